"""Compressed checkpoints: safetensors shards (one per block) + JSON manifest + HF config/tokenizer.

Layout of a checkpoint directory::

    config.json, tokenizer files      as Hugging Face writes them
    layerwise.json                    manifest: format, recipe, per-layer meta + report, calibration, versions,
                                      and each shard's sha256 (`shards`)
    block-00000.safetensors …         one shard per decoder block (packed codes, scales, LUTs, masks,
                                      plus the block's plain tensors: norms, biases); a compressed
                                      lm_head gets the next block number
    rest.safetensors                  everything else outside the blocks (embeddings, final norm, lm_head)
    .layerwise-output                 marker: written by layerwise (see outputs.py)

A compressed layer `L` is stored as tensors `L.weight.<part>` (part: codes, scale, zero_point, lut,
lut_codes, lut_scale, values, mask; a symmetric grid has no zero_point). Everything is written
under a hidden temporary name next to the target and renamed when complete, so a crash never
leaves a directory that looks whole. Reading checks the manifest and every tensor against it
(manifest.py) before decoding anything.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ModelError, RecipeError
from .formats import CompressedWeight
from .manifest import FORMAT, PARTS, check_parts, sha256_file, validate_manifest
from .outputs import atomic_directory, check_output, environment_failure, os_errors, publish, remove_stale, temporary_path

log = logging.getLogger(__name__)

MANIFEST = "layerwise.json"


class CheckpointWriter:
    """Writes a checkpoint shard by shard; use as a context manager (`commit()` renames at the end).

    inputs: the paths the run reads; the output may not be, contain or lie inside any of them.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool = False, plain_dtype: torch.dtype = torch.float16,
                 inputs: tuple = ()):
        self.out_dir = check_output(out_dir, overwrite, inputs)
        self.tmp_dir = temporary_path(self.out_dir)
        self.plain_dtype = plain_dtype
        self.layers: dict[str, dict] = {}
        self.overwrite = overwrite

    def __enter__(self):
        with os_errors(self.out_dir):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(self.out_dir)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            failure = environment_failure(exc, self.out_dir)
            if failure is not None:  # disk full, read-only, …: one line instead of a traceback
                raise failure from None
        return False

    def write_block(self, index: int, compressed: dict[str, CompressedWeight], plain: dict[str, torch.Tensor]) -> None:
        tensors = {name: self._plain(t) for name, t in plain.items()}
        for name, cw in compressed.items():
            if cw.bits_per_weight() > 16:
                raise RecipeError(f"{name}: the recipe's method stores {cw.bits_per_weight():.2f} bits per weight, more "
                                  "than the float16 layer; choose fewer bits, more sparsity or leave the layer alone")
            self.layers[name] = {"shard": f"block-{index:05d}.safetensors", **cw.meta()}
            for part, t in cw.to_tensors().items():
                tensors[f"{name}.weight.{part}"] = t
        save_shard(tensors, self.tmp_dir / f"block-{index:05d}.safetensors")

    def write_rest(self, plain: dict[str, torch.Tensor]) -> None:
        tensors = {name: self._plain(t) for name, t in plain.items()}
        save_shard(tensors, self.tmp_dir / "rest.safetensors")

    def commit(self, config, tokenizer, manifest: dict) -> Path:
        """Write config, tokenizer and manifest (with each shard's sha256), then move the directory into place."""
        config.save_pretrained(self.tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp_dir)
        manifest = {"format": FORMAT, **manifest}
        layers = manifest.setdefault("layers", {})
        for name, meta in self.layers.items():
            layers.setdefault(name, {}).update(meta)
        manifest["shards"] = {p.name: sha256_file(p) for p in sorted(self.tmp_dir.glob("*.safetensors"))}
        (self.tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        return publish(self.tmp_dir, self.out_dir, "checkpoint")

    def _plain(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(self.plain_dtype)
        return t.contiguous()


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    """The validated manifest (CheckpointError names the first bad field)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ModelError(f"{path} is not a layerwise checkpoint (no {MANIFEST}); compress a model first")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is not valid JSON ({e}); the checkpoint is damaged, compress again") from None
    return validate_manifest(manifest, path)


def read_tensors(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, CompressedWeight]]:
    """All plain tensors and every compressed layer of a checkpoint, each checked against the manifest.

    verify: compare each shard's sha256 with the manifest's (False skips it, for speed).
    """
    path = Path(path)
    manifest = read_manifest(path)
    layers = manifest["layers"]
    plain: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for shard in _shards(path, manifest, verify):
        for key, tensor in _read_shard(shard).items():
            layer, sep, part = key.rpartition(".weight.")
            if sep and part in PARTS:
                if layer not in layers:
                    raise CheckpointError(f"{shard}: tensor {key} belongs to no layer of {MANIFEST}; the checkpoint is damaged")
                if layers[layer]["shard"] != shard.name:
                    raise CheckpointError(f"{shard}: tensor {key} should be in {layers[layer]['shard']} per {MANIFEST}")
                parts.setdefault(layer, {})[part] = tensor
            else:
                plain[key] = tensor
    missing = set(layers) - set(parts)
    if missing:
        raise CheckpointError(f"{path}: checkpoint is incomplete, no tensors for {sorted(missing)[:3]}")
    compressed = {}
    for name, tensors in parts.items():
        check_parts(name, layers[name], tensors, path)
        try:
            compressed[name] = CompressedWeight.from_tensors(layers[name], tensors)
        except (ValueError, RuntimeError) as e:  # e.g. codes beyond `bits`, a mask that disagrees with `kept`
            raise CheckpointError(f"{path}: layer {name} does not decode ({_first_line(e)}); the checkpoint is damaged") from None
        if compressed[name].kept != layers[name]["kept"]:
            raise CheckpointError(f"{path}: layer {name} keeps {compressed[name].kept} weights, the manifest says {layers[name]['kept']}")
    return plain, compressed


def _shards(path: Path, manifest: dict, verify: bool) -> list[Path]:
    """The shard files, sha256-checked against the manifest unless `verify` is False."""
    recorded = manifest.get("shards")
    if recorded is None:  # written before shards were hashed
        log.warning("%s records no shard checksums; its tensors are checked against the manifest only", path)
        return sorted(path.glob("*.safetensors"))
    on_disk = {p.name for p in path.glob("*.safetensors")}
    if on_disk != set(recorded):
        raise CheckpointError(
            f"{path}: shards {sorted(on_disk ^ set(recorded))[:3]} are on disk or in {MANIFEST} but not both; "
            "the checkpoint is incomplete or mixed with another one, compress again"
        )
    shards = [path / name for name in sorted(recorded)]
    if verify:
        for shard in shards:
            if sha256_file(shard) != recorded[shard.name]:
                raise CheckpointError(
                    f"{shard}: sha256 differs from the one in {MANIFEST}; the file was changed or damaged "
                    "(compress again, or pass --no-verify to skip the check)"
                )
    return shards


def _read_shard(shard: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(shard, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{shard} is not a readable safetensors file ({_first_line(e)}); the checkpoint is damaged") from None


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", verify: bool = True,
                    trust_remote_code: bool = False):
    """A transformers model whose dense weights equal the checkpoint's dequantized codes.

    The compressed form stays attached as `model.layerwise_compressed` (name → CompressedWeight) and
    the manifest as `model.layerwise_manifest`, for export.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = read_manifest(path)
    plain, compressed = read_tensors(path, verify)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: its config.json cannot be read ({_first_line(e)}); the checkpoint is damaged, "
                              "compress again") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    state = dict(plain)
    for name, cw in compressed.items():
        state[f"{name}.weight"] = cw.dequantize()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in result.missing_keys if _is_tied(model, k)}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ModelError(
            f"{path}: checkpoint does not match its config (missing {sorted(set(result.missing_keys) - tied)[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    model.tie_weights()
    model.to(device=device)
    model.eval()
    model.layerwise_compressed = compressed
    model.layerwise_manifest = manifest
    return model


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def decompress(path: str | Path, out_dir: str | Path, overwrite: bool = False, verify: bool = True,
               trust_remote_code: bool = False) -> Path:
    """Write a plain float16 Hugging Face checkpoint holding exactly the dequantized values."""
    from transformers import AutoTokenizer

    check_output(out_dir, overwrite, inputs=(path,))
    model = load_compressed(path, dtype=torch.float16, verify=verify, trust_remote_code=trust_remote_code)
    with atomic_directory(out_dir, "decompressed", overwrite, inputs=(path,)) as tmp:
        model.config.dtype = torch.float16
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        except (OSError, ValueError):
            log.warning("no tokenizer in %s; the decompressed checkpoint has none either", path)
    return Path(out_dir)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
