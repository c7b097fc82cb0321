"""Faster float32 matrix products, where the backend keeps float32 accuracy.

torch's "medium" float32 matmul precision lets a backend compute float32 products through
bfloat16 units (on CPUs, oneDNN's bfloat16 mode, `torch.backends.mkldnn.matmul.fp32_precision`).
Measured on this project's machines (AVX512-BF16): twice the speed of the default float32 GEMM, and
float32 accuracy against float64 (Frobenius error 2.6e-7 vs 1.6e-7 on a 2048-token Hessian; values
such as 1 + 2⁻¹⁰ that one bfloat16 pass would round come out exact), so the forwards, Hessians,
sweeps and SparseGPT's refinement all gain. Elsewhere "medium" can mean one bfloat16 pass or TF32
(8 or 10 mantissa bits, errors near 1e-3): a Hessian's Cholesky and the OBS updates must not run on
that. So the mode is probed on the device at hand, and used only where a probe product stays
within float32 accuracy.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-5  # relative Frobenius error: float32 GEMM ~1e-7, one bfloat16 pass or TF32 ~1e-3


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block, the previous setting after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def probe_error(device: torch.device, precision: str = "medium") -> float:
    """Relative Frobenius error against float64 of one [256, 1024] × [1024, 256] float32 product
    computed under `precision` on `device`."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 256, generator=g)
    exact = a.double() @ b.double()
    with matmul_precision(precision):
        fast = (a.to(device) @ b.to(device)).double().cpu()
    return float((fast - exact).norm() / exact.norm())


@functools.lru_cache(maxsize=None)
def fast_matmul_is_accurate(device: torch.device) -> bool:
    """Whether "medium" float32 products on `device` keep float32 accuracy (probed once per device)."""
    error = probe_error(device)
    accurate = error <= PROBE_TOLERANCE
    log.info("float32 products on %s: %s (a probe product off float64 by %.1e)", device,
             "bfloat16-unit GEMM, float32-accurate" if accurate else "plain float32 (the fast mode is not accurate here)",
             error)
    return accurate


def fast_float32_matmul(device: torch.device, enabled: bool = True):
    """A context in which float32 products use the fast mode if `enabled` and accurate on `device`."""
    if enabled and fast_matmul_is_accurate(device):
        return matmul_precision("medium")
    return contextlib.nullcontext()
