"""A compressed token embedding in the mlpackage: the `gather` reads a constexpr weight (a tied
output head's `linear` the same one), which decodes bit for bit to the checkpoint's values, the
weight file is what `--target-mb` prices, and the numpy MIL interpreter matches HF."""

from __future__ import annotations

import logging

import pytest
import torch

ct = pytest.importorskip("coremltools")

from conftest import build_tiny_model, save_tiny_model  # noqa: E402
from test_export import assert_bit_exact, load_in, load_program, rtn_all  # noqa: E402
from test_family_export import assert_prefill_then_decode_match_hf  # noqa: E402

from layerwise import methods  # noqa: E402
from layerwise.checkpoint import read_tensors  # noqa: E402
from layerwise.cli import main  # noqa: E402
from layerwise.coreml import export_mlpackage, package_bytes  # noqa: E402
from layerwise.coreml.layout import exported_bytes, other_blob_bytes  # noqa: E402
from layerwise.recipe import method_config  # noqa: E402

logging.getLogger("coremltools").setLevel(logging.ERROR)
pytestmark = pytest.mark.slow  # a conversion per case: make test, not test-fast

EMBED = "model.embed_tokens"
CONTEXT, PREFILL, DECODE = 48, 40, 4
CASES = {  # kind, embedding config
    "llama-rtn8": ("llama", {"method": "rtn", "bits": 8}),
    "qwen2-rtn8": ("qwen2", {"method": "rtn", "bits": 8}),
    "gemma3-rtn4b32": ("gemma3_text", {"method": "rtn", "bits": 4, "block_size": 32}),
    "qwen2-kmeans": ("qwen2", {"method": "kmeans", "n_bits": 4, "granularity": "per_grouped_channel",
                               "group_size": 1024}),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    kind, raw = CASES[request.param]
    model = build_tiny_model(kind, dtype=torch.float32)
    compressed = rtn_all(model)
    weight = model.model.embed_tokens.weight.data
    compressed[EMBED] = methods.solve_group(method_config(raw, "test"), [weight], None)[0].compressed
    load_in(model, compressed)
    pkg = tmp_path_factory.mktemp(request.param) / "model.mlpackage"
    export_mlpackage(model, pkg, context=CONTEXT, compressed=compressed)
    _, prog = load_program(pkg)
    return kind, model, compressed, pkg, prog


def test_gather_reads_the_constexpr_embedding(exported):
    kind, model, compressed, _, prog = exported
    kinds = assert_bit_exact(prog, compressed)
    op = next(op for op in prog.functions["main"].operations if op.name == EMBED.replace(".", "_") + "_weight")
    assert op.op_type == kinds[EMBED] and op.op_type.startswith("constexpr_")
    users = {child.op_type for child in op.outputs[0].child_ops}
    assert users == ({"gather", "linear"} if model.config.tie_word_embeddings else {"gather"})


def test_weight_file_is_priced(exported):
    _, model, compressed, pkg, _ = exported
    weights = package_bytes(pkg / "Data" / "com.apple.CoreML" / "weights")
    priced = sum(exported_bytes(cw) for cw in compressed.values()) + other_blob_bytes(model, list(compressed), CONTEXT)
    assert weights == priced


def test_mil_interpreter_matches_hf(exported):
    _, model, _, _, prog = exported
    assert_prefill_then_decode_match_hf(prog, model, PREFILL, DECODE)


def test_checkpoint_export_decodes_bit_exact(tmp_path, calib_text_file):
    """From `compress --embeddings 8` to `export`: every constexpr weight, the embedding included,
    is the checkpoint's dequantized codes."""
    source = save_tiny_model(tmp_path / "qwen2", "qwen2")
    ck, pkg = tmp_path / "ck", tmp_path / "model.mlpackage"
    assert main(["-q", "compress", str(source), "--out", str(ck), "--method", "rtn", "--bits", "4",
                 "--block-size", "32", "--embeddings", "8"]) == 0
    assert main(["-q", "export", str(ck), "--out", str(pkg), "--context", "32"]) == 0
    _, compressed = read_tensors(ck)
    assert EMBED in compressed
    _, prog = load_program(pkg)
    assert assert_bit_exact(prog, compressed)[EMBED] == "constexpr_blockwise_shift_scale"
