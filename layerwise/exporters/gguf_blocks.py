"""Our affine codes as GGUF blocks of 32 (ggml's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), code for code.

Every type holds a float16 scale d per 32 weights and decodes in float32:
Q4_0: d·(q − 8), Q5_0: d·(q − 16), Q8_0: d·q (q int8), Q4_1 / Q5_1: d·q + m with a float16 m.
A layer of ours (w = s·(q − z), a block of B columns per scale) fits when B and in are multiples
of 32 (a block of B is B / 32 GGUF blocks with one scale): with k = q − z,
- a symmetric grid of ≤ 4 / 5 / 8 bits: k ∈ [−2^(b−1), 2^(b−1)) → Q4_0 / Q5_0 / Q8_0, d = s;
- an asymmetric grid of ≤ 3 bits: |k| ≤ 7 → Q4_0; of 6 or 7 bits: |k| ≤ 127 → Q8_0;
- an asymmetric grid of 4 / 5 bits: Q4_1 / Q5_1 with d = s, m = fp16(−s·z), q as is.
Pruned weights of a sparse layer get k = 0 (exactly +0). The float32 results equal our float16
weights when every s·k and s·z is a float16 number (`grid.scale_significand`, grid "gguf").
"""

from __future__ import annotations

import numpy as np
import torch

from ..formats import CompressedWeight
from .tally import affine_codes

QK = 32  # weights per GGUF block
# type → (bytes per block, offset subtracted from the stored code; None: d·q + m)
LAYOUTS = {"Q4_0": (18, 8), "Q4_1": (20, None), "Q5_0": (22, 16), "Q5_1": (24, None), "Q8_0": (34, 0)}


def gguf_type(cw: CompressedWeight) -> str | None:
    """The GGUF block type that holds `cw`'s codes exactly, or None (F16 then)."""
    if cw.scheme != "affine" or cw.block_size % QK or cw.shape[1] % QK:
        return None
    bits, sym = cw.bits, cw.midpoint_zero
    if bits <= 3 or (sym and bits == 4):
        return "Q4_0"
    if sym and bits == 5:
        return "Q5_0"
    if sym or bits in (6, 7):
        return "Q8_0"
    return {4: "Q4_1", 5: "Q5_1"}.get(bits)


def _per_block(cw: CompressedWeight, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [n, 32], s float16 [n], z uint8 [n]) of the rows' GGUF blocks, in row order."""
    repeat = cw.block_size // QK
    codes = affine_codes(cw)[rows].numpy().reshape(-1, QK)
    scale = cw.scale[rows].repeat_interleave(repeat, dim=1).numpy().reshape(-1)
    zero = cw.zero_point[rows].repeat_interleave(repeat, dim=1).numpy().reshape(-1)
    return codes, scale, zero


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] values < 16 → [n, 16] bytes: weight j in the low nibble of byte j, j + 16 in the high."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit values → [n, 4] bytes: bit 4 of weight i as bit i of a little-endian uint32."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(QK, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4")[:, None].view(np.uint8)


def pack_rows(cw: CompressedWeight, kind: str) -> np.ndarray:
    """uint8 [out, in / 32 · block bytes]: the layer's rows as GGUF blocks of type `kind`."""
    codes, scale, zero = _per_block(cw, slice(None))
    d = scale.astype("<f2")[:, None].view(np.uint8)
    if kind in ("Q4_1", "Q5_1"):
        m = (-(scale.astype(np.float32) * zero.astype(np.float32))).astype("<f2")[:, None].view(np.uint8)
        parts = [d, m] + ([_high_bits(codes)] if kind == "Q5_1" else []) + [_nibbles(codes)]
    else:
        k = codes.astype(np.int16) - zero.astype(np.int16)[:, None]
        if kind == "Q8_0":
            parts = [d, k.astype(np.int8).view(np.uint8)]
        else:
            q = (k + LAYOUTS[kind][1]).astype(np.uint8)
            parts = [d] + ([_high_bits(q)] if kind == "Q5_0" else []) + [_nibbles(q)]
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == LAYOUTS[kind][0]
    return blocks.reshape(cw.shape[0], -1)


def gguf_decoded(cw: CompressedWeight, kind: str):
    """rows → the float32 values a GGUF reader computes from `pack_rows(cw, kind)` (d·k or d·q + m)."""

    def rows_of(rows: slice) -> torch.Tensor:
        codes, scale, zero = (torch.from_numpy(a) for a in _per_block(cw, rows))
        d = scale.float()[:, None]
        if kind in ("Q4_1", "Q5_1"):
            m = (-(scale.float() * zero.float())).half().float()[:, None]
            values = d * codes.float() + m
        else:
            values = d * (codes.float() - zero.float()[:, None])
        return values.reshape(-1, cw.shape[1])

    return rows_of


def block_bytes(cw: CompressedWeight) -> int:
    """Bytes of `cw` in a GGUF file: its block type's, or F16's."""
    kind = gguf_type(cw)
    return 2 * cw.numel if kind is None else cw.numel // QK * LAYOUTS[kind][0]
