"""Every declared family exported once: states, the fused SDPA op (explicit ops only where soft-capped),
constexpr weights bit-exact to RTN-compressed linears (Phi-3's fused ones included), attention metadata,
and the numpy MIL interpreter against HF over a prefill past the sliding window plus 4 decode steps,
fed the plain causal mask the README documents."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # multi-process runs and long conversions: make test, not test-fast

ct = pytest.importorskip("coremltools")

from conftest import FAMILY_KINDS, FAMILY_VARIANTS, build_tiny_model  # noqa: E402
from mil_interpreter import MILInterpreter  # noqa: E402
from test_export import assert_bit_exact, load_program, op_types, rtn_all  # noqa: E402
from test_mil_interpreter import assert_logits_close  # noqa: E402

from layerwise.coreml import export_mlpackage, package_bytes  # noqa: E402
from layerwise.coreml.layout import exported_bytes, other_blob_bytes, program_bytes  # noqa: E402
from layerwise.models.stateful import causal_mask  # noqa: E402

logging.getLogger("coremltools").setLevel(logging.ERROR)

EXPORTED = {**{kind: (kind, {}) for kind in FAMILY_KINDS}, "phi3_longrope": FAMILY_VARIANTS["phi3_longrope"]}
PREFILL, DECODE, CONTEXT = 40, 4, 48  # past the 16-token windows


@pytest.fixture(scope="module", params=list(EXPORTED))
def exported(request, tmp_path_factory):
    """(name, model holding the dequantized weights, compressed, report, spec, program), once per family."""
    kind, extra = EXPORTED[request.param]
    model = build_tiny_model(kind, dtype=torch.float32, **extra)
    compressed = rtn_all(model)  # 4-bit, blocks of 32, loaded back into the model
    pkg = tmp_path_factory.mktemp(request.param) / "model.mlpackage"
    report = export_mlpackage(model, pkg, context=CONTEXT, compressed=compressed)
    report["package"] = pkg
    spec, prog = load_program(pkg)
    return request.param, model, compressed, report, spec, prog


def test_weight_file_is_what_the_size_budget_prices(exported):
    """`--target-mb` prices every family's weight file byte for byte: its rope tables (Gemma 3: a
    local and a global pair), window positions, (1 + w) norms left out when they are ones."""
    name, model, compressed, report, _, _ = exported
    weights = package_bytes(report["package"] / "Data" / "com.apple.CoreML" / "weights")
    priced = sum(exported_bytes(cw) for cw in compressed.values()) + other_blob_bytes(model, list(compressed), CONTEXT)
    assert weights == priced


def test_program_is_within_its_family_price(exported):
    """The program text and manifest (the package less its weight file) stay under what the size
    budget prices for the family, and not far under (the price is a measurement, rounded up)."""
    name, model, _, report, _, _ = exported
    pkg = report["package"]
    program = package_bytes(pkg) - package_bytes(pkg / "Data" / "com.apple.CoreML" / "weights")
    priced = program_bytes(model)
    assert 0.85 * priced <= program <= priced, (program, priced)


def test_program_is_stateful_with_sdpa_except_soft_capped_layers(exported):
    name, model, _, report, spec, prog = exported
    meta = dict(spec.description.metadata.userDefined)
    kinds = json.loads(meta["layerwise.attention_ops"])
    ops = op_types(prog)
    assert {"read_state", "coreml_update_state", "slice_update"} <= ops
    assert [s.name for s in spec.description.state] == ["k_cache", "v_cache"]
    sdpa = sum(op.op_type == "scaled_dot_product_attention" for op in prog.functions["main"].operations)
    assert sdpa == kinds.count("sdpa")
    if "softcap" in kinds:  # Gemma 2: q·k, tanh cap, softmax as explicit ops
        assert {"matmul", "tanh", "softmax"} <= ops
    else:
        assert not ops & {"softmax", "matmul"}
    assert set(report["ops"]) == ops


def test_constexpr_weights_decode_bit_exact(exported):
    name, model, compressed, report, _, prog = exported
    kinds = assert_bit_exact(prog, compressed)
    assert set(kinds.values()) == {"constexpr_blockwise_shift_scale"}
    if name.startswith("phi3"):  # the fused projections travel as the one linear they are
        assert "model.layers.0.self_attn.qkv_proj" in kinds and "model.layers.0.mlp.gate_up_proj" in kinds


def test_metadata_records_windows_and_attention_kinds(exported):
    name, model, _, _, spec, _ = exported
    meta = dict(spec.description.metadata.userDefined)
    windows = json.loads(meta["layerwise.layer_windows"])
    assert len(windows) == model.config.num_hidden_layers
    assert json.loads(meta["layerwise.attention_kinds"]) == ["sliding" if w else "full" for w in windows]
    assert meta["layerwise.family"] == EXPORTED[name][0]
    if EXPORTED[name][0] in ("mistral", "gemma2", "gemma3_text") or name == "phi3_longrope":
        assert 16 in windows


def separated_ids(model, length: int = PREFILL + DECODE, min_gap: float = 3e-3, tries: int = 200):
    """Token ids (and HF's logits for them) where HF's top two logits differ by more than
    min_gap × the logit scale at every position: a random tiny model has near-ties that float16
    noise flips, and "same argmax everywhere" is only defined away from them."""
    for seed in range(tries):
        ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(1, length))
        with torch.no_grad():
            ref = model(torch.from_numpy(ids).long()).logits.float().numpy()
        top2 = np.sort(ref[0], axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > min_gap * np.abs(ref).max():
            return ids.astype(np.int32), ref
    raise AssertionError(f"no token sequence of {tries} without a near-tie")


def test_mil_interpreter_matches_hf_past_the_window(exported):
    """Prefill of 40 tokens then 4 decode steps through the float16 program, plain causal masks."""
    name, model, _, _, _, prog = exported
    assert_prefill_then_decode_match_hf(prog, model)


def assert_prefill_then_decode_match_hf(prog, model, prefill: int = PREFILL, decode: int = DECODE):
    """The program's logits for a prefill then single-token decode steps equal HF's whole-sequence forward."""
    interp = MILInterpreter(prog)
    state = interp.new_state()
    ids, ref = separated_ids(model, prefill + decode)

    def step(start, stop):
        mask = causal_mask(stop - start, past=start).numpy().astype(np.float16)
        return np.asarray(interp.run({"input_ids": ids[:, start:stop], "causal_mask": mask}, state)["logits"], np.float32)

    assert_logits_close(step(0, prefill), ref[:, :prefill])
    for t in range(prefill, prefill + decode):
        assert_logits_close(step(t, t + 1), ref[:, t : t + 1])
