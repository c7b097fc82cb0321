"""Which modules hold a weight layerwise compresses: `nn.Linear` (weight [out, in]) and transformers'
`Conv1D` (GPT-2 and its kin: weight [in, out], the transpose).

Kept apart from `linears` so that the family table (`models.families`), which `linears` names in
its errors, can ask the same question without importing `linears` back.
"""

from __future__ import annotations

import torch.nn as nn


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_compressible(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d_type()))


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as [in, out] (Conv1D)."""
    return isinstance(module, _conv1d_type())
