"""Helpers for tests that compare whole checkpoints: tiny sharded sources, file hashes, manifests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from conftest import TOKENIZER_FILES, build_tiny_model
from layerwise.models import DEMO_MODEL_DIR

TIMINGS = ("seconds", "compression_seconds", "created")


def save_sharded(path: Path, kind="llama", dtype=torch.float16, **overrides) -> Path:
    """A tiny model saved in several safetensors shards (with an index), plus the demo tokenizer."""
    model = build_tiny_model(kind, dtype=dtype, num_hidden_layers=3, **overrides)
    model.save_pretrained(path, max_shard_size="100KB")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(DEMO_MODEL_DIR) / name, path / name)
    return path


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).glob("*.safetensors"))}


def manifest_without_timings(directory: Path) -> dict:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMINGS}
        return obj

    return strip(json.loads((Path(directory) / "layerwise.json").read_text()))


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ha, hb = file_hashes(a), file_hashes(b)
    assert ha == hb and len(ha) >= 4
    assert manifest_without_timings(a) == manifest_without_timings(b)
