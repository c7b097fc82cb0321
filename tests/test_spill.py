"""Spill: tensors parked in a temporary file keep their values and take no resident memory until read."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from layerwise.spill import Spill

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")


def resident_kib(t: torch.Tensor) -> int:
    """Resident KiB of the mapping that holds `t` (from /proc/self/smaps)."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line: its address range
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = start <= address < end
            elif inside and head[0] == "Rss:":
                return int(head[1])
    raise AssertionError("no mapping holds the tensor")


def test_held_tensors_keep_their_values_and_no_resident_pages(tmp_path):
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (600, 1000), dtype=torch.uint8)
    mask = torch.rand(300, 1000) < 0.5
    with Spill(tmp_path / "not" / "made") as spill:  # the nearest existing folder holds the file
        held = [spill.hold(codes), spill.hold(mask)]
        assert [resident_kib(t) for t in held] == [0, 0]
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing left behind, even while mapped
    step = mmap.ALLOCATIONGRANULARITY  # each tensor in whole pages of its own
    assert spill.nbytes == -(-600_000 // step) * step + -(-300_000 // step) * step
    for original, view in zip([codes, mask], held):
        assert view.dtype == original.dtype and view.shape == original.shape
        assert torch.equal(view, original)  # read after the descriptor was closed
    assert resident_kib(held[0]) >= 586  # reading brought the pages back …
    assert spill.release(held[0].numpy()[10:])  # … an array inside it releases them again
    assert resident_kib(held[0]) == 0 and torch.equal(held[0], codes)


def test_release_ignores_what_the_spill_does_not_hold(tmp_path):
    with Spill(tmp_path) as spill:
        kept = spill.hold(torch.ones(5000, dtype=torch.uint8))
        other = torch.ones(5000, dtype=torch.uint8)
        assert not spill.release(other) and not spill.release(other.numpy())
        assert spill.release(kept)
        assert torch.equal(other, kept)
