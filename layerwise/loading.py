"""Opening models: a local HF directory, a Hub id, or a layerwise checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import is_checkpoint, load_compressed
from .errors import ModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def load_model(name_or_path: str, dtype: str = "auto", device: str = "cpu"):
    """A causal LM from a checkpoint directory, a HF directory or a Hub id, on `device`.

    dtype "auto" keeps the stored dtype of a HF model (a layerwise checkpoint loads as float32).
    """
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is unknown; use one of {sorted(DTYPES)}")
    if is_checkpoint(name_or_path):
        return load_compressed(name_or_path, dtype=torch.float32 if dtype == "auto" else DTYPES[dtype], device=device)
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_looks_reachable(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load a model config from {name_or_path!r}: {_first_line(e)} — give a local Hugging Face "
            "model directory (with config.json) or a reachable Hub id"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except ValueError as e:
        raise ModelError(
            f"{name_or_path!r} (model_type {getattr(config, 'model_type', '?')!r}) is not a causal language model "
            f"transformers can load: {_first_line(e)}"
        ) from None
    except OSError as e:
        raise ModelError(f"cannot load weights of {name_or_path!r}: {_first_line(e)}") from None
    return model.to(device).eval()


def open_for_compress(name_or_path: str, lazy: bool | None = None):
    """(model, lazy block reader or None, local directory) for `compress`.

    lazy None: lazy for a Hugging Face model (local directory or Hub id; its weights must be
    safetensors, a pickle-only model is refused with how to convert it), eager for a layerwise
    checkpoint (its weights are compressed already).
    """
    from .lazy import open_lazy, resolve_local

    if lazy is None:
        lazy = not is_checkpoint(name_or_path)
    if not lazy:
        return load_model(name_or_path), None, name_or_path
    _check_looks_reachable(name_or_path)
    local = resolve_local(name_or_path)
    model, blocks = open_lazy(str(local))
    return model, blocks, str(local)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r}: {_first_line(e)}") from None


def _check_looks_reachable(name: str) -> None:
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelError(f"no model directory at {name!r}; check the path (it must hold config.json and weights)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{name!r} has no config.json; point at a Hugging Face model directory")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
