"""A method defined outside layerwise, added with one `methods.register` call, runs through the
normal command line: compress (with its own flag), decompress, ppl and a Core ML export, and every
stage holds the values its solver chose, bit for bit."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from layerwise import methods
from layerwise.budget import default_menu
from layerwise.checkpoint import read_tensors
from layerwise.cli import main
from layerwise.errors import RecipeError
from layerwise.formats import CompressedWeight
from layerwise.solvers import MethodConfig, Solution
from layerwise.solvers.base import require

SMALL = ["--nsamples", "4", "--seqlen", "32", "--seed", "0", "--device", "cpu"]


@dataclass
class SignConfig(MethodConfig):
    """1-bit sign quantization: each output channel becomes ±m, a 2-entry LUT per row."""

    method = "sign"
    needs_hessian = True
    scale: str = "hessian"  # m = mean |w| weighted by diag(H) ("hessian") or unweighted ("mean")

    def __post_init__(self):
        require(self.scale in ("hessian", "mean"), f"scale={self.scale!r} must be hessian or mean")


def solve_sign(weights, hessian, config, *, prepared=None, consume_hessian=False, sensitivities=None):
    """weights: [out_k, in] sharing hessian: [in, in] → a 1-bit LUT [out, 1, 2] = (-m, +m) per row."""
    solutions = []
    for weight in weights:
        W = weight.detach().float()
        importance = torch.diagonal(hessian).float() if config.scale == "hessian" else torch.ones(W.shape[1])
        m = ((W.abs() * importance).sum(1) / importance.sum().clamp_min(1e-12)).half()  # [out] float16
        lut = torch.stack([-m, m], dim=1)[:, None, :].cpu()  # [out, 1, 2]
        codes = (W >= 0).to(torch.uint8).cpu()
        solutions.append(Solution(CompressedWeight(tuple(W.shape), "lut", bits=1, codes=codes, lut=lut)))
    return solutions


SIGN_SCALE = methods.Flag("sign_scale", (methods.Option(("--sign-scale",), {
    "choices": ("hessian", "mean"), "help": "sign: weight the channel scale by diag(H) or not"}),), "scale")


@pytest.fixture
def sign_method():
    methods.register(methods.Method("sign", SignConfig, solve_sign, flags=(SIGN_SCALE,)))
    try:
        yield
    finally:
        methods.unregister("sign")


def compress_help(capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    return capsys.readouterr().out


def test_register_adds_the_method_everywhere_and_unregister_removes_it(sign_method, capsys):
    assert "sign" in methods.names()
    assert "--sign-scale {hessian,mean}" in compress_help(capsys) and "kmeans,sign}" in compress_help(capsys)
    with pytest.raises(RecipeError, match="choose bits for gptq, rtn, skm, kmeans, not 'sign'"):
        default_menu({"method": "sign"})
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.Method("sign", SignConfig, solve_sign))
    with pytest.raises(ValueError, match="built-in"):
        methods.unregister("gptq")
    methods.unregister("sign")
    assert "sign" not in methods.names()
    assert "--sign-scale" not in compress_help(capsys) and "kmeans}" in compress_help(capsys)
    methods.register(methods.Method("sign", SignConfig, solve_sign, flags=(SIGN_SCALE,)))  # for the fixture's finally


def test_toy_method_through_compress_decompress_ppl_and_export(sign_method, tiny_dirs, calib_text_file, tmp_path, capsys):
    checkpoint, dense_dir = tmp_path / "ck", tmp_path / "dense"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(checkpoint), "--calib", str(calib_text_file),
                 *SMALL, "--method", "sign", "--sign-scale", "hessian"]) == 0
    manifest = json.loads((checkpoint / "layerwise.json").read_text())
    assert manifest["recipe"]["rules"][0]["config"] == {"method": "sign", "scale": "hessian"}
    _, compressed = read_tensors(checkpoint)
    assert len(compressed) == 14  # 2 blocks × 7 linears
    original = load_file(tiny_dirs["llama"] / "model.safetensors")
    for name, cw in compressed.items():
        w = original[name + ".weight"].float()
        assert cw.scheme == "lut" and cw.bits == 1 and tuple(cw.lut.shape) == (w.shape[0], 1, 2), name
        assert torch.equal(cw.lut[..., 0], -cw.lut[..., 1]) and bool((cw.lut[..., 1] > 0).all()), name
        dense = cw.dequantize()
        expected = torch.where(cw.codes.bool(), cw.lut[:, 0, 1:2], cw.lut[:, 0, 0:1])  # the codes' dequantization
        assert torch.equal(dense.view(torch.int16), expected.view(torch.int16)), name
        assert torch.equal(dense > 0, w >= 0), name  # the sign is kept
        report = manifest["layers"][name]["report"]
        assert report["method"] == "sign" and report["error_space"] == "output" and 0 < report["rel_error"] < 1, name

    assert main(["-q", "decompress", str(checkpoint), "--out", str(dense_dir)]) == 0
    decompressed = load_file(dense_dir / "model.safetensors")
    for name, cw in compressed.items():
        assert torch.equal(decompressed[name + ".weight"].view(torch.int16), cw.dequantize().view(torch.int16)), name

    capsys.readouterr()
    assert main(["-q", "ppl", str(checkpoint), "--data", str(calib_text_file), "--seqlen", "32", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert math.isfinite(ppl) and ppl > 1

    pytest.importorskip("coremltools")
    from coreml.test_export import assert_bit_exact, load_program

    pkg = tmp_path / "sign.mlpackage"
    assert main(["-q", "export", str(checkpoint), "--out", str(pkg), "--context", "32"]) == 0
    _, prog = load_program(pkg)
    kinds = assert_bit_exact(prog, compressed)
    assert set(kinds.values()) == {"constexpr_lut_to_dense"}
