"""Export with the codes, masks and values parked in a `Spill` (as `layerwise export` loads them):
the same weights bit for bit, every array derived from them parked too, and none of it left resident."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from test_export import (CONTEXT, assert_bit_exact, block_linears, llama, load_in, load_program, lut_weight,
                         pruned_affine, pruned_dense)
from test_spill import resident_kib

from layerwise.checkpoint import read_tensors
from layerwise.cli import main
from layerwise.coreml import export_mlpackage
from layerwise.formats import CompressedWeight
from layerwise.solvers import RTNConfig, rtn
from layerwise.spill import Spill


def parked_tensors(cw: CompressedWeight) -> list[torch.Tensor]:
    return [t for t in (cw.codes, cw.mask, cw.values) if t is not None]


def test_every_scheme_exports_bit_exact_from_the_spill(tmp_path):
    model = llama(kv_heads=1)
    w = {n.removeprefix("model.layers."): m.weight.data for n, m in block_linears(model).items()}
    g = torch.Generator().manual_seed(3)
    schemes = {  # each path of weights.constexpr_weight that derives an array from the codes, mask or values
        "0.self_attn.q_proj": rtn(w["0.self_attn.q_proj"], None, RTNConfig(bits=4, block_size=32, sym=True)).compressed,
        "0.self_attn.k_proj": rtn(w["0.self_attn.k_proj"], None, RTNConfig(bits=8, sym=True)).compressed,
        "0.self_attn.v_proj": lut_weight(w["0.self_attn.v_proj"], 3, 8, g, prune=True),
        "0.self_attn.o_proj": pruned_dense(w["0.self_attn.o_proj"]),
        "0.mlp.gate_proj": pruned_affine(w["0.mlp.gate_proj"], 4, 32, sym=True),
        "0.mlp.up_proj": pruned_affine(w["0.mlp.up_proj"], 4, 32),
        "0.mlp.down_proj": CompressedWeight(tuple(w["0.mlp.down_proj"].shape), "dense",
                                            values=w["0.mlp.down_proj"].half()),
        "1.mlp.down_proj": rtn(w["1.mlp.down_proj"], None, RTNConfig(bits=4, block_size=32)).compressed,
    }
    compressed = {"model.layers." + n: c for n, c in schemes.items()}
    load_in(model, compressed)
    kept = {n: c.kept for n, c in schemes.items()}  # (counting reads the masks: before they are parked)
    pkg = tmp_path / "spilled.mlpackage"
    with Spill(tmp_path) as spill:
        for cw in compressed.values():
            for field in ("codes", "mask", "values"):
                if getattr(cw, field) is not None:
                    setattr(cw, field, spill.hold(getattr(cw, field)))
        loaded = spill.nbytes
        export_mlpackage(model, pkg, context=CONTEXT, compressed=compressed, spill=spill)
        # parked while building the program: signed codes (q, k, gate: one byte per kept weight), kept
        # codes (v, gate, up: one byte each), kept values (o: two bytes each), the dense layer's values
        derived = (kept["0.self_attn.q_proj"] + kept["0.self_attn.k_proj"] + 2 * kept["0.mlp.gate_proj"]
                   + kept["0.self_attn.v_proj"] + kept["0.mlp.up_proj"] + 2 * kept["0.self_attn.o_proj"]
                   + 2 * kept["0.mlp.down_proj"])
        assert spill.nbytes - loaded >= derived
    assert sum(resident_kib(t) for cw in compressed.values() for t in parked_tensors(cw)) == 0
    _, prog = load_program(pkg)
    dense = compressed.pop("model.layers.0.mlp.down_proj")  # a plain float16 const, not a constexpr
    assert_bit_exact(prog, compressed)
    const = {op.name: op for op in prog.functions["main"].operations}["model_layers_0_mlp_down_proj_weight_to_fp16"]
    assert np.array_equal(const.outputs[0].val.view(np.uint16), dense.values.numpy().view(np.uint16))


@pytest.mark.slow
def test_cli_export_of_a_sparse_symmetric_checkpoint_is_bit_exact(tiny_dirs, calib_text_file, tmp_path):
    checkpoint, pkg = tmp_path / "ck", tmp_path / "M.mlpackage"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(checkpoint), "--calib", str(calib_text_file),
                 "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--method", "sparsegpt", "--sparsity", "0.5",
                 "--bits", "4", "--block-size", "32", "--sym"]) == 0
    assert main(["-q", "export", str(checkpoint), "--out", str(pkg), "--context", "64"]) == 0
    _, compressed = read_tensors(checkpoint)
    assert all(cw.mask is not None and cw.midpoint_zero for cw in compressed.values())
    _, prog = load_program(pkg)
    assert_bit_exact(prog, compressed)
