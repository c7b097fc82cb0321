"""The storage policy for floating-point weights, stated once.

- Compute: every block (and the tensors outside the blocks) runs in float32 while it is compressed;
  a float16 block's nn.Linear weights stay float16 and are upcast per call (`upcast.py`).
- Kept in memory afterwards: the stored dtype, except bfloat16, which comes back as float32 — the
  compressed layers' values are float16 numbers and bfloat16 cannot hold them exactly.
- Written to a checkpoint's plain tensors (norms, biases, embeddings): float16 for a float32 model,
  otherwise the stored dtype (float16 stays float16, bfloat16 stays bfloat16).
"""

from __future__ import annotations

import torch

COMPUTE_DTYPE = torch.float32


def kept_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype a compressed block (or an outside tensor) is given back in after float32 compute."""
    return torch.float32 if stored == torch.bfloat16 else stored


def checkpoint_plain_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype of the uncompressed floating tensors in a checkpoint of a model stored as `stored`."""
    return torch.float16 if stored == torch.float32 else stored
