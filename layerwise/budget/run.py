"""`layerwise compress --target-bits/--target-mb`: allocate, then compress the choice to a checkpoint.

The model is loaded whole (the loss scales need one backward pass through all of it), so
`--eager-load` is implied; `--offload-activations` applies to the measuring pass as well, and
`--resume` measures and allocates again (the same data give the same choice) and then continues
the interrupted compression after its last complete block (the writer refuses a different recipe).
"""

from __future__ import annotations

import shutil

from layerwise.calib_data import calibration_windows

from ..job import CompressJob
from ..loading import check_length, load_model, load_tokenizer
from ..pipeline import compress_to_checkpoint
from .allocate import allocate


def compress_to_budget(job: CompressJob):
    """Returns (checkpoint path, CompressionResult, Allocation) for a job with a `target`; its recipe
    is the menu each layer chooses from. The manifest's recipe is the per-layer choice
    (`--recipe CHECKPOINT` reruns it) and its `budget` entry the allocation."""
    job.validate()  # an unfinished run is named before the long measuring pass, not after it
    model = load_model(job.model, trust_remote_code=job.trust_remote_code, allow_non_finite=job.allow_non_finite)
    tokenizer = load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    check_length(model.config, job.seqlen, "--seqlen", job.allow_long_context)
    windows, _ = calibration_windows(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed)
    offload_dir = job.out.parent / f".{job.out.name}.measure-activations" if job.offload_activations else None
    try:
        allocation = allocate(model, job.recipe, windows, job.target, device=job.device, batch_size=job.batch_size,
                              offload_dir=offload_dir)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    path, result = compress_to_checkpoint(job.with_recipe(allocation.recipe), model=model, tokenizer=tokenizer,
                                          windows=windows, manifest_extra={"budget": allocation.summary()})
    return path, result, allocation
