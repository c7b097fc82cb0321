"""Fisher sensitivity for SKM through the Python API: squared gradients of a user's loss.

coremltools' SKMPalettizer weights its k-means by the diagonal Fisher, the squared gradients of a
loss over calibration data. `fisher_sensitivity` computes the same thing for the linears inside the
decoder blocks, to pass as `LayerwiseCompressor(..., sensitivity=…)` with recipes that say
`sensitivity: fisher`. It needs one backward pass through the whole model per batch (memory for
activations and one gradient per compressed weight), which the Hessian default avoids.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerwise.models.families import get_module, resolve_family

from .errors import DataError


def fisher_sensitivity(
    model: nn.Module, loss_fn: Callable[[nn.Module, object], torch.Tensor], data: Iterable
) -> dict[str, torch.Tensor]:
    """Σ over `data` of (∂ loss_fn(model, batch) / ∂W)² for every nn.Linear in the decoder blocks.

    Returns {full layer name: [out, in] float32 on the CPU}. The model's parameters keep their
    values and `requires_grad` flags; gradients are computed in the model's own dtype and device.
    """
    family = resolve_family(model)
    blocks = get_module(model, family.blocks)
    linears = {
        f"{family.blocks}.{i}.{rel}": m
        for i, block in enumerate(blocks)
        for rel, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {name: torch.zeros(m.weight.shape, dtype=torch.float32) for name, m in linears.items()}
    batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in linears.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for batch in tqdm(data, desc="fisher sensitivity", unit="batch", disable=None):
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise DataError(f"the loss is {loss.item()} on calibration batch {batches}; check loss_fn and data")
                for m in linears.values():
                    m.weight.grad = None
                loss.backward()
                for name, m in linears.items():
                    sums[name] += m.weight.grad.detach().float().cpu() ** 2
                batches += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    if batches == 0:
        raise DataError("fisher_sensitivity got no calibration batches; pass a non-empty iterable")
    return sums


def next_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, L] batch of token ids (HF shifts the labels)."""
    input_ids = input_ids.to(next(model.parameters()).device)
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
