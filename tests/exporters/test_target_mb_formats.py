"""`compress --target-mb M --target-format mlx|gguf`: the knapsack prices that format's bytes (its
exporter's `layer_bytes` and `fixed_bytes`), and the exported weights file lands in [0.99, 1] × M."""

from __future__ import annotations

import pytest

from cli_steps import compress, export_as

from layerwise.cli import main

pytest.importorskip("gguf")


@pytest.mark.parametrize("fmt, target_mb, weights", [
    ("gguf", 1.28, "m.gguf"),  # between every layer in Q4_1 (1.22 MB) and every layer 8-bit (1.33 MB)
    ("mlx", 1.11, "mlx/model.safetensors"),  # between 2-bit (1.08 MB) and 8-bit (1.14 MB) groups of 32
])
def test_the_export_lands_just_below_the_target(fmt, target_mb, weights, tiny_dirs, calib_text_file, tmp_path, capsys):
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--target-mb", str(target_mb),
                  "--target-format", fmt, "--grid", fmt)
    assert f"budget {target_mb:g} MB {fmt}" in capsys.readouterr().out
    summary = export_as(fmt, ck, tmp_path / weights.split("/")[0], capsys)
    assert "bit for bit" in summary
    size = (tmp_path / weights).stat().st_size / 1e6
    assert 0.99 * target_mb <= size <= target_mb, size


def test_a_target_format_without_a_target_mb_is_refused(tiny_dirs, tmp_path, capsys):
    assert main(["compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "ck"), "--target-bits", "4",
                 "--target-format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "add --target-mb" in err
    assert list(tmp_path.iterdir()) == []
