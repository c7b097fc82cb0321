"""lean_writer: the same weight file as coremltools' own writer, without its two copies of a float16
const, and with the spilled codes it wrote dropped from memory. Fails if the wrapper stops applying."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.backend.mil import helper  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from layerwise.coreml.blob_writer import lean_writer  # noqa: E402
from layerwise.spill import Spill  # noqa: E402

from test_spill import resident_kib  # noqa: E402

OUT, IN, BLOCK = 2048, 2048, 32  # a float16 weight of 8 MiB: its copies dwarf the rest of a save
Q_OUT = 256  # rows of the uint4 weight (its codes: 512 KiB, one byte each until written)


def program(weight: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray):
    """x @ weightᵀ and x @ dequantized(codes)ᵀ: one float16 const and one uint4 constexpr."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, IN), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        dense = mb.linear(x=x, weight=mb.const(val=weight, name="dense_weight"))
        q = mb.constexpr_blockwise_shift_scale(data=codes, scale=scale, offset=offset, name="q_weight")
        return dense, mb.linear(x=x, weight=q)
    return prog


def save(prog, path: Path) -> int:
    """Write `prog` as an mlpackage; returns the peak of traced allocations (numpy, bytes) meanwhile."""
    tracemalloc.start()
    try:
        ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                   pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True).save(str(path))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def weight_file(pkg: Path) -> bytes:
    return (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()


@pytest.fixture(scope="module")
def tensors():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((OUT, IN)).astype(np.float16)
    codes = rng.integers(0, 16, (Q_OUT, IN), dtype=np.uint8)
    scale = rng.random((Q_OUT, IN // BLOCK)).astype(np.float16)
    offset = rng.integers(0, 16, (Q_OUT, IN // BLOCK), dtype=np.uint8)
    return weight, codes, scale, offset


def uint4(a: np.ndarray) -> np.ndarray:
    return a.view(types.nptype_from_builtin(types.uint4))


def test_same_weight_file_without_the_float16_copies(tensors, tmp_path):
    weight, codes, scale, offset = tensors
    prog = program(weight, uint4(codes), scale, uint4(offset))
    stock_peak = save(prog, tmp_path / "stock.mlpackage")
    with lean_writer() as applied:
        lean_peak = save(prog, tmp_path / "lean.mlpackage")
    assert applied, f"lean_writer does not apply to coremltools {ct.__version__}; check the wrapped function"
    assert weight_file(tmp_path / "lean.mlpackage") == weight_file(tmp_path / "stock.mlpackage")
    # stock: flatten() and tobytes() of the 8 MiB const, alive together; lean: no copy of it (the
    # uint4 codes still take the stock path, flattened: 512 KiB)
    assert stock_peak >= 2 * weight.nbytes and lean_peak < weight.nbytes / 4, (stock_peak, lean_peak)


def test_spilled_codes_are_dropped_once_written(tensors, tmp_path):
    weight, codes, scale, offset = tensors
    with Spill(tmp_path) as spill:
        held = spill.hold(torch.from_numpy(codes))
        prog = program(weight, uint4(held.numpy()), scale, uint4(offset))
        with lean_writer(spill):
            save(prog, tmp_path / "lean.mlpackage")
        assert resident_kib(held) == 0  # the writer read all of it, then let it go
    save(program(weight, uint4(codes), scale, uint4(offset)), tmp_path / "stock.mlpackage")
    assert weight_file(tmp_path / "lean.mlpackage") == weight_file(tmp_path / "stock.mlpackage")


def test_wrapped_only_inside_and_only_on_the_checked_versions(monkeypatch):
    stock = helper._get_offset_by_writing_data
    with lean_writer() as applied:
        assert applied and helper._get_offset_by_writing_data is not stock
    assert helper._get_offset_by_writing_data is stock
    monkeypatch.setattr(ct, "__version__", "8.3")
    with lean_writer() as applied:
        assert not applied and helper._get_offset_by_writing_data is stock
