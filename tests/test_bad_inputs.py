"""Bad inputs, run through the CLI as a user would: exit 2, one line naming the problem, no traceback,
and nothing new or changed on disk. In-process (`main([...])`) except where a real process is
needed (signals, standard input, a closed pipe)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerwise.cli import main

from conftest import save_tiny_model

EXE = str(Path(sys.executable).parent / "layerwise")
RTN = ["--method", "rtn", "--bits", "4", "--no-mse-clip"]  # min-max: the fastest real compression
GPTQ = ["--method", "gptq", "--bits", "4", "--nsamples", "4", "--seqlen", "64"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, calib_text_file):
    """A workspace: a tiny model, a checkpoint of it, calibration text, a recipe, a foreign folder."""
    root = tmp_path_factory.mktemp("bad")
    model = save_tiny_model(root / "model")
    assert main(["-q", "compress", str(model), "--out", str(root / "ck"), *RTN]) == 0
    shutil.copy(calib_text_file, root / "calib.txt")
    (root / "recipe.yaml").write_text("rules:\n  - match: '.*'\n    config: {method: rtn, bits: 4, mse_clip: false}\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's unrelated files\n")
    return root


def snapshot(*roots: Path) -> dict:
    """Every path under the roots with its size, modification time and mode (hidden ones included)."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()  # a folder's own time moves when a temporary entry came and went: its entries count
            state[str(path)] = (st.st_size, None if path.is_dir() else st.st_mtime_ns, st.st_mode)
    return state


def refused(capsys, argv, message, *roots, command=None) -> str:
    """Run the CLI; assert exit 2, one line containing `message`, no traceback, nothing changed under roots."""
    before = snapshot(*roots)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (types, choices) exit from parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    command = command or next(a for a in argv if not a.startswith("-"))
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"layerwise {command}: error:") or err.startswith("layerwise: error:"), err
    assert message in err, err
    assert snapshot(*roots) == before
    return err


def copy(work: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(work / name, tmp_path / name))


# ---- 1. outputs: --overwrite replaces only our own outputs, never an input ------------------------
def test_compress_onto_its_own_model_is_refused(work, capsys):
    refused(capsys, ["compress", str(work / "model"), "--out", str(work / "model"), "--overwrite", *RTN],
            "is the input", work)


def test_output_containing_or_inside_an_input_is_refused(work, capsys):
    refused(capsys, ["compress", str(work / "model"), "--out", str(work), "--overwrite", *RTN], "contains the input", work)
    refused(capsys, ["compress", str(work / "model"), "--out", str(work / "model" / "ck"), *RTN], "lies inside the input", work)
    refused(capsys, ["export", str(work / "ck"), "--out", str(work / "ck" / "M.mlpackage")], "lies inside the input", work)


def test_output_onto_calibration_text_or_recipe_is_refused(work, capsys):
    refused(capsys, ["compress", str(work / "model"), "--out", str(work / "calib.txt"), "--calib",
                     str(work / "calib.txt"), "--overwrite", *GPTQ], "is the input", work)
    refused(capsys, ["compress", str(work / "model"), "--out", str(work / "recipe.yaml"), "--recipe",
                     str(work / "recipe.yaml"), "--overwrite"], "is the input", work)


def test_decompress_onto_its_checkpoint_is_refused(work, capsys):
    refused(capsys, ["decompress", str(work / "ck"), "--out", str(work / "ck"), "--overwrite"], "is the input", work)


def test_overwrite_never_replaces_a_foreign_directory_or_file(work, capsys):
    for target in ("foreign", "calib.txt"):
        refused(capsys, ["compress", str(work / "model"), "--out", str(work / target), "--overwrite", *RTN],
                "was not written by layerwise", work)
    refused(capsys, ["decompress", str(work / "ck"), "--out", str(work / "foreign"), "--overwrite"],
            "was not written by layerwise", work)


def test_existing_output_without_overwrite(work, capsys, tmp_path):
    refused(capsys, ["decompress", str(work / "ck"), "--out", str(work / "ck")], "is the input", work)
    refused(capsys, ["compress", str(work / "model"), "--out", str(work / "foreign"), *RTN], "already exists", work)


def test_overwrite_replaces_our_own_outputs_only_when_complete(work, tmp_path, capsys):
    """A checkpoint and a decompressed model we wrote are replaced; a failed run leaves the old one."""
    ck, dense = tmp_path / "ck", tmp_path / "dense"
    assert main(["-q", "compress", str(work / "model"), "--out", str(ck), *RTN]) == 0
    assert main(["-q", "decompress", str(ck), "--out", str(dense)]) == 0
    assert main(["-q", "decompress", str(ck), "--out", str(dense), "--overwrite"]) == 0
    before = snapshot(tmp_path)
    # a run that fails half-way (a bad block size is found only per layer) leaves the old checkpoint alone
    refused(capsys, ["compress", str(work / "model"), "--out", str(ck), "--overwrite", *RTN, "--block-size", "48"],
            "does not divide", tmp_path)
    assert snapshot(tmp_path) == before
    assert main(["-q", "compress", str(work / "model"), "--out", str(ck), "--overwrite", "--method", "rtn", "--bits", "3", "--no-mse-clip"]) == 0
    assert json.loads((ck / "layerwise.json").read_text())["recipe"]["rules"][0]["config"]["bits"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- 2. inputs are checked, not trusted ---------------------------------------------------------
def _poison(model_dir: Path, tensor: str, value: float) -> None:
    weights = load_file(model_dir / "model.safetensors")
    weights[tensor][1, 2] = value
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_non_finite_weights_are_named(work, tmp_path, capsys):
    model = copy(work, "model", tmp_path)
    _poison(model, "model.layers.0.self_attn.q_proj.weight", float("nan"))
    refused(capsys, ["compress", str(model), "--out", str(tmp_path / "o"), *RTN],
            "model.layers.0.self_attn.q_proj.weight holds 1 NaN", tmp_path)
    refused(capsys, ["ppl", str(model), "--data", str(work / "calib.txt"), "--seqlen", "64"],
            "model.layers.0.self_attn.q_proj.weight holds 1 NaN", tmp_path)
    # --allow-non-finite: fine where the recipe leaves the layer alone, still an error where it compresses it
    refused(capsys, ["compress", str(model), "--out", str(tmp_path / "o"), *RTN, "--allow-non-finite"],
            "the recipe compresses it", tmp_path)
    recipe = tmp_path / "skip.yaml"
    recipe.write_text("rules:\n  - match: 'q_proj'\n    config: null\n  - match: '.*'\n    config: {method: rtn, bits: 4, mse_clip: false}\n")
    assert main(["-q", "compress", str(model), "--out", str(tmp_path / "o"), "--recipe", str(recipe), "--allow-non-finite"]) == 0


def test_inf_weight_is_an_error_not_a_nan_perplexity(work, tmp_path, capsys):
    model = copy(work, "model", tmp_path)
    _poison(model, "model.layers.1.mlp.up_proj.weight", float("inf"))
    refused(capsys, ["ppl", str(model), "--data", str(work / "calib.txt"), "--seqlen", "64"], "1 Inf", tmp_path)


def _edit_manifest(ck: Path, edit) -> None:
    manifest = json.loads((ck / "layerwise.json").read_text())
    edit(manifest)
    (ck / "layerwise.json").write_text(json.dumps(manifest))


def test_edited_manifest_is_caught_before_decoding(work, tmp_path, capsys):
    ck = copy(work, "ck", tmp_path)
    _edit_manifest(ck, lambda m: m["layers"]["model.layers.0.self_attn.q_proj"].update(bits=3))
    refused(capsys, ["decompress", str(ck), "--out", str(tmp_path / "d")], "model.layers.0.self_attn.q_proj.weight.codes", tmp_path)


def test_changed_shard_fails_its_checksum(work, tmp_path, capsys):
    ck = copy(work, "ck", tmp_path)
    shard = ck / "block-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit inside a tensor: safetensors itself cannot notice
    shard.write_bytes(bytes(data))
    refused(capsys, ["ppl", str(ck), "--data", str(work / "calib.txt"), "--seqlen", "64"], "sha256", tmp_path)
    refused(capsys, ["export", str(ck), "--out", str(tmp_path / "M.mlpackage")], "sha256", tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "bad header", "empty"])
def test_damaged_safetensors(work, tmp_path, capsys, damage):
    def spoil(path: Path):
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "bad header": b"\xff" * 8 + data[8:], "empty": b""}[damage])

    ck, model = copy(work, "ck", tmp_path), copy(work, "model", tmp_path)
    spoil(ck / "block-00000.safetensors")
    spoil(model / "model.safetensors")
    refused(capsys, ["decompress", str(ck), "--out", str(tmp_path / "d"), "--no-verify"], "not a readable safetensors", tmp_path)
    refused(capsys, ["decompress", str(ck), "--out", str(tmp_path / "d")], "sha256", tmp_path)
    refused(capsys, ["compress", str(model), "--out", str(tmp_path / "o"), *RTN], "not a readable safetensors", tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "layerwise-checkpoint/1"}', "\xff\xfe"])
def test_malformed_manifest(work, tmp_path, capsys, text):
    ck = copy(work, "ck", tmp_path)
    (ck / "layerwise.json").write_bytes(text.encode("latin1"))
    for command in ("inspect", "decompress"):
        argv = [command, str(ck)] + (["--out", str(tmp_path / "d")] if command == "decompress" else [])
        refused(capsys, argv, "layerwise.json", tmp_path)


def test_manifest_fuzz_each_field_errors_or_decodes_the_same(work, tmp_path, capsys):
    """Edit every field of layerwise.json in turn (a checkpoint holding every scheme: affine with and
    without zero points, LUT float16 and int8, dense + mask, joint affine + mask): reading it either
    fails with one line or decodes to exactly the same tensors; `inspect` never meets anything else."""
    from layerwise.checkpoint import read_tensors
    from layerwise.errors import LayerwiseError
    from layerwise.inspect import report_table

    recipe = tmp_path / "every-scheme.yaml"
    recipe.write_text("""rules:
  - {match: 'layers\\.0\\.self_attn\\.q_proj', config: {method: rtn, bits: 4, block_size: 32, sym: true, mse_clip: false}}
  - {match: 'layers\\.0\\.self_attn\\.k_proj', config: {method: kmeans, n_bits: 2, granularity: per_grouped_channel, group_size: 16, lut_dtype: int8}}
  - {match: 'layers\\.0\\.self_attn\\.v_proj', config: {method: kmeans, n_bits: 3}}
  - {match: 'layers\\.0\\.self_attn\\.o_proj', config: {method: magnitude, sparsity: 0.5}}
  - {match: 'layers\\.0\\.mlp\\.gate_proj', config: {method: magnitude, nm: '2:4', bits: 4}}
  - {match: 'layers\\.0\\.', config: {method: rtn, bits: 3, mse_clip: false}}
  - {match: '.*', config: null}
""")
    ck = tmp_path / "ck"
    assert main(["-q", "compress", str(work / "model"), "--out", str(ck), "--recipe", str(recipe)]) == 0
    original_text = (ck / "layerwise.json").read_text()
    plain0, compressed0 = read_tensors(ck)
    dense0 = {name: cw.dequantize() for name, cw in compressed0.items()}

    def leaves(node, path=()):
        yield path
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, (*path, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from leaves(value, (*path, i))

    def edits(value):
        yield "delete"
        for other in (None, "x", -1, float("nan"), True, []):
            if type(other) is not type(value) or other != value:
                yield other
        if isinstance(value, bool):
            yield not value
        elif isinstance(value, int):
            yield value + 1
        elif isinstance(value, str):
            yield value + "0"

    manifest = json.loads(original_text)
    outcomes = {"error": 0, "same": 0}
    for path in leaves(manifest):
        informational = path[:1] in (("recipe",), ("versions",), ("calibration",)) and len(path) > 1
        if not path or informational or "report" in path[:-1] and path[-1] not in ("bits_per_weight", "damping"):
            continue  # fields only shown to people: the whole entry is edited, and a few stand for the rest
        for edit in edits(_get(manifest, path)):
            edited = json.loads(original_text)
            parent, key = _get(edited, path[:-1]), path[-1]
            if edit == "delete":
                parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
            else:
                parent[key] = edit
            (ck / "layerwise.json").write_text(json.dumps(edited))
            try:
                plain, compressed = read_tensors(ck)
            except LayerwiseError as e:
                assert "\n" not in str(e)
                outcomes["error"] += 1
            else:
                assert plain.keys() == plain0.keys() and all(torch.equal(plain[k], plain0[k]) for k in plain0), (path, edit)
                assert compressed.keys() == dense0.keys(), (path, edit)
                for name, cw in compressed.items():
                    assert torch.equal(cw.dequantize().view(torch.int16), dense0[name].view(torch.int16)), (path, edit)
                outcomes["same"] += 1
            try:  # what `layerwise inspect` prints: a table or one LayerwiseError, nothing else
                report_table(ck)
            except LayerwiseError:
                pass
    (ck / "layerwise.json").write_text(original_text)
    assert outcomes["error"] > 200 and outcomes["same"] > 20, outcomes


def _get(node, path):
    for key in path:
        node = node[key]
    return node


# ---- 3. no foreign code ---------------------------------------------------------------------------
MARKER_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("imported")
from transformers import LlamaConfig, LlamaForCausalLM
class MarkerConfig(LlamaConfig):
    model_type = "marker_llama"
class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def test_custom_code_is_never_imported_even_when_stdin_says_yes(work, tmp_path, capsys, monkeypatch):
    model = copy(work, "model", tmp_path)
    marker = tmp_path / "IMPORTED"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="marker_llama", architectures=["MarkerForCausalLM"],
                  auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM",
                            "AutoTokenizer": ["tokenization_marker.MarkerTokenizer", None]})
    (model / "config.json").write_text(json.dumps(config))
    for module in ("configuration_marker", "modeling_marker", "tokenization_marker"):
        (model / f"{module}.py").write_text(MARKER_CODE.format(marker=str(marker)))
    proc = subprocess.run([EXE, "compress", str(model), "--out", str(tmp_path / "o"), *RTN], input="y\n" * 1000,
                          capture_output=True, text=True, timeout=300)  # `yes y | layerwise compress …`
    assert proc.returncode == 2, proc.stderr
    assert "auto_map" in proc.stderr and "--trust-remote-code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 1000))
    for argv in (["ppl", str(model), "--data", str(work / "calib.txt")],
                 ["export", str(model), "--out", str(tmp_path / "M.mlpackage")]):
        refused(capsys, argv, "--trust-remote-code", tmp_path)
        assert not marker.exists()


def test_pickle_only_model_is_refused_without_loading(work, tmp_path, capsys):
    model = copy(work, "model", tmp_path)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    err = refused(capsys, ["compress", str(model), "--out", str(tmp_path / "o"), *RTN], "pickle", tmp_path)
    assert "safetensors" in err and "weights_only" not in err


# ---- 4. one line for environment failures, signals, pipes ------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["compress", "MODEL", "--out", "O", *RTN, "--batch-size", "0"], "--batch-size: 0 must be at least 1"),
    (["compress", "MODEL", "--out", "O", *GPTQ[:-2], "--seqlen", "-5"], "--seqlen: -5 must be at least 1"),
    (["ppl", "MODEL", "--data", "CALIB", "--seqlen", "0"], "--seqlen: 0 must be at least 1"),
    (["export", "MODEL", "--out", "O.mlpackage", "--context", "0"], "--context: 0 must be at least 1"),
    (["export", "MODEL", "--out", "O.mlpackage", "--prefill-length", "-1"], "--prefill-length: -1"),
    (["compress", "MODEL", "--out", "O", "--method", "gptq", "--bits", "4", "--nsamples", "x"], "'x' is not an integer"),
])
def test_zero_or_negative_sizes(work, tmp_path, capsys, argv, message):
    argv = [{"MODEL": str(work / "model"), "CALIB": str(work / "calib.txt"), "O": str(tmp_path / "o"),
             "O.mlpackage": str(tmp_path / "o.mlpackage")}.get(a, a) for a in argv]
    refused(capsys, argv, message, tmp_path, command=argv[0])


def test_non_utf8_text(work, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait ".encode("latin1") * 1000)
    refused(capsys, ["compress", str(work / "model"), "--out", str(tmp_path / "o"), "--calib", str(bad), *GPTQ],
            "is not UTF-8 text", tmp_path)
    refused(capsys, ["ppl", str(work / "model"), "--data", str(tmp_path)], "is not UTF-8 text", tmp_path)


def test_parent_is_a_file(work, tmp_path, capsys):
    (tmp_path / "plain-file").write_text("x")
    for argv in (["compress", str(work / "model"), *RTN], ["decompress", str(work / "ck")]):
        refused(capsys, [*argv, "--out", str(tmp_path / "plain-file" / "o")], "is a file, not a directory", tmp_path)


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_disk_full_or_read_only_while_writing(work, tmp_path, capsys, monkeypatch, code, message):
    """The failure hits half-way (the second shard): one line, and no partial directory is left."""
    import layerwise.checkpoint as checkpoint

    real, calls = checkpoint.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code), str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    before = snapshot(tmp_path)
    assert main(["compress", str(work / "model"), "--out", str(tmp_path / "o"), *RTN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and message in err and "Traceback" not in err
    # the complete first block is kept for --resume (the message says so); no output appears
    assert "1 complete block shards kept" in err and "--resume" in err
    assert not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path / ".o.partial")
    assert snapshot(tmp_path) == before

    import layerwise.outputs as outputs

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.os, "replace", full)
    refused(capsys, ["decompress", str(work / "ck"), "--out", str(tmp_path / "d")], message, tmp_path)


def test_read_only_location(work, tmp_path, capsys):
    """A directory we may not write in (a read-only mount, or not ours) is refused before any work."""
    target = Path("/proc/layerwise-ck") if os.geteuid() == 0 else tmp_path / "ro" / "ck"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    refused(capsys, ["compress", str(work / "model"), "--out", str(target), *RTN], "cannot write", tmp_path, work)


def test_context_too_large_to_allocate(work, tmp_path, capsys):
    refused(capsys, ["export", str(work / "model"), "--out", str(tmp_path / "M.mlpackage"), "--context", "1000"],
            "exceeds the model's maximum of 256 positions", tmp_path)
    refused(capsys, ["export", str(work / "model"), "--out", str(tmp_path / "M.mlpackage"), "--context", "10000000000",
                     "--allow-long-context"], "(the KV-cache states) needs about", tmp_path)


def test_inspect_into_a_closed_pipe_is_quiet(work):
    proc = subprocess.run(f"{EXE} inspect {work / 'ck'} | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("layer") and proc.stderr == ""


@pytest.mark.slow
def test_sigterm_stops_cleanly_like_sigint(work, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([EXE, "-q", "compress", str(work / "model"), "--out", str(out), "--method", "gptq",
                             "--bits", "4", "--nsamples", "256", "--seqlen", "128", "--batch-size", "1"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / ".o.partial").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines() == [err] and "stopped by SIGTERM" in err and "Traceback" not in err
    assert not out.exists()
    if (tmp_path / ".o.partial").exists():  # complete blocks are kept, and the line says how to go on
        assert "--resume" in err
    else:
        assert "incomplete outputs were removed" in err and list(tmp_path.iterdir()) == []


def test_a_real_bug_shows_the_traceback_and_exit_1(work, capsys, monkeypatch):
    import layerwise.inspect as inspect

    def broken(path):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspect, "report_table", broken)
    assert main(["inspect", str(work / "ck")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "please report it" in err


# ---- 5. refuse what cannot be right --------------------------------------------------------------
def test_encoder_is_not_a_causal_lm(work, tmp_path, capsys):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "model" / name, tmp_path / "bert" / name)
    refused(capsys, ["compress", str(tmp_path / "bert"), "--out", str(tmp_path / "o"), *RTN], "not a causal decoder", tmp_path)


def test_windows_beyond_max_positions(work, tmp_path, capsys):
    refused(capsys, ["compress", str(work / "model"), "--out", str(tmp_path / "o"), "--calib", str(work / "calib.txt"),
                     "--method", "gptq", "--bits", "4", "--nsamples", "2", "--seqlen", "512"], "maximum of 256", tmp_path)
    refused(capsys, ["ppl", str(work / "model"), "--data", str(work / "calib.txt"), "--seqlen", "257"],
            "maximum of 256", tmp_path)


def test_method_larger_than_float16(work, tmp_path, capsys):
    refused(capsys, ["compress", str(work / "model"), "--out", str(tmp_path / "o"), "--method", "magnitude",
                     "--sparsity", "0"], "larger than float16", tmp_path)


# ---- 7. small things -------------------------------------------------------------------------------
@pytest.mark.parametrize("config,key", [
    ({"method": "gptq", "damp": True}, "damp=True"),
    ({"method": "gptq", "lazy_batch": True}, "lazy_batch=True"),
    ({"method": "sparsegpt", "sparsity": 0.5, "column_block": False}, "column_block=False"),
    ({"method": "skm", "n_bits": 4, "lazy_batch": True}, "lazy_batch=True"),
    ({"method": "kmeans", "n_bits": 4, "group_size": True, "granularity": "per_grouped_channel"}, "group_size=True"),
    ({"method": "rtn", "bits": 4, "block_size": True}, "block_size=True"),
])
def test_every_config_rejects_bools_for_numbers(config, key):
    from layerwise.errors import RecipeError
    from layerwise.recipe import method_config

    with pytest.raises(RecipeError, match=key.replace("=", "=")):
        method_config(config, "recipe")


def test_recipe_directory_and_divisor_hints(work, tmp_path, capsys):
    refused(capsys, ["compress", str(work / "model"), "--out", str(tmp_path / "o"), "--recipe", str(tmp_path)],
            "is a directory", tmp_path)
    err = refused(capsys, ["compress", str(work / "model"), "--out", str(tmp_path / "o"), *RTN, "--block-size", "48"],
                  "does not divide", tmp_path)
    hinted = err.split("e.g. ")[1].split(")")[0].split(", ")
    assert hinted and all(64 % int(d) == 0 for d in hinted)


def test_checkpoint_files_follow_the_umask(work):
    mask = os.umask(0)
    os.umask(mask)
    for path in (work / "ck").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


# ---- further mistakes found on the way ----------------------------------------------------------
def test_config_that_does_not_match_the_weights(work, tmp_path, capsys):
    model = copy(work, "model", tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    refused(capsys, ["ppl", str(model), "--data", str(work / "calib.txt"), "--seqlen", "64"], "do not match its config.json",
            tmp_path)


@pytest.mark.parametrize("damage", ["missing", "not json"])
def test_checkpoint_config_damaged(work, tmp_path, capsys, damage):
    ck = copy(work, "ck", tmp_path)
    if damage == "missing":
        (ck / "config.json").unlink()
    else:
        (ck / "config.json").write_text("{")
    refused(capsys, ["decompress", str(ck), "--out", str(tmp_path / "d")], "config.json cannot be read", tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device(work, tmp_path, capsys):
    refused(capsys, ["ppl", str(work / "model"), "--data", str(work / "calib.txt"), "--device", "cuda"], "no CUDA GPU", tmp_path)
    refused(capsys, ["ppl", str(work / "model"), "--data", str(work / "calib.txt"), "--device", "tpu"], "unknown", tmp_path)


def test_export_checks_before_converting(work, tmp_path, capsys):
    """Mistakes in export's arguments are one line before coremltools is even imported (it prints noise)."""
    foreign = tmp_path / "Someone.mlpackage"
    foreign.mkdir()
    (foreign / "Manifest.json").write_text("{}")
    refused(capsys, ["export", str(work / "ck"), "--out", str(foreign), "--overwrite"], "was not written by layerwise", tmp_path)
    refused(capsys, ["export", str(work / "ck"), "--out", str(tmp_path / "model.bin")], "must end in .mlpackage", tmp_path)
    refused(capsys, ["export", str(work / "ck"), "--out", str(tmp_path / "M.mlpackage"), "--multifunction",
                     "--context", "32", "--prefill-length", "64"], "--prefill-length 64 must lie in", tmp_path)


def test_leftovers_of_a_killed_run_are_removed(work, tmp_path):
    """A SIGKILLed decompress leaves `.NAME.partial-PID`; the next run writing NAME removes it (its process is gone)."""
    stale = tmp_path / ".d.partial-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["-q", "decompress", str(work / "ck"), "--out", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_tokenizer_error_is_not_cut_mid_sentence(work, tmp_path, capsys):
    model = copy(work, "model", tmp_path)
    (model / "tokenizer.json").write_text("{}")  # damaged: transformers raises a KeyError deep inside
    err = refused(capsys, ["compress", str(model), "--out", str(tmp_path / "o"), *RTN], "cannot load a tokenizer", tmp_path)
    assert "added_tokens" in err and err.endswith("check its tokenizer files")
    (model / "tokenizer.json").unlink()  # transformers' message lists three alternatives over several lines
    err = refused(capsys, ["compress", str(model), "--out", str(tmp_path / "o"), *RTN], "cannot load a tokenizer", tmp_path)
    assert "(3)" in err, err
