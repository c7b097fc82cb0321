"""Core ML export: stateful iOS18 programs whose constexpr ops decode to the checkpoint bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
from coremltools.converters.mil.mil.types import builtin_to_string

from layerwise.coreml import export_mlpackage, package_bytes
from layerwise.errors import ModelError
from layerwise.formats import CompressedWeight
from layerwise.models.stateful import StatefulCausalLM, causal_mask
from layerwise.solvers import RTNConfig, rtn

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
# big enough that the weights, not the program text, dominate the package size
SIZED = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
CONTEXT = 64


# ---- helpers ------------------------------------------------------------------------------------
def llama(kv_heads: int = 2, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}, num_key_value_heads=kv_heads)).eval()


def block_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def load_in(model, compressed: dict[str, CompressedWeight]) -> None:
    """Copy cw.dequantize() into the model: torch and Core ML then hold the same numbers."""
    with torch.no_grad():
        for name, cw in compressed.items():
            model.get_submodule(name).weight.copy_(cw.dequantize().float())


def rtn_all(model, bits: int = 4, block_size: int | None = 32, sym: bool = False) -> dict[str, CompressedWeight]:
    cfg = RTNConfig(bits=bits, block_size=block_size, sym=sym)
    compressed = {n: rtn(m.weight.data, None, cfg).compressed for n, m in block_linears(model).items()}
    load_in(model, compressed)
    return compressed


def load_program(pkg: Path):
    spec = ct.utils.load_spec(str(pkg))
    weights = pkg / "Data" / "com.apple.CoreML" / "weights"
    return spec, load_milproto(spec, spec.specificationVersion, str(weights))


def op_types(prog) -> set[str]:
    return {op.op_type for fn in prog.functions.values() for op in fn.operations}


def decode(var) -> np.ndarray:
    """Materialize a constexpr output with coremltools' own decoders (recursing through chains)."""
    op = var.op
    if op.op_type == "const":
        return var.val
    try:
        out = op.materialized_val_inference()
    except (TypeError, AttributeError, ValueError):  # an input is itself a constexpr output
        args = {k: None if v is None else decode(v) for k, v in op.inputs.items()}
        order = {
            "constexpr_blockwise_shift_scale": ("data", "scale", "offset"),
            "constexpr_lut_to_dense": ("indices", "lut", "vector_axis"),
            "constexpr_sparse_to_dense": ("nonzero_data", "mask"),
            "constexpr_lut_to_sparse": ("indices_mask", "indices_nonzero_data", "lut", "vector_axis"),
            "constexpr_sparse_blockwise_shift_scale": ("data_mask", "nonzero_data", "scale", "offset"),
        }[op.op_type]
        out = type(op).decompress(*(args.get(k) for k in order))
    return out[list(op.outputs).index(var)] if isinstance(out, tuple) else out


def decoded_weights(prog, function: str = "main") -> dict[str, tuple[str, np.ndarray]]:
    """MIL op name → (op type, decoded value) for every constexpr whose output feeds a compute op."""
    found = {}
    for op in prog.functions[function].operations:
        if op.op_type.startswith("constexpr_") and any(
            not child.op_type.startswith("constexpr_") for child in op.outputs[-1].child_ops
        ):
            found[op.name] = (op.op_type, decode(op.outputs[-1]))
    return found


def assert_bit_exact(prog, compressed: dict[str, CompressedWeight], function: str = "main") -> dict[str, str]:
    found = decoded_weights(prog, function)
    kinds = {}
    for name, cw in compressed.items():
        op_type, value = found[name.replace(".", "_") + "_weight"]
        expected = cw.dequantize().numpy()
        assert value.dtype == np.float16 and value.shape == expected.shape, name
        assert np.array_equal(value.view(np.uint16), expected.view(np.uint16)), name
        kinds[name] = op_type
    return kinds


def expected_bytes(model, compressed: dict[str, CompressedWeight], context: int) -> int:
    """Compressed payload + 2 bytes per uncompressed parameter and per rotary-table entry."""
    held = {id(model.get_submodule(n).weight) for n in compressed}
    dense = {id(p): p.numel() for p in model.parameters() if id(p) not in held}  # tied: counted once
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    rope = 2 * context * head_dim
    return sum(cw.payload_bytes() for cw in compressed.values()) + 2 * (sum(dense.values()) + rope)


# ---- a tiny GQA Llama with RTN 4-bit block-32 weights, exported once ---------------------------
@pytest.fixture(scope="module")
def rtn_export(tmp_path_factory):
    model = llama(kv_heads=2)
    compressed = rtn_all(model)
    pkg = tmp_path_factory.mktemp("rtn") / "tiny.mlpackage"
    report = export_mlpackage(model, pkg, context=CONTEXT, compressed=compressed, metadata={"recipe": {"rtn": 4}})
    spec, prog = load_program(pkg)
    return model, compressed, pkg, report, spec, prog


def test_rtn_weights_decode_bit_exact(rtn_export):
    _, compressed, _, report, _, prog = rtn_export
    kinds = assert_bit_exact(prog, compressed)
    assert set(kinds.values()) == {"constexpr_blockwise_shift_scale"}
    assert report["compressed"] == {"constexpr_blockwise_shift_scale": len(compressed)}
    for fn in prog.functions.values():  # 4-bit codes travel as uint4, zero points as uint4 offsets
        for op in fn.operations:
            if op.op_type == "constexpr_blockwise_shift_scale":
                assert builtin_to_string(op.data.dtype) == "uint4" and op.offset.dtype == op.data.dtype


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_weights_export_signed_codes_without_offset(tmp_path, bits):
    """A symmetric grid travels as int4/int8 codes − 2**(bits−1) and no offset tensor, bit-exact,
    including sparse symmetric weights."""
    model = llama()
    compressed = rtn_all(model, bits=bits, sym=True)
    gate = "model.layers.0.mlp.gate_proj"
    compressed[gate] = pruned_affine(model.get_submodule(gate).weight.data, bits, 32, sym=True)
    load_in(model, compressed)
    assert all(cw.midpoint_zero for cw in compressed.values())
    export_mlpackage(model, tmp_path / "sym.mlpackage", context=CONTEXT, compressed=compressed)
    _, prog = load_program(tmp_path / "sym.mlpackage")
    assert_bit_exact(prog, compressed)
    shift_ops = [op for op in prog.functions["main"].operations if "shift_scale" in op.op_type]
    assert len(shift_ops) == len(compressed)
    for op in shift_ops:
        data = op.data if op.op_type == "constexpr_blockwise_shift_scale" else op.nonzero_data
        assert builtin_to_string(data.dtype) == f"int{bits}" and op.offset is None


def test_program_is_stateful_with_fused_attention(rtn_export):
    model, _, _, report, spec, prog = rtn_export
    ops = op_types(prog)
    assert {"read_state", "coreml_update_state", "slice_update", "scaled_dot_product_attention"} <= ops
    assert not ops & {"softmax", "matmul"}  # no decomposed attention left
    main = prog.functions["main"].operations
    assert sum(op.op_type == "scaled_dot_product_attention" for op in main) == model.config.num_hidden_layers
    assert set(report["ops"]) == ops
    assert [s.name for s in spec.description.state] == ["k_cache", "v_cache"]
    assert [i.name for i in spec.description.input] == ["input_ids", "causal_mask"]
    assert [o.name for o in spec.description.output] == ["logits"]
    assert spec.specificationVersion >= 9  # iOS18


def test_metadata_and_report(rtn_export):
    _, _, pkg, report, spec, _ = rtn_export
    meta = dict(spec.description.metadata.userDefined)
    assert meta["layerwise.context"] == str(CONTEXT)
    assert meta["layerwise.state_names"] == "k_cache,v_cache"
    assert meta["layerwise.input_names"] == "input_ids,causal_mask"
    assert json.loads(meta["layerwise.state_shape"]) == [2, 1, 2, CONTEXT, 16]
    assert json.loads(meta["recipe"]) == {"rtn": 4}
    assert report["size_bytes"] == package_bytes(pkg) and report["seconds"] > 0
    assert not [p for p in pkg.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_mixed_schemes_mqa_decode_bit_exact(tmp_path):
    """LUT (grouped channels, plain and int8), sparse dense/affine/LUT, 2-, 3- and 8-bit grids, MQA."""
    model = llama(kv_heads=1)
    w = {n.removeprefix("model.layers."): m.weight.data for n, m in block_linears(model).items()}
    g = torch.Generator().manual_seed(5)
    schemes = {
        "0.self_attn.q_proj": lut_weight(w["0.self_attn.q_proj"], 4, 16, g),
        "0.self_attn.k_proj": lut_weight(w["0.self_attn.k_proj"], 4, 16, g, q8=True),
        "0.self_attn.v_proj": lut_weight(w["0.self_attn.v_proj"], 2, 8, g, prune=True),
        "0.self_attn.o_proj": pruned_dense(w["0.self_attn.o_proj"]),
        "0.mlp.gate_proj": pruned_affine(w["0.mlp.gate_proj"], 4, 32),
        "0.mlp.up_proj": rtn(w["0.mlp.up_proj"], None, RTNConfig(bits=2)).compressed,
        "0.mlp.down_proj": rtn(w["0.mlp.down_proj"], None, RTNConfig(bits=3)).compressed,
        "1.mlp.down_proj": rtn(w["1.mlp.down_proj"], None, RTNConfig(bits=8)).compressed,
        "1.mlp.up_proj": pruned_affine(w["1.mlp.up_proj"], 3, None),
    }
    cw = {"model.layers." + n: c for n, c in schemes.items()}
    load_in(model, cw)
    report = export_mlpackage(model, tmp_path / "mixed.mlpackage", context=CONTEXT, compressed=cw)
    _, prog = load_program(tmp_path / "mixed.mlpackage")
    kinds = assert_bit_exact(prog, cw)
    assert kinds["model.layers.0.self_attn.q_proj"] == "constexpr_lut_to_dense"
    assert kinds["model.layers.0.self_attn.o_proj"] == "constexpr_sparse_to_dense"
    assert kinds["model.layers.0.mlp.up_proj"] == "constexpr_lut_to_dense"  # per-channel 2-bit grid: 4-entry LUT
    assert kinds["model.layers.0.mlp.down_proj"] == "constexpr_lut_to_dense"  # 3-bit grid as 8-entry LUT
    assert kinds["model.layers.1.mlp.down_proj"] == "constexpr_blockwise_shift_scale"  # uint8 codes
    ops = op_types(prog)
    assert {"constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"} <= ops
    assert "scaled_dot_product_attention" in ops and "softmax" not in ops
    assert report["compressed"]["constexpr_sparse_to_dense"] == 4


def test_tied_qwen2_lm_head_compressed_feeds_embedding_too(tmp_path):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    compressed = rtn_all(model)
    compressed["lm_head"] = rtn(model.lm_head.weight.data, None, RTNConfig(bits=4, block_size=16)).compressed
    load_in(model, compressed)
    export_mlpackage(model, tmp_path / "qwen.mlpackage", context=CONTEXT, compressed=compressed)
    _, prog = load_program(tmp_path / "qwen.mlpackage")
    assert_bit_exact(prog, compressed)
    head = next(op for op in prog.functions["main"].operations if op.name == "lm_head_weight")
    consumers = {child.op_type for child in head.outputs[0].child_ops}
    assert consumers == {"gather", "linear"}  # one compressed copy serves embedding and head


def test_float16_export_holds_model_weights(tmp_path):
    model = llama(kv_heads=2)
    export_mlpackage(model, tmp_path / "fp16.mlpackage", context=CONTEXT, last_logits_only=True)
    spec, prog = load_program(tmp_path / "fp16.mlpackage")
    assert not any(t.startswith("constexpr_") for t in op_types(prog))
    consts = {
        op.name: op.outputs[0].val for op in prog.functions["main"].operations
        if op.op_type == "const" and getattr(op.outputs[0].val, "ndim", 0) == 2
    }
    for name, module in block_linears(model).items():
        expected = module.weight.detach().half().numpy()
        assert any(v.shape == expected.shape and np.array_equal(v, expected) for v in consts.values()), name
    logits = spec.description.output[0].type.multiArrayType
    assert list(logits.shape)[-2:] == [1, TINY["vocab_size"]]  # last_logits_only


def test_bfloat16_model_is_exported_from_a_float32_copy(tmp_path):
    model = llama().to(torch.bfloat16)
    report = export_mlpackage(model, tmp_path / "bf16.mlpackage", context=16)
    assert "scaled_dot_product_attention" in report["ops"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the user's model is untouched


def test_unknown_or_misshaped_compressed_weight_is_an_error(tmp_path):
    model = llama()
    cw = rtn(torch.randn(8, 64), None, RTNConfig(bits=4)).compressed
    with pytest.raises(ModelError, match="no module"):
        export_mlpackage(model, tmp_path / "x.mlpackage", context=16, compressed={"model.layers.9.nope": cw})
    with pytest.raises(ModelError, match="shape"):
        export_mlpackage(model, tmp_path / "x.mlpackage", context=16, compressed={"model.layers.0.mlp.up_proj": cw})
    with pytest.raises(ModelError, match=".mlpackage"):
        export_mlpackage(model, tmp_path / "x.mlmodel", context=16)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="does not tile"):  # a group size that does not divide
        CompressedWeight((4, 48), "affine", 4, torch.zeros(4, 48, dtype=torch.uint8),
                         torch.ones(4, 5, dtype=torch.float16), torch.zeros(4, 5, dtype=torch.uint8))


# ---- sizes: single function, multifunction, float16 ---------------------------------------------
@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZED, num_key_value_heads=2)).eval()
    compressed = rtn_all(model)
    return model, compressed, tmp_path_factory.mktemp("sized")


@pytest.mark.slow
def test_package_size_matches_compressed_payload(sized):
    model, compressed, root = sized
    report = export_mlpackage(model, root / "single.mlpackage", context=CONTEXT, compressed=compressed)
    expected = expected_bytes(model, compressed, CONTEXT)
    weights = package_bytes(root / "single.mlpackage" / "Data" / "com.apple.CoreML" / "weights")
    assert abs(weights / expected - 1) < 0.02
    assert abs(report["size_bytes"] / expected - 1) < 0.05


@pytest.mark.slow
def test_multifunction_shares_one_weight_copy(sized):
    model, compressed, root = sized
    single = root / "single.mlpackage"
    if not single.exists():
        export_mlpackage(model, single, context=CONTEXT, compressed=compressed)
    report = export_mlpackage(
        model, root / "mf.mlpackage", context=CONTEXT, compressed=compressed,
        multifunction=True, prefill_length=16, last_logits_only=True,
    )
    assert report["functions"] == ["prefill", "decode"]
    assert report["compressed"] == {"constexpr_blockwise_shift_scale": len(compressed)}
    assert abs(report["size_bytes"] / package_bytes(single) - 1) < 0.10
    spec, prog = load_program(root / "mf.mlpackage")
    assert {f.name for f in spec.description.functions} == {"prefill", "decode"}
    assert spec.description.defaultFunctionName == "decode"
    for fn in ("prefill", "decode"):
        assert_bit_exact(prog, compressed, fn)
        assert "scaled_dot_product_attention" in {op.op_type for op in prog.functions[fn].operations}
    shapes = {f.name: list(f.input[0].type.multiArrayType.shape) for f in spec.description.functions}
    assert shapes == {"prefill": [1, 16], "decode": [1, 1]}


def test_float16_package_size(sized):
    model, _, root = sized
    report = export_mlpackage(model, root / "fp16.mlpackage", context=CONTEXT)
    assert abs(report["size_bytes"] / expected_bytes(model, {}, CONTEXT) - 1) < 0.05


# ---- a real prediction (macOS only) -------------------------------------------------------------
@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS")
def test_coreml_prediction_matches_torch(rtn_export):
    model, _, pkg, _, _, _ = rtn_export
    mlmodel = ct.models.MLModel(str(pkg), compute_units=ct.ComputeUnit.CPU_ONLY)
    state = mlmodel.make_state()
    wrapper = StatefulCausalLM(model, context=CONTEXT, cache_dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(6)).int()
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
        mask = causal_mask(stop - start, past=start)
        with torch.no_grad():
            ref = wrapper(ids[:, start:stop], mask).numpy()
        feed = {"input_ids": ids[:, start:stop].numpy(), "causal_mask": mask.numpy().astype(np.float16)}
        out = mlmodel.predict(feed, state=state)["logits"]
        assert np.abs(out.astype(np.float32) - ref).max() < 0.05 * max(1.0, np.abs(ref).max())


# ---- hand-built compressed weights --------------------------------------------------------------
def lut_weight(weight, bits, group_out, g, q8=False, prune=False) -> CompressedWeight:
    """Per-grouped-channel LUT: `group_out` rows share one 2**bits table (nearest-entry codes)."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    n = out_f // group_out
    lut = torch.sort(torch.randn(n, 1, 2**bits, generator=g) * w.std(), dim=-1).values.half()
    lut_codes = lut_scale = None
    if q8:
        lut_scale = (lut.float().abs().amax(-1, keepdim=True) / 127).half()
        lut_codes = torch.round(lut.float() / lut_scale.float()).to(torch.int8)
        lut = (lut_codes.float() * lut_scale.float()).half()
    rows = lut.float()[torch.arange(out_f) // group_out, 0]  # (out, 2**bits)
    codes = (w[:, :, None] - rows[:, None, :]).abs().argmin(-1).to(torch.uint8)
    mask = _keep_half(w) if prune else None
    if mask is not None:
        codes = torch.where(mask, codes, torch.zeros_like(codes))
    return CompressedWeight((out_f, in_f), "lut", bits, codes=codes, lut=lut,
                            lut_codes=lut_codes, lut_scale=lut_scale, mask=mask)


def pruned_dense(weight) -> CompressedWeight:
    mask = _keep_half(weight)
    values = torch.where(mask, weight.detach().half(), torch.zeros((), dtype=torch.float16))
    return CompressedWeight(tuple(weight.shape), "dense", 16, values=values, mask=mask)


def pruned_affine(weight, bits, block_size, sym=False) -> CompressedWeight:
    cw = rtn(weight.data, None, RTNConfig(bits=bits, block_size=block_size, sym=sym)).compressed
    cw.mask = _keep_half(weight)
    cw.codes = torch.where(cw.mask, cw.codes, torch.zeros_like(cw.codes))
    return cw


def _keep_half(weight) -> torch.Tensor:
    w = weight.detach().abs()
    return w >= w.median()
