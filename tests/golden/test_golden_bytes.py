"""Refactors keep the bytes: every method, recipe kind and scheduling path gives the checkpoint it
gave when golden_hashes.json was recorded (`python tests/golden/make_cases.py --write`)."""

import json
from pathlib import Path

import pytest

from golden.make_cases import CASES, checkpoint_hashes, make_case, make_demo

GOLDEN = json.loads((Path(__file__).parent / "golden_hashes.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_bytes_unchanged(name, tiny_dirs, calib_text_file, root):
    assert checkpoint_hashes(make_case(name, tiny_dirs, calib_text_file, root)) == GOLDEN[name]


def test_demo_checkpoint_bytes_unchanged(root):
    assert checkpoint_hashes(make_demo(root)) == GOLDEN["demo"]
