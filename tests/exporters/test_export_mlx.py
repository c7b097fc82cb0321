"""`layerwise export --format mlx`: mlx_lm.load reads the directory, every weight MLX decodes equals
the checkpoint's (with --grid mlx), and mlx-lm's logits and greedy text match our model's."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from cli_steps import compress, export_as

from layerwise.checkpoint import load_compressed
from layerwise.exporters.mlx import MLX, mlx_layout
from layerwise.formats import CompressedWeight
from layerwise.models import DEMO_MODEL_DIR

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
nn = pytest.importorskip("mlx.nn")

export = partial(export_as, "mlx")


def module(model, name: str):
    for part in name.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def mlx_weights(model, loaded) -> dict[str, np.ndarray]:
    """name → float16 weight as MLX decodes it (`mx.dequantize` of what mlx_lm.load built)."""
    out = {}
    for name in loaded.compressed:
        m = module(model, name)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
        else:
            w = m.weight
        out[name] = np.array(w)
    return out


def bits_equal(a: np.ndarray, b: torch.Tensor) -> bool:
    return a.dtype == np.float16 and np.array_equal(a.view(np.uint16), b.numpy().view(np.uint16))


def our_logits(checkpoint, ids: list[int]) -> np.ndarray:
    model = load_compressed(checkpoint, dtype=torch.float32).model
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_logits_match(model, checkpoint, ids=(1, 200, 37, 999, 4000, 12, 512, 7)) -> None:
    """mlx-lm's float32 logits of `ids` within float16 tolerance of our decompressed model's."""
    theirs = np.array(model(mx.array([list(ids)])).astype(mx.float32))[0]
    ours = our_logits(checkpoint, list(ids))
    assert np.abs(theirs - ours).max() < 2e-2 * max(1.0, np.abs(ours).max())


@pytest.mark.slow
def test_gptq_mlx_grid_decodes_bit_for_bit_and_logits_match(tiny_dirs, calib_text_file, tmp_path, capsys):
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "gptq", "--bits", "4",
                  "--block-size", "32", "--grid", "mlx")
    summary = export(ck, tmp_path / "mlx", capsys)
    assert "14 4-bit groups of 32" in summary and "bit for bit" in summary
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    loaded = load_compressed(ck, dtype=None)
    decoded = mlx_weights(model, loaded)
    assert all(isinstance(module(model, n), nn.QuantizedLinear) for n in loaded.compressed)
    for name, cw in loaded.compressed.items():
        assert bits_equal(decoded[name], cw.dequantize()), name
    assert_logits_match(model, ck)


def test_embeddings_flag_travels_exactly(tiny_dirs, calib_text_file, tmp_path, capsys):
    """`--embeddings 8 --grid mlx`: the tied token table is an MLX QuantizedEmbedding (groups of 32) whose
    decoded values are the checkpoint's, and mlx-lm's logits (through the tied head) match ours."""
    ck = compress(tiny_dirs["qwen2"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4",
                  "--block-size", "32", "--grid", "mlx", "--embeddings", "8")
    assert "bit for bit" in export(ck, tmp_path / "mlx", capsys)
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    loaded = load_compressed(ck, dtype=None)
    assert isinstance(module(model, "model.embed_tokens"), nn.QuantizedEmbedding)
    decoded = mlx_weights(model, loaded)
    for name, cw in loaded.compressed.items():
        assert bits_equal(decoded[name], cw.dequantize()), name
    assert_logits_match(model, ck)


def test_default_grid_reports_the_largest_difference_mlx_decodes(tiny_dirs, tmp_path, capsys, calib_text_file):
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4",
                  "--block-size", "32")
    summary = export(ck, tmp_path / "mlx", capsys)
    report = float(summary.split("largest difference from the checkpoint's weights ")[1].split()[0])
    assert "--grid mlx" in summary
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    loaded = load_compressed(ck, dtype=None)
    decoded = mlx_weights(model, loaded)
    worst = max(float(np.abs(decoded[n].astype(np.float32) - cw.dequantize().float().numpy()).max())
                for n, cw in loaded.compressed.items())
    assert worst > 0 and f"{worst:.3g}" == f"{report:.3g}"


@pytest.mark.slow
def test_greedy_text_matches_ours_on_the_demo_model(tmp_path, capsys, calib_text_file):
    ck = compress(DEMO_MODEL_DIR, tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4",
                  "--block-size", "32", "--grid", "mlx")
    export(ck, tmp_path / "mlx", capsys)
    model, tokenizer = mlx_lm.load(str(tmp_path / "mlx"))
    prompt = "The history of the city"
    ids = tokenizer.encode(prompt)
    theirs = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt=ids, max_tokens=20)]
    ours_model = load_compressed(ck, dtype=torch.float32).model
    with torch.no_grad():
        out = ours_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    ours = out[0, len(ids):].tolist()
    assert len(ours) == 20 and theirs == ours


@pytest.mark.slow
def test_three_bit_and_mixed_recipes_load_and_run(tiny_dirs, tmp_path, capsys, calib_text_file):
    recipe = tmp_path / "mixed.json"
    recipe.write_text(json.dumps({"rules": [
        {"match": r"q_proj", "config": {"method": "rtn", "bits": 3, "block_size": 64, "grid": "mlx"}},
        {"match": r"k_proj", "config": {"method": "rtn", "bits": 7, "grid": "mlx"}},  # per-channel, 7 → 8 bits
        {"match": r"down_proj", "config": {"method": "kmeans", "n_bits": 4}},  # LUT: float16
        {"match": r"o_proj", "config": {"method": "magnitude", "sparsity": 0.5, "bits": 4, "block_size": 32}},
        {"match": r"\.", "config": {"method": "gptq", "bits": 3, "block_size": 32, "grid": "mlx"}},
    ]}))
    ids = [1, 300, 301, 302, 9]
    for name, flags in (("three", ["--method", "gptq", "--bits", "3", "--block-size", "64", "--grid", "mlx"]),
                        ("mixed", ["--recipe", str(recipe)])):
        ck = compress(tiny_dirs["llama"], tmp_path / name, calib_text_file, *flags)
        summary = export(ck, tmp_path / f"{name}-mlx", capsys)
        config = json.loads((tmp_path / f"{name}-mlx" / "config.json").read_text())
        model, _ = mlx_lm.load(str(tmp_path / f"{name}-mlx"))
        theirs = np.array(model(mx.array([ids])).astype(mx.float32))[0]
        assert np.abs(theirs - our_logits(ck, ids)).max() < 5e-2
        if name == "three":
            assert config["quantization"] == {"group_size": 64, "bits": 3, "mode": "affine"}
            continue
        q = config["quantization"]
        assert (q["bits"], q["group_size"]) == (3, 32)
        assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 3, "mode": "affine"}
        assert q["model.layers.0.self_attn.k_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
        assert q["model.layers.1.mlp.down_proj"] is False
        assert isinstance(module(model, "model.layers.1.mlp.down_proj"), nn.Linear)
        assert "converted: 2 lut → float16" in summary


def test_layout_and_price():
    codes = torch.zeros(8, 256, dtype=torch.uint8)

    def affine(bits, blocks, mask=None):
        return CompressedWeight((8, 256), "affine", bits, codes=codes, scale=torch.ones(8, blocks, dtype=torch.float16),
                                zero_point=torch.zeros(8, blocks, dtype=torch.uint8), mask=mask)

    assert mlx_layout(affine(4, 8)) == (4, 32)
    assert mlx_layout(affine(4, 1)) == (4, 128)  # per-channel: groups of 128 sharing the row's scale
    assert mlx_layout(affine(7, 2)) == (8, 128)
    assert mlx_layout(affine(4, 16)) is None  # blocks of 16: float16
    assert MLX().layer_bytes(affine(4, 8)) == 8 * 256 // 2 + 4 * 8 * 8
    assert MLX().layer_bytes(affine(4, 16)) == 2 * 8 * 256


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_other_families_load_and_match(kind, tmp_path, capsys, calib_text_file):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / kind, kind)
    ck = compress(model, tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "4", "--block-size", "32",
                  "--grid", "mlx")
    assert "bit for bit" in export(ck, tmp_path / "mlx", capsys)
    mlx_model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert_logits_match(mlx_model, ck)


def test_price_is_within_one_percent_of_the_weights(tiny_dirs, calib_text_file, tmp_path, capsys):
    from layerwise.loading import load_checkpoint

    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--method", "rtn", "--bits", "3",
                  "--block-size", "64")
    export(ck, tmp_path / "mlx", capsys)
    loaded = load_checkpoint(ck, dense=False)
    price = MLX().fixed_bytes(loaded.model, list(loaded.compressed))
    price += sum(MLX().layer_bytes(cw) for cw in loaded.compressed.values())
    assert abs(price / (tmp_path / "mlx" / "model.safetensors").stat().st_size - 1) < 0.01


@pytest.mark.slow
def test_a_target_bits_checkpoint_loads_and_runs(tiny_dirs, tmp_path, capsys, calib_text_file):
    """`--target-bits 3.5` mixes bits and group sizes per layer; mlx-lm reads each layer's override."""
    ck = compress(tiny_dirs["llama"], tmp_path / "ck", calib_text_file, "--target-bits", "3.5", "--grid", "mlx")
    summary = export(ck, tmp_path / "mlx", capsys)
    quantization = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    assert any(isinstance(v, dict) for v in quantization.values())  # at least one layer differs from the default
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    loaded = load_compressed(ck, dtype=None)
    decoded = mlx_weights(model, loaded)
    exact = [n for n, cw in loaded.compressed.items() if bits_equal(decoded[n], cw.dequantize())]
    assert "bit for bit" in summary and len(exact) == len(loaded.compressed)
    ids = [1, 300, 301, 302, 9]
    theirs = np.array(model(mx.array([ids])).astype(mx.float32))[0]
    assert np.abs(theirs - our_logits(ck, ids)).max() < 5e-2
