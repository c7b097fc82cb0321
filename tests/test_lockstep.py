"""Staged solving in one forward per block (lockstep.py) gives the stage-by-stage result."""

import pytest
import torch

from layerwise.capture import capture_block_inputs
from layerwise.engine import LayerwiseCompressor
from layerwise.errors import ModelError
from layerwise.lockstep import lockstep_block
from layerwise.recipe import Recipe, method_config

from conftest import build_tiny_model


def ids(n=12, L=32):
    return torch.randint(4, 4096, (n, L), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("raw", [{"method": "gptq", "bits": 3, "block_size": 32},
                                 {"method": "skm", "n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16}])
def test_lockstep_equals_one_forward_per_stage(kind, raw):
    results, outputs = {}, {}
    for lockstep in (True, False):
        model = build_tiny_model(kind, dtype=torch.float32)
        seen = {}
        compressor = LayerwiseCompressor(model, Recipe.single(method_config(dict(raw), "test")), device="cpu",
                                         batch_size=4, lockstep=lockstep)
        results[lockstep] = compressor.compress(ids(), on_block_output=lambda i, outs, seen=seen: seen.__setitem__(i, torch.cat(outs)))
        outputs[lockstep] = seen
    for name, cw in results[True].compressed.items():
        assert torch.equal(cw.dequantize(), results[False].compressed[name].dequantize()), name
    assert [r.rel_error for r in results[True].layers] == [r.rel_error for r in results[False].layers]
    for i in outputs[True]:
        assert torch.equal(outputs[True][i], outputs[False][i])


def test_a_linear_running_twice_is_a_clear_error():
    model = build_tiny_model("llama", dtype=torch.float32)
    block = model.model.layers[0]
    batches = capture_block_inputs(model, model.model.layers, ids(4), 2, torch.device("cpu"))
    mlp = block.mlp
    original = mlp.forward
    mlp.forward = lambda x: original(x) + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    with pytest.raises(ModelError, match="once per forward"):
        lockstep_block(block, 0, batches, ["mlp.gate_proj"], lambda name, h: None)


def test_an_error_in_a_solve_unwinds_every_batch():
    model = build_tiny_model("llama", dtype=torch.float32)
    block = model.model.layers[0]
    batches = capture_block_inputs(model, model.model.layers, ids(6), 2, torch.device("cpu"))

    def fail(name, hessian):
        raise RuntimeError("solver failed")

    with pytest.raises(RuntimeError, match="solver failed"):
        lockstep_block(block, 0, batches, ["self_attn.q_proj"], fail)
    out = lockstep_block(block, 0, batches, ["self_attn.q_proj"], lambda name, h: None)  # hooks were removed
    assert len(out) == 3
