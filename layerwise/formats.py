"""CompressedWeight: the one representation shared by solvers, checkpoints and the Core ML export.

A linear weight `[out, in]` is held as one of three schemes, optionally with a sparsity mask:

- ``affine``: integer ``codes`` (uint8 holding `bits`-bit values) with a float16 ``scale`` and an
  integer ``zero_point`` per block of ``in // scale.shape[1]`` input columns;
  ``w = scale * (codes - zero_point)``. Per-channel is one block spanning all inputs. A symmetric
  grid (every zero point at the midpoint ``2**(bits-1)``) stores no zero points on disk and
  exports as signed codes without an offset.
- ``lut``: ``codes`` are `bits`-bit indices into a float16 look-up table per group,
  ``lut: [out // group_out, in // group_in, 2**bits]``; ``w = lut[g_out, g_in, codes]``.
  Optionally the LUT itself is int8/uint8 with a float16 scale (``lut_codes``, ``lut_scale``),
  in which case ``lut == lut_scale * lut_codes`` exactly (the iOS18 quantized-LUT form).
- ``dense``: float16 ``values``.

With a ``mask`` (bool, True = kept) the pruned entries are exactly zero and only the kept entries'
codes or values are stored on disk; by convention pruned entries hold code 0 / value 0 in memory.

Every number is float16 or an integer, and dequantization computes float16 results from those
float16 numbers: the checkpoint, `decompress`, the torch model and the Core ML constexpr ops then
hold the very same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEMES = ("affine", "lut", "dense")
DEQUANTIZE_CHUNK = 1 << 20  # weights dequantized at once (a few MB of temporaries, not [out, in] float32)


@dataclass
class CompressedWeight:
    shape: tuple[int, int]
    scheme: str
    bits: int = 16
    codes: torch.Tensor | None = None  # uint8 [out, in]: affine codes or LUT indices
    scale: torch.Tensor | None = None  # float16 [out, in // block_size]
    zero_point: torch.Tensor | None = None  # uint8 [out, in // block_size]
    lut: torch.Tensor | None = None  # float16 [out // group_out, in // group_in, 2**bits]
    lut_codes: torch.Tensor | None = None  # int8 or uint8, same shape as lut (quantized LUT)
    lut_scale: torch.Tensor | None = None  # float16 [out // group_out, in // group_in, 1]
    values: torch.Tensor | None = None  # float16 [out, in] (dense scheme)
    mask: torch.Tensor | None = None  # bool [out, in], True = kept

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; expected one of {SCHEMES}")
        out_f, in_f = self.shape
        if self.scheme == "affine":
            _check(self.codes, torch.uint8, self.shape, "codes")
            _check(self.scale, torch.float16, None, "scale")
            _check(self.zero_point, torch.uint8, tuple(self.scale.shape), "zero_point")
            if self.scale.shape[0] != out_f or in_f % self.scale.shape[1]:
                raise ValueError(f"scale shape {tuple(self.scale.shape)} does not tile {self.shape}")
        elif self.scheme == "lut":
            _check(self.codes, torch.uint8, self.shape, "codes")
            _check(self.lut, torch.float16, None, "lut")
            g_out, g_in, k = self.lut.shape
            if out_f % g_out or in_f % g_in or k != 2**self.bits:
                raise ValueError(f"lut shape {tuple(self.lut.shape)} does not fit {self.shape} at {self.bits} bits")
            if (self.lut_codes is None) != (self.lut_scale is None):
                raise ValueError("a quantized LUT needs both lut_codes and lut_scale")
        else:
            _check(self.values, torch.float16, self.shape, "values")
        if self.mask is not None:
            _check(self.mask, torch.bool, self.shape, "mask")
        if self.codes is not None and self.codes.numel() and int(self.codes.max()) >= 2**self.bits:
            raise ValueError(f"codes exceed {self.bits} bits")

    @property
    def midpoint_zero(self) -> bool:
        """Affine with every zero point at 2**(bits-1) (a symmetric grid): nothing to store for them."""
        return self.scheme == "affine" and bool(torch.all(self.zero_point == 2 ** (self.bits - 1)))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def block_size(self) -> int | None:
        """Input columns per affine scale (== in_features for per-channel)."""
        return self.shape[1] // self.scale.shape[1] if self.scheme == "affine" else None

    @property
    def lut_group(self) -> tuple[int, int] | None:
        """(output channels, input columns) sharing one LUT."""
        if self.scheme != "lut":
            return None
        return self.shape[0] // self.lut.shape[0], self.shape[1] // self.lut.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def kept(self) -> int:
        """Number of stored (non-pruned) weights."""
        return self.numel if self.mask is None else int(self.mask.sum())

    # ---- values ---------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """Dense float16 weight [out, in], pruned entries exactly +0. Computed a few rows at a time
        (every value depends on its own row only): no [out, in] float32 temporaries."""
        source = self.values if self.scheme == "dense" else self.codes
        dense = torch.empty(self.shape, dtype=torch.float16, device=source.device)
        step = max(1, DEQUANTIZE_CHUNK // max(1, self.shape[1]))
        for r0 in range(0, self.shape[0], step):
            dense[r0 : r0 + step] = self.dequantize_rows(slice(r0, r0 + step))
        return dense

    def dequantize_rows(self, rows: slice) -> torch.Tensor:
        """`dequantize` of the rows `rows` only (float16 [len(rows), in])."""
        if self.scheme == "affine":
            bs = self.block_size
            steps = self.codes[rows].float() - self.zero_point[rows].float().repeat_interleave(bs, dim=1)
            # steps are small integers, exact in float32; one rounding to float16 = fp16 product
            dense = (steps * self.scale[rows].float().repeat_interleave(bs, dim=1)).to(torch.float16)
        elif self.scheme == "lut":
            g_out, g_in = self.lut_group
            groups = torch.arange(self.shape[0])[rows] // g_out
            cols = torch.arange(self.shape[1]) // g_in
            dense = self.lut[groups[:, None], cols[None, :], self.codes[rows].long()]
        else:
            dense = self.values[rows]
        if self.mask is not None:
            dense = torch.where(self.mask[rows], dense, torch.zeros((), dtype=torch.float16))
        return dense + 0.0  # turns any -0.0 into +0.0 so every path agrees bit for bit

    # ---- size -----------------------------------------------------------------------------
    def payload_bytes(self) -> int:
        """Bytes this weight takes on disk (packed codes, scales, LUTs, mask)."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.payload_bytes() / self.numel

    # ---- serialization --------------------------------------------------------------------
    def meta(self) -> dict:
        """JSON-able description needed (with `to_tensors`) to rebuild this weight."""
        m = {"scheme": self.scheme, "bits": self.bits, "shape": list(self.shape), "kept": self.kept}
        if self.scheme == "affine":
            m["block_size"] = self.block_size
            m["zero_point"] = "midpoint" if self.midpoint_zero else "stored"
        if self.scheme == "lut":
            m["lut_group"] = list(self.lut_group)
            m["lut_shape"] = list(self.lut.shape)
            if self.lut_codes is not None:
                m["lut_dtype"] = str(self.lut_codes.dtype).replace("torch.", "")
        m["sparse"] = self.mask is not None
        return m

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Packed tensors for safetensors: codes at `bits` bits, mask at 1 bit, only kept entries."""
        out: dict[str, torch.Tensor] = {}
        keep = None if self.mask is None else self.mask.reshape(-1)
        if self.mask is not None:
            out["mask"] = pack_bits(self.mask.reshape(-1).to(torch.uint8), 1)
        if self.codes is not None:
            flat = self.codes.reshape(-1)
            out["codes"] = pack_bits(flat if keep is None else flat[keep], self.bits)
        if self.scheme == "affine":
            out["scale"] = self.scale.contiguous()
            if not self.midpoint_zero:
                out["zero_point"] = pack_bits(self.zero_point.reshape(-1), self.bits)
        if self.scheme == "lut":
            if self.lut_codes is None:
                out["lut"] = self.lut.contiguous()
            else:
                out["lut_codes"] = self.lut_codes.contiguous()
                out["lut_scale"] = self.lut_scale.contiguous()
        if self.scheme == "dense":
            flat = self.values.reshape(-1)
            out["values"] = (flat if keep is None else flat[keep]).contiguous()
        return out

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "CompressedWeight":
        shape = tuple(meta["shape"])
        numel = shape[0] * shape[1]
        bits = int(meta["bits"])
        mask = None
        if meta.get("sparse"):
            mask = unpack_bits(tensors["mask"], 1, numel).bool().reshape(shape)

        def scatter(kept_values: torch.Tensor, fill) -> torch.Tensor:
            if mask is None:
                return kept_values.reshape(shape)
            full = torch.full((numel,), fill, dtype=kept_values.dtype)
            full[mask.reshape(-1)] = kept_values
            return full.reshape(shape)

        kept = int(meta["kept"])
        kw: dict = {"shape": shape, "scheme": meta["scheme"], "bits": bits, "mask": mask}
        if "codes" in tensors:
            kw["codes"] = scatter(unpack_bits(tensors["codes"], bits, kept), 0)
        if meta["scheme"] == "affine":
            kw["scale"] = tensors["scale"]
            if meta.get("zero_point") == "midpoint":
                kw["zero_point"] = torch.full(tensors["scale"].shape, 2 ** (bits - 1), dtype=torch.uint8)
            else:
                kw["zero_point"] = unpack_bits(tensors["zero_point"], bits, tensors["scale"].numel()).reshape(
                    tensors["scale"].shape
                )
        elif meta["scheme"] == "lut":
            if "lut_codes" in tensors:
                kw["lut_codes"], kw["lut_scale"] = tensors["lut_codes"], tensors["lut_scale"]
                kw["lut"] = (kw["lut_codes"].float() * kw["lut_scale"].float()).to(torch.float16)
            else:
                kw["lut"] = tensors["lut"]
        else:
            kw["values"] = scatter(tensors["values"], 0.0)
        return cls(**kw)


def _check(t, dtype, shape, name):
    if t is None:
        raise ValueError(f"{name} is required")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of `bits`-bit values into bytes, little-endian bit order.

    4-bit values go two per byte, 3-bit values 8 per 3 bytes, and so on.
    """
    if bits == 8:
        return values.to(torch.uint8).contiguous()
    v = values.to(torch.uint8).numpy()
    planes = np.unpackbits(v[:, None], axis=1, count=bits, bitorder="little")  # [n, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values as a flat uint8 tensor."""
    if bits == 8:
        return packed[:count].clone()
    if bits in (1, 2, 4):  # whole values per byte: shift and mask, no bit planes (8x + 2x temporaries)
        p, per = packed.numpy(), 8 // bits
        out = np.empty(len(p) * per, dtype=np.uint8)
        for k in range(per):
            out[k::per] = (p >> (k * bits)) & ((1 << bits) - 1)
        return torch.from_numpy(out[:count].copy() if len(out) > count else out)
    flat = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((flat.astype(np.uint16) @ weights).astype(np.uint8))


def packed_nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)
