"""What keeps compress's working set small gives the same result: float16 linears upcast per call
(upcast.py) vs a float32 copy of the same model, and the automatic lockstep choice."""

import logging

import pytest
import torch

from layerwise.engine import LayerwiseCompressor
from layerwise.recipe import Recipe, method_config

from conftest import build_tiny_model

GPTQ = {"method": "gptq", "bits": 3, "block_size": 32}


def ids(n, L=32):
    return torch.randint(4, 4096, (n, L), generator=torch.Generator().manual_seed(0))


def compress(model, windows, batch_size=4, **kwargs):
    seen, dtypes = {}, {}

    def on_block_output(i, outs):
        seen[i] = torch.cat(outs)
        dtypes[i] = {m.weight.dtype for m in model.model.layers[i].modules() if isinstance(m, torch.nn.Linear)}

    compressor = LayerwiseCompressor(model, Recipe.single(method_config(dict(GPTQ), "test")), device="cpu",
                                     batch_size=batch_size, **kwargs)
    return compressor, compressor.compress(windows, on_block_output=on_block_output), seen, dtypes


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("lockstep", [True, False])
def test_float16_linears_upcast_per_call_equal_float32_compute(kind, lockstep):
    half = build_tiny_model(kind, dtype=torch.float16)
    full = build_tiny_model(kind, dtype=torch.float16).float()  # the same values, stored in float32
    _, a, outs_a, dtypes_a = compress(half, ids(8), lockstep=lockstep)
    _, b, outs_b, dtypes_b = compress(full, ids(8), lockstep=lockstep)
    assert all(d == {torch.float16} for d in dtypes_a.values())  # never a float32 copy of the block's linears
    assert all(d == {torch.float32} for d in dtypes_b.values())
    for name, cw in a.compressed.items():
        assert torch.equal(cw.dequantize(), b.compressed[name].dequantize()), name
    assert [r.rel_error for r in a.layers] == [r.rel_error for r in b.layers]
    for i in outs_a:
        assert torch.equal(outs_a[i], outs_b[i])
    assert all(type(m) is torch.nn.Linear for m in half.modules() if isinstance(m, torch.nn.Linear))  # restored
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_lockstep_auto_falls_back_to_staged_when_its_activations_outgrow_the_memory(caplog, monkeypatch):
    # tiny llama block: it holds ~1 kB per token (128 + 2 × 64 floats); with 400 kB "available",
    # lockstep may hold 100 kB
    import layerwise.engine

    monkeypatch.setattr(layerwise.engine, "available_memory", lambda: 400_000)
    results = {}
    for n, expect in ((1, True), (4, False)):
        with caplog.at_level(logging.INFO, logger="layerwise.engine"):
            compressor, results[n], outs, _ = compress(build_tiny_model("llama"), ids(n))
        assert compressor.lockstep is expect
        assert ("lockstep solving on" if expect else "lockstep solving off") in caplog.text
        caplog.clear()
        _, forced, forced_outs, _ = compress(build_tiny_model("llama"), ids(n), lockstep=True)
        for name, cw in results[n].compressed.items():
            assert torch.equal(cw.dequantize(), forced.compressed[name].dequantize()), name
        for i in outs:
            assert torch.equal(outs[i], forced_outs[i])


def test_offloaded_run_parks_tree_sums_and_gives_the_same_weights(tmp_path, monkeypatch):
    """--offload-activations (staged, activations in files, the Hessian tree's waiting sums parked
    in files too) gives the in-memory run's weights and reports on 7 windows in 4 batches (an
    uneven tree with parked subtrees); its folder is left empty."""
    from layerwise.hessian import HessianAccumulator

    model = build_tiny_model("llama")
    _, kept, outs_kept, _ = compress(model, ids(7), lockstep=False, batch_size=2)
    parks = []
    park = HessianAccumulator.park
    monkeypatch.setattr(HessianAccumulator, "park", lambda self, d: parks.append(d) or park(self, d))
    _, parked, outs_parked, _ = compress(build_tiny_model("llama"), ids(7), offload_dir=tmp_path / "acts", batch_size=2)
    assert len(parks) >= 2 * 4 * 2  # per block and stage: the 4-batch tree parks 2 left sums (and more per stage)
    for name, cw in kept.compressed.items():
        assert torch.equal(cw.dequantize(), parked.compressed[name].dequantize()), name
    assert [r.rel_error for r in kept.layers] == [r.rel_error for r in parked.layers]
    for i in outs_kept:
        assert torch.equal(outs_kept[i], outs_parked[i])
    assert not [p for p in (tmp_path / "acts").iterdir() if p.suffix == ".hessian"]


def test_lockstep_auto_counts_the_float_models_group_inputs(caplog, monkeypatch):
    """With float targets the leaders' float inputs (64 + 64 + 64 + 128 floats per token here) wait
    beside the paused batches: 2 windows fit lockstep's 100 kB without them and not with them."""
    import layerwise.engine

    monkeypatch.setattr(layerwise.engine, "available_memory", lambda: 400_000)
    for targets, expect in (("compressed", True), ("float", False)):
        compressor, _, _, _ = compress(build_tiny_model("llama"), ids(2), targets=targets)
        assert compressor.lockstep is expect, targets
