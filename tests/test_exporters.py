"""Output formats as entries: the registry, the loaded value exporters read, the scratch folder's rules."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from layerwise.checkpoint import LoadedCheckpoint
from layerwise.cli import build_parser
from layerwise.errors import LayerwiseError
from layerwise.exporters import DEFAULT_FORMAT, EXPORTERS, ExportOptions, get_exporter
from layerwise.loading import load_checkpoint
from layerwise.outputs import scratch_directory


def test_core_ml_is_the_default_entry():
    assert DEFAULT_FORMAT == "coreml" and get_exporter() is EXPORTERS["coreml"]
    exporter = get_exporter("coreml")
    assert exporter.suffix == ".mlpackage"
    assert exporter.tokenizer_dir(Path("/x/Model.mlpackage")) == Path("/x/Model-tokenizer")
    with pytest.raises(LayerwiseError, match="unknown output format 'nope'"):
        get_exporter("nope")


def test_export_format_flag_lists_the_registry():
    args = build_parser().parse_args(["export", "m", "--out", "m.mlpackage"])
    assert args.format == "coreml"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "m", "--out", "m.mlpackage", "--format", "nope"])


def test_core_ml_checks_its_out_before_loading(tmp_path):
    exporter = get_exporter("coreml")
    with pytest.raises(LayerwiseError, match="must end in .mlpackage"):
        exporter.check(tmp_path / "model.bin", ExportOptions())
    with pytest.raises(LayerwiseError, match="--prefill-length 64 must lie in"):
        exporter.check(tmp_path / "M.mlpackage", ExportOptions(context=32, multifunction=True, prefill_length=64))


def test_loaded_values_hang_nothing_on_the_model(tiny_dirs, tmp_path, calib_text_file):
    from layerwise.cli import main

    plain = load_checkpoint(str(tiny_dirs["llama"]))
    assert isinstance(plain, LoadedCheckpoint) and plain.compressed == {} and plain.manifest is None
    ck = tmp_path / "ck"
    assert main(["-q", "compress", str(tiny_dirs["llama"]), "--out", str(ck), "--method", "rtn", "--bits", "4",
                 "--calib", str(calib_text_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]) == 0
    loaded = load_checkpoint(str(ck), dense=False)
    assert len(loaded.compressed) == 14 and loaded.manifest["format"]
    assert not [name for name in vars(loaded.model) if name.startswith("layerwise")]


def test_scratch_folder_is_the_temporary_directory_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    before = tempfile.tempdir
    out = tmp_path / "M.mlpackage"
    with scratch_directory(out) as scratch:
        assert scratch.name == f".{out.name}.partial-{os.getpid()}"
        made = tempfile.mkdtemp()
        assert os.path.dirname(made) == str(scratch / "tmp") and os.environ["TMPDIR"] == str(scratch / "tmp")
    assert not scratch.exists()
    assert tempfile.tempdir == before and os.environ["TMPDIR"] == str(tmp_path / "elsewhere")
