"""Size budgets end to end on tiny saved models: the budget holds, a fragile layer gets more bits,
the choice is a plain recipe in the checkpoint, and user mistakes are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from layerwise.budget import Target, allocate
from layerwise.budget.allocate import allocate_from_table
from layerwise.calib_data import calibration_windows
from layerwise.checkpoint import read_manifest, read_tensors
from layerwise.cli import main
from layerwise.loading import load_tokenizer
from layerwise.models import DEMO_MODEL_DIR
from layerwise.recipe import recipe_from_dict

SMALL = ["--nsamples", "8", "--seqlen", "64", "--seed", "0", "--device", "cpu"]
FRAGILE = "model.layers.1.mlp.down_proj"
OUTLIER_INPUTS = [3, 17, 40, 51, 77, 100]
# a short menu keeps the measurement fast (the default one is exercised through the CLI below)
MENU = {"rules": [{"match": ".*", "menu": [{"method": "gptq", "bits": b, "block_size": 32} for b in (2, 3, 4, 8)]}]}


def fragile_model():
    """A tiny Llama whose layer-1 down_proj is fragile: six of its input channels carry activations
    100× smaller (up_proj's rows ÷ 100) and weights 100× larger (down_proj's columns × 100). The
    function is unchanged, but those columns set every quantization block's range, so a low-bit
    grid crushes the rest of the layer (the weight-outlier pattern of real LLMs)."""
    model = build_tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[OUTLIER_INPUTS] *= 0.01
        model.get_submodule(FRAGILE).weight[:, OUTLIER_INPUTS] *= 100.0
    return model


@pytest.fixture(scope="module")
def measured(calib_text_file):
    """One measured table (errors, bytes, loss scales) of the fragile model."""
    model = fragile_model()
    windows, _ = calibration_windows(str(calib_text_file), load_tokenizer(str(DEMO_MODEL_DIR)), 16, 64, 0)
    allocation = allocate(model, recipe_from_dict(MENU), windows, Target(bits=3.5), device="cpu")
    return model, allocation


def test_fragile_layer_gets_more_bits(measured):
    _, allocation = measured
    bits = {n: allocation.table[n][k].config.bits for n, k in allocation.chosen.items()}
    others = [b for n, b in bits.items() if n != FRAGILE]
    assert bits[FRAGILE] > max(others), bits
    assert allocation.scales[FRAGILE].sum() > 0


@pytest.mark.parametrize("target", [2.75, 3.5, 4.25, 6.0])
def test_bits_budget_holds_within_one_percent_below(measured, target):
    model, allocation = measured
    again = allocate_from_table(model, allocation.table, allocation.scales, Target(bits=target))
    assert 0.99 * target <= again.bits_per_weight <= target


def test_more_bytes_never_predict_more_loss(measured):
    model, allocation = measured
    losses = [allocate_from_table(model, allocation.table, allocation.scales, Target(bits=t)).predicted_dloss
              for t in (2.75, 3.0, 3.5, 4.0, 5.0)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]


def test_mb_budget_counts_the_export_layout(measured):
    """--target-mb prices candidates by the mlpackage's layout: a 3-bit grid in blocks costs its
    4-bit codes there, so at the same MB the choice differs from the checkpoint-bytes one."""
    model, allocation = measured
    from layerwise.exporters import get_exporter

    fixed = get_exporter("coreml").fixed_bytes(model, list(allocation.table))
    three_b32 = {n: next(c for c in cands if c.config.bits == 3 and c.config.block_size == 32)
                 for n, cands in allocation.table.items()}
    assert all(c.export_bytes["coreml"] > c.checkpoint_bytes for c in three_b32.values())
    mb = (fixed + sum(c.export_bytes["coreml"] for c in three_b32.values())) / 1e6
    chosen = allocate_from_table(model, allocation.table, allocation.scales, Target(mb=mb))
    assert 0.99 * mb <= chosen.export_mb <= mb


@pytest.mark.slow
def test_cli_budget_checkpoint_recipe_rerun_and_inspect(tiny_dirs, calib_text_file, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(calib_text_file),
                 *SMALL, "--target-bits", "3.5"]) == 0  # no --method: the GPTQ menu
    manifest = read_manifest(out)
    budget = manifest["budget"]
    assert budget["target"]["bits"] == 3.5 and 0.99 * 3.5 <= budget["bits_per_weight"] <= 3.5
    layers = manifest["layers"]
    payload = sum(m["report"]["bits_per_weight"] * m["shape"][0] * m["shape"][1] for m in layers.values())
    assert payload / sum(m["shape"][0] * m["shape"][1] for m in layers.values()) == pytest.approx(budget["bits_per_weight"])
    assert len({(m["bits"], m.get("block_size")) for m in layers.values()}) > 1  # a real mix
    rules = manifest["recipe"]["rules"]
    assert len(rules) == len(layers) and all("config" in r for r in rules)
    assert {r["config"]["method"] for r in rules} == {"gptq"}
    # rerun the saved choice with --recipe CHECKPOINT: the same bytes
    again = tmp_path / "again"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(again), "--calib", str(calib_text_file),
                 *SMALL, "--recipe", str(out)]) == 0
    _, first = read_tensors(out)
    _, second = read_tensors(again)
    for name, cw in first.items():
        assert torch.equal(cw.dequantize().view(torch.int16), second[name].dequantize().view(torch.int16)), name
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "budget 3.5 bits/weight" in table and "model.layers.1.mlp.down_proj" in table


@pytest.mark.parametrize("args, message", [
    (["--method", "gptq", "--target-bits", "1.0"], "below what the menus allow"),
    (["--method", "gptq", "--target-bits", "12"], "above what the menus can use"),
    (["--method", "sparsegpt", "--target-bits", "3"], "not 'sparsegpt'"),
    (["--method", "gptq", "--bits", "3", "--target-bits", "3"], "drop them"),
    (["--method", "gptq", "--target-bits", "-2"], "positive"),
])
@pytest.mark.slow
def test_budget_mistakes_exit_2_with_one_line(tiny_dirs, calib_text_file, tmp_path, capsys, args, message):
    out = tmp_path / "x"
    code = main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(calib_text_file),
                 *SMALL, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_menu_recipe_without_target_is_an_error(tiny_dirs, calib_text_file, tmp_path, capsys):
    recipe = tmp_path / "menu.yaml"
    recipe.write_text(json.dumps({"rules": [{"match": ".*", "menu": [{"method": "gptq", "bits": 3},
                                                                     {"method": "gptq", "bits": 4}]}]}))
    code = main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "x"), "--calib",
                 str(calib_text_file), *SMALL, "--recipe", str(recipe)])
    assert code == 2 and "--target-bits" in capsys.readouterr().err


def test_loss_scales_leave_every_tensor_as_it_was(calib_text_file):
    """Parameters and buffers (the float32 rotary frequencies of a float16 model too) come back bit for bit."""
    from layerwise.budget.loss_scale import output_fisher_scales

    model = build_tiny_model("llama", dtype=torch.float16)
    before = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    windows, _ = calibration_windows(str(calib_text_file), load_tokenizer(str(DEMO_MODEL_DIR)), 2, 32, 0)
    scales = output_fisher_scales(model, ["model.layers.0.mlp.down_proj"], windows, device="cpu")
    assert scales["model.layers.0.mlp.down_proj"].shape == (64,) and scales["model.layers.0.mlp.down_proj"].sum() > 0
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
