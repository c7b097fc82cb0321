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
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, Interrupted, LayerwiseError, ModelError, RecipeError
from .fingerprint import check_same_inputs
from .formats import CompressedWeight
from .linears import to_module_layout
from .manifest import FORMAT, PARTS, check_parts, sha256_file, validate_manifest
from .memory import placeholder
from .outputs import atomic_directory, check_output, environment_failure, os_errors, publish, remove, remove_stale
from .run_lock import OWNER, RunLock, check_unlocked
from .run_record import REST, kept_blocks, shard_entry
from .spill import Spill

log = logging.getLogger(__name__)

MANIFEST = "layerwise.json"


RUN = ".layerwise-run.json"  # inside the temporary output only: arguments, inputs, every finished block and shard


class CheckpointWriter:
    """Writes a checkpoint shard by shard; use as a context manager (`commit()` renames at the end).

    The temporary output `.NAME.partial` next to `out_dir` is the unit of progress: a block shard
    appears there only once complete (written under a temporary name, then renamed), and `RUN`
    records the run's arguments, its inputs' fingerprint (`fingerprint.Inputs`), each finished
    block's layers and each shard's sha256. A crash, kill or Ctrl-C leaves it in place;
    `resume=True` continues after its last block shard that is still as recorded when the arguments
    and inputs are the same (`run_record.kept_blocks`). While the writer is open, its owner file
    (`run_lock`) keeps every other run off the same output.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool = False, plain_dtype: torch.dtype = torch.float16,
                 resume: bool = False, run_args: dict | None = None, inputs=None):
        """out_dir: a path `outputs.check_output` accepted (`CompressJob.validate` checks it once).
        inputs: the run's `fingerprint.Inputs` (None: not recorded, not compared)."""
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial"
        self.plain_dtype = plain_dtype
        self.layers: dict[str, dict] = {}  # name → shard and CompressedWeight meta
        self.reports: dict[str, dict] = {}  # name → per-layer report, in block order
        self.blocks: list[int] = []  # indices of the complete shards, in order
        self.overwrite = overwrite
        self.resume = resume
        self.run_args = json.loads(json.dumps(run_args or {}))  # as it reads back from JSON
        self.inputs = inputs
        self.shards: dict[str, dict] = {}  # shard file → {"sha256", "size"} as renamed into place
        self.lock = RunLock(self.out_dir)

    def __enter__(self):
        with os_errors(self.out_dir):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(self.out_dir)
            created = not self.tmp_dir.exists()
            try:
                self._start()
            except BaseException:  # a refusal, or a signal before the first block: nothing to keep
                fresh = not self.resume and (self.lock.held or created)
                self._end()
                if fresh:
                    shutil.rmtree(self.tmp_dir, ignore_errors=True)
                raise
        return self

    def check_start(self) -> None:
        """Raise now what `__enter__` would about an unfinished run (callers with long work before it)."""
        check_unlocked(self.out_dir)
        if self.resume and not self.tmp_dir.exists():
            raise ModelError(f"--resume: there is no unfinished run for {self.out_dir} (no {self.tmp_dir.name}); "
                             "run without --resume")
        if not self.resume and self.tmp_dir.exists() and not self.overwrite and (self.tmp_dir / RUN).is_file():
            done = len(json.loads((self.tmp_dir / RUN).read_text()).get("blocks", []))
            raise ModelError(f"{self.tmp_dir} holds an unfinished run ({done} blocks written); add --resume to continue "
                             "it, or --overwrite to start over")

    def _start(self) -> None:
        self.check_start()
        self.lock.acquire()
        if self.resume:
            self._load_progress()
        else:
            for path in self.tmp_dir.iterdir():  # an earlier run's leftovers (--overwrite), not the owner file
                if path.name != OWNER:
                    remove(path)
            self._save_progress()

    def _end(self) -> None:
        self.lock.release()
        if self.inputs is not None:
            self.inputs.stop()

    def __exit__(self, exc_type, exc, tb):
        self._end()
        if exc_type is None:
            return False
        left = None
        if not self.blocks:  # nothing worth resuming
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        else:
            left = (f"{len(self.blocks)} complete block shards kept in {self.tmp_dir}; run the same command with "
                    "--resume to continue after them")
        # the CLI prints one line: the problem, then what is left and how to resume
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(*exc.args, left=left) from None
        failure = environment_failure(exc, self.out_dir) or exc
        if isinstance(failure, LayerwiseError):
            raise type(failure)(f"{failure}; {left}" if left else str(failure)) from None
        if left:
            log.warning("stopped: %s", left)
        return False

    @property
    def blocks_done(self) -> int:
        """How many shards from block 0 on are complete (the engine starts after them)."""
        n = 0
        while n in self.blocks:
            n += 1
        return n

    def write_block(self, index: int, compressed: dict[str, CompressedWeight], plain: dict[str, torch.Tensor],
                    reports: dict[str, dict] | None = None) -> None:
        """Write shard `index` (complete or not at all), then record it as done."""
        shard = f"block-{index:05d}.safetensors"
        tensors = {name: self._plain(t) for name, t in plain.items()}
        layers = {}
        for name, cw in compressed.items():
            if cw.bits_per_weight() > 16:
                raise RecipeError(f"{name}: the recipe's method stores {cw.bits_per_weight():.2f} bits per weight, more "
                                  "than the float16 layer; choose fewer bits, more sparsity or leave the layer alone")
            layers[name] = {"shard": shard, **cw.meta()}
            for part, t in cw.to_tensors().items():
                tensors[f"{name}.weight.{part}"] = t
        _save_atomic(tensors, self.tmp_dir / shard)
        self.shards[shard] = shard_entry(self.tmp_dir / shard)
        self.layers.update(layers)
        self.reports.update(reports or {})
        self.blocks.append(index)
        self._save_progress()

    def read_block(self, index: int) -> dict[str, CompressedWeight]:
        """The compressed layers of a complete shard (a resumed run streams through them)."""
        shard = f"block-{index:05d}.safetensors"
        names = [name for name, meta in self.layers.items() if meta["shard"] == shard]
        parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
        with safe_open(self.tmp_dir / shard, framework="pt") as f:
            for key in f.keys():
                layer, sep, part = key.rpartition(".weight.")
                if sep and layer in parts:
                    parts[layer][part] = f.get_tensor(key)
        return {name: CompressedWeight.from_tensors(self.layers[name], parts[name]) for name in names}

    def write_rest(self, plain: dict[str, torch.Tensor], compressed: dict[str, CompressedWeight] | None = None,
                   reports: dict[str, dict] | None = None) -> None:
        """rest.safetensors: the plain tensors outside the blocks, and the compressed layers outside
        them (the token embedding) with their manifest entries."""
        tensors = {name: self._plain(t) for name, t in plain.items()}
        for name, cw in (compressed or {}).items():
            self.layers[name] = {"shard": REST, **cw.meta()}
            tensors.update({f"{name}.weight.{part}": t for part, t in cw.to_tensors().items()})
        self.reports.update(reports or {})
        _save_atomic(tensors, self.tmp_dir / REST)
        self.shards[REST] = shard_entry(self.tmp_dir / REST)
        self._save_progress()

    def commit(self, config, tokenizer, manifest: dict) -> Path:
        """Write config, tokenizer and manifest (with each shard's sha256), then move the directory into place."""
        config.save_pretrained(self.tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp_dir)
        manifest = {"format": FORMAT, **manifest}
        layers = manifest.setdefault("layers", {})
        for name, report in self.reports.items():
            layers.setdefault(name, {})["report"] = report
        for name, meta in self.layers.items():
            layers.setdefault(name, {}).update(meta)
        manifest["shards"] = {p.name: sha256_file(p) for p in sorted(self.tmp_dir.glob("*.safetensors"))}
        (self.tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        (self.tmp_dir / RUN).unlink(missing_ok=True)
        self._end()  # the owner file is not part of the checkpoint
        return publish(self.tmp_dir, self.out_dir, "checkpoint")

    def _save_progress(self) -> None:
        progress = {"arguments": self.run_args, "inputs": self.inputs.record() if self.inputs is not None else None,
                    "blocks": self.blocks, "shards": self.shards, "layers": self.layers, "reports": self.reports}
        tmp = self.tmp_dir / f"{RUN}.tmp"
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, self.tmp_dir / RUN)

    def _load_progress(self) -> None:
        """Trust only the shards `RUN` lists that are on disk as recorded; refuse other arguments or
        inputs by name."""
        try:
            progress = json.loads((self.tmp_dir / RUN).read_text())
        except (OSError, ValueError):
            raise ModelError(f"--resume: {self.tmp_dir} has no readable {RUN}; pass --overwrite to start over") from None
        before, now = _flat(progress.get("arguments", {})), _flat(self.run_args)
        changed = [f"{key} was {before.get(key)!r} in the unfinished run and is {now.get(key)!r} now"
                   for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
        if changed:  # every difference, so one rerun fixes them all
            raise ModelError(f"--resume: {'; '.join(changed)}; rerun with the same arguments, or pass --overwrite "
                             "to start over")
        if self.inputs is not None:
            check_same_inputs(progress.get("inputs"), self.inputs.record(wait=True))
        self.blocks, self.shards = kept_blocks(self.tmp_dir, progress)
        self.layers = {n: m for n, m in progress["layers"].items() if m["shard"] in self.shards}
        self.reports = {n: r for n, r in progress["reports"].items() if n in self.layers}
        for stray in self.tmp_dir.glob(".*.tmp-*"):  # a shard that was being written when the run died
            stray.unlink()
        log.info("resuming %s: %d complete block shards kept", self.out_dir, len(self.blocks))

    def _plain(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(self.plain_dtype)
        return t.contiguous()


def _flat(d: dict, prefix: str = "") -> dict:
    """{"calibration": {"seed": 0}} → {"calibration.seed": 0}, so a difference is named to the leaf."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file under a hidden temporary name, renamed once complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


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


def read_tensors(path: str | Path, verify: bool = True,
                 spill: Spill | None = None) -> tuple[dict[str, torch.Tensor], dict[str, CompressedWeight]]:
    """All plain tensors and every compressed layer of a checkpoint, each checked against the manifest.

    verify: compare each shard's sha256 with the manifest's (False skips it, for speed).
    spill: each layer's codes, mask and values move there as soon as the layer is decoded (export),
        so that those of one block at most are resident while loading.
    """
    path = Path(path)
    manifest = read_manifest(path)
    layers = manifest["layers"]
    plain: dict[str, torch.Tensor] = {}
    compressed: dict[str, CompressedWeight] = {}
    for shard in checked_shards(path, manifest, verify):
        parts: dict[str, dict[str, torch.Tensor]] = {}
        shard_plain: dict[str, torch.Tensor] = {}
        for key, tensor in _read_shard(shard).items():
            layer, sep, part = key.rpartition(".weight.")
            if sep and part in PARTS:
                if layer not in layers:
                    raise CheckpointError(f"{shard}: tensor {key} belongs to no layer of {MANIFEST}; the checkpoint is damaged")
                if layers[layer]["shard"] != shard.name:
                    raise CheckpointError(f"{shard}: tensor {key} should be in {layers[layer]['shard']} per {MANIFEST}")
                parts.setdefault(layer, {})[part] = tensor
            else:
                shard_plain[key] = tensor
        # a shard's tensors view its memory-mapped file: beside packed codes, keep copies (norms,
        # biases), so the mapping, with every page of codes read while unpacking, goes with the shard
        plain.update({k: v.clone() for k, v in shard_plain.items()} if parts else shard_plain)
        for name in list(parts):  # a layer lives in one shard: decode it now, drop its packed parts
            compressed[name] = _decode_layer(name, layers[name], parts.pop(name), path)
            if spill is not None:
                _park_layer(compressed[name], spill)
    missing = set(layers) - set(compressed)
    if missing:
        raise CheckpointError(f"{path}: checkpoint is incomplete, no tensors for {sorted(missing)[:3]}")
    return plain, compressed


def _park_layer(cw: CompressedWeight, spill: Spill) -> None:
    """Move `cw`'s [out, in] tensors (one byte or two per weight) into `spill`."""
    for field in ("codes", "mask", "values"):
        if getattr(cw, field) is not None:
            setattr(cw, field, spill.hold(getattr(cw, field)))


def _decode_layer(name: str, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> CompressedWeight:
    check_parts(name, meta, tensors, path)
    try:
        cw = CompressedWeight.from_tensors(meta, tensors)
    except (ValueError, RuntimeError) as e:  # e.g. codes beyond `bits`, a mask that disagrees with `kept`
        raise CheckpointError(f"{path}: layer {name} does not decode ({_first_line(e)}); the checkpoint is damaged") from None
    if cw.kept != meta["kept"]:
        raise CheckpointError(f"{path}: layer {name} keeps {cw.kept} weights, the manifest says {meta['kept']}")
    # copies of the tensors kept as read (scales, LUTs): views would keep the shard's mapping alive
    for field in ("scale", "lut", "lut_codes", "lut_scale", "values"):
        if getattr(cw, field) is not None:
            setattr(cw, field, getattr(cw, field).clone())
    return cw


def checked_shards(path: Path, manifest: dict, verify: bool) -> list[Path]:
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


@dataclass
class LoadedCheckpoint:
    """A model as loaded, with what its checkpoint says beyond the dense weights (what export reads).

    A plain Hugging Face model loads as the same value with no compressed layers and no manifest.
    """

    model: torch.nn.Module
    compressed: dict[str, CompressedWeight] = field(default_factory=dict)  # HF module name → its weight
    manifest: dict | None = None  # the validated layerwise.json; None for a plain model
    spill: Spill | None = None  # where the compressed layers' codes, masks and values are parked, if anywhere


def load_compressed(path: str | Path, dtype: torch.dtype | None = torch.float32, device: str = "cpu", verify: bool = True,
                    trust_remote_code: bool = False, dense: bool = True, spill: Spill | None = None) -> LoadedCheckpoint:
    """The checkpoint as a transformers model whose dense weights equal the dequantized codes, with
    its CompressedWeights and manifest.

    dtype: of the floating tensors (None: as stored). dense=False: each compressed layer's weight is a
    placeholder of its shape (`memory.placeholder`, no memory) and only the CompressedWeight holds it —
    for export, which never needs the dense values. spill: see `read_tensors`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = read_manifest(path)
    plain, compressed = read_tensors(path, verify, spill)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: its config.json cannot be read ({_first_line(e)}); the checkpoint is damaged, "
                              "compress again") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    state = dict(plain)
    for name, cw in compressed.items():
        module = model.get_submodule(name)
        if dense:
            state[f"{name}.weight"] = to_module_layout(module, cw.dequantize())  # Conv1D: [in, out]
        else:
            state[f"{name}.weight"] = placeholder(module.weight.shape, dtype or torch.float16)
    if dtype is not None:
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
    return LoadedCheckpoint(model, compressed, manifest, spill)


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def decompress(path: str | Path, out_dir: str | Path, overwrite: bool = False, verify: bool = True,
               trust_remote_code: bool = False) -> Path:
    """Write a plain float16 Hugging Face checkpoint holding exactly the dequantized values."""
    from transformers import AutoTokenizer

    check_output(out_dir, overwrite, inputs=(path,))
    model = load_compressed(path, dtype=torch.float16, verify=verify, trust_remote_code=trust_remote_code).model
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
