"""The same checkpoint exports to the same program and weight file in every process: nothing in the
trace depends on Python's string hashing (PYTHONHASHSEED), e.g. the order of rope tables or window bands."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("coremltools")

from conftest import save_tiny_model  # noqa: E402

from layerwise.cli import main  # noqa: E402


def digests(package) -> dict[str, str]:
    """sha256 of the program and the weight file (the manifest names items by random UUIDs)."""
    wanted = ("model.mlmodel", "weight.bin")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in package.rglob("*") if p.name in wanted}


@pytest.mark.slow
def test_gemma3_exports_the_same_bytes_under_any_hash_seed(tmp_path, calib_text_file):
    source = save_tiny_model(tmp_path / "gemma3", "gemma3_text")  # sliding and global layers, two rope tables
    ck = tmp_path / "ck"
    assert main(["-q", "compress", str(source), "--out", str(ck), "--method", "rtn", "--bits", "4",
                 "--block-size", "32"]) == 0
    found = []
    for seed in ("1", "2"):
        pkg = tmp_path / f"m{seed}.mlpackage"
        subprocess.run([sys.executable, "-m", "layerwise", "-q", "export", str(ck), "--out", str(pkg), "--context", "32"],
                       check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        found.append(digests(pkg))
    assert len(found[0]) == 2 and found[0] == found[1]
