"""Opening models: a local HF directory, a Hub id, or a layerwise checkpoint — and checking them.

A model directory is data, not code: every `from_pretrained` passes `trust_remote_code=False`
(unless the user says `--trust-remote-code`), so a config's `auto_map` never imports a file and
transformers never asks on standard input; weights are read from safetensors only (a pickle can
run code when loaded). What is loaded is then checked: a causal decoder, finite weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .checkpoint import LoadedCheckpoint, is_checkpoint, load_compressed
from .devices import resolve_device
from .errors import ModelError, NumericalError
from .model_checks import check_causal, check_finite  # re-exported: the loaders' checks

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def load_model(name_or_path: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
               verify: bool = True, allow_non_finite: bool = False, dense: bool = True, spill=None):
    """A causal LM from a checkpoint directory, a HF directory or a Hub id, on `device` (see `load_checkpoint`)."""
    return load_checkpoint(name_or_path, dtype, device, trust_remote_code, verify, allow_non_finite, dense, spill).model


def load_checkpoint(name_or_path: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
                    verify: bool = True, allow_non_finite: bool = False, dense: bool = True,
                    spill=None) -> LoadedCheckpoint:
    """A checkpoint directory, a HF directory or a Hub id as a `LoadedCheckpoint`, its model on `device`
    (a plain model: no compressed layers, no manifest).

    dtype "auto" keeps the stored dtype of a HF model (a layerwise checkpoint loads as float32).
    verify: check a checkpoint's shard sha256s. allow_non_finite: skip the NaN/Inf weight check
    (the caller then checks the weights it uses, see `check_finite`).
    dense=False (export): a checkpoint's compressed weights stay compressed (placeholders in the
    model, see `load_compressed`) and its other tensors keep their stored dtype; with a `spill.Spill`,
    their codes, masks and values are parked in its file as they are read.
    """
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is unknown; use one of {sorted(DTYPES)}")

    device = str(resolve_device(device))  # an unknown or absent device is one line, not a torch traceback
    if is_checkpoint(name_or_path):
        stored = None if not dense else torch.float32
        loaded = load_compressed(name_or_path, dtype=stored if dtype == "auto" else DTYPES[dtype], device=device,
                                 verify=verify, trust_remote_code=trust_remote_code, dense=dense, spill=spill)
    else:
        loaded = LoadedCheckpoint(_load_hf(name_or_path, dtype, trust_remote_code).to(device).eval())
    check_causal(loaded.model, name_or_path)
    if not allow_non_finite:
        check_finite(loaded.model.named_parameters() if dense else _decoded_parameters(loaded), name_or_path)
        if spill is not None:
            spill.release_all()  # what the check decoded (dense layers' values, masks) goes back to the file
    return loaded


def _decoded_parameters(loaded: LoadedCheckpoint):
    """(name, tensor) whose values are finite iff the parameter's (decoded) values are: a compressed
    layer's own tensors where they decide it, else its dequantized weight (one layer at a time)."""
    for name, p in loaded.model.named_parameters():
        cw = loaded.compressed.get(name.removesuffix(".weight"))
        if cw is None:
            yield name, p
        elif cw.scheme == "lut":  # decoded values are LUT entries
            yield name, cw.lut
        elif cw.scheme == "affine" and _affine_stays_finite(cw):
            continue
        else:  # dense values, or a grid whose extreme steps might overflow float16
            yield name, cw.dequantize()


def _affine_stays_finite(cw) -> bool:
    """Every scale·(code − zero point) is a finite float16 when |scale|·(2**bits − 1) ≤ 65504."""
    scale = cw.scale.float()
    return bool(torch.isfinite(scale).all()) and float(scale.abs().max()) * (2**cw.bits - 1) <= 65504


def _load_hf(name_or_path: str, dtype: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_looks_reachable(name_or_path)
    remote = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **remote)
    except (OSError, ValueError) as e:
        _refuse_custom_code(name_or_path, trust_remote_code)
        raise ModelError(
            f"cannot load a model config from {name_or_path!r}: {_first_line(e)} — give a local Hugging Face "
            "model directory (with config.json) or a reachable Hub id"
        ) from None
    try:  # use_safetensors: never fall back to pickle weights, locally or from the Hub
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], use_safetensors=True, **remote)
    except ValueError as e:
        _refuse_custom_code(name_or_path, trust_remote_code)
        raise ModelError(
            f"{name_or_path!r} (model_type {getattr(config, 'model_type', '?')!r}) is not a causal language model "
            f"transformers can load: {_first_line(e)}"
        ) from None
    except OSError as e:
        raise ModelError(f"cannot load weights of {name_or_path!r}: {_first_line(e)}") from None
    except Exception as e:  # a damaged safetensors file raises the library's own errors
        if type(e).__name__ in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader"):
            raise ModelError(f"the weights of {name_or_path!r} are not a readable safetensors file "
                             f"({_first_line(e)}); download or save the model again") from None
        if "ignore_mismatched_sizes" in str(e):  # transformers' "weights do not match the config" report
            raise ModelError(f"the weights of {name_or_path!r} do not match its config.json (tensor shapes differ); "
                             "the directory mixes two models, save it again") from None
        raise


def open_for_compress(name_or_path: str, lazy: bool | None = None, trust_remote_code: bool = False,
                      allow_non_finite: bool = False):
    """(model, lazy block reader or None, local directory) for `compress`.

    lazy None: lazy for a Hugging Face model (local directory or Hub id; its weights must be
    safetensors, a pickle-only model is refused with how to convert it), eager for a layerwise
    checkpoint (its weights are compressed already). The tensors in memory are checked for NaN/Inf
    here (unless allow_non_finite); a lazy block's when it is read (`LazyBlocks.finite_names`).
    """
    from .lazy import open_lazy, resolve_local

    if lazy is None:
        lazy = not is_checkpoint(name_or_path)
    if not lazy:
        model = load_model(name_or_path, trust_remote_code=trust_remote_code, allow_non_finite=allow_non_finite)
        return model, None, name_or_path
    _check_looks_reachable(name_or_path)
    local = resolve_local(name_or_path)
    try:
        model, blocks = open_lazy(str(local), trust_remote_code=trust_remote_code)
    except ModelError:
        _refuse_custom_code(str(local), trust_remote_code)
        raise
    check_causal(model, name_or_path)
    if not allow_non_finite:
        check_finite(model.named_parameters(), name_or_path)
    return model, blocks, str(local)


def check_weights(name_or_path: str, trust_remote_code: bool = False, lazy: bool = True) -> None:
    """Refuse, before anything is loaded, a Hugging Face model whose weight files cannot give it every
    tensor (a missing or damaged shard, a tensor absent, of another shape or not floating point);
    only the safetensors headers are read. lazy: `open_for_compress` will read it block by block."""
    from .lazy import check_headers, resolve_local

    _check_looks_reachable(name_or_path)
    local = resolve_local(name_or_path)
    try:
        check_headers(local, name_or_path, trust_remote_code, lazy=lazy)
    except ModelError:
        _refuse_custom_code(str(local), trust_remote_code)
        raise


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing, damaged (a tokenizer.json without a key raises KeyError) or foreign files
        _refuse_custom_code(name_or_path, trust_remote_code)
        detail = _message(e) if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {_message(e)}"
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r} ({detail}); check its tokenizer files") from None


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings are configured for (None: not stated)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(config, length: int, what: str, allow_long: bool) -> None:
    """Refuse a window or context longer than the model's maximum positions unless `allow_long`."""
    limit = max_positions(config)
    if limit is not None and length > limit and not allow_long:
        raise ModelError(
            f"{what} {length} exceeds the model's maximum of {limit} positions; use at most {limit} "
            "(or pass --allow-long-context if the model is meant to run longer, e.g. rope-scaled)"
        )


def _refuse_custom_code(name_or_path: str, trust_remote_code: bool) -> None:
    """The clear error for a directory whose config or weights we refuse to execute."""
    path = Path(name_or_path)
    if not path.is_dir():
        return
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{name_or_path!r} needs its own Python code (auto_map in config.json), which layerwise does not run; "
            "read that code and pass --trust-remote-code only if you trust it"
        )


def _check_looks_reachable(name: str) -> None:
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelError(f"no model directory at {name!r}; check the path (it must hold config.json and weights)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{name!r} has no config.json; point at a Hugging Face model directory")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
        if pickles:
            raise ModelError(
                f"{name!r} holds only pickle weights ({pickles[0]}), which can run code when loaded; convert them "
                "to safetensors where you trust the file (e.g. the safetensors project's convert script, or "
                "transformers' save_pretrained(..., safe_serialization=True)) and point layerwise at the result"
            )
        raise ModelError(f"{name!r} holds no *.safetensors weights; point at a Hugging Face model directory")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _message(e: Exception) -> str:
    """The whole message on one line (the first line alone can stop mid-sentence)."""
    return " ".join(str(e).split()) or type(e).__name__
