"""What a CompressedWeight costs inside an exported mlpackage, computed without coremltools.

`weights.py` turns each CompressedWeight into constexpr ops whose inputs are stored in the package's
weight file; this module lists those tensors (element count, bits per element) exactly as
`weights.py` writes them, and prices them the way coremltools' blob writer stores them: a 64-byte
header per blob and data padded to 64 bytes (sub-byte types packed). Tensors of fewer than 10
elements stay inline in the program text (coremltools' `should_use_weight_file`).
"""

from __future__ import annotations

import math

from ..formats import CompressedWeight

INDEX_BITS = (1, 2, 3, 4, 6, 8)  # iOS18 LUT index types uint1..uint8
BLOB_HEADER_BYTES = 64
BLOB_ALIGN_BYTES = 64
INLINE_BELOW = 10  # elements; smaller constants are written into the program text


def blob_bytes(numel: int, bits: int) -> int:
    """Bytes one constant of `numel` `bits`-bit elements takes in the weight file (0 when inline)."""
    if numel < INLINE_BELOW:
        return 0
    data = math.ceil(numel * bits / 8)
    return BLOB_HEADER_BYTES + math.ceil(data / BLOB_ALIGN_BYTES) * BLOB_ALIGN_BYTES


def index_bits(bits: int) -> int:
    """The narrowest iOS18 LUT index type holding `bits`-bit indices."""
    return next(b for b in INDEX_BITS if b >= bits)


def affine_lut_is_smaller(cw: CompressedWeight) -> bool:
    """A per-channel grid of 1/2/3/6 bits: is an exact 2**bits LUT per row smaller than uint4/uint8 codes?"""
    if cw.scale.shape[1] != 1 or cw.bits in (4, 8) or cw.bits not in INDEX_BITS:
        return False
    out_f, in_f = cw.shape
    container = 4 if cw.bits <= 4 else 8
    offset_bytes = 0 if cw.midpoint_zero else container / 8
    as_codes = out_f * in_f * container / 8 + out_f * (2 + offset_bytes)
    as_lut = out_f * in_f * cw.bits / 8 + out_f * 2 ** cw.bits * 2
    return as_lut < as_codes


def coreml_tensors(cw: CompressedWeight) -> list[tuple[int, int]]:
    """(elements, bits per element) of each constant `weights.constexpr_weight` stores for `cw`."""
    out = [] if cw.mask is None else [(cw.numel, 1)]  # uint1 mask
    if cw.scheme == "affine" and affine_lut_is_smaller(cw):
        bits = index_bits(cw.bits)
        return out + [(cw.kept, bits), (cw.shape[0] * 2**bits, 16)]  # indices, padded float16 LUT per row
    if cw.scheme == "affine":
        container = 4 if cw.bits <= 4 else 8  # a 3-bit grid rides in 4-bit codes
        out += [(cw.kept, container), (cw.scale.numel(), 16)]
        if not cw.midpoint_zero:
            out.append((cw.zero_point.numel(), container))
        return out
    if cw.scheme == "lut":
        bits = index_bits(cw.bits)
        n_out, n_in, _ = cw.lut.shape
        if cw.lut_codes is not None:
            lut = [(cw.lut_codes.numel(), 8), (cw.lut_scale.numel(), 16)]
        else:
            lut = [(n_out * n_in * 2**bits, 16)]
        return out + [(cw.kept, bits)] + lut
    return out + [(cw.kept, 16)]  # float16 values (all of them, or the kept ones next to the mask)


def exported_bytes(cw: CompressedWeight) -> int:
    """Weight-file bytes of `cw` in an mlpackage written by `layerwise export`."""
    return sum(blob_bytes(n, bits) for n, bits in coreml_tensors(cw))
