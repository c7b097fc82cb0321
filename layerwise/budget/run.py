"""`layerwise compress --target-bits/--target-mb`: allocate, then compress the choice to a checkpoint.

The model is loaded whole (the loss scales need one backward pass through all of it), so
`--eager-load` is implied; `--offload-activations` applies to the measuring pass as well, and
`--resume` measures and allocates again (the same data give the same choice) and then continues
the interrupted compression after its last complete block (the writer refuses a different recipe).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from layerwise.calib_data import calibration_windows

from ..checkpoint import CheckpointWriter
from ..loading import check_length, load_model, load_tokenizer
from ..outputs import check_output
from ..pipeline import compress_to_checkpoint
from ..recipe import Recipe
from .allocate import Target, allocate


def compress_to_budget(model_path: str, out_dir: str | Path, recipe: Recipe, target: Target, calib: str,
                       nsamples: int = 128, seqlen: int = 256, seed: int = 0, device: str = "auto",
                       batch_size: int = 8, staged: bool = True, overwrite: bool = False, resume: bool = False,
                       offload_activations: bool = False, trust_remote_code: bool = False,
                       allow_non_finite: bool = False, allow_long_context: bool = False, inputs: tuple = ()):
    """Returns (checkpoint path, CompressionResult, Allocation). The manifest's recipe is the
    per-layer choice (`--recipe CHECKPOINT` reruns it) and its `budget` entry the allocation."""
    inputs = (model_path, calib, *inputs)
    out_dir = check_output(out_dir, overwrite, inputs)
    # an unfinished run is named before the long measuring pass, not after it
    CheckpointWriter(out_dir, overwrite=overwrite, resume=resume, inputs=inputs).check_start()
    model = load_model(model_path, trust_remote_code=trust_remote_code, allow_non_finite=allow_non_finite)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    check_length(model.config, seqlen, "--seqlen", allow_long_context)
    windows, _ = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    offload_dir = out_dir.parent / f".{out_dir.name}.measure-activations" if offload_activations else None
    try:
        allocation = allocate(model, recipe, windows, target, device=device, batch_size=batch_size,
                              offload_dir=offload_dir)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    path, result = compress_to_checkpoint(
        model_path, out_dir, allocation.recipe, calib, nsamples, seqlen, seed, device=device, batch_size=batch_size,
        staged=staged, overwrite=overwrite, model=model, tokenizer=tokenizer, windows=windows, resume=resume,
        offload_activations=offload_activations, allow_non_finite=allow_non_finite,
        allow_long_context=allow_long_context, inputs=inputs[2:], manifest_extra={"budget": allocation.summary()},
    )
    return path, result, allocation
