"""What an exported mlpackage costs, computed without coremltools: each CompressedWeight
(`exported_bytes`) and the rest of the package (`fixed_bytes`), for `--target-mb`.

`weights.py` turns each CompressedWeight into constexpr ops whose inputs are stored in the package's
weight file; this module lists those tensors (element count, bits per element) exactly as
`weights.py` writes them, and prices them the way coremltools' blob writer stores them: a 64-byte
header per blob and data padded to 64 bytes (sub-byte types packed). Tensors of fewer than 10
elements stay inline in the program text (coremltools' `should_use_weight_file`). The rest is every
other tensor as float16, the converter's zero biases and the tables the export keeps, plus the
program text priced per family.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..formats import CompressedWeight
from ..models.families import NormKind, resolve_family
from ..models.stateful import divided_norms, has_partial_rotary, stored_table_sizes

INDEX_BITS = (1, 2, 3, 4, 6, 8)  # iOS18 LUT index types uint1..uint8
BLOB_HEADER_BYTES = 64
BLOB_ALIGN_BYTES = 64
INLINE_BELOW = 10  # elements; smaller constants are written into the program text
EXPORT_CONTEXT = 512  # `layerwise export`'s default --context: the rotary tables it stores
# model.mlmodel (the program) and Manifest.json, per family: (fixed bytes, bytes per decoder block),
# measured on tiny models of 2 and 4 blocks with mixed forms (`benchmarks/program_bytes.py`) and
# rounded up (per block × 1.08, fixed × 1.05) so the package stays below the target: an overestimate
# only leaves the weights a little less room. Unknown families take the largest. Partial rotary
# (Phi-4-mini) adds a slice and a concat per q and k: 4.4 kB per block measured (tiny Phi-3, factor 0.5).
PROGRAM_BYTES = {
    "llama": (15_000, 29_000), "mistral": (18_000, 29_000), "qwen2": (15_000, 30_000),
    "qwen3": (14_000, 36_000), "gemma": (15_000, 30_000), "gemma2": (19_000, 38_000),
    "gemma3_text": (20_000, 43_000), "phi3": (15_000, 29_000), "granite": (16_000, 30_000),
    "olmo2": (15_000, 36_000),
}
PROGRAM_BYTES_UNKNOWN = (20_000, 43_000)
PARTIAL_ROTARY_BYTES_PER_BLOCK = 4_800
DEDUP_FROM = 100  # coremltools' const_deduplication threshold (elements)


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


def fixed_bytes(model: nn.Module, budgeted: list[str]) -> int:
    """Package bytes that do not depend on the choice: the weight file's other blobs and the program text."""
    return other_blob_bytes(model, budgeted) + program_bytes(model)


def program_bytes(model: nn.Module) -> int:
    """model.mlmodel and Manifest.json of the export, as priced for the model's family."""
    family = resolve_family(model)
    fixed, per_block = PROGRAM_BYTES.get(family.name, PROGRAM_BYTES_UNKNOWN)
    if has_partial_rotary(model, family):
        per_block += PARTIAL_ROTARY_BYTES_PER_BLOCK
    return fixed + per_block * model.config.num_hidden_layers


def other_blob_bytes(model: nn.Module, budgeted: list[str], context: int = EXPORT_CONTEXT) -> int:
    """Weight-file bytes besides the budgeted layers: every other tensor as float16 (tied ones
    once), the zero biases the export gives bias-less linears, the tables the export keeps for a
    `context` (rope per key, window positions), and the file's 64-byte header."""
    family = resolve_family(model)
    skip = {f"{n}.weight" for n in budgeted}
    one_plus = family.norm is NormKind.RMS_ONE_PLUS
    divided = tuple(f".{n}.weight" for n in divided_norms(family))  # ÷ the residual divisor: never ones
    seen, total = set(), 0
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if name in skip:  # a budgeted embedding prices its tied output head too: one tensor
            seen.add(key)
        elided = _elided(name, tensor, one_plus) and not name.endswith(divided)
        if key in seen or not tensor.is_floating_point() or elided:
            continue
        seen.add(key)
        total += blob_bytes(tensor.numel(), 16)
    tables = sum(blob_bytes(n, 16) for n in stored_table_sizes(model, family, context))
    return total + zero_bias_bytes(model) + tables + BLOB_HEADER_BYTES


def zero_bias_bytes(model: nn.Module) -> int:
    """coremltools' torch frontend gives every linear without a bias a float16 zero bias [out];
    its `const_deduplication` pass keeps one copy of equal constants of DEDUP_FROM elements or more."""
    sizes = [m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None]
    kept = [n for n in sizes if n < DEDUP_FROM] + sorted({n for n in sizes if n >= DEDUP_FROM})
    return sum(blob_bytes(n, 16) for n in kept)


def _elided(name: str, tensor: torch.Tensor, one_plus: bool) -> bool:
    """A norm weight of all ones: the converter drops the multiplication (and the constant). Gemma's
    norms store offsets from 1 (`one_plus`): the export multiplies by 1 + w, so all zeros is ones."""
    ones = 0 if one_plus and "norm" in name else 1
    return tensor.dim() == 1 and bool((tensor == ones).all())
