"""A real `layerwise export` stopped mid-save (SIGKILL, SIGTERM, SIGINT) leaves nothing behind once the
next export to the same --out has run: no hidden package or scratch folder beside --out, nothing in
the system temporary directory (coremltools makes its own temporary packages there unless told)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import save_tiny_model

from layerwise.cli import main

pytestmark = pytest.mark.slow  # multi-process runs and long conversions: make test, not test-fast

pytest.importorskip("coremltools")

# The real CLI (`python -m layerwise`) in a child process that stops right after coremltools writes
# a package (the export's own, or a part of a multifunction one): every temporary thing of the
# conversion exists then. It says so through a file, then waits to be signalled.
PAUSED = textwrap.dedent(
    """
    import os, runpy, signal, sys, time
    import coremltools as ct
    signal.signal(signal.SIGINT, signal.default_int_handler)
    save = ct.models.MLModel.save
    def save_then_wait(self, path):
        save(self, path)
        open(os.environ["PAUSED_AT"], "w").close()
        time.sleep(600)
    ct.models.MLModel.save = save_then_wait
    sys.argv = ["layerwise", *sys.argv[1:]]
    runpy.run_module("layerwise", run_name="__main__", alter_sys=True)
    """
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # one block: what is left behind does not depend on the program's length
    return save_tiny_model(tmp_path_factory.mktemp("debris") / "model", num_hidden_layers=1)


def _export_args(model_dir, out, multifunction: bool) -> list[str]:
    return ["-q", "export", str(model_dir), "--out", str(out), "--context", "32",
            *(["--multifunction", "--prefill-length", "8"] if multifunction else [])]


def _stop_mid_save(model_dir, out, tmpdir, multifunction: bool, sig: int) -> subprocess.CompletedProcess:
    paused = out.parent.parent / "paused"
    env = {**os.environ, "TMPDIR": str(tmpdir), "PAUSED_AT": str(paused)}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED, *_export_args(model_dir, out, multifunction)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert paused.exists(), proc.communicate(timeout=5) if proc.poll() is not None else "no pause in 300 s"
    debris = [p for p in out.parent.iterdir()] + [p for p in tmpdir.iterdir()]
    assert debris, "nothing temporary exists mid-save: the test stops at the wrong moment"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _dirs(tmp_path):
    out_dir, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmpdir.mkdir()
    return out_dir / "m.mlpackage", tmpdir


@pytest.mark.parametrize("multifunction", [False, True], ids=["single", "multifunction"])
def test_killed_export_leaves_nothing_after_the_next_one(model_dir, tmp_path, monkeypatch, multifunction):
    out, tmpdir = _dirs(tmp_path)
    killed = _stop_mid_save(model_dir, out, tmpdir, multifunction, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # so tempfile reads TMPDIR again
    assert main(_export_args(model_dir, out, multifunction)) == 0  # the next export, in this process
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-tokenizer", "m.mlpackage"]
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_export_removes_its_temporary_things(model_dir, tmp_path, sig):
    out, tmpdir = _dirs(tmp_path)
    stopped = _stop_mid_save(model_dir, out, tmpdir, sig == signal.SIGINT, sig)
    assert stopped.returncode == 128 + sig, stopped.stderr
    assert f"stopped by {signal.Signals(sig).name}" in stopped.stderr
    assert list(out.parent.iterdir()) == []
    assert list(tmpdir.iterdir()) == []


def test_a_live_exports_temporary_folder_is_left_alone(model_dir, tmp_path):
    """Another export to the same --out that is still running keeps its scratch folder."""
    from layerwise.outputs import remove_stale, temporary_path

    out, _ = _dirs(tmp_path)
    live = temporary_path(out)  # this (live) process's name
    live.mkdir()
    dead = out.parent / f".{out.name}.partial-999999"
    dead.mkdir()
    remove_stale(out)
    assert live.exists() and not dead.exists()
