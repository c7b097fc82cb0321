"""A compress run is one CompressJob, validated once before any block: weight files that cannot give
the model every tensor are one line and exit 2 with nothing written, on the lazy and the eager path;
the output is checked once per --out."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerwise.cli import build_parser, cmd_compress, main
from layerwise.errors import RecipeError
from layerwise.job import CompressJob
from layerwise.recipe import Recipe
from layerwise.solvers import RTNConfig

from checkpoint_compare import save_sharded

RTN = ["--method", "rtn", "--bits", "4", "--no-mse-clip"]
LAST_BLOCK = "model.layers.2.mlp.down_proj.weight"  # in a later shard than block 0's tensors


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return save_sharded(tmp_path_factory.mktemp("job") / "src")


def _copy(sharded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def _shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _reshape(name):
    return lambda tensors: tensors.update({name: tensors[name][:, :-1].contiguous()})


def _as_int(name):
    return lambda tensors: tensors.update({name: tensors[name].to(torch.int16)})


DAMAGE = {  # name → (how the model directory is spoiled, what the one line must say)
    "missing shard": (lambda m: _shard_of(m, LAST_BLOCK).unlink(), "is missing"),
    "shard lacks a tensor": (lambda m: _rewrite(_shard_of(m, LAST_BLOCK), _drop(LAST_BLOCK)),
                             f"has no tensor '{LAST_BLOCK}'"),
    "wrong shape": (lambda m: _rewrite(_shard_of(m, LAST_BLOCK), _reshape(LAST_BLOCK)), f"'{LAST_BLOCK}' in"),
    "integer weights": (lambda m: _rewrite(_shard_of(m, LAST_BLOCK), _as_int(LAST_BLOCK)), "not floating point"),
    "unreadable shard": (lambda m: _shard_of(m, LAST_BLOCK).write_bytes(b"\xff" * 16), "not a readable safetensors"),
}


@pytest.mark.parametrize("loading", [[], ["--eager-load"]], ids=["lazy", "eager"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_weights_are_refused_before_any_block(sharded, tmp_path, capsys, calib_text_file, damage, loading):
    model = _copy(sharded, tmp_path)
    spoil, message = DAMAGE[damage]
    spoil(model)
    capsys.readouterr()
    code = main(["compress", str(model), "--out", str(tmp_path / "out"), "--calib", str(calib_text_file),
                 *RTN, *loading])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert err.startswith("layerwise compress: error:")
    if damage == "wrong shape":
        assert "shape" in err and "config.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no partial output


def test_a_tensor_in_no_file_is_named(sharded, tmp_path, capsys):
    model = _copy(sharded, tmp_path)
    _rewrite(_shard_of(model, LAST_BLOCK), _drop(LAST_BLOCK))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    del index["weight_map"][LAST_BLOCK]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["compress", str(model), "--out", str(tmp_path / "out"), *RTN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"holds the tensor '{LAST_BLOCK}'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("budget", [False, True], ids=["recipe", "target-bits"])
def test_the_output_is_checked_once_per_out(sharded, tmp_path, monkeypatch, calib_text_file, budget):
    import layerwise.outputs as outputs

    real, checked = outputs.check_output, []

    def counting(out, *args, **kwargs):
        checked.append(Path(out))
        return real(out, *args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("layerwise")]:
        if getattr(module, "check_output", None) is real:  # every module's own reference to it
            monkeypatch.setattr(module, "check_output", counting)
    menu = tmp_path / "menu.yaml"  # a short menu keeps the measuring pass quick
    menu.write_text("rules:\n  - match: '.*'\n    menu: [{method: gptq, bits: 2, block_size: 32}, "
                    "{method: gptq, bits: 4, block_size: 32}]\n")
    flags = ["--recipe", str(menu), "--target-bits", "3.6"] if budget else RTN
    args = build_parser().parse_args(["compress", str(sharded), "--out", str(tmp_path / "out"), "--calib",
                                      str(calib_text_file), "--nsamples", "4", "--seqlen", "32", *flags])
    assert cmd_compress(args) == 0
    assert checked == [tmp_path / "out"]
    assert (tmp_path / "out" / "layerwise.json").is_file()


def test_a_budget_without_method_leaves_the_flags_alone():
    from layerwise.cli import _compress_job

    args = build_parser().parse_args(["compress", "MODEL", "--out", "O", "--target-bits", "3.5"])
    job = _compress_job(args)
    assert args.method is None
    assert {c.method for rule in job.recipe.rules for c in rule.menu} == {"gptq"}
    assert job.target.bits == 3.5 and job.eager


def test_validate_runs_once_and_a_job_refuses_bad_sizes(sharded, tmp_path, monkeypatch):
    import layerwise.job as job_module

    calls = []
    monkeypatch.setattr(job_module, "check_weights", lambda *a, **k: calls.append(a))
    job = CompressJob(str(sharded), tmp_path / "out", Recipe.single(RTNConfig(bits=4)), "wikitext2")
    assert job.validate() is job and job.validate() is job and len(calls) == 1
    assert job.with_recipe(Recipe.single(RTNConfig(bits=3))).validate() and len(calls) == 1
    with pytest.raises(RecipeError, match="--nsamples 0"):
        CompressJob(str(sharded), tmp_path / "out", job.recipe, "wikitext2", nsamples=0)
