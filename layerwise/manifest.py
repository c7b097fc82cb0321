"""What a checkpoint's `layerwise.json` must say, and what its stored tensors must then look like.

A checkpoint is data from disk: every field the code reads is checked for type and range before use,
and each compressed layer's stored tensors are checked for dtype and size against its manifest entry
(shape, bits, scheme, kept count) before anything is decoded. Any mismatch is one CheckpointError
naming the layer and the field.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .formats import SCHEMES, packed_nbytes
from .solvers.base import is_int, is_number

FORMAT = "layerwise-checkpoint/1"
SHARD_NAME = re.compile(r"(block-\d{5}|rest)\.safetensors")
PARTS = ("codes", "scale", "zero_point", "lut", "lut_codes", "lut_scale", "values", "mask")
AFFINE_BITS = range(2, 9)
LUT_BITS = (1, 2, 3, 4, 6, 8)
REPORT_NUMBERS = ("rel_error", "seconds", "bits_per_weight", "sparsity")


def validate_manifest(manifest, where) -> dict:
    """Raise CheckpointError unless `manifest` has every field the readers use, of the right type."""
    _require(isinstance(manifest, dict), where, "layerwise.json", "must hold a JSON object")
    _require(manifest.get("format") == FORMAT, where, "format",
             f"is {manifest.get('format')!r}, expected {FORMAT!r} (written by another version?)")
    layers = manifest.get("layers")
    _require(isinstance(layers, dict), where, "layers", "must be an object of layer name → entry")
    shards = manifest.get("shards")
    _require(shards is None or (isinstance(shards, dict) and all(
        isinstance(k, str) and SHARD_NAME.fullmatch(k) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
        for k, v in shards.items())), where, "shards", "must map shard file names to sha256 hex digests")
    _require(manifest.get("compression_seconds") is None or is_number(manifest["compression_seconds"]),
             where, "compression_seconds", "must be a number")
    left = manifest.get("left_uncompressed")  # block weights kept in float16 (inspect's summary line)
    _require(left is None or (
        isinstance(left, dict) and all(is_int(left.get(k)) and left[k] >= 0
                                       for k in ("weights", "parameters", "block_weights", "block_parameters"))
        and isinstance(left.get("reasons"), dict)
        and all(isinstance(r, dict) and isinstance(r.get("kinds"), list) and all(isinstance(k, str) for k in r["kinds"])
                for r in left["reasons"].values())), where, "left_uncompressed", "is not a summary of float16 block weights")
    for name, meta in layers.items():
        validate_layer(name, meta, where)
    return manifest


def validate_layer(name: str, meta, where) -> None:
    at = f"{where}: layer {name}"

    def need(ok, field, problem):
        _require(ok, at, field, problem)

    need(isinstance(meta, dict), "entry", "must be an object")
    need(isinstance(meta.get("shard"), str) and SHARD_NAME.fullmatch(meta["shard"]), "shard",
         f"{meta.get('shard')!r} is not a shard name like block-00000.safetensors")
    scheme, bits, shape = meta.get("scheme"), meta.get("bits"), meta.get("shape")
    need(scheme in SCHEMES, "scheme", f"{scheme!r} is not one of {list(SCHEMES)}")
    need(isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and s > 0 for s in shape),
         "shape", f"{shape!r} is not [out, in] positive integers")
    allowed = {"affine": AFFINE_BITS, "lut": LUT_BITS, "dense": (16,)}[scheme]
    need(is_int(bits) and bits in allowed, "bits", f"{bits!r} is not valid for scheme {scheme} ({list(allowed)})")
    numel = shape[0] * shape[1]
    need(isinstance(meta.get("sparse"), bool), "sparse", "must be true or false")
    kept = meta.get("kept")
    need(is_int(kept) and 0 <= kept <= numel and (meta["sparse"] or kept == numel), "kept",
         f"{kept!r} does not fit {numel} weights (sparse: {meta['sparse']})")
    if scheme == "affine":
        bs = meta.get("block_size")
        need(is_int(bs) and bs > 0 and shape[1] % bs == 0, "block_size", f"{bs!r} does not divide {shape[1]} inputs")
        need(meta.get("zero_point") in ("midpoint", "stored"), "zero_point", "must be 'midpoint' or 'stored'")
    if scheme == "lut":
        group, lut_shape = meta.get("lut_group"), meta.get("lut_shape")
        need(isinstance(group, list) and len(group) == 2 and all(is_int(g) and g > 0 for g in group)
             and shape[0] % group[0] == 0 and shape[1] % group[1] == 0, "lut_group", f"{group!r} does not tile {shape}")
        need(lut_shape == [shape[0] // group[0], shape[1] // group[1], 2**bits], "lut_shape",
             f"{lut_shape!r} does not match shape {shape}, lut_group {group} and {bits} bits")
        need(meta.get("lut_dtype") in (None, "int8", "uint8"), "lut_dtype", "must be int8 or uint8 when present")
    report = meta.get("report")
    need(isinstance(report, dict), "report", "must be an object (the layer's solver report)")
    for key in REPORT_NUMBERS:
        need(is_number(report.get(key)), f"report.{key}", f"{report.get(key)!r} is not a number")
    need("damping" in report and (report["damping"] is None or is_number(report["damping"])), "report.damping",
         "must be a number or null")
    need(isinstance(report.get("method"), str), "report.method", "must be a string")
    need(report.get("error_space", "output") in ("output", "weight"), "report.error_space", "must be output or weight")
    notes = report.get("notes", [])
    need(isinstance(notes, list) and all(isinstance(n, str) for n in notes), "report.notes", "must be a list of strings")


def expected_parts(meta: dict) -> dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...]]]:
    """Stored part → (allowed dtypes, shape) that a validated layer entry implies."""
    out_f, in_f = meta["shape"]
    bits, kept, numel = meta["bits"], meta["kept"], out_f * in_f
    parts = {}
    if meta["sparse"]:
        parts["mask"] = ((torch.uint8,), (packed_nbytes(numel, 1),))
    if meta["scheme"] == "affine":
        blocks = in_f // meta["block_size"]
        parts["codes"] = ((torch.uint8,), (packed_nbytes(kept, bits),))
        parts["scale"] = ((torch.float16,), (out_f, blocks))
        if meta["zero_point"] == "stored":
            parts["zero_point"] = ((torch.uint8,), (packed_nbytes(out_f * blocks, bits),))
    elif meta["scheme"] == "lut":
        parts["codes"] = ((torch.uint8,), (packed_nbytes(kept, bits),))
        lut_shape = tuple(meta["lut_shape"])
        if meta.get("lut_dtype"):
            parts["lut_codes"] = ((getattr(torch, meta["lut_dtype"]),), lut_shape)
            parts["lut_scale"] = ((torch.float16,), (*lut_shape[:2], 1))
        else:
            parts["lut"] = ((torch.float16,), lut_shape)
    else:
        parts["values"] = ((torch.float16,), (kept,))
    return parts


def check_parts(name: str, meta: dict, tensors: dict[str, torch.Tensor], where) -> None:
    """Each stored tensor of layer `name` has the dtype and size its manifest entry implies."""
    expected = expected_parts(meta)
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise CheckpointError(
            f"{where}: layer {name} stores {sorted(tensors)} but its manifest entry (scheme {meta['scheme']}, "
            f"sparse {meta['sparse']}) needs {sorted(expected)}; the checkpoint is damaged, compress again"
        )
    for part, (dtypes, shape) in expected.items():
        t = tensors[part]
        if t.dtype not in dtypes or tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {name}.weight.{part} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}, but the "
                f"manifest (shape {meta['shape']}, {meta['bits']} bits, scheme {meta['scheme']}, kept {meta['kept']}) "
                f"implies {str(dtypes[0]).replace('torch.', '')} {list(shape)}; the checkpoint is damaged, compress again"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {name}.weight.{part} holds NaN or Inf; the checkpoint is damaged")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(ok, where, field, problem) -> None:
    if not ok:
        raise CheckpointError(f"{where}: {field} {problem}; the checkpoint's layerwise.json is damaged or edited")
