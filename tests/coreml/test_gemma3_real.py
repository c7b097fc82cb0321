"""Gemma 3 270M end to end on its real weights (issue 24): compress → ppl → stateful export with
sliding windows in the program → the MIL interpreter past the 512-token window against the
decompressed model → `layerwise generate` token for token against HF `generate`.

Needs the model built by ../shared/models/gemma3-270m/make.py, named by LAYERWISE_GEMMA3_270M (`make
test-real` sets ~/.cache/gemma3-270m); about ten minutes on two cores."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import real_model

from layerwise.cli import main

GEMMA3, NO_GEMMA3 = real_model("LAYERWISE_GEMMA3_270M")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GEMMA3 is None, reason=NO_GEMMA3)]
PROMPT_TOKENS = 600  # past the 512-token window of 5 of every 6 layers


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory, calib_text_file):
    out = tmp_path_factory.mktemp("gemma") / "g3-gptq4"
    assert main(["-q", "compress", str(GEMMA3), "--out", str(out), "--method", "gptq", "--bits", "4", "--block-size", "32",
                 "--calib", str(calib_text_file), "--nsamples", "8", "--seqlen", "128", "--device", "cpu"]) == 0
    return out


def test_gemma3_ppl_of_checkpoint_is_close_to_float(gemma_checkpoint, calib_text_file, capsys):
    results = {}
    for name, path in (("float", GEMMA3), ("gptq4", gemma_checkpoint)):
        assert main(["-q", "ppl", str(path), "--data", str(calib_text_file), "--seqlen", "128", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["float"]["bos_token_id"] == 2 and results["gptq4"]["bos_token_id"] == 2
    assert math.isfinite(results["gptq4"]["ppl"]) and results["gptq4"]["ppl"] < 1.5 * results["float"]["ppl"]


def test_gemma3_export_runs_past_the_window_like_the_decompressed_model(gemma_checkpoint, tmp_path):
    from mil_interpreter import MILInterpreter, load_program
    from test_mil_interpreter import assert_logits_close, causal_mask

    from layerwise.checkpoint import load_compressed

    package = tmp_path / "g3.mlpackage"
    assert main(["-q", "export", str(gemma_checkpoint), "--out", str(package), "--context", "640",
                 "--last-logits-only"]) == 0
    import coremltools as ct

    meta = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
    assert 512 in json.loads(meta["layerwise.layer_windows"])  # the windows are in the program
    ids = np.random.default_rng(0).integers(3, 200000, size=(1, PROMPT_TOKENS)).astype(np.int32)
    ids[0, 0] = 2  # <bos>
    interp = MILInterpreter(load_program(package))
    out = interp.run({"input_ids": ids, "causal_mask": causal_mask(0, PROMPT_TOKENS)}, interp.new_state())["logits"]
    model = load_compressed(gemma_checkpoint).model
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).logits[:, -1:].float().numpy()
    assert_logits_close(np.asarray(out, np.float32), ref)


def test_gemma3_generate_equals_hf_generate(gemma_checkpoint, capsys):
    from transformers import AutoTokenizer

    from layerwise.checkpoint import load_compressed

    prompt = "The history of the city begins in"
    assert main(["-q", "generate", str(gemma_checkpoint), "--prompt", prompt, "--max-new-tokens", "20"]) == 0
    ours = capsys.readouterr().out.strip()
    tok = AutoTokenizer.from_pretrained(GEMMA3)
    model = load_compressed(gemma_checkpoint).model
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert ours == prompt + tok.decode(hf[0, ids.shape[1]:], skip_special_tokens=True)
