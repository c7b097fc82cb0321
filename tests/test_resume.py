"""A real `layerwise compress` process killed after block k (SIGKILL, or Ctrl-C = SIGINT) and resumed
with --resume writes the same bytes as an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from layerwise.cli import main

from checkpoint_compare import assert_same_checkpoint, save_sharded

# Runs the real CLI in a child process that sends itself `sig` right after block `k`'s shard is complete.
# SIGINT gets Python's own handler (Ctrl-C in a terminal): a child inherits an ignored SIGINT from a
# suite run in the background (`make test &`), and would then finish the run instead of stopping.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from layerwise import checkpoint
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sig, k = int(sys.argv[1]), int(sys.argv[2])
    write_block = checkpoint.CheckpointWriter.write_block
    def write_then_die(self, index, *args, **kwargs):
        write_block(self, index, *args, **kwargs)
        if index == k:
            os.kill(os.getpid(), sig)
    checkpoint.CheckpointWriter.write_block = write_then_die
    from layerwise.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory, calib_text_file):
    root = tmp_path_factory.mktemp("resume")
    src = save_sharded(root / "src")
    args = ["compress", str(src), "--method", "gptq", "--bits", "4", "--block-size", "32",
            "--calib", str(calib_text_file), "--nsamples", "8", "--seqlen", "32", "--device", "cpu"]
    assert main(args + ["--out", str(root / "whole")]) == 0
    return root, args


@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(resume_case, sig, code, capsys):
    root, args = resume_case
    out = root / f"killed-{sig.name}"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(int(sig)), "1", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    partial = out.parent / f".{out.name}.partial"
    assert not out.exists() and sorted(p.name for p in partial.glob("block-*")) == [
        "block-00000.safetensors", "block-00001.safetensors"]
    if sig == signal.SIGINT:
        assert "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert main(args + ["--out", str(out)]) == 2  # no silent restart over an unfinished run
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert not partial.exists()
    assert_same_checkpoint(out, root / "whole")


@pytest.mark.slow
def test_resume_with_other_arguments_names_the_difference(resume_case, capsys):
    root, args = resume_case
    out = root / "other-args"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(int(signal.SIGKILL)), "0", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert main(args + ["--out", str(out), "--resume", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "calibration.seed was 0 in the unfinished run and is 1 now" in err
    assert main(args + ["--out", str(root / "nothing"), "--resume"]) == 2
    assert "no unfinished run" in capsys.readouterr().err


def test_offloaded_activations_give_the_same_checkpoint(resume_case, caplog):
    root, args = resume_case
    import logging

    caplog.set_level(logging.INFO, logger="layerwise")
    assert main(args + ["--out", str(root / "offloaded"), "--offload-activations"]) == 0
    assert_same_checkpoint(root / "offloaded", root / "whole")
    assert not (root / ".offloaded.activations").exists()
    assert any("memory estimate" in r.getMessage() and "on disk" in r.getMessage() for r in caplog.records)
