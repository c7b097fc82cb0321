"""Windows begin like the model's own text: with the tokenizer's BOS when it adds one by default."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, real_model
from layerwise import evaluate
from layerwise.calib_data import BUNDLED_EVALUATION, bos_token_id, calibration_windows, load_text, tokenize_text
from layerwise.evaluate import perplexity
from layerwise.models import DEMO_MODEL_DIR

DEMO_PPL = 85.0344664  # float16 demo model, bundled test excerpt, 256-token windows, before BOS handling existed


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory) -> Path:
    """The demo tokenizer, changed to put <s> before every text (as Gemma's and Llama 3's do)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    out = tmp_path_factory.mktemp("bos-tokenizer")
    shutil.copy(Path(DEMO_MODEL_DIR) / "tokenizer_config.json", out / "tokenizer_config.json")
    tok = Tokenizer.from_file(str(Path(DEMO_MODEL_DIR) / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    return out


def test_bos_comes_from_the_tokenizer(bos_tokenizer_dir):
    from transformers import AutoTokenizer

    assert bos_token_id(AutoTokenizer.from_pretrained(bos_tokenizer_dir)) == 1
    assert bos_token_id(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)) is None  # like SmolLM2 and Qwen


def test_calibration_windows_start_with_bos_and_keep_their_length(bos_tokenizer_dir, calib_text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    windows, info = calibration_windows(str(calib_text_file), tok, 8, 64, 0)
    assert windows.shape == (8, 64) and info["bos_token_id"] == 1
    assert (windows[:, 0] == 1).all() and not (windows[:, 1:] == 1).any()
    text = tokenize_text(tok, load_text(str(calib_text_file), "calibration"))
    for window in windows:  # the rest is 63 consecutive tokens of the text, at a multiple of 63
        starts = [s for s in range(0, text.numel() - 62, 63) if torch.equal(text[s : s + 63], window[1:])]
        assert starts


def test_perplexity_with_bos_equals_hf_loss_with_default_special_tokens(bos_tokenizer_dir):
    """HF's own evaluation: each window's text tokenized with the default special tokens, labels =
    inputs (the loss skips predicting the first token, i.e. BOS is never a target)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    model = build_tiny_model("llama").float()
    text = tokenize_text(tok, load_text(BUNDLED_EVALUATION, "evaluation"))[: 4 * 31]
    ours = perplexity(model, text, seqlen=32, batch_size=3, bos=1)
    nll = 0.0
    for window in text.reshape(4, 31):
        ids = tok(tok.decode(window), return_tensors="pt")["input_ids"]
        assert ids[0, 0] == 1 and torch.equal(ids[0, 1:], window)  # the same windows as HF makes them
        nll += model(input_ids=ids, labels=ids).loss.item() * 31
    assert ours["tokens"] == 4 * 31 and ours["bos_token_id"] == 1
    assert math.isclose(ours["ppl"], math.exp(nll / (4 * 31)), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite", "gpt2"])  # plain, final soft-cap, ÷ logits_scaling, no family
def test_sliced_head_gives_hf_loss(monkeypatch, kind):
    """The head applied a few positions at a time (the declared families) or whole logits scored a
    window at a time (any other model): HF's own mean loss over the same windows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "gpt2":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=4096, n_embd=64, n_layer=2,
                                                                      n_head=4)).eval()
    else:
        overrides = dict(final_logit_softcapping=3.0) if kind == "gemma2" else {}
        model = build_tiny_model(kind, **overrides).float()
    ids = torch.randint(4, 4096, (6 * 48,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evaluate, "LOSS_BYTES", 4 * 4096 * 5)  # 5 positions at a time
    ours = perplexity(model, ids, seqlen=48, batch_size=4)
    hf = model(input_ids=ids.reshape(6, 48), labels=ids.reshape(6, 48)).loss.item()
    assert ours["tokens"] == 6 * 47 and math.isclose(ours["nll"], hf, rel_tol=1e-5)


@pytest.mark.slow
def test_a_model_without_bos_scores_as_before(capsys):
    """SmolLM2 and the demo model add no BOS: their windows, and so their numbers, do not move."""
    from layerwise.cli import main

    assert main(["-q", "ppl", DEMO_MODEL_DIR, "--data", BUNDLED_EVALUATION, "--seqlen", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bos_token_id"] is None and result["tokens"] == 40035
    assert math.isclose(result["ppl"], DEMO_PPL, rel_tol=1e-6)


GEMMA3, NO_GEMMA3 = real_model("LAYERWISE_GEMMA3_270M")


@pytest.mark.slow
@pytest.mark.skipif(GEMMA3 is None, reason=NO_GEMMA3)
def test_gemma3_270m_perplexity_matches_hf_with_its_bos():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GEMMA3)
    model = AutoModelForCausalLM.from_pretrained(GEMMA3, torch_dtype=torch.float32)
    text = tokenize_text(tok, load_text(BUNDLED_EVALUATION, "evaluation"))[: 3 * 127]
    ours = perplexity(model, text, seqlen=128, batch_size=1, bos=bos_token_id(tok))
    nll = sum(model(input_ids=ids, labels=ids).loss.item() * 127
              for ids in (tok(tok.decode(w), return_tensors="pt")["input_ids"] for w in text.reshape(3, 127)))
    assert ours["bos_token_id"] == tok.bos_token_id
    assert abs(ours["ppl"] / math.exp(nll / (3 * 127)) - 1) < 0.02
