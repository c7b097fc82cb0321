"""coremltools peer rows on a tiny saved Llama: they run, change the block weights, and score."""

import math

import pytest
import torch

from layerwise.calib_data import BUNDLED_CALIBRATION, BUNDLED_EVALUATION, calibration_windows
from layerwise.loading import load_model, load_tokenizer
from layerwise.bench.peers import PEERS, compress_peer, measure_peer, peer_bits
from layerwise.pipeline import evaluate_perplexity

NSAMPLES, SEQLEN = 4, 64


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    path = tiny_dirs["llama"]
    base = evaluate_perplexity(str(path), BUNDLED_EVALUATION, seqlen=SEQLEN)["ppl"]
    return path, base


@pytest.mark.parametrize("name, bits", [("ct-gptq-4bit-block32", 4.5), ("ct-ptp-4bit-g16", None)])
@pytest.mark.slow
def test_measure_peer_row(tiny, name, bits):
    path, base_ppl = tiny
    row = measure_peer(name, str(path), BUNDLED_CALIBRATION, BUNDLED_EVALUATION, NSAMPLES, SEQLEN, 0, "cpu")
    assert "error" not in row, row.get("error")
    assert row["peer"] is True and row["method"] == name and row["checkpoint_mb"] is None
    assert math.isfinite(row["ppl"]) and row["ppl"] != pytest.approx(base_ppl, rel=1e-6)
    assert row["layers_changed"] == "14/14"  # 2 blocks x 7 linears
    assert row["compress_s"] > 0 and row["compress_cpu_s"] > 0 and row["peak_rss_mb"] > 0
    if bits is not None:  # calibrated: timed against one forward over the windows
        assert row["time_vs_forward"] == pytest.approx(row["compress_s"] / row["forward_s"])
    else:  # data-free: no windows to compare with
        assert "forward_s" not in row
    if bits is not None:
        assert row["bits_per_weight"] == pytest.approx(bits)
    else:  # 4 bits + a 16-entry float16 LUT per 16 rows: 4 + 16/in_features (64 or 128 here)
        assert 4 + 16 / 128 <= row["bits_per_weight"] <= 4 + 16 / 64


def test_peer_results_have_the_promised_structure(tiny):
    path, _ = tiny
    windows, _ = calibration_windows(BUNDLED_CALIBRATION, load_tokenizer(str(path)), NSAMPLES, SEQLEN, 0)
    original = load_model(str(path), dtype="float32")
    outside = {k: v.clone() for k, v in original.state_dict().items() if not k.startswith("model.layers.")}

    gptq = compress_peer("ct-gptq-4bit-block32", load_model(str(path), dtype="float32"), windows)
    w = gptq.model.layers[1].mlp.down_proj.weight.detach()  # [64, 128]: 4 blocks of 32 per row
    assert not torch.equal(w, original.model.layers[1].mlp.down_proj.weight)
    for block in w.reshape(w.shape[0], -1, 32).reshape(-1, 32):
        assert torch.unique(block).numel() <= 16
    for k, v in gptq.state_dict().items():
        if k in outside:
            assert torch.equal(v, outside[k]), k

    ptp = compress_peer("ct-ptp-4bit-g16", load_model(str(path), dtype="float32"), windows)
    w = ptp.model.layers[0].self_attn.q_proj.weight.detach()  # [64, 64]: LUT per 16 output rows
    for group in w.reshape(-1, 16, w.shape[1]):
        assert torch.unique(group).numel() <= 16
    assert torch.equal(ptp.lm_head.weight, outside["lm_head.weight"])


def test_bits_formulas():
    shapes = {"a": (256, 256), "b": (256, 704)}
    assert peer_bits(PEERS["ct-gptq-4bit-block32"], shapes) == pytest.approx(4.5)
    assert peer_bits(PEERS["ct-ptq-int4-block32"], shapes) == pytest.approx(4.5)
    per_channel = (256 * 256 * (4 + 16 / 256) + 256 * 704 * (4 + 16 / 704)) / (256 * 256 + 256 * 704)
    assert peer_bits(PEERS["ct-gptq-4bit-per-channel"], shapes) == pytest.approx(per_channel)
    assert peer_bits(PEERS["ct-sparsegpt-2:4"], shapes, {"a": 0.5, "b": 0.5}) == pytest.approx(9.0)
    lut3 = (256 * 256 * (3 + 8 * 16 / (16 * 256)) + 256 * 704 * (3 + 8 * 16 / (16 * 704))) / (256 * 960)
    assert peer_bits(PEERS["ct-skm-3bit-g16"], shapes) == pytest.approx(lut3)


def test_unknown_peer_keeps_its_row_with_the_error(tiny):
    row = measure_peer("ct-nope", str(tiny[0]), BUNDLED_CALIBRATION, BUNDLED_EVALUATION, NSAMPLES, SEQLEN, 0, "cpu")
    assert row["peer"] is True and row["error"].startswith("KeyError: ")


@pytest.mark.parametrize("name, levels", [("ct-gptq-3bit-block32", 8)])
def test_low_bit_gptq_peers_quantize_to_their_bits(tiny, name, levels):
    """coremltools reads the bit width from the dtype's name: uint3 really is 3 bits."""
    path, _ = tiny
    tokenizer = load_tokenizer(str(path))
    windows, _ = calibration_windows(BUNDLED_CALIBRATION, tokenizer, NSAMPLES, SEQLEN, 0)
    model = compress_peer(name, load_model(str(path), dtype="float32"), windows)
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    blocks = w.reshape(w.shape[0], -1, 32)
    distinct = max(len(torch.unique(b)) for row in blocks for b in row)
    assert 2 < distinct <= levels
