"""The compute device a user names (`--device`), checked against what torch sees."""

from __future__ import annotations

import torch

from .errors import RecipeError


def resolve_device(device: str) -> torch.device:
    """"auto": CUDA, else MPS, else CPU; a named device that is unknown or absent is a RecipeError."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise RecipeError(f"--device {device!r} is unknown; use cpu, cuda, mps or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RecipeError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(device)
