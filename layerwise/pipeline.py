"""End-to-end jobs the CLI and the benchmarks share: compress to a checkpoint, measure perplexity."""

from __future__ import annotations

import logging
import platform
import shutil
import time
from pathlib import Path

import torch

from layerwise.calib_data import calibration_windows, load_text, tokenize_text

from .checkpoint import CheckpointWriter
from .distributed import SINGLE, Ranks, opened_on_main
from .engine import CompressionResult, LayerwiseCompressor
from .evaluate import perplexity
from .dtypes import checkpoint_plain_dtype
from .loading import check_finite, check_length, load_model, load_tokenizer, open_for_compress
from .memory import check_fits
from .outputs import check_output
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
    lazy: bool | None = None,
    resume: bool = False,
    offload_activations: bool = False,
    trust_remote_code: bool = False,
    allow_non_finite: bool = False,
    allow_long_context: bool = False,
    inputs: tuple = (),
    ranks: Ranks = SINGLE,
    manifest_extra: dict | None = None,
    fast_matmul: bool = True,
) -> tuple[Path, CompressionResult]:
    """Load, calibrate, compress block by block and write a checkpoint. Returns (path, result).

    `model`, `tokenizer` and `windows` may be passed in to skip loading (benchmarks reuse them).
    lazy: read each block's weights from the safetensors files when it is reached (None: whenever
    `model_path` is a safetensors checkpoint and no `model` is passed). resume: continue an
    interrupted run with the same arguments after its last complete block. offload_activations:
    keep the calibration activations memory-mapped on disk next to the output. ranks: this process's
    place under torch.distributed (`distributed.from_environment`); rank 0 alone writes.
    Everything that can be checked is checked before the output directory is created.
    inputs: further paths the run reads (a recipe file); --out may not touch them, the model or the text.
    allow_non_finite: NaN/Inf weights are accepted in layers the recipe leaves alone.
    fast_matmul: float32 products through bfloat16 units where the device keeps float32 accuracy
    (`matmul_precision`); False: plain float32 products.
    """
    inputs = (model_path, calib, *inputs)
    out_dir = check_output(out_dir, overwrite, inputs)
    blocks = None
    if model is None:
        model, blocks, model_path_local = open_for_compress(model_path, lazy, trust_remote_code, allow_non_finite)
    else:
        model_path_local = model_path
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path_local, trust_remote_code)
    suffix = f"-rank{ranks.rank}" if ranks.world > 1 else ""
    offload_dir = out_dir.parent / f".{out_dir.name}.activations{suffix}" if offload_activations else None
    compressor = LayerwiseCompressor(model, recipe, device=device, batch_size=batch_size, staged=staged,
                                     lazy=blocks, offload_dir=offload_dir, ranks=ranks, fast_matmul=fast_matmul)
    if allow_non_finite:  # the layers the recipe compresses must still be finite
        planned = {f"{name}.weight" for name in compressor.plan}
        check_finite(model.named_parameters(), model_path, only=planned)
        if blocks is not None:
            blocks.finite_names = planned
    if compressor.needs_data:
        check_length(model.config, seqlen if windows is None else windows.shape[1], "--seqlen", allow_long_context)
        if not offload_activations:  # the cached block inputs and outputs, float32, kept in memory between blocks
            check_fits(2 * 4 * nsamples * seqlen * model.config.hidden_size, f"--nsamples {nsamples} x --seqlen {seqlen}",
                       "lower --nsamples or --seqlen, or pass --offload-activations")
    if not compressor.needs_data:
        log.info("every method in the recipe is data-free: the calibration text is not read")
        windows, calib_info = None, {"source": None, "data_free": True}
    elif windows is None:
        windows, calib_info = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    else:
        calib_info = {"source": calib, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": seed}
    plain_dtype = checkpoint_plain_dtype(next(model.parameters()).dtype)
    # what decides the bytes of the checkpoint: a resumed run must repeat them exactly
    run_args = {"source_model": str(model_path), "recipe": recipe.to_dict(), "calibration": calib_info, "seed": seed,
                "staged": staged, "batch_size": batch_size, "device": str(compressor.device),
                "matmul": "bfloat16-units" if compressor.fast_matmul else "float32"}
    try:
        with opened_on_main(ranks, lambda: CheckpointWriter(out_dir, overwrite=overwrite, plain_dtype=plain_dtype,
                                                            resume=resume, run_args=run_args,
                                                            inputs=inputs)) as writer:
            result = compressor.compress(windows, writer=writer)
            if not ranks.main:
                return out_dir, result
            writer.write_rest(_outside_tensors(model, compressor))
            manifest = {
                "source_model": str(model_path),
                "family": compressor.family.name,
                "recipe": recipe.to_dict(),
                "calibration": calib_info,
                "seed": seed,
                "staged": staged,
                "device": str(compressor.device),
                "matmul": run_args["matmul"],
                "compression_seconds": result.seconds,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": versions(),
                "layers": {},  # filled by the writer with every block's layers, also those of a resumed run
                "left_uncompressed": result.left_out,  # block weights kept in float16, by reason
                **(manifest_extra or {}),
            }
            path = writer.commit(model.config, tokenizer, manifest)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    log.info("wrote %s (%d layers compressed in %.1f s)", path, len(writer.reports), result.seconds)
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


def evaluate_perplexity(model_or_path, data: str, seqlen: int = 256, batch_size: int = 8, device: str = "cpu",
                        dtype: str = "float32", tokenizer=None, token_ids: torch.Tensor | None = None,
                        trust_remote_code: bool = False, verify: bool = True, allow_long_context: bool = False) -> dict:
    """Perplexity of a HF model, a checkpoint directory, or an in-memory model on `data`."""
    if isinstance(model_or_path, (str, Path)):
        model = load_model(str(model_or_path), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           verify=verify)
        tokenizer = tokenizer or load_tokenizer(str(model_or_path), trust_remote_code=trust_remote_code)
    else:
        model = model_or_path
    check_length(model.config, seqlen, "--seqlen", allow_long_context)
    if token_ids is None:
        token_ids = tokenize_text(tokenizer, load_text(data, "evaluation"))
    return perplexity(model, token_ids, seqlen=seqlen, batch_size=batch_size, device=device)
