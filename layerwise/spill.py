"""Tensors parked in a temporary file, resident only while something reads them.

Export holds every compressed layer's codes (and masks) from loading until coremltools writes them,
a byte per weight (1.3 GB for a 3 GB float16 model at 4 bits), yet reads each once, at the end.
`Spill.hold` writes a tensor to an unlinked temporary file and returns a view of it, mapped (shared)
but not read: the process holds none of it (the kernel keeps what it can in its page cache, which
it reclaims under pressure, and reads the rest back from disk). Reading the view brings its pages
into the process; `release` drops them again once they have been used.

The file is next to the output (a /tmp on tmpfs would be memory again); unlinked at once, its
space goes back when the last view is freed (a mapping outlives the file's name and descriptor).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class Spill:
    """A temporary file holding tensors (`hold`) whose mapped pages are dropped (`release`)."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory).absolute()
        while not directory.exists():  # an output's folder may not be made yet: its nearest parent
            directory = directory.parent
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".layerwise-spill-")
        self._size = 0
        self._regions: list[tuple[int, int, mmap.mmap]] = []  # (address, bytes, its mapping)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor; the views handed out stay valid (each keeps its own mapping)."""
        self._file.close()

    @property
    def nbytes(self) -> int:
        """Bytes written to the file so far."""
        return self._size

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s values (same dtype and shape) in the file, none of its pages resident."""
        nbytes = t.numel() * t.element_size()
        if not nbytes:
            return t
        offset, step = self._size, mmap.ALLOCATIONGRANULARITY  # each tensor its own mapping, so whole pages
        self._size += -(-nbytes // step) * step
        self._file.seek(offset)
        self._file.write(t.detach().cpu().contiguous().numpy())  # a full disk: OSError(ENOSPC) here
        self._file.flush()
        # mapped, not read: nothing resident. MAP_SHARED, so that dropping pages never loses a write
        mapping = mmap.mmap(self._file.fileno(), nbytes, offset=offset)
        view = torch.frombuffer(mapping, dtype=t.dtype).view(t.shape)
        self._regions.append((view.data_ptr(), nbytes, mapping))
        return view

    def release(self, array: np.ndarray | torch.Tensor) -> bool:
        """Drop the resident pages of the held tensor `array` views (none if it views none).
        Returns whether it did."""
        address = array.data_ptr() if isinstance(array, torch.Tensor) else array.__array_interface__["data"][0]
        for start, nbytes, mapping in self._regions:
            if start <= address < start + nbytes:
                _drop(mapping)
                return True
        return False

    def release_all(self) -> None:
        """Drop the resident pages of every held tensor."""
        for _, _, mapping in self._regions:
            _drop(mapping)


def _drop(mapping: mmap.mmap) -> None:
    """Unmap the resident pages of a shared file mapping (no data lost: they are the file's); a
    no-op where madvise is missing (Windows)."""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
