"""Refactors keep the bytes: every method, recipe kind and scheduling path gives the checkpoint it
gave when golden_hashes.json was recorded (`python tests/golden/make_cases.py --write`)."""

import json
from pathlib import Path

import pytest

import torch

from golden.make_cases import CASES, checkpoint_hashes, machine, make_case, make_demo

GOLDEN = json.loads((Path(__file__).parent / "golden_hashes.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The recorded thread count (a GEMM on 2 threads sums in another order than on 1); the
    hashes hold only on a machine with the recorded kernels, elsewhere the test says so and skips."""
    recorded = GOLDEN["_machine"]
    previous = torch.get_num_threads()
    torch.set_num_threads(recorded["threads"])
    try:
        here = machine()
        if here != recorded:
            pytest.skip(f"golden hashes were recorded on {recorded}; this machine is {here}")
        yield tmp_path_factory.mktemp("golden")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_bytes_unchanged(name, tiny_dirs, calib_text_file, root):
    assert checkpoint_hashes(make_case(name, tiny_dirs, calib_text_file, root)) == GOLDEN[name]


def test_demo_checkpoint_bytes_unchanged(root):
    assert checkpoint_hashes(make_demo(root)) == GOLDEN["demo"]
