"""End-to-end jobs the CLI and the benchmarks share: compress to a checkpoint, measure perplexity."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from layerwise.calib_data import calibration_windows, load_text, tokenize_text

from .checkpoint import CheckpointWriter
from .engine import CompressionResult, LayerwiseCompressor
from .evaluate import perplexity
from .loading import load_model, load_tokenizer
from .recipe import Recipe

log = logging.getLogger(__name__)


def versions() -> dict:
    """Installed versions, read from package metadata (importing coremltools on Linux is noisy)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("layerwise", "torch", "transformers", "coremltools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def compress_to_checkpoint(
    model_path: str,
    out_dir: str | Path,
    recipe: Recipe,
    calib: str,
    nsamples: int = 128,
    seqlen: int = 256,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 8,
    staged: bool = True,
    overwrite: bool = False,
    model=None,
    tokenizer=None,
    windows: torch.Tensor | None = None,
    manifest_extra: dict | None = None,
) -> tuple[Path, CompressionResult]:
    """Load, calibrate, compress block by block and write a checkpoint. Returns (path, result).

    `model`, `tokenizer` and `windows` may be passed in to skip loading (benchmarks reuse them).
    Everything that can be checked is checked before the output directory is created.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        from .errors import ModelError

        raise ModelError(f"output {out_dir} already exists; choose another --out or pass --overwrite")
    model = model if model is not None else load_model(model_path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
    compressor = LayerwiseCompressor(model, recipe, device=device, batch_size=batch_size, staged=staged)
    if not compressor.needs_data:
        log.info("every method in the recipe is data-free: the calibration text is not read")
        windows, calib_info = None, {"source": None, "data_free": True}
    elif windows is None:
        windows, calib_info = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    else:
        calib_info = {"source": calib, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": seed}
    stored_dtype = next(model.parameters()).dtype
    plain_dtype = torch.float16 if stored_dtype == torch.float32 else stored_dtype
    with CheckpointWriter(out_dir, overwrite=overwrite, plain_dtype=plain_dtype) as writer:
        result = compressor.compress(windows, writer=writer)
        writer.write_rest(_outside_tensors(model, compressor))
        manifest = {
            "source_model": str(model_path),
            "family": compressor.family.name,
            "recipe": recipe.to_dict(),
            "calibration": calib_info,
            "seed": seed,
            "staged": staged,
            "device": str(compressor.device),
            "compression_seconds": result.seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "layers": {r.name: {"report": _report_dict(r)} for r in result.layers},
            **(manifest_extra or {}),
        }
        path = writer.commit(model.config, tokenizer, manifest)
    log.info("wrote %s (%d layers compressed in %.1f s)", path, len(result.layers), result.seconds)
    return path, result


def _outside_tensors(model, compressor) -> dict[str, torch.Tensor]:
    """State outside the blocks, each storage once (tied embeddings), minus a compressed lm_head."""
    prefix = compressor.family.blocks + "."
    skip = {f"{compressor.family.lm_head}.weight"} if compressor.family.lm_head in compressor.plan else set()
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix) or name in skip:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _report_dict(r) -> dict:
    return {
        "method": r.method,
        "rel_error": r.rel_error,
        "error_space": r.error_space,
        "seconds": r.seconds,
        "bits_per_weight": r.bits_per_weight,
        "damping": r.damping,
        "sparsity": r.sparsity,
        "notes": r.notes,
    }


def evaluate_perplexity(model_or_path, data: str, seqlen: int = 256, batch_size: int = 8, device: str = "cpu",
                        dtype: str = "float32", tokenizer=None, token_ids: torch.Tensor | None = None) -> dict:
    """Perplexity of a HF model, a checkpoint directory, or an in-memory model on `data`."""
    if isinstance(model_or_path, (str, Path)):
        model = load_model(str(model_or_path), dtype=dtype, device=device)
        tokenizer = tokenizer or load_tokenizer(str(model_or_path))
    else:
        model = model_or_path
    if token_ids is None:
        token_ids = tokenize_text(tokenizer, load_text(data, "evaluation"))
    return perplexity(model, token_ids, seqlen=seqlen, batch_size=batch_size, device=device)
