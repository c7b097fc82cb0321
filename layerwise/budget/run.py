"""`layerwise compress --target-bits/--target-mb`: allocate, then compress the choice to a checkpoint."""

from __future__ import annotations

from pathlib import Path

from layerwise.calib_data import calibration_windows

from ..errors import ModelError
from ..loading import load_model, load_tokenizer
from ..pipeline import compress_to_checkpoint
from ..recipe import Recipe
from .allocate import Target, allocate


def compress_to_budget(model_path: str, out_dir: str | Path, recipe: Recipe, target: Target, calib: str,
                       nsamples: int = 128, seqlen: int = 256, seed: int = 0, device: str = "auto",
                       batch_size: int = 8, staged: bool = True, overwrite: bool = False):
    """Returns (checkpoint path, CompressionResult, Allocation). The manifest's recipe is the
    per-layer choice (`--recipe CHECKPOINT` reruns it) and its `budget` entry the allocation."""
    if Path(out_dir).exists() and not overwrite:
        raise ModelError(f"output {out_dir} already exists; choose another --out or pass --overwrite")
    model = load_model(model_path)
    tokenizer = load_tokenizer(model_path)
    windows, calib_info = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    allocation = allocate(model, recipe, windows, target, device=device, batch_size=batch_size)
    path, result = compress_to_checkpoint(
        model_path, out_dir, allocation.recipe, calib, nsamples, seqlen, seed, device=device, batch_size=batch_size,
        staged=staged, overwrite=overwrite, model=model, tokenizer=tokenizer, windows=windows,
        manifest_extra={"budget": allocation.summary()},
    )
    return path, result, allocation
