import json

import pytest
import torch

from layerwise.calib_data import HubText, calibration_windows, load_text, sample_windows, tokenize_text
from layerwise.calib_data.sources import load_hub_text
from layerwise.errors import DataError
from layerwise.loading import load_tokenizer
from layerwise.models import DEMO_MODEL_DIR


def test_windows_are_seeded_distinct_and_non_overlapping():
    ids = torch.arange(10_000)
    a = sample_windows(ids, 20, 100, seed=0)
    assert torch.equal(a, sample_windows(ids, 20, 100, seed=0))
    assert not torch.equal(a, sample_windows(ids, 20, 100, seed=1))
    starts = a[:, 0]
    assert (starts % 100 == 0).all() and len(set(starts.tolist())) == 20
    assert torch.equal(a[:, -1] - a[:, 0], torch.full((20,), 99))


def test_too_little_text_is_an_error_not_repetition():
    with pytest.raises(DataError, match="1000 tokens = 3 windows of 256, but 4 were requested"):
        sample_windows(torch.arange(1000), 4, 256, seed=0)


def test_jsonl_txt_and_directory_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    assert load_text(str(tmp_path / "a.txt")) == "alpha beta"
    assert load_text(str(tmp_path / "b.jsonl")) == "gamma\n\ndelta"
    assert load_text(str(tmp_path)) == "alpha beta\n\ngamma\n\ndelta"
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 has no string field 'text'"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_hub_path_through_datasets_load_dataset_on_local_files(tmp_path):
    """The real `datasets.load_dataset` code path the wikitext2/c4 names use, on local json files."""
    rows = [{"text": f"line {i} of the calibration text"} for i in range(50)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = HubText("json", None, data_files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")})
    text = load_hub_text(spec, "calibration")
    assert text.startswith("line 0 of the calibration text\n\nline 1")
    assert load_hub_text(HubText("json", data_files={"train": str(tmp_path / "train.jsonl")}, max_rows=2), "calibration") == (
        "line 0 of the calibration text\n\nline 1 of the calibration text")


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path):
    spec = HubText("json", None, data_files={"train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DataError, match="could not load dataset 'json'"):
        load_hub_text(spec, "calibration")


def test_bundled_calibration_gives_128_windows_of_256():
    tok = load_tokenizer(DEMO_MODEL_DIR)
    from layerwise.calib_data import BUNDLED_CALIBRATION

    windows, info = calibration_windows(BUNDLED_CALIBRATION, tok, 128, 256, 0)
    assert windows.shape == (128, 256) and info["text_tokens"] == 49406
    assert tokenize_text(tok, "hello world").dtype == torch.long
