"""Interrupted, resumed and raced runs: a resume trusts only kept shards still as recorded and inputs
still as fingerprinted; one live run per --out whatever the flags; inspect checks the files as
decompress does."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest

from layerwise import checkpoint
from layerwise.cli import main

from checkpoint_compare import assert_same_checkpoint, file_hashes, save_sharded

OWNER = ".layerwise-owner.json"


@pytest.fixture(scope="module")
def case(tmp_path_factory, calib_text_file):
    root = tmp_path_factory.mktemp("trust")
    src = save_sharded(root / "src")
    calib = root / "calib.txt"
    shutil.copy(calib_text_file, calib)
    args = ["compress", str(src), "--method", "gptq", "--bits", "4", "--block-size", "32",
            "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--device", "cpu"]
    assert main(args + ["--out", str(root / "whole")]) == 0
    return root, args


def interrupted(out, args, monkeypatch, after: int = 1):
    """Leave `out`'s partial output as a Ctrl-C right after block `after`'s shard does."""
    write_block = checkpoint.CheckpointWriter.write_block

    def write_then_stop(self, index, *a, **kw):
        write_block(self, index, *a, **kw)
        if index == after:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint.CheckpointWriter, "write_block", write_then_stop)
        assert main(args + ["--out", str(out)]) == 130
    partial = out.parent / f".{out.name}.partial"
    assert sorted(p.name for p in partial.glob("block-*")) == [f"block-{i:05d}.safetensors" for i in range(after + 1)]
    assert not (partial / OWNER).exists()  # the lock goes with the run
    return partial


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def tree(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_kept_shard_is_recomputed(case, damage, monkeypatch, caplog, tmp_path):
    root, args = case
    out = tmp_path / "ck"
    partial = interrupted(out, args, monkeypatch)
    shard = partial / "block-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:  # same size, 1,000 bytes of tensor data flipped: the header still reads
        data[-1000:] = bytes(b ^ 0xFF for b in data[-1000:])
        shard.write_bytes(data)
    caplog.set_level(logging.INFO, logger="layerwise")
    assert main(args + ["--out", str(out), "--resume"]) == 0
    said = [r.getMessage() for r in caplog.records if "block-00001.safetensors is" in r.getMessage()]
    assert len(said) == 1 and damage in said[0] and "recomputing from block 1" in said[0], said
    assert_same_checkpoint(out, root / "whole")
    assert not (out / OWNER).exists()


def test_a_missing_kept_shard_discards_the_later_ones(case, monkeypatch, caplog, tmp_path):
    root, args = case
    out = tmp_path / "ck"
    partial = interrupted(out, args, monkeypatch, after=2)
    (partial / "block-00001.safetensors").unlink()
    caplog.set_level(logging.INFO, logger="layerwise")
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert any("block-00001.safetensors is missing" in r.getMessage() for r in caplog.records)
    assert_same_checkpoint(out, root / "whole")


def test_changed_source_weights_are_refused(case, monkeypatch, tmp_path, capsys):
    root, args = case
    src = tmp_path / "src"
    shutil.copytree(root / "src", src)
    args = [str(src) if a == str(root / "src") else a for a in args]
    out = tmp_path / "ck"
    partial = interrupted(out, args, monkeypatch)
    record = json.loads((partial / ".layerwise-run.json").read_text())
    assert all(w["sha256"] for w in record["inputs"]["weights"].values())
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(b ^ 0x01 for b in data[-100:])
    shard.write_bytes(data)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the contents say it
    before = tree(partial)
    capsys.readouterr()
    assert main(args + ["--out", str(out), "--resume"]) == 2
    err = one_line_error(capsys)
    assert f"the source weights changed since the unfinished run ({shard.name})" in err and "--overwrite" in err
    assert tree(partial) == before


def test_changed_calibration_text_is_refused(case, monkeypatch, tmp_path, capsys):
    root, args = case
    calib = tmp_path / "calib.txt"
    shutil.copy(root / "calib.txt", calib)
    args = [str(calib) if a == str(root / "calib.txt") else a for a in args]
    out = tmp_path / "ck"
    partial = interrupted(out, args, monkeypatch)
    lines = calib.read_text().splitlines(keepends=True)  # the same text, another order: the same flags and counts
    half = len(lines) // 2
    calib.write_text("".join(lines[half:] + lines[:half]))
    before = tree(partial)
    capsys.readouterr()
    assert main(args + ["--out", str(out), "--resume"]) == 2
    err = one_line_error(capsys)
    assert "the calibration windows changed since the unfinished run" in err and "--overwrite" in err
    assert tree(partial) == before


@pytest.fixture
def live_pid():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_a_live_run_keeps_every_other_run_off_its_output(case, monkeypatch, tmp_path, capsys, live_pid):
    root, args = case
    out = tmp_path / "ck"
    partial = interrupted(out, args, monkeypatch)
    (partial / OWNER).write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "started": "now"}))
    before = tree(partial)
    capsys.readouterr()
    for flags in ([], ["--resume"], ["--overwrite"], ["--overwrite", "--resume"]):
        assert main(args + ["--out", str(out), *flags]) == 2, flags
        err = one_line_error(capsys)
        assert f"is being written by another run (PID {live_pid} on this host" in err, err
        assert tree(partial) == before
    (partial / OWNER).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "now"}))
    assert main(args + ["--out", str(out), "--overwrite"]) == 2
    assert "on host elsewhere.example" in one_line_error(capsys)
    # the owner is gone: its partial output is resumable as before
    (partial / OWNER).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "started": "then"}))
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert_same_checkpoint(out, root / "whole")
    assert not (out / OWNER).exists() and not partial.exists()


def test_a_live_run_that_has_just_begun_is_not_overwritten(case, tmp_path, capsys, live_pid):
    root, args = case
    out = tmp_path / "ck"
    shutil.copytree(root / "whole", out)
    partial = out.parent / f".{out.name}.partial"
    partial.mkdir()
    (partial / OWNER).write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "started": "now"}))
    assert main(args + ["--out", str(out), "--overwrite"]) == 2
    assert "being written by another run" in one_line_error(capsys)
    assert (partial / OWNER).exists() and file_hashes(out) == file_hashes(root / "whole")


@pytest.mark.parametrize("verify", [True, False])
def test_inspect_checks_the_shards(case, tmp_path, capsys, verify):
    root, _ = case
    flags = [] if verify else ["--no-verify"]
    missing, swapped = tmp_path / "missing", tmp_path / "swapped"
    shutil.copytree(root / "whole", missing)
    shutil.copytree(root / "whole", swapped)
    assert main(["inspect", str(missing), *flags]) == 0
    capsys.readouterr()
    (missing / "block-00001.safetensors").unlink()
    assert main(["inspect", str(missing), *flags]) == 2
    assert "block-00001.safetensors" in one_line_error(capsys)
    a, b = swapped / "block-00000.safetensors", swapped / "block-00001.safetensors"
    a.rename(swapped / "tmp")
    b.rename(a)
    (swapped / "tmp").rename(b)
    assert main(["inspect", str(swapped), "--json", *flags]) == 2
    err = one_line_error(capsys)
    assert ("sha256 differs" in err) if verify else ("should be in block-0000" in err), err


@pytest.mark.parametrize("when", ["after mkdir", "after the owner file"])
def test_a_signal_while_the_run_starts_leaves_nothing(when, monkeypatch, tmp_path):
    """SIGTERM lands inside `__enter__` (the `with` never opens, so `__exit__` never runs)."""
    from layerwise import run_lock
    acquire = run_lock.RunLock.acquire

    def interrupted(self):
        if when == "after mkdir":
            self.tmp_dir.mkdir(parents=True)
        else:
            acquire(self)
        raise KeyboardInterrupt(15)

    monkeypatch.setattr(run_lock.RunLock, "acquire", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.CheckpointWriter(tmp_path / "o"):
            pass
    assert list(tmp_path.iterdir()) == []
