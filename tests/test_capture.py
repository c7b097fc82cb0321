"""Capturing every block's own arguments from the real forward, without touching block weights."""

import torch

from layerwise.capture import capture_block_inputs, run_block

from conftest import build_tiny_model

SLIDING, FULL = "sliding_attention", "full_attention"


def ids(n=4, L=64):
    return torch.randint(4, 4096, (n, L), generator=torch.Generator().manual_seed(1))


def test_one_mask_and_rotary_table_per_attention_kind():
    """Gemma 3 with layers sliding/full/sliding: blocks of the same kind share one mask and one
    (cos, sin); the full layer's differ (no window, global rope)."""
    model = build_tiny_model("gemma3_text", dtype=torch.float32, num_hidden_layers=3, layer_types=[SLIDING, FULL, SLIDING])
    (batch,) = capture_block_inputs(model, model.model.layers, ids(), 4, torch.device("cpu"))
    kw = [call.kwargs for call in batch.calls]
    assert kw[0]["attention_mask"] is not None and kw[0]["attention_mask"] is kw[2]["attention_mask"]
    assert kw[0]["position_embeddings"][0] is kw[2]["position_embeddings"][0]
    full = kw[1]["attention_mask"]  # None: plain causal (SDPA's is_causal); else a mask without the window
    assert full is None or not torch.equal(kw[0]["attention_mask"], full)
    assert not torch.equal(kw[0]["position_embeddings"][0], kw[1]["position_embeddings"][0])  # local vs global rope
    assert torch.equal(kw[0]["position_ids"], kw[1]["position_ids"])


def test_capture_runs_no_block_and_reads_no_block_weight():
    """The blocks' weights may not be there yet (lazy loading): capture works with them on meta."""
    model = build_tiny_model("gemma2", dtype=torch.float32)
    reference = capture_block_inputs(model, model.model.layers, ids(), 2, torch.device("cpu"))
    model.model.layers.to("meta")
    calls = []
    handles = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in model.model.layers]
    batches = capture_block_inputs(model, model.model.layers, ids(), 2, torch.device("cpu"))
    assert len(calls) == 2 * len(batches)  # the recorders stood in for the blocks, hooks still fire
    for got, ref in zip(batches, reference):
        assert torch.equal(got.hidden, ref.hidden)
        for a, b in zip(got.calls, ref.calls):
            assert torch.equal(a.kwargs["attention_mask"], b.kwargs["attention_mask"])
    for h in handles:
        h.remove()
    assert "forward" not in model.model.layers[0].__dict__  # the class's forward is back


def test_positional_block_arguments_are_kept():
    """GPT-2 passes its causal mask positionally; dropping it would run the blocks unmasked."""
    model = build_tiny_model("gpt2", dtype=torch.float32, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                             attn_implementation="eager")  # eager attention gets the mask as a tensor
    x = ids(2, 32)
    (batch,) = capture_block_inputs(model, model.transformer.h, x, 2, torch.device("cpu"))
    assert any(isinstance(a, torch.Tensor) for a in batch.calls[0].args)
    with torch.no_grad():
        expected = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states[1]
        assert (run_block(model.transformer.h[0], batch, 0) - expected).abs().max() <= 1e-5
