"""The commands of the issue, end to end on tiny saved models, and every user mistake → exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerwise.checkpoint import load_compressed, read_tensors
from layerwise.cli import main

SMALL = ["--nsamples", "8", "--seqlen", "64", "--seed", "0", "--device", "cpu"]


def compress(model_dir, out, calib, *extra):
    return main(["-q", "compress", str(model_dir), "--out", str(out), "--calib", str(calib), *SMALL, *extra])


@pytest.fixture(scope="module")
def checkpoints(tiny_dirs, calib_text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for kind in ("llama", "qwen2"):
        out[kind] = root / kind
        assert compress(tiny_dirs[kind], out[kind], calib_text_file, "--method", "gptq", "--bits", "4",
                        "--block-size", "32", "--act-order") == 0
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_checkpoint_load_is_bit_exact(checkpoints, kind):
    loaded = load_compressed(checkpoints[kind])
    model = loaded.model
    plain, compressed = read_tensors(checkpoints[kind])
    assert len(compressed) == 2 * 7
    for name, cw in compressed.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight.half().view(torch.int16), cw.dequantize().view(torch.int16))
        assert torch.equal(loaded.compressed[name].codes, cw.codes)
    if kind == "qwen2":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_size_on_disk_matches_bits(checkpoints):
    manifest = json.loads((checkpoints["llama"] / "layerwise.json").read_text())
    payload = 0
    for name, meta in manifest["layers"].items():
        out_f, in_f = meta["shape"]
        payload += out_f * in_f * 4 / 8 + out_f * in_f / 32 * (2 + 0.5)  # codes + fp16 scale + 4-bit zero
    plain = 4096 * 64 * 2 * 2 + 64 * 2 * 5  # embed + lm_head + 5 norms, fp16
    disk = sum(p.stat().st_size for p in checkpoints["llama"].glob("*.safetensors"))
    assert abs(disk - (payload + plain)) / (payload + plain) < 0.02
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["report"]["bits_per_weight"] == 4.625


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decompress_loads_in_plain_transformers_with_same_ppl(checkpoints, calib_text_file, tmp_path, capsys, kind):
    from transformers import AutoModelForCausalLM

    dense = tmp_path / "dense"
    assert main(["-q", "decompress", str(checkpoints[kind]), "--out", str(dense)]) == 0
    model = AutoModelForCausalLM.from_pretrained(dense)
    assert next(model.parameters()).dtype == torch.float16
    ref = load_compressed(checkpoints[kind]).model
    for name, p in ref.named_parameters():
        assert torch.equal(p.half(), model.get_parameter(name)), name
    ppl = []
    for target in (checkpoints[kind], dense):
        capsys.readouterr()
        assert main(["-q", "ppl", str(target), "--data", str(calib_text_file), "--seqlen", "64", "--json"]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        result = json.loads(last)
        assert {"ppl", "tokens", "windows"} <= set(result)
        ppl.append(result["ppl"])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


def test_inspect_prints_table(checkpoints, capsys):
    assert main(["inspect", str(checkpoints["llama"])]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "rel.err" in out and "4.625" in out


def test_two_runs_same_seed_identical_files(tiny_dirs, calib_text_file, tmp_path):
    for name in ("a", "b"):
        assert compress(tiny_dirs["mistral"], tmp_path / name, calib_text_file, "--method", "gptq", "--bits", "3") == 0
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


BAD = [
    (["--method", "gptq", "--bits", "9"], "bits=9"),
    (["--method", "gptq", "--bits", "4", "--block-size", "48"], "block_size=48 does not divide"),
    (["--method", "rtn", "--bits", "4", "--act-order"], "unknown key 'act_order'"),
    (["--method", "gptq", "--bits", "4", "--nsamples", "100000"], "were requested"),
    (["--method", "gptq", "--bits", "4", "--calib", "/no/such/file.txt"], "neither a file"),
    (["--bits", "4"], "give --method"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_exits_2_with_message_and_no_output(tiny_dirs, calib_text_file, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = ["compress", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(calib_text_file),
            "--nsamples", "8", "--seqlen", "64", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("layerwise compress: error:") and message in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bad_recipe_key_and_wrong_model_path(tiny_dirs, calib_text_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - match: '.*'\n    config: {method: gptq, bitz: 4}\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dirs["llama"]), "--out", str(out), "--recipe", str(recipe),
                 "--calib", str(calib_text_file)]) == 2
    assert "unknown key 'bitz'" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nope"), "--out", str(out), "--method", "rtn", "--bits", "4"]) == 2
    assert "no model directory" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_architecture_is_a_clear_error(tmp_path, calib_text_file, capsys):
    from transformers import T5Config, T5Model

    T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100)).save_pretrained(tmp_path / "t5")
    assert main(["ppl", str(tmp_path / "t5"), "--data", str(calib_text_file)]) == 2
    err = capsys.readouterr().err
    assert "model_type 't5'" in err and "not a causal language model" in err


def test_existing_output_is_refused(checkpoints, tiny_dirs, calib_text_file, capsys):
    assert compress(tiny_dirs["llama"], checkpoints["llama"], calib_text_file, "--method", "rtn", "--bits", "4") == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "layerwise"
    proc = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a layerwise checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_boolean_flags_turn_defaults_off():
    from layerwise.cli import build_parser, method_config_from_flags
    from layerwise.recipe import method_config

    args = build_parser().parse_args(["compress", "m", "--out", "o", "--method", "gptq", "--bits", "3",
                                      "--no-act-order", "--no-mse-clip"])
    cfg = method_config(method_config_from_flags(args), "flags")
    assert cfg.act_order is False and cfg.mse_clip is False
    default = method_config(method_config_from_flags(build_parser().parse_args(
        ["compress", "m", "--out", "o", "--method", "gptq", "--bits", "3"])), "flags")
    assert default.act_order is True and default.mse_clip is True


def test_refine_steps_flag():
    from layerwise.cli import build_parser, method_config_from_flags
    from layerwise.recipe import method_config

    def config(*flags):
        argv = ["compress", "m", "--out", "o", "--method", "sparsegpt", "--sparsity", "0.5", *flags]
        return method_config(method_config_from_flags(build_parser().parse_args(argv)), "flags")

    assert config("--refine-steps", "0").refine_steps == 0
    assert config().refine_steps == 12


def test_data_free_method_reads_no_calibration(tiny_dirs, tmp_path, capsys):
    """RTN never reads --calib (here a path that does not exist); the manifest says data-free and
    `inspect` labels the weight-space errors."""
    out = tmp_path / "rtn"
    assert compress(tiny_dirs["llama"], out, tmp_path / "missing.txt", "--method", "rtn", "--bits", "4", "--sym") == 0
    manifest = json.loads((out / "layerwise.json").read_text())
    assert manifest["calibration"] == {"source": None, "data_free": True}
    down = manifest["layers"]["model.layers.0.mlp.down_proj"]["report"]
    assert down["error_space"] == "weight" and down["bits_per_weight"] == 4.0 + 16 / 128  # no zero points
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "(w)" in capsys.readouterr().out
