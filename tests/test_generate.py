"""`layerwise generate`: greedy decoding through the export wrapper equals HF's `generate`, for every family."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import FAMILY_KINDS, build_tiny_model
from layerwise.cli import main
from layerwise.generate import generate_ids, wrapper_step

PROMPT, NEW = 24, 12  # the prompt runs past the 16-token sliding windows


def _hf_greedy(model, prompt: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_greedy_through_the_wrapper_equals_hf_generate(kind):
    model = build_tiny_model(kind, dtype=torch.float32)
    prompt = torch.randint(4, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    expected = _hf_greedy(model, prompt)
    step = wrapper_step(model, context=PROMPT + NEW, cache_dtype=torch.float32)
    eos = (model.generation_config.eos_token_id,)
    assert list(generate_ids(step, prompt[0].tolist(), NEW, eos_ids=eos)) == expected


def test_float16_cache_and_seeded_sampling():
    model = build_tiny_model("mistral", dtype=torch.float32)
    prompt = list(range(10, 10 + PROMPT))
    greedy32 = list(generate_ids(wrapper_step(model, PROMPT + NEW, torch.float32), prompt, NEW))
    greedy16 = list(generate_ids(wrapper_step(model, PROMPT + NEW, torch.float16), prompt, NEW))
    assert len(greedy16) == NEW and sum(a == b for a, b in zip(greedy16, greedy32)) >= NEW // 2

    def sampled(seed):
        return list(generate_ids(wrapper_step(model, PROMPT + NEW), prompt, NEW, temperature=1.0, seed=seed))

    assert sampled(3) == sampled(3) and sampled(3) != sampled(4)


def test_cli_generates_from_a_compressed_checkpoint(tiny_dirs, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(ck), "--method", "rtn", "--bits", "4",
                 "--block-size", "32", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["-q", "generate", str(ck), "--prompt", "The game was", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The game was") and len(out.strip()) > len("The game was")
    stats = json.loads(err.strip().splitlines()[-1])
    assert 1 <= stats["new_tokens"] <= 6 and stats["prompt_tokens"] > 0


def test_bad_arguments_are_one_line_errors(tiny_dirs, tmp_path, capsys):
    assert main(["generate", str(tiny_dirs["llama"]), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err
    if sys.platform != "darwin":
        pkg = tmp_path / "Model.mlpackage"
        pkg.mkdir()
        assert main(["generate", str(pkg), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert "need macOS" in err and len(err.strip().splitlines()) == 1


def test_families_command_lists_every_family(capsys):
    assert main(["families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in rows] == list(FAMILY_KINDS)
    assert all(r["supports"] == ["compress", "export", "generate"] for r in rows)


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS")
def test_coreml_generation_equals_the_wrapper(tmp_path):
    from layerwise.coreml import export_mlpackage
    from layerwise.generate import coreml_step

    model = build_tiny_model("gemma2", dtype=torch.float32)
    prompt = list(range(10, 10 + PROMPT))
    export_mlpackage(model, tmp_path / "m.mlpackage", context=PROMPT + NEW)
    step, context = coreml_step(tmp_path / "m.mlpackage")
    ours = list(generate_ids(wrapper_step(model, PROMPT + NEW, torch.float16), prompt, NEW))
    assert context == PROMPT + NEW and list(generate_ids(step, prompt, NEW))[:4] == ours[:4]
