"""Lazy loading: a meta skeleton whose blocks are read from safetensors when reached gives the very
same checkpoint as the whole model loaded by transformers; pickles are refused; Hub ids go through
huggingface_hub's cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from layerwise.cli import main
from layerwise.engine import LayerwiseCompressor
from layerwise.errors import ModelError
from layerwise.job import CompressJob
from layerwise.lazy import open_lazy, weight_files
from layerwise.pipeline import compress_to_checkpoint
from layerwise.recipe import Recipe
from layerwise.solvers import GPTQConfig, RTNConfig

from checkpoint_compare import assert_same_checkpoint, save_sharded
from conftest import TOKENIZER_FILES, build_tiny_model
from layerwise.models import DEMO_MODEL_DIR

@pytest.mark.parametrize(
    "kind,dtype",
    [("llama", torch.float16), ("llama", torch.bfloat16), ("llama", torch.float32), ("qwen2", torch.float16)],
)
def test_lazy_checkpoint_equals_eager_byte_for_byte(tmp_path, calib_text_file, kind, dtype):
    src = save_sharded(tmp_path / "src", kind, dtype)
    assert (src / "model.safetensors.index.json").is_file()
    recipe = Recipe.single(GPTQConfig(bits=4, block_size=32))
    for lazy in (True, False):
        compress_to_checkpoint(CompressJob(str(src), tmp_path / f"out-{lazy}", recipe, str(calib_text_file),
                                           nsamples=8, seqlen=32, device="cpu", lazy=lazy))
    assert_same_checkpoint(tmp_path / "out-True", tmp_path / "out-False")


def test_skeleton_computes_buffers_ties_embeddings_and_frees_blocks(tmp_path, calib_text_file):
    src = save_sharded(tmp_path / "src", "qwen2")  # tied embeddings
    model, blocks = open_lazy(str(src))
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(src)  # computes inv_freq in float32 as well
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)
    assert all(p.is_meta for p in model.model.layers.parameters())

    seen = []

    def check(index, hidden):  # while block `index` runs, no other block holds weights
        loaded = [i for i, b in enumerate(model.model.layers) if not next(b.parameters()).is_meta]
        seen.append((index, loaded))

    from layerwise.calib_data import calibration_windows
    from layerwise.loading import load_tokenizer

    windows, _ = calibration_windows(str(calib_text_file), load_tokenizer(str(src)), 4, 32, 0)
    LayerwiseCompressor(model, Recipe.single(RTNConfig(bits=4)), device="cpu", lazy=blocks).compress(
        windows, on_block_output=check)
    assert seen == [(0, [0]), (1, [1]), (2, [2])]
    assert all(p.is_meta for p in model.model.layers.parameters())


def test_pickle_only_checkpoint_is_refused_with_how_to_convert(tmp_path, calib_text_file, capsys):
    src = tmp_path / "pickled"
    model = build_tiny_model("llama")  # a legacy checkpoint: config + pickled state dict
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(DEMO_MODEL_DIR) / name, src / name)
    assert (src / "pytorch_model.bin").is_file()
    code = main(["compress", str(src), "--out", str(tmp_path / "out"), "--method", "rtn", "--bits", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "pickled" in err and "safe_serialization=True" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_hub_id_goes_through_the_hub_cache(tmp_path, monkeypatch, calib_text_file):
    """snapshot_download (offline) finds the snapshot in the cache layout a real download leaves."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    save_sharded(snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model, blocks = open_lazy("tiny-org/tiny-llama")
    assert blocks.files == weight_files(snapshot)
    assert not next(model.model.embed_tokens.parameters()).is_meta


def test_missing_weights_are_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no model.safetensors"):
        weight_files(tmp_path)
