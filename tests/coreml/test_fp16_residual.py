"""A residual stream past float16's 65504 (issue 24: Gemma 3 270M reaches 1.04e5): the export
carries it ÷ the family's residual divisor, folded into the embedding multiplier, the post-norm
weights and the eps of the norms reading the stream. A tiny Gemma 3 whose post-feedforward norms
are made large (as the real model's are, up to 153) grows its residual to ~1.2e5; the float16
program must still match HF's float32 logits, with the compressed weights (embedding included)
bit for bit as the checkpoint holds them."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from conftest import build_tiny_model  # noqa: E402
from mil_interpreter import MILInterpreter  # noqa: E402
from test_export import assert_bit_exact, load_in, load_program, rtn_all  # noqa: E402
from test_mil_interpreter import assert_logits_close  # noqa: E402

from layerwise import methods  # noqa: E402
from layerwise.coreml import export_mlpackage  # noqa: E402
from layerwise.models.families import resolve_family  # noqa: E402
from layerwise.models.stateful import StatefulCausalLM, causal_mask  # noqa: E402
from layerwise.recipe import method_config  # noqa: E402

logging.getLogger("coremltools").setLevel(logging.ERROR)
pytestmark = pytest.mark.slow  # one conversion: make test, not test-fast

FLOAT16_MAX = 65504.0
CONTEXT, PREFILL, DECODE = 48, 40, 4  # past the tiny config's 16-token window
POST_NORM = 24575.0  # (1 + w) = 24576 = 3·2¹³: exact in float16, ÷16 too


def loud_gemma3():
    """Tiny Gemma 3 (float32) whose MLP branches add up to ~1.2e5 to the residual."""
    model = build_tiny_model("gemma3_text", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight.fill_(POST_NORM)
    return model


def residual_peak(model, ids: torch.Tensor) -> float:
    """max |h| over every block's output, HF float32."""
    peaks = []

    def record(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        peaks.append(float(hidden.abs().max()))

    hooks = [layer.register_forward_hook(record) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return max(peaks)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = loud_gemma3()
    compressed = rtn_all(model)  # 4-bit linears, loaded back into the model
    weight = model.model.embed_tokens.weight.data  # and an 8-bit table: the fold must not touch it
    compressed["model.embed_tokens"] = methods.solve_group(
        method_config({"method": "rtn", "bits": 8}, "test"), [weight], None)[0].compressed
    load_in(model, compressed)
    pkg = tmp_path_factory.mktemp("loud") / "model.mlpackage"
    export_mlpackage(model, pkg, context=CONTEXT, compressed=compressed)
    spec, prog = load_program(pkg)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, PREFILL + DECODE))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits.float().numpy()
    return model, compressed, spec, prog, ids.astype(np.int32), ref


def test_the_tiny_model_overflows_float16_within_the_divisor(exported):
    model, *_, ids, _ = exported
    peak = residual_peak(model, torch.from_numpy(ids).long())
    assert FLOAT16_MAX < peak < FLOAT16_MAX * resolve_family(model).residual_divisor / 4, peak


def test_float16_program_matches_hf_past_the_window(exported):
    """Prefill past the 16-token window, then decode steps: without the divisor the logits are NaN."""
    _, _, _, prog, ids, ref = exported
    interp = MILInterpreter(prog)
    state = interp.new_state()

    def step(start, stop):
        mask = causal_mask(stop - start, past=start).numpy().astype(np.float16)
        out = interp.run({"input_ids": ids[:, start:stop], "causal_mask": mask}, state)["logits"]
        return np.asarray(out, np.float32)

    assert_logits_close(step(0, PREFILL), ref[:, :PREFILL])
    for t in range(PREFILL, PREFILL + DECODE):
        assert_logits_close(step(t, t + 1), ref[:, t : t + 1])


def test_compressed_weights_stay_bit_exact_and_metadata_names_the_divisor(exported):
    _, compressed, spec, prog, _, _ = exported
    kinds = assert_bit_exact(prog, compressed)
    assert "model.embed_tokens" in kinds
    meta = dict(spec.description.metadata.userDefined)
    assert meta["layerwise.family"] == "gemma3_text"
    assert "residual÷16" in meta["layerwise.traits"].split(",")
    assert json.loads(meta["layerwise.layer_windows"]) == [16, None]


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "granite"])
def test_divided_wrapper_is_the_hf_model_in_float32(kind, monkeypatch):
    """In real arithmetic the divisor changes nothing: the float32 wrapper carrying the residual ÷16
    equals HF's logits (Granite: folded into its residual multiplier, as a family without post-norms would)."""
    model = build_tiny_model(kind, dtype=torch.float32)
    with_divisor(monkeypatch, model, 16)
    wrapper = StatefulCausalLM(model, context=CONTEXT, cache_dtype=torch.float32).eval()
    assert wrapper.residual_divisor == 16
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 4096, size=(1, 24)))
    with torch.no_grad():
        ours = wrapper(ids, causal_mask(24))
        ref = model(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def with_divisor(monkeypatch, model, divisor: int) -> None:
    """Make `model`'s family carry the residual ÷ divisor for the length of the test."""
    import dataclasses

    from layerwise.models import families

    name = families.resolve_family(model).name
    monkeypatch.setattr(families, "FAMILIES", tuple(
        dataclasses.replace(f, residual_divisor=divisor) if f.name == name else f for f in families.FAMILIES))


def test_divisor_changes_no_float16_bit(tmp_path, monkeypatch):
    """A power of two moves only exponents: on a Gemma 3 whose residual fits float16 either way, the
    program carrying it ÷16 gives the logits of the program carrying it as is, bit for bit."""
    model = build_tiny_model("gemma3_text", dtype=torch.float32)
    with torch.no_grad():  # norm weights off their all-zero init, so every (1 + w) is a real constant
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(-0.9, 3.0, generator=torch.Generator().manual_seed(len(name)))
    compressed = rtn_all(model)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, PREFILL)).astype(np.int32)
    mask = causal_mask(PREFILL).numpy().astype(np.float16)
    logits = {}
    for divisor in (16, 1):
        with_divisor(monkeypatch, model, divisor)
        pkg = tmp_path / f"d{divisor}.mlpackage"
        export_mlpackage(model, pkg, context=CONTEXT, compressed=compressed)
        interp = MILInterpreter(load_program(pkg)[1])
        logits[divisor] = np.asarray(interp.run({"input_ids": ids, "causal_mask": mask}, interp.new_state())["logits"])
    assert logits[16].dtype == np.float16 and np.isfinite(logits[16]).all()
    np.testing.assert_array_equal(logits[16].view(np.uint16), logits[1].view(np.uint16))
