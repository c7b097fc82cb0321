"""The numpy MIL interpreter (tests/coreml/mil_interpreter.py) against torch, on stateful exports.

A tiny single-layer attention model with a register_buffer KV cache is converted (iOS18 states,
RangeDim query length, fp16) and run prefill + decode through the interpreter with the state
carried; logits must match the float32 torch module. Compressed variants (constexpr ops) are saved
as .mlpackage, loaded back with `load_program` and checked against torch with the dequantized
weights. A few handlers are unit-tested on hand-built MIL programs.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from mil_interpreter import HANDLERS, MILInterpreter, load_program  # noqa: E402

logging.getLogger("coremltools").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="coremltools")

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 64, 32, 4, 2, 8, 16
STEPS = (5, 1, 1, 1, 1)  # prefill of 5 tokens, then 4 decode steps
MASKED = float(np.finfo(np.float16).min)


class TinyStatefulAttention(nn.Module):
    """Embedding → RMSNorm → rotary GQA attention over a register_buffer KV cache → RMSNorm → head."""

    def __init__(self, cache_dtype=torch.float16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.norm_w = nn.Parameter(1 + 0.1 * torch.randn(HIDDEN))
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        shape = (1, 1, KV_HEADS, CONTEXT, HEAD_DIM)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    def rms_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, input_ids, causal_mask):
        q_len, end = input_ids.shape[1], causal_mask.shape[-1]
        past = end - q_len
        x = self.embed(input_ids)
        h = self.rms_norm(x)
        freqs = torch.arange(past, end).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q = self.q_proj(h).view(1, q_len, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(h).view(1, q_len, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(h).view(1, q_len, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        self.k_cache[0, :, :, past:end] = k.to(self.k_cache.dtype)
        self.v_cache[0, :, :, past:end] = v.to(self.v_cache.dtype)
        ks = self.k_cache[0, :, :, :end].to(q.dtype)
        vs = self.v_cache[0, :, :, :end].to(q.dtype)
        rep = HEADS // KV_HEADS  # GQA head repeat
        ks = ks[:, :, None].expand(1, KV_HEADS, rep, end, HEAD_DIM).reshape(1, HEADS, end, HEAD_DIM)
        vs = vs[:, :, None].expand(1, KV_HEADS, rep, end, HEAD_DIM).reshape(1, HEADS, end, HEAD_DIM)
        a = F.scaled_dot_product_attention(q, ks, vs, attn_mask=causal_mask.to(q.dtype))
        x = x + self.o_proj(a.transpose(1, 2).reshape(1, q_len, HEADS * HEAD_DIM))
        return self.lm_head(self.rms_norm(x))


def causal_mask(past: int, q_len: int) -> np.ndarray:
    """Additive [1, 1, q_len, past + q_len] fp16 mask: query i sees keys 0 .. past + i."""
    keys, rows = np.arange(past + q_len)[None, :], past + np.arange(q_len)[:, None]
    return np.where(keys <= rows, 0.0, MASKED).astype(np.float16)[None, None]


def token_ids(n=sum(STEPS), vocab=VOCAB, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n)).astype(np.int32)


def run_steps(step, ids, steps=STEPS):
    """Call step(input_ids, mask) for prefill + decode; returns the list of float32 logits."""
    past, outs = 0, []
    for q_len in steps:
        outs.append(np.asarray(step(ids[:, past : past + q_len], causal_mask(past, q_len)), np.float32))
        past += q_len
    return outs


def torch_step(module):
    module.k_cache.zero_()
    module.v_cache.zero_()

    def step(ids, mask):
        with torch.no_grad():
            return module(torch.from_numpy(ids), torch.from_numpy(mask.astype(np.float32))).numpy()

    return step


def interp_step(interp, state=None):
    state = interp.new_state() if state is None else state
    name = next(v.name for v in interp.func.outputs)

    def step(ids, mask):
        return interp.run({"input_ids": ids, "causal_mask": mask}, state)[name]

    return step


def assert_logits_close(out, ref, rel=2e-2):
    """fp16 tolerance relative to the logit scale, and the same argmax at every position."""
    assert out.shape == ref.shape
    tol = rel * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out - ref).max())
    assert err <= tol, f"max abs diff {err:.4g} > {tol:.4g}"
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


# --- the tiny stateful model -------------------------------------------------------------------
def convert_tiny(module, **kwargs):
    ids, mask = torch.zeros(1, 5, dtype=torch.int32), torch.zeros(1, 1, 5, 5)
    traced = torch.jit.trace(module.eval(), (ids, mask))
    q_len, end = ct.RangeDim(1, CONTEXT, default=1), ct.RangeDim(1, CONTEXT, default=1)
    state_type = ct.TensorType(shape=tuple(module.k_cache.shape), dtype=np.float16)
    return ct.convert(
        traced,
        inputs=[ct.TensorType("input_ids", shape=(1, q_len), dtype=np.int32),
                ct.TensorType("causal_mask", shape=(1, 1, q_len, end), dtype=np.float16)],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        states=[ct.StateType(wrapped_type=state_type, name="k_cache"),
                ct.StateType(wrapped_type=state_type, name="v_cache")],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny():
    """(export module with fp16 caches, float32 reference module with the same weights)."""
    torch.manual_seed(0)
    export = TinyStatefulAttention(torch.float16)
    ref = TinyStatefulAttention(torch.float32).eval()
    ref.load_state_dict({k: v.float() for k, v in export.state_dict().items()})
    return export, ref


@pytest.fixture(scope="module")
def tiny_prog(tiny):
    return convert_tiny(copy.deepcopy(tiny[0]), convert_to="milinternal")


@pytest.fixture(scope="module")
def tiny_mlmodel(tiny):
    return convert_tiny(copy.deepcopy(tiny[0]), convert_to="mlprogram", skip_model_load=True)


def test_program_has_stateful_ops(tiny_prog):
    interp = MILInterpreter(tiny_prog)
    assert {"read_state", "coreml_update_state", "slice_update", "scaled_dot_product_attention"} <= interp.op_types
    assert interp.op_types <= set(HANDLERS) | {"const"}
    state = interp.new_state()
    assert set(state) == {"k_cache", "v_cache"}
    assert state["k_cache"].shape == (1, 1, KV_HEADS, CONTEXT, HEAD_DIM) and state["k_cache"].dtype == np.float16


def test_prefill_and_decode_match_torch(tiny, tiny_prog):
    interp, ids = MILInterpreter(tiny_prog), token_ids()
    state = interp.new_state()
    outs = run_steps(interp_step(interp, state), ids)
    refs = run_steps(torch_step(tiny[1]), ids)
    for out, ref in zip(outs, refs):
        assert_logits_close(out, ref)
    # the interpreter's cache holds what the float32 module wrote, rounded to fp16
    end = sum(STEPS)
    np.testing.assert_allclose(state["k_cache"][..., :end, :], tiny[1].k_cache[..., :end, :].numpy(), atol=1e-2)
    assert not state["k_cache"][..., end:, :].any()


def test_dropping_the_state_changes_decode(tiny_prog):
    interp, ids = MILInterpreter(tiny_prog), token_ids()
    state = interp.new_state()
    carried = run_steps(interp_step(interp, state), ids, steps=(5, 1))[-1]
    dropped = interp_step(interp)(ids[:, 5:6], causal_mask(5, 1))  # fresh zero cache
    assert np.abs(carried - dropped.astype(np.float32)).max() > 0.1
    # re-running the step on the carried state rewrites the same cache slot: same result
    again = interp.run({"input_ids": ids[:, 5:6], "causal_mask": causal_mask(5, 1)}, state)["logits"]
    np.testing.assert_array_equal(again.astype(np.float32), carried)


def test_input_shape_is_checked(tiny_prog):
    interp = MILInterpreter(tiny_prog)
    with pytest.raises(ValueError, match="causal_mask"):
        interp.run({"input_ids": token_ids(3), "causal_mask": np.zeros((1, 3, 3), np.float16)})


# --- compressed weights (constexpr ops), through a saved .mlpackage -------------------------------
def _compress(mlmodel, scheme):
    import coremltools.optimize.coreml as cto

    def cfg(op_config):
        return cto.OptimizationConfig(global_config=op_config)

    if scheme == "int4_blockwise":
        return cto.linear_quantize_weights(mlmodel, cfg(cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=8, weight_threshold=0)))
    if scheme == "palettize_4bit":
        return cto.palettize_weights(mlmodel, cfg(cto.OpPalettizerConfig(nbits=4, mode="uniform", weight_threshold=0)))
    pruned = cto.prune_weights(mlmodel, cfg(cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)))
    if scheme == "sparse":
        return pruned
    if scheme == "sparse_palettize_joint":
        return cto.palettize_weights(
            pruned, cfg(cto.OpPalettizerConfig(nbits=4, mode="uniform", weight_threshold=0)), joint_compression=True)
    return cto.linear_quantize_weights(  # sparse_int8_joint
        pruned, cfg(cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)),
        joint_compression=True)


COMPRESSION = {
    "int4_blockwise": {"constexpr_blockwise_shift_scale"},
    "palettize_4bit": {"constexpr_lut_to_dense"},
    "sparse": {"constexpr_sparse_to_dense"},
    "sparse_palettize_joint": {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
    "sparse_int8_joint": {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
}


@pytest.mark.parametrize("scheme", sorted(COMPRESSION))
def test_compressed_mlpackage_matches_dequantized_torch(tiny, tiny_mlmodel, tmp_path, scheme):
    path = tmp_path / f"{scheme}.mlpackage"
    _compress(tiny_mlmodel, scheme).save(str(path))
    prog = load_program(path)
    interp = MILInterpreter(prog)
    assert COMPRESSION[scheme] <= interp.op_types

    # torch reference with each compressed weight replaced by its materialised (dequantized) value
    ref = copy.deepcopy(tiny[1])
    params = dict(ref.named_parameters())
    replaced = set()
    for op in prog.functions["main"].operations:
        feeds_compute = any(not c.op_type.startswith("constexpr_") for o in op.outputs for c in o.child_ops)
        if op.op_type.startswith("constexpr_") and feeds_compute:
            name = next(p for p in params if op.name.startswith(p.replace(".", "_") + "_to_fp16"))
            dense = np.asarray(op.materialized_val_inference(), np.float32)
            assert dense.shape == tuple(params[name].shape)
            assert not np.array_equal(dense, params[name].detach().half().float().numpy())  # really compressed
            params[name].data = torch.from_numpy(dense)
            replaced.add(name)
    assert {"embed.weight", "q_proj.weight", "lm_head.weight"} <= replaced

    ids = token_ids()
    for out, want in zip(run_steps(interp_step(interp), ids), run_steps(torch_step(ref), ids)):
        assert_logits_close(out, want)


# --- handler unit tests on hand-built programs ---------------------------------------------------
def _run_single(prog, **inputs):
    out = MILInterpreter(prog).run(inputs)
    assert len(out) == 1
    return next(iter(out.values()))


@pytest.mark.parametrize("dtype", [types.fp32, types.fp16])
@pytest.mark.parametrize("mask_kind", ["float", "bool", "none"])
def test_sdpa_matches_torch(dtype, mask_kind):
    rng = np.random.default_rng(0)
    npdt = np.float16 if dtype == types.fp16 else np.float32
    q, k, v = (rng.standard_normal(s).astype(npdt) for s in [(1, 4, 3, 8), (1, 4, 6, 8), (1, 4, 6, 8)])
    bool_mask = np.tril(np.ones((3, 6), bool), k=3)[None, None]
    specs = [mb.TensorSpec(q.shape, dtype), mb.TensorSpec(k.shape, dtype), mb.TensorSpec(v.shape, dtype)]
    if mask_kind == "none":
        @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
        def prog(q, k, v):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v)

        out, tmask, feeds = _run_single(prog, q=q, k=k, v=v), None, {}
    else:
        mask = bool_mask if mask_kind == "bool" else np.where(bool_mask, 0.0, -1e4).astype(npdt)
        mspec = mb.TensorSpec(mask.shape, types.bool if mask_kind == "bool" else dtype)

        @mb.program(input_specs=specs + [mspec], opset_version=ct.target.iOS18)
        def prog(q, k, v, m):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m)

        out, tmask = _run_single(prog, q=q, k=k, v=v, m=mask), torch.from_numpy(mask)
        tmask = tmask if mask_kind == "bool" else tmask.float()
    want = F.scaled_dot_product_attention(*(torch.from_numpy(t).float() for t in (q, k, v)), attn_mask=tmask)
    assert out.dtype == npdt
    np.testing.assert_allclose(out.astype(np.float32), want.numpy(), atol=2e-3 if npdt == np.float16 else 1e-5)


def test_slice_update_writes_state_in_place():
    shape = (2, 1, 4, 6, 3)

    @mb.program(input_specs=[mb.TensorSpec((2, 3), types.fp16), mb.StateTensorSpec(shape, types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(u, s):
        x = mb.read_state(input=s)
        y = mb.slice_update(x=x, update=u, begin=[1, 0, 2, 1, 0], end=[2, 1, 3, 3, 3],
                            squeeze_mask=[True, True, True, False, False])
        y = mb.coreml_update_state(state=s, value=y)
        return mb.reduce_sum(x=y, axes=[0, 1, 2, 3, 4])

    interp = MILInterpreter(prog)
    state = interp.new_state()
    buf = state["s"]
    u = np.arange(6, dtype=np.float16).reshape(2, 3) + 1
    out = interp.run({"u": u}, state)
    want = np.zeros(shape, np.float16)
    want[1, 0, 2, 1:3, :] = u
    assert state["s"] is buf
    np.testing.assert_array_equal(state["s"], want)
    assert float(next(iter(out.values()))) == float(u.astype(np.float32).sum())
    interp.run({"u": u}, state)  # a second write lands on the carried state
    assert float(next(iter(interp.run({"u": u}, state).values()))) == float(u.astype(np.float32).sum())


def test_fp16_rounding_after_each_op():
    @mb.program(input_specs=[mb.TensorSpec((2,), types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.sub(x=mb.add(x=x, y=np.float16(1.0)), y=x)  # 2048 + 1 == 2048 in fp16

    out = _run_single(prog, x=np.array([2048, 1], np.float16))
    np.testing.assert_array_equal(out, np.array([0, 1], np.float16))


def test_shape_ops_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ind = np.array([[2, 0], [1, -1]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(x.shape), mb.TensorSpec(ind.shape, types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, ind):
        g = mb.gather(x=x, indices=ind, axis=2, batch_dims=1)  # (2, 3, 2)
        c = mb.concat(values=[g, mb.mul(x=g, y=2.0)], axis=-1, interleave=True)  # (2, 3, 4)
        a, b = mb.split(x=c, split_sizes=[1, 3], axis=-1)
        t = mb.tile(x=mb.transpose(x=b, perm=[0, 2, 1]), reps=[1, 1, 2])  # (2, 3, 6)
        n = mb.layer_norm(x=t, axes=[-1], epsilon=1e-5)
        s = mb.softmax(x=mb.band_part(x=n, lower=1, upper=0), axis=-1)
        s0 = mb.slice_by_size(x=s, begin=[0, 0, 0], size=[-1, -1, 1])
        return mb.concat(values=[mb.reshape(x=a, shape=[2, 0, -1]), s0], axis=-1)

    g = np.stack([x[i][:, ind[i] % 4] for i in range(2)])
    c = np.stack([g, g * 2], axis=-1).reshape(2, 3, 4)
    a, b = c[..., :1], c[..., 1:]
    t = np.tile(b.transpose(0, 2, 1), (1, 1, 2))
    n = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
    n = n * np.tri(3, 6, 0) * (1 - np.tri(3, 6, -2))
    s = torch.softmax(torch.from_numpy(n), -1).numpy()
    want = np.concatenate([a, s[:, :, :1]], axis=-1)
    np.testing.assert_allclose(_run_single(prog, x=x, ind=ind), want, atol=1e-5)


def test_unhandled_op_raises_naming_it():
    @mb.program(input_specs=[mb.TensorSpec((2, 5))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.topk(x=x, k=2)[0]

    with pytest.raises(NotImplementedError, match="topk"):
        MILInterpreter(prog).run({"x": np.zeros((2, 5), np.float32)})


# --- the project's export (layerwise.coreml.convert) of a tiny random Llama ---------------------
@pytest.fixture(scope="module")
def export_mlpackage():
    try:
        from layerwise.coreml.convert import export_mlpackage
        import layerwise.models.stateful  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"layerwise.coreml.convert / layerwise.models.stateful not importable yet: {exc}")
    return export_mlpackage


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default init so the logits have a clear scale and argmax
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed" in name else 1.0 / math.sqrt(p.shape[1]))
    return model


def _hf_logits(model, ids):
    with torch.no_grad():  # full sequence, no cache: position t's logits are what step t must give
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def _assert_steps_match_hf(outs, hf):
    past = 0
    for q_len, out in zip(STEPS, outs):
        assert_logits_close(out, hf[:, past : past + q_len][:, -out.shape[1] :])  # fits last-logits-only
        past += q_len


def test_exported_tiny_llama_matches_hf(export_mlpackage, tiny_llama, tmp_path):
    path = tmp_path / "tiny_llama.mlpackage"
    export_mlpackage(copy.deepcopy(tiny_llama), str(path), context=32)
    interp = MILInterpreter(load_program(path))
    assert set(interp.state_specs) == {"k_cache", "v_cache"}
    assert interp.state_specs["k_cache"][0] == (2, 1, 2, 32, 16)
    ids = token_ids(vocab=tiny_llama.config.vocab_size)
    _assert_steps_match_hf(run_steps(interp_step(interp), ids), _hf_logits(tiny_llama, ids))


def _affine(w, bits, block):
    from layerwise.formats import CompressedWeight

    out_f, in_f = w.shape
    wb = w.detach().float().view(out_f, in_f // block, block)
    lo, hi = wb.amin(-1).clamp(max=0), wb.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-3).half()
    zp = torch.round(-lo / scale.float()).clamp(0, 2**bits - 1)
    codes = (torch.round(wb / scale.float()[..., None]) + zp[..., None]).clamp(0, 2**bits - 1)
    return CompressedWeight((out_f, in_f), "affine", bits=bits, codes=codes.to(torch.uint8).view(out_f, in_f),
                            scale=scale, zero_point=zp.to(torch.uint8))


def _lut_pruned(w, bits, group_out):
    from layerwise.formats import CompressedWeight

    w = w.detach().float()
    out_f, in_f = w.shape
    mask = w.abs() > w.abs().median()
    groups = w.view(out_f // group_out, group_out * in_f)
    lut = torch.quantile(groups, torch.linspace(0.05, 0.95, 2**bits), dim=1).T[:, None, :].half()
    rows = torch.arange(out_f) // group_out
    codes = (w[..., None] - lut[rows, 0][:, None, :].float()).abs().argmin(-1).to(torch.uint8)
    return CompressedWeight((out_f, in_f), "lut", bits=bits, codes=torch.where(mask, codes, 0),
                            lut=lut, mask=mask)


@pytest.mark.slow
def test_compressed_multifunction_export_matches_hf(export_mlpackage, tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    weight = {n: model.get_submodule(n).weight for n in
              ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head")}
    compressed = {
        "model.layers.0.self_attn.q_proj": _affine(weight["model.layers.0.self_attn.q_proj"], 4, 16),
        "model.layers.1.mlp.down_proj": _lut_pruned(weight["model.layers.1.mlp.down_proj"], 2, 8),
        "lm_head": _affine(weight["lm_head"], 8, 64),  # per channel
    }
    path = tmp_path / "tiny_llama_compressed.mlpackage"
    export_mlpackage(model, str(path), context=32, compressed=compressed, multifunction=True,
                     prefill_length=STEPS[0])
    prog = load_program(path)
    prefill, decode = MILInterpreter(prog, "prefill"), MILInterpreter(prog, "decode")
    assert any(t.startswith("constexpr_") for t in decode.op_types)
    assert prefill.state_specs == decode.state_specs

    state = prefill.new_state()  # one state carried across the two functions

    def step(ids, mask):
        interp = prefill if ids.shape[1] > 1 else decode
        return interp.run({"input_ids": ids, "causal_mask": mask}, state)["logits"]

    with torch.no_grad():  # the reference holds exactly the weights the constexpr ops decode to
        for name, cw in compressed.items():
            model.get_submodule(name).weight.copy_(cw.dequantize().float())
    ids = token_ids(vocab=model.config.vocab_size)
    _assert_steps_match_hf(run_steps(step, ids), _hf_logits(model, ids))


def _tiny_family(kind: str, kv_heads: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"tie_word_embeddings": True} if kind == "qwen2" else {}
    cfg = AutoConfig.for_model(kind, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64, **extra)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed" in name else 1.0 / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("kind,kv_heads", [("llama", 1), ("mistral", 2), ("mistral", 1), ("qwen2", 2), ("qwen2", 1)])
@pytest.mark.slow
def test_exported_families_match_hf_and_need_the_state(export_mlpackage, kind, kv_heads, tmp_path):
    """Each family (GQA and MQA; Qwen2 with q/k/v biases and tied embeddings) runs prefill + 4 decode
    steps through the interpreter like HF; a decode step on a fresh state gives different logits."""
    model = _tiny_family(kind, kv_heads)
    path = tmp_path / f"{kind}{kv_heads}.mlpackage"
    export_mlpackage(copy.deepcopy(model), str(path), context=32)
    interp = MILInterpreter(load_program(path))
    ids = token_ids(vocab=model.config.vocab_size)
    state = interp.new_state()
    outs = run_steps(interp_step(interp, state), ids)
    _assert_steps_match_hf(outs, _hf_logits(model, ids))
    past = sum(STEPS) - 1
    dropped = interp_step(interp)(ids[:, past:], causal_mask(past, 1))  # same step, zero cache
    assert np.abs(np.asarray(dropped, np.float32) - outs[-1]).max() > 0.1
