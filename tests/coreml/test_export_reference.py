"""Acceptance on the bundled reference model: GPTQ 4-bit block-32 checkpoint → `layerwise export`."""

import pytest

from layerwise.checkpoint import load_compressed
from layerwise.cli import main
from layerwise.coreml import package_bytes
from layerwise.models import DEMO_MODEL_DIR

from test_export import assert_bit_exact, expected_bytes, load_program, op_types

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    ck, pkg = root / "ck", root / "Model.mlpackage"
    assert main(["-q", "compress", DEMO_MODEL_DIR, "--out", str(ck), "--method", "gptq", "--bits", "4",
                 "--block-size", "32", "--nsamples", "32", "--seqlen", "256", "--device", "cpu"]) == 0
    assert main(["-q", "export", str(ck), "--out", str(pkg), "--context", "512"]) == 0
    return ck, pkg


def test_reference_export_is_stateful_fused_and_bit_exact(exported):
    ck, pkg = exported
    spec, prog = load_program(pkg)
    ops = op_types(prog)
    assert {"read_state", "coreml_update_state", "scaled_dot_product_attention"} <= ops
    assert "softmax" not in ops and "matmul" not in ops
    kinds = assert_bit_exact(prog, load_compressed(ck).compressed)
    assert len(kinds) == 28 and set(kinds.values()) == {"constexpr_blockwise_shift_scale"}
    meta = spec.description.metadata.userDefined
    assert meta["layerwise.context"] == "512" and "gptq" in meta["layerwise.recipe"]
    assert (pkg.parent / "Model-tokenizer" / "tokenizer.json").is_file()


def test_reference_package_size_within_5_percent_of_payload(exported):
    ck, pkg = exported
    loaded = load_compressed(ck)
    expected = expected_bytes(loaded.model, loaded.compressed, 512)
    assert abs(package_bytes(pkg) - expected) / expected < 0.05


def test_export_refuses_existing_output_and_unknown_family(exported, tmp_path, capsys):
    ck, pkg = exported
    assert main(["export", str(ck), "--out", str(pkg)]) == 2
    assert "already exists" in capsys.readouterr().err
