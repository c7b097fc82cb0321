"""Compressed checkpoints: safetensors shards (one per block) + JSON manifest + HF config/tokenizer.

Layout of a checkpoint directory::

    config.json, tokenizer files      as Hugging Face writes them
    layerwise.json                    manifest: format, recipe, per-layer meta + report, calibration, versions
    block-00000.safetensors …         one shard per decoder block (packed codes, scales, LUTs, masks,
                                      plus the block's plain tensors: norms, biases)
    rest.safetensors                  everything outside the blocks (embeddings, final norm, lm_head)

A compressed layer `L` is stored as tensors `L.weight.<part>` (part: codes, scale, zero_point, lut,
lut_codes, lut_scale, values, mask; a symmetric grid has no zero_point). Everything is written
under a hidden temporary name next to the target and renamed when complete, so a crash never
leaves a directory that looks whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelError
from .formats import CompressedWeight
from .linears import to_module_layout

log = logging.getLogger(__name__)

MANIFEST = "layerwise.json"
FORMAT = "layerwise-checkpoint/1"


class CheckpointWriter:
    """Writes a checkpoint shard by shard; use as a context manager (`commit()` renames at the end)."""

    def __init__(self, out_dir: str | Path, overwrite: bool = False, plain_dtype: torch.dtype = torch.float16):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise ModelError(f"output {self.out_dir} already exists; choose another --out or pass --overwrite")
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        self.plain_dtype = plain_dtype
        self.layers: dict[str, dict] = {}
        self.overwrite = overwrite

    def __enter__(self):
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False

    def write_block(self, index: int, compressed: dict[str, CompressedWeight], plain: dict[str, torch.Tensor]) -> None:
        tensors = {name: self._plain(t) for name, t in plain.items()}
        for name, cw in compressed.items():
            self.layers[name] = {"shard": f"block-{index:05d}.safetensors", **cw.meta()}
            for part, t in cw.to_tensors().items():
                tensors[f"{name}.weight.{part}"] = t
        save_file(tensors, self.tmp_dir / f"block-{index:05d}.safetensors", metadata={"format": "pt"})

    def write_rest(self, plain: dict[str, torch.Tensor]) -> None:
        tensors = {name: self._plain(t) for name, t in plain.items()}
        save_file(tensors, self.tmp_dir / "rest.safetensors", metadata={"format": "pt"})

    def commit(self, config, tokenizer, manifest: dict) -> Path:
        """Write config, tokenizer and manifest, then atomically move the directory into place."""
        config.save_pretrained(self.tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp_dir)
        manifest = {"format": FORMAT, **manifest}
        layers = manifest.setdefault("layers", {})
        for name, meta in self.layers.items():
            layers.setdefault(name, {}).update(meta)
        (self.tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        return _replace_dir(self.tmp_dir, self.out_dir)

    def _plain(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(self.plain_dtype)
        return t.contiguous()


def _replace_dir(tmp: Path, target: Path) -> Path:
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not is_checkpoint(path):
        raise ModelError(f"{path} is not a layerwise checkpoint (no {MANIFEST}); compress a model first")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, CompressedWeight]]:
    """All plain tensors and every compressed layer of a checkpoint."""
    path = Path(path)
    manifest = read_manifest(path)
    plain: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                layer, sep, part = key.rpartition(".weight.")
                if sep and layer in manifest["layers"]:
                    parts.setdefault(layer, {})[part] = f.get_tensor(key)
                else:
                    plain[key] = f.get_tensor(key)
    compressed = {name: CompressedWeight.from_tensors(manifest["layers"][name], parts[name]) for name in parts}
    missing = set(manifest["layers"]) - set(compressed)
    if missing:
        raise ModelError(f"{path}: checkpoint is incomplete, no tensors for {sorted(missing)[:3]}")
    return plain, compressed


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A transformers model whose dense weights equal the checkpoint's dequantized codes.

    The compressed form stays attached as `model.layerwise_compressed` (name → CompressedWeight) and
    the manifest as `model.layerwise_manifest`, for export.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = read_manifest(path)
    plain, compressed = read_tensors(path)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    state = dict(plain)
    for name, cw in compressed.items():
        state[f"{name}.weight"] = to_module_layout(model.get_submodule(name), cw.dequantize())  # Conv1D: [in, out]
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


def decompress(path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a plain float16 Hugging Face checkpoint holding exactly the dequantized values."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"output {out_dir} already exists; choose another --out or pass --overwrite")
    model = load_compressed(path, dtype=torch.float16)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.config.dtype = torch.float16
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
        except (OSError, ValueError):
            log.warning("no tokenizer in %s; the decompressed checkpoint has none either", path)
        return _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
