"""Checks on a loaded model that the eager and the lazy loader share: a causal decoder, finite weights."""

from __future__ import annotations

import torch

from .errors import ModelError, NumericalError


def check_causal(model, name: str) -> None:
    """Refuse encoders (BERT and kin): their attention sees later tokens, so neither calibration nor
    perplexity nor a KV-cache export means anything for them."""
    config = model.config
    bidirectional = [type(m).__name__ for m in model.modules() if getattr(m, "is_causal", None) is False]
    if getattr(config, "is_encoder_decoder", False) or bidirectional:
        raise ModelError(
            f"{name!r} (model_type {config.model_type!r}) is not a causal decoder: "
            f"{bidirectional[0] if bidirectional else 'encoder-decoder'} attends to later tokens; "
            "layerwise compresses decoder-only language models (Llama, Mistral, Qwen2, …)"
        )


def check_finite(named_tensors, name: str, only: set[str] | None = None) -> None:
    """NumericalError naming the first tensor holding NaN or Inf (only the names in `only`, if given)."""
    for tensor_name, tensor in named_tensors:
        if only is not None and tensor_name not in only:
            continue
        if tensor.is_floating_point() and tensor.device.type != "meta" and not _all_finite(tensor):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            hint = ("the recipe compresses it, so it must be finite (leave that layer alone with config: null)"
                    if only is not None else "compress's --allow-non-finite accepts them in layers the recipe leaves alone")
            raise NumericalError(
                f"{name}: tensor {tensor_name} holds {nan} NaN and {inf} Inf values; the model is damaged ({hint})"
            )


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(tensor).all(), a few million values at a time: on a float16 embedding the
    whole-tensor call allocates a float32 copy and a bool mask of it (470 MiB on a 32k × 3072 one)."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))
