"""A size-budget checkpoint (mixed bits and block sizes per layer) exports bit for bit, and the
package's weight file is exactly what `layerwise.coreml.layout` priced for `--target-mb`."""

from __future__ import annotations

import pytest

pytest.importorskip("coremltools")

from test_export import assert_bit_exact, load_program

from layerwise.checkpoint import load_compressed, read_manifest, read_tensors
from layerwise.cli import main
from layerwise.coreml import package_bytes
from layerwise.coreml.layout import exported_bytes, other_blob_bytes

SMALL = ["--nsamples", "8", "--seqlen", "64", "--seed", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def mixed_export(tiny_dirs, calib_text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    checkpoint, pkg = root / "mixed", root / "mixed.mlpackage"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(checkpoint), "--calib", str(calib_text_file),
                 *SMALL, "--method", "gptq", "--target-bits", "3.6"]) == 0
    assert main(["-q", "export", str(checkpoint), "--out", str(pkg), "--context", "512",
                 "--allow-long-context"]) == 0
    return checkpoint, pkg


def test_mixed_checkpoint_decodes_bit_exact(mixed_export):
    checkpoint, pkg = mixed_export
    _, compressed = read_tensors(checkpoint)
    assert len({(cw.bits, cw.block_size) for cw in compressed.values()}) > 1  # really mixed
    _, prog = load_program(pkg)
    kinds = assert_bit_exact(prog, compressed)
    assert len(kinds) == len(compressed)


def test_weight_file_is_the_priced_layout(mixed_export):
    checkpoint, pkg = mixed_export
    _, compressed = read_tensors(checkpoint)
    weights = package_bytes(pkg / "Data" / "com.apple.CoreML" / "weights")
    model = load_compressed(checkpoint).model
    budgeted = sum(exported_bytes(cw) for cw in compressed.values())
    # header + one blob per constant, the converter's zero biases included: byte for byte
    assert weights == budgeted + other_blob_bytes(model, list(compressed))
    predicted_mb = read_manifest(checkpoint)["budget"]["predicted_export_mb"]
    assert abs(package_bytes(pkg) / 1e6 - predicted_mb) / predicted_mb < 0.02


@pytest.mark.parametrize("target_mb", [1.2, 1.24])
@pytest.mark.slow
def test_target_mb_package_is_within_one_percent_below(tiny_dirs, calib_text_file, tmp_path, target_mb):
    """The whole exported package (weight file, program, manifest) lands in [0.99, 1] × the target."""
    checkpoint, pkg = tmp_path / "ck", tmp_path / "ck.mlpackage"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(checkpoint), "--calib", str(calib_text_file),
                 *SMALL, "--method", "gptq", "--target-mb", str(target_mb)]) == 0
    assert main(["-q", "export", str(checkpoint), "--out", str(pkg), "--context", "512",
                 "--allow-long-context"]) == 0
    size = package_bytes(pkg) / 1e6
    assert 0.99 * target_mb <= size <= target_mb, size
