"""Gemma 3 270M on its real weights through `--format gguf`: its SentencePiece-style vocabulary as
llama.cpp's "llama" tokenizer splits text as the Hugging Face tokenizer does, the float16 export gives
HF's next-token loss, and the 4-bit export's weights are the checkpoint's (llama.cpp then rounds the
activations to 8 bits for its Q4_1 dot products; Gemma's activation outliers make that ~1 % of the loss,
against 0.2 % on SmolLM2: both are checked loosely, its top tokens exactly).

Needs the model built by ../shared/models/gemma3-270m/make.py, named by LAYERWISE_GEMMA3_270M, and
llama-cpp-python. About four minutes on two cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import real_model

from layerwise.checkpoint import load_compressed
from layerwise.cli import main

GEMMA3, NO_GEMMA3 = real_model("LAYERWISE_GEMMA3_270M")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GEMMA3 is None, reason=NO_GEMMA3)]
llama_cpp = pytest.importorskip("llama_cpp")
TEXT = (" = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ,"
        " lit . Valkyria of the Battlefield 3 ) , commonly referred to as")
SPLITS = [TEXT, "The history of the city", "Hello  world,\tdon't   stop!\n\n12345 émigré ©"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GEMMA3)


def scored(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def loss(logits, ids) -> float:
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=1)
    return float(-logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean())


def test_float16_export_splits_text_and_scores_as_hugging_face(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    assert main(["-q", "export", str(GEMMA3), "--format", "gguf", "--out", str(tmp_path / "f16.gguf")]) == 0
    llm = llama_cpp.Llama(str(tmp_path / "f16.gguf"), n_ctx=128, vocab_only=True, verbose=False)
    for text in SPLITS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text)["input_ids"]
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    theirs = scored(tmp_path / "f16.gguf", ids)
    assert abs(loss(theirs, ids) - loss(ours, ids)) <= 1e-3 * loss(ours, ids)  # measured 5e-5
    assert np.abs(theirs - ours).max() < 0.2  # measured 0.047 on logits up to ~40


def test_4bit_export_carries_the_codes_and_llama_cpp_agrees_on_the_top_tokens(tmp_path, tokenizer, capsys):
    ck = tmp_path / "ck"
    assert main(["-q", "compress", str(GEMMA3), "--out", str(ck), "--method", "rtn", "--bits", "4", "--block-size",
                 "32", "--grid", "gguf"]) == 0
    capsys.readouterr()
    assert main(["export", str(ck), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "every weight equals the checkpoint's bit for bit" in capsys.readouterr().out
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        ours = load_compressed(ck, dtype=torch.float32).model(torch.tensor([ids])).logits[0].numpy()
    theirs = scored(tmp_path / "m.gguf", ids)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    assert abs(loss(theirs, ids) - loss(ours, ids)) <= 0.03 * loss(ours, ids)  # measured 1.3 %
