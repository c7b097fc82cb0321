"""A budget run honours the compress options that change how, not what: --offload-activations
gives the same checkpoint, and a killed budget run resumes to the same bytes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from layerwise.cli import main

from checkpoint_compare import assert_same_checkpoint, save_sharded
from test_resume import KILLER


@pytest.fixture(scope="module")
def budget_case(calib_text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-options")
    menu = root / "menu.yaml"  # a short menu keeps the measuring pass (three runs of it here) quick
    menu.write_text("rules:\n  - match: '.*'\n    menu: [{method: gptq, bits: 2, block_size: 32}, "
                    "{method: gptq, bits: 4, block_size: 32}]\n")
    args = ["compress", str(save_sharded(root / "src")), "--recipe", str(menu), "--target-bits", "3.6",
            "--calib", str(calib_text_file), "--nsamples", "8", "--seqlen", "32", "--device", "cpu"]
    assert main(args + ["--out", str(root / "whole")]) == 0
    return root, args


@pytest.mark.slow
def test_offloaded_budget_run_gives_the_same_checkpoint(budget_case):
    root, args = budget_case
    assert main(args + ["--out", str(root / "offloaded"), "--offload-activations"]) == 0
    assert_same_checkpoint(root / "offloaded", root / "whole")
    assert not list(root.glob(".offloaded.*"))  # both passes' activations removed


@pytest.mark.slow
def test_killed_budget_run_resumes_to_the_same_bytes(budget_case, capsys):
    root, args = budget_case
    out = root / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(int(signal.SIGKILL)), "0", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert main(args + ["--out", str(out)]) == 2  # named before measuring, one line
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and "Traceback" not in err
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert_same_checkpoint(out, root / "whole")
