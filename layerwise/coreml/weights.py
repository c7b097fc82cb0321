"""Hand CompressedWeights to Core ML as iOS18 constexpr ops, bit for bit.

The converter never fits a palette or a scale here, nor sees the weights: the program is converted
with stand-ins (`standins`), then `swap_stand_ins` puts in each stand-in's place the float16 const
of a plain weight or the constexpr op(s) that decode the checkpoint's own codes, scales, zero
points, LUTs and masks:

    affine            constexpr_blockwise_shift_scale(data=uint4|uint8 codes, scale, offset=zero point)
    affine, symmetric constexpr_blockwise_shift_scale(data=int4|int8 codes − 2**(bits−1), scale), no offset
    affine, 3-bit-ish per-channel grid where an LUT is smaller:
                      constexpr_lut_to_dense(indices=uintN, lut=[out, 1, 2**N, 1] = scale*(k - zp))
    lut               constexpr_lut_to_dense(indices=uintN, lut=[out/g_out, in/g_in, 2**N, 1])
    lut, int8 LUT     lut = constexpr_blockwise_shift_scale(data=lut_codes, scale=lut_scale)
    any + mask        constexpr_sparse_blockwise_shift_scale / constexpr_lut_to_sparse / plain
                      nonzero values, then constexpr_sparse_to_dense(nonzero_data, mask=uint1)
    dense, no mask    left as the float16 const

Every decode is the same float16 arithmetic as `CompressedWeight.dequantize` (an exact integer
step times a float16 scale, rounded once), so the program holds the checkpoint's numbers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

from ..errors import ModelError
from ..formats import CompressedWeight
from .layout import affine_lut_is_smaller, index_bits

log = logging.getLogger(__name__)



def swap_stand_ins(prog, stand_ins, values: dict[str, object], function: str = "main", spill=None) -> dict[str, str]:
    """Put each held weight's real value where its stand-in is (see `standins`).

    values: parameter name (``model.layers.0.mlp.up_proj.weight``) → (module name, CompressedWeight),
        stored as the constexpr op(s) decoding its codes, named after the module (a float16 const when
        dense), or → a torch tensor, a float16 const ``<parameter>_to_fp16`` (the float16 pass's name).
    Each weight lands just before its first user, where coremltools' float16 pass had put its const.
    spill: where the CompressedWeights' codes, masks and values are parked (`layerwise.spill`), if
        they are: the arrays derived from them go there too (see `constexpr_weight`).
    Returns module name → MIL op type now producing its weight, for the CompressedWeights.
    """
    block = prog.functions[function]
    done: dict[str, str] = {}
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["layerwise_compress"])):
        position = {id(op): i for i, op in enumerate(block.operations)}
        for op in list(block.operations):
            param = stand_ins.made.get(op.name)
            if param is None:
                continue
            var = op.outputs[0]
            first_user = min(var.child_ops, key=lambda user: position[id(user)], default=None)
            if first_user is None:  # an unused weight: nothing to store
                _remove(block, op)
                continue
            value = values[param]
            with block:
                new = _real_weight(param, value, first_user, spill)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=var, new_var=new, force_replace=True)
            _remove(block, op)
            if isinstance(value, tuple):
                done[value[0]] = new.op.op_type
    missing = sorted({v[0] for v in values.values() if isinstance(v, tuple)} - set(done))
    if missing:
        raise ModelError(f"the weight of {missing[0]} is not used by the converted program; it cannot be exported compressed")
    log.info("compressed %d weights in function %r: %s", len(done), function, _summary(done))
    return done


def _real_weight(param: str, value, before_op, spill=None):
    """The op(s) producing `param`'s exported value, built before `before_op`."""
    if not isinstance(value, tuple):
        return mb.const(val=float16_array(value), name=f"{param}_to_fp16", before_op=before_op)
    module, cw = value
    if cw.scheme == "dense" and cw.mask is None:
        dense = _parking(spill, cw)(_np(cw.dequantize()))
        return mb.const(val=dense, name=f"{param}_to_fp16", before_op=before_op)
    return constexpr_weight(cw, name=_op_name(module), before_op=before_op, spill=spill)


def float16_array(t: torch.Tensor) -> np.ndarray:
    """`t` as float16 numpy, rounded as coremltools' float16 pass rounds a float32 const (a float16
    tensor is shared, not copied)."""
    t = t.detach().cpu()
    if t.dtype == torch.float16:
        return t.numpy()
    return t.float().numpy().astype(np.float16)


def _remove(block, op) -> None:
    """Remove a stand-in and the consts only it used."""
    inputs = [v.op for v in op.inputs.values() if v.op is not None and v.op.op_type == "const"]
    block.remove_ops([op])
    block.remove_ops([c for c in inputs if not c.outputs[0].child_ops and c in block.operations])


def constexpr_weight(cw: CompressedWeight, name: str, before_op=None, spill=None):
    """Build (inside an active MIL block) the constexpr ops decoding `cw` → Var fp16 [out, in].

    spill: where `cw`'s codes / mask / values are parked, if they are; then each array derived from
    them (signed codes, kept codes or values) is parked there too, else a whole model's worth of
    them would be resident from here until the weight file is written.
    """
    kw = {"before_op": before_op} if before_op is not None else {}
    park = _parking(spill, cw)
    mask = None if cw.mask is None else _np(cw.mask)
    if cw.scheme == "affine" and affine_lut_is_smaller(cw):
        return _lut(cw, _affine_grid(cw), mask, name, kw, park)
    if cw.scheme == "affine":
        bits = 4 if cw.bits <= 4 else 8
        codes, tag = _np(cw.codes), _uint
        shift = {"scale": _np(cw.scale)}
        if cw.midpoint_zero:  # signed codes around 0: no offset tensor to store
            # uint8 arithmetic wraps modulo 256, so viewed as int8 this is code − 2**(bits−1) exactly
            codes, tag = park((codes - np.uint8(2 ** (cw.bits - 1))).view(np.int8)), _int
        else:
            shift["offset"] = _uint(_np(cw.zero_point), bits)
        if mask is None:
            return mb.constexpr_blockwise_shift_scale(data=tag(codes, bits), name=name, **shift, **kw)
        m, nz = mb.constexpr_sparse_blockwise_shift_scale(
            data_mask=_uint(mask, 1), nonzero_data=tag(park(codes[mask]), bits), name=name + "_sparse", **shift, **kw
        )
        return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name=name, **kw)
    if cw.scheme == "lut":
        if cw.lut_codes is not None:
            n_out, n_in, k = cw.lut.shape
            decoded = (cw.lut_codes.float() * cw.lut_scale.float()).to(torch.float16)
            if not torch.equal(decoded.view(torch.int16), cw.lut.view(torch.int16)):
                raise ModelError(f"{name}: lut != lut_scale * lut_codes; the int8 LUT would decode differently")
            lut = mb.constexpr_blockwise_shift_scale(
                data=_np(cw.lut_codes).reshape(n_out, n_in, k, 1),
                scale=_np(cw.lut_scale).reshape(n_out, n_in, 1, 1),
                name=name + "_lut", **kw,
            )
            return _lut(cw, lut, mask, name, kw, park)
        return _lut(cw, _np(cw.lut), mask, name, kw, park)
    values = _np(cw.values)[mask] + np.float16(0)  # dense + mask (+0: any -0.0 becomes +0.0)
    return mb.constexpr_sparse_to_dense(
        nonzero_data=park(values), mask=_uint(mask, 1), name=name, **kw
    )


def _lut(cw: CompressedWeight, lut, mask, name: str, kw: dict, park):
    """lut: np [n_out, n_in, 2**bits] float16, or a Var [n_out, n_in, 2**bits, 1] (quantized LUT)."""
    bits = index_bits(cw.bits)
    if isinstance(lut, np.ndarray):
        pad = 2**bits - lut.shape[-1]  # 5/7-bit tables ride in 6/8-bit indices; padding never indexed
        lut = np.pad(lut + np.float16(0), ((0, 0), (0, 0), (0, pad)))[..., None].astype(np.float16)
    elif bits != cw.bits:
        raise ModelError(f"a quantized {cw.bits}-bit LUT has no Core ML index type; use 1/2/3/4/6/8 bits")
    if mask is None:
        return mb.constexpr_lut_to_dense(indices=_uint(_np(cw.codes), bits), lut=lut, name=name, **kw)
    m, nz = mb.constexpr_lut_to_sparse(
        indices_mask=_uint(mask, 1),
        indices_nonzero_data=_uint(park(_np(cw.codes)[mask]), bits),
        lut=lut,
        name=name + "_sparse",
        **kw,
    )
    return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name=name, **kw)


def _parking(spill, cw: CompressedWeight):
    """array → the same array parked in `spill` (`Spill.hold`), with `cw`'s own [out, in] tensors'
    pages dropped again once read (they were read to derive it); the array itself without a spill."""
    if spill is None:
        return lambda array: array

    def park(array: np.ndarray) -> np.ndarray:
        held = spill.hold(torch.from_numpy(np.ascontiguousarray(array))).numpy()
        for source in (cw.codes, cw.mask, cw.values):
            if source is not None:
                spill.release(source)
        return held
    return park


def _affine_grid(cw: CompressedWeight) -> np.ndarray:
    """A per-channel affine grid as a LUT [out, 1, 2**bits]: entry k = fp16(scale * (k - zp))."""
    steps = torch.arange(2**cw.bits, dtype=torch.float32) - cw.zero_point.float()[..., None]
    return _np((steps * cw.scale.float()[..., None]).to(torch.float16))


def _uint(a: np.ndarray, bits: int) -> np.ndarray:
    """Integer or bool array → numpy array tagged with MIL's uint{bits} (sub-byte types are packed on
    save); a contiguous uint8 or bool array is viewed, not copied (the codes or masks of a whole
    model are that big)."""
    dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))
    a = np.ascontiguousarray(a)
    return (a.view(np.uint8) if a.dtype == np.bool_ else a.astype(np.uint8, copy=False)).view(dtype)


def _int(a: np.ndarray, bits: int) -> np.ndarray:
    """Signed integer array → numpy array tagged with MIL's int{bits}."""
    dtype = types.nptype_from_builtin(types.string_to_builtin(f"int{bits}"))
    return np.ascontiguousarray(a).astype(np.int8, copy=False).view(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _op_name(module: str) -> str:
    return module.replace(".", "_") + "_weight"


def _summary(done: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for op_type in done.values():
        counts[op_type] = counts.get(op_type, 0) + 1
    return ", ".join(f"{n}× {t}" for t, n in sorted(counts.items()))
