"""The calibration batches as the current block sees them: in memory, or memory-mapped files on disk.

Block inputs are N × L × hidden float32 — 32 windows of 512 tokens of a 4096-wide model are 256 MB,
and 128 × 2048 are 4 GB. With a directory, each batch's hidden states live in their own file and are
mapped (`numpy.memmap`) only while that batch is in use, so the resident set holds one batch.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .capture import BlockInput


class Activations:
    """A list of `BlockInput`s whose hidden states may be offloaded to `directory`."""

    def __init__(self, directory: str | Path | None = None, device: torch.device | str = "cpu"):
        self.directory = Path(directory) if directory is not None else None
        self.device = torch.device(device)
        self._batches: list[BlockInput] = []  # hidden is None for an offloaded batch
        self._files: list[Path | None] = []
        self._shapes: list[tuple[int, ...]] = []
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def append(self, batch: BlockInput) -> None:
        self._batches.append(replace(batch, hidden=None) if self.directory is not None else batch)
        self._files.append(None)
        self._shapes.append(tuple(batch.hidden.shape))
        if self.directory is not None:
            self._store(len(self._batches) - 1, batch.hidden)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> BlockInput:
        batch = self._batches[i]
        if self.directory is None:
            return batch
        mapped = np.memmap(self._files[i], dtype=np.float32, mode="c", shape=self._shapes[i])  # private, writable
        return replace(batch, hidden=torch.from_numpy(mapped).to(self.device))

    def __iter__(self) -> Iterator[BlockInput]:
        return (self[i] for i in range(len(self)))

    def advance(self, step: Callable[[BlockInput], torch.Tensor]) -> None:
        """Replace every batch's hidden states by `step(batch)` (the block's outputs)."""
        for i in range(len(self)):
            out = step(self[i])
            if self.directory is None:
                self._batches[i].hidden = out
            else:
                self._store(i, out)

    def hidden_states(self) -> list[torch.Tensor]:
        return [batch.hidden for batch in self]

    def nbytes(self) -> int:
        return sum(4 * int(np.prod(s)) for s in self._shapes)

    def tokens(self) -> int:
        """Calibration tokens held (batch × length, summed over the batches)."""
        return sum(int(np.prod(s[:-1])) for s in self._shapes)

    def hidden_width(self) -> int:
        return self._shapes[0][-1]

    def close(self) -> None:
        for f in self._files:
            if f is not None:
                f.unlink(missing_ok=True)
        self._files = [None] * len(self._files)

    def _store(self, i: int, hidden: torch.Tensor) -> None:
        """Write to a new file and rename it over the old one (a mapped reader never sees a half write)."""
        path = self.directory / f"batch-{i:05d}.f32"
        tmp = self.directory / f".batch-{i:05d}.{uuid.uuid4().hex}"
        hidden.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tofile(tmp)
        os.replace(tmp, path)
        self._files[i] = path
