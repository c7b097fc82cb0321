"""The CLI steps the exporter tests share: a quick compress, then `export --format FMT`."""

from __future__ import annotations

from layerwise.cli import main

FAST = ["--nsamples", "8", "--seqlen", "64"]


def compress(model, out, calib, *flags) -> str:
    assert main(["-q", "compress", str(model), "--out", str(out), "--calib", str(calib), *FAST, *flags]) == 0
    return str(out)


def export_as(fmt: str, checkpoint, out, capsys) -> str:
    """Export and return the summary line (the last line printed)."""
    assert main(["-q", "export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]
