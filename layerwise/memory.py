"""Refusing work that cannot fit in memory before it is allocated (the kernel's OOM killer gives no
message, and may take other processes with it), and placeholder tensors that take none."""

from __future__ import annotations

import math
import mmap
import os

import torch

from .errors import LayerwiseError


class MemoryLimitError(LayerwiseError, MemoryError):
    """A request whose tensors would not fit in the memory available."""


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere physical memory; None: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need_bytes: float, what: str, fix: str) -> None:
    """MemoryLimitError when `need_bytes` exceeds the memory available (a device other than the CPU
    has its own memory: callers check only what lives in RAM)."""
    have = available_memory()
    if have is not None and need_bytes > have:
        raise MemoryLimitError(f"{what} needs about {need_bytes / 1e9:.1f} GB, more than the {have / 1e9:.1f} GB of "
                               f"memory available; {fix}")


# glibc's mallopt parameter: allocations at least this big get their own mmap (freed = given back)
_M_MMAP_THRESHOLD = -3


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc only


def give_back_large_frees(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more from its own mapping, so that freeing it
    returns the memory to the system at once. glibc otherwise raises this threshold by itself up to
    32 MB after the first large free, and the tens-of-MB temporaries of the solvers and forwards
    then stay resident as heap fragments, one heap per thread that ran them (measured: ~1 GB on a
    3 GB model). Process-wide; a no-op off glibc. Returns whether it was applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def trim_heap() -> None:
    """Hand the free pages inside the heaps back to the system (glibc malloc_trim; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def placeholder(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zeros of `shape` that take no resident memory until written: a private anonymous mapping,
    whose pages the kernel maps to its single zero page when read. For weights whose shape is used
    (tracing, conversion) while their values live elsewhere. Contiguous, so reading it (a matmul
    while tracing) makes no dense copy either, unlike a stride-0 expanded tensor."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not nbytes:
        return torch.zeros(tuple(shape), dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(tuple(shape))
