"""End-to-end jobs the CLI and the benchmarks share: compress to a checkpoint, measure perplexity."""

from __future__ import annotations

import logging
import platform
import shutil
import time
from pathlib import Path

import torch

from layerwise.calib_data import bos_token_id, calibration_windows, load_text, tokenize_text

from .checkpoint import CheckpointWriter
from .distributed import opened_on_main
from .engine import CompressionResult, LayerwiseCompressor
from .evaluate import perplexity
from .float_stream import bytes_per_token as float_stream_bytes
from .float_targets import is_float
from .dtypes import checkpoint_plain_dtype
from .fingerprint import Inputs
from .loading import check_finite, check_length, load_model, load_tokenizer, open_for_compress
from .memory import check_fits, trim_heap
from .job import CompressJob

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


def compress_to_checkpoint(job: CompressJob, model=None, tokenizer=None, windows: torch.Tensor | None = None,
                           manifest_extra: dict | None = None) -> tuple[Path, CompressionResult]:
    """Load, calibrate, compress block by block and write a checkpoint. Returns (path, result).

    The job is validated first (once: `CompressJob.validate`), so everything that can be checked
    is checked before the output directory is created. `model`, `tokenizer` and `windows` may be
    passed in to skip loading (benchmarks and the budget reuse them). job.lazy: read each block's
    weights from the safetensors files when it is reached (None: whenever the model is a
    safetensors checkpoint and no `model` is passed). job.resume: continue an interrupted run with
    the same arguments after its last complete block. job.offload_activations: keep the calibration
    activations memory-mapped on disk next to the output. job.ranks: this process's place under
    torch.distributed (`distributed.from_environment`); rank 0 alone writes. job.allow_non_finite:
    NaN/Inf weights are accepted in layers the recipe leaves alone. job.fast_matmul: float32
    products through bfloat16 units where the device keeps float32 accuracy (`matmul_precision`).
    manifest_extra: further manifest entries (a budget's allocation).
    """
    job.validate()
    blocks, model_path_local = None, job.model
    if model is None:
        model, blocks, model_path_local = open_for_compress(job.model, job.lazy, job.trust_remote_code,
                                                            job.allow_non_finite)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path_local, job.trust_remote_code)
    suffix = f"-rank{job.ranks.rank}" if job.ranks.world > 1 else ""
    offload_dir = job.out.parent / f".{job.out.name}.activations{suffix}" if job.offload_activations else None
    compressor = LayerwiseCompressor(model, job.recipe, device=job.device, batch_size=job.batch_size,
                                     staged=job.staged, lazy=blocks, offload_dir=offload_dir, ranks=job.ranks,
                                     fast_matmul=job.fast_matmul, targets=job.targets, float_alpha=job.float_alpha,
                                     magr=job.magr)
    _check_loaded(job, model, blocks, compressor, windows)
    windows, calib_info = _calibration(job, compressor, tokenizer, windows)
    # the source weights' hashing starts now, in the background, and is recorded as it finishes
    inputs = Inputs(_local_dir(model_path_local), windows) if job.ranks.main else None
    try:
        path, result, writer = _write(job, model, tokenizer, compressor, windows, calib_info, manifest_extra, inputs)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    if writer is not None:
        log.info("wrote %s (%d layers compressed in %.1f s)", path, len(writer.reports), result.seconds)
    return path, result


def _local_dir(model_path) -> Path | None:
    """The directory holding the model's weight and tokenizer files (None: only a Hub id, never opened here)."""
    path = Path(str(model_path)).expanduser()
    return path if path.is_dir() else None


def _check_loaded(job: CompressJob, model, blocks, compressor: LayerwiseCompressor, windows) -> None:
    """What needs the model and the recipe's plan: the compressed layers finite, the windows' length, memory."""
    if job.allow_non_finite:  # the layers the recipe compresses must still be finite
        planned = {f"{name}.weight" for name in compressor.plan}
        check_finite(model.named_parameters(), job.model, only=planned)
        if blocks is not None:
            blocks.finite_names = planned
    if compressor.needs_data:
        check_length(model.config, job.seqlen if windows is None else windows.shape[1], "--seqlen",
                     job.allow_long_context)
        if not job.offload_activations:  # the cached block inputs and outputs, float32, kept in memory between blocks
            per_token = 2 * 4 * model.config.hidden_size + _float_stream_bytes(job, compressor)
            check_fits(per_token * job.nsamples * job.seqlen,
                       f"--nsamples {job.nsamples} x --seqlen {job.seqlen}",
                       "lower --nsamples or --seqlen, or pass --offload-activations")


def _calibration(job: CompressJob, compressor: LayerwiseCompressor, tokenizer, windows) -> tuple:
    """(windows or None, the manifest's calibration entry)."""
    if not compressor.needs_data:
        log.info("every method in the recipe is data-free: the calibration text is not read")
        return None, {"source": None, "data_free": True}
    if windows is None:
        return calibration_windows(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed)
    return windows, {"source": job.calib, "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                     "seed": job.seed, "bos_token_id": bos_token_id(tokenizer)}


def _write(job: CompressJob, model, tokenizer, compressor: LayerwiseCompressor, windows, calib_info: dict,
           manifest_extra: dict | None, inputs: Inputs | None = None) -> tuple:
    """Compress into the writer and commit (rank 0); returns (path, result, writer or None elsewhere)."""
    plain_dtype = checkpoint_plain_dtype(next(model.parameters()).dtype)
    # what decides the bytes of the checkpoint: a resumed run must repeat them exactly
    run_args = {"source_model": str(job.model), "recipe": job.recipe.to_dict(), "calibration": calib_info,
                "seed": job.seed, "staged": job.staged, "batch_size": job.batch_size,
                "device": str(compressor.device), "matmul": "bfloat16-units" if compressor.fast_matmul else "float32",
                "targets": job.targets_record}
    with opened_on_main(job.ranks, lambda: CheckpointWriter(job.out, overwrite=job.overwrite, plain_dtype=plain_dtype,
                                                            resume=job.resume, run_args=run_args,
                                                            inputs=inputs)) as writer:
        result = compressor.compress(windows, writer=writer)
        if not job.ranks.main:
            return job.out, result, None
        writer.write_rest(_outside_tensors(model, compressor), result.outside,
                          {r.name: r.to_dict() for r in result.layers if r.name in result.outside})
        manifest = {
            "source_model": str(job.model),
            "family": compressor.family.name,
            "recipe": job.recipe.to_dict(),
            "calibration": calib_info,
            "seed": job.seed,
            "staged": job.staged,
            "device": str(compressor.device),
            "matmul": run_args["matmul"],
            **job.targets_entry,
            "compression_seconds": result.seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "layers": {},  # filled by the writer with every block's layers, also those of a resumed run
            "left_uncompressed": result.left_out,  # block weights kept in float16, by reason
            **(manifest_extra or {}),
        }
        return writer.commit(model.config, tokenizer, manifest), result, writer


def _float_stream_bytes(job: CompressJob, compressor: LayerwiseCompressor) -> int:
    """Bytes per calibration token the float model's stream adds (`--targets float`), else 0."""
    if not is_float(job.targets):
        return 0
    family = compressor.family
    return float_stream_bytes(compressor.walker.blocks[0], family.groups, compressor.model.config.hidden_size,
                              job.targets == "float-all")


def _outside_tensors(model, compressor) -> dict[str, torch.Tensor]:
    """State outside the blocks, each storage once (tied embeddings), minus a compressed lm_head or
    embedding (and the output head tied to it: the same storage)."""
    prefix = compressor.family.blocks + "."
    family = compressor.family
    skip = {f"{name}.weight" for name in (family.lm_head, family.embeddings) if name in compressor.plan}
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if name.startswith(prefix) or name in skip or key in seen:
            seen.add(key)
            continue
        seen.add(key)
        out[name] = tensor
    return out


def evaluate_perplexity(model_or_path, data: str, seqlen: int = 256, batch_size: int = 8, device: str = "cpu",
                        dtype: str = "float32", tokenizer=None, token_ids: torch.Tensor | None = None,
                        trust_remote_code: bool = False, verify: bool = True, allow_long_context: bool = False,
                        fast_matmul: bool = True) -> dict:
    """Perplexity of a HF model, a checkpoint directory, or an in-memory model on `data`; windows
    begin with the tokenizer's BOS when it adds one by default (`calib_data.bos_token_id`).
    fast_matmul: `evaluate.perplexity`'s (False: --exact-matmul)."""
    path = str(model_or_path) if isinstance(model_or_path, (str, Path)) else None
    if tokenizer is None and path is not None:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    bos = bos_token_id(tokenizer) if tokenizer is not None else None
    if token_ids is None:
        token_ids = tokenize_text(tokenizer, load_text(data, "evaluation"))
    if path is not None:  # a 262k-token vocabulary's tokenizer is ~400 MB: not resident beside the model
        del tokenizer
        trim_heap()
        model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, verify=verify)
    else:
        model = model_or_path
    check_length(model.config, seqlen, "--seqlen", allow_long_context)
    return perplexity(model, token_ids, seqlen=seqlen, batch_size=batch_size, device=device, bos=bos,
                      fast_matmul=fast_matmul)
