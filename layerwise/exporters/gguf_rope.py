"""The rope of a GGUF file: its dimension count, base and scaling as llama.cpp reads them.

llama.cpp rotates pair i of a head by pos · base^(−2i/d) / f_i, with the per-pair factors f_i in a
float32 tensor: `rope_freqs` for Llama 3's frequency-dependent scaling, `rope_factors_short` and
`rope_factors_long` for Phi-3's LongRoPE (llama.cpp takes the long ones when its context, padded to
a multiple of 256, is longer than the original one; Hugging Face when the sequence is: a llama.cpp
context longer than the original scores short texts differently). The factors are read off transformers'
own rope functions, so they are the inverse frequencies the Hugging Face model uses. Other
scalings (linear, dynamic, yarn) are refused in one line.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError

SCALINGS = ("default", "llama3", "longrope")  # rope_type values written


def rope_parameters(config) -> dict:
    """The config's rope parameters (the global layers' where they differ per layer type: Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def write_rope(writer, config, head_dim: int) -> None:
    """The rope keys of `config` into `writer` (a gguf.GGUFWriter), and the factor tensors a scaling needs."""
    rope = rope_parameters(config)
    rotary = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    dims = int(head_dim * rotary)
    writer.add_rope_dimension_count(dims)  # Phi-4-mini rotates 3/4 of each head
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_freq_base(base)
    kind = rope.get("rope_type", "default")
    if kind not in SCALINGS:
        raise ModelError(f"--format gguf does not write {kind!r} rope scaling (it writes {', '.join(SCALINGS[1:])})")
    if kind == "llama3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
        writer.add_tensor("rope_freqs.weight", _factors(_plain_inverse_frequencies(base, dims) / scaled.float()))
    elif kind == "longrope":
        _write_longrope(writer, config, rope, dims)


def _write_longrope(writer, config, rope: dict, dims: int) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = rope.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
    if original is None:
        raise ModelError("--format gguf: a longrope config without original_max_position_embeddings")
    for name in ("short_factor", "long_factor"):
        if len(rope[name]) != dims // 2:
            raise ModelError(f"--format gguf: longrope's {name} has {len(rope[name])} entries for {dims // 2} "
                             "rotated pairs")
    _, attention = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"))
    writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_rope_scaling_attn_factors(float(attention))  # HF scales cos and sin by it; llama.cpp's mscale
    writer.add_tensor("rope_factors_short.weight", _factors(torch.tensor(rope["short_factor"])))
    writer.add_tensor("rope_factors_long.weight", _factors(torch.tensor(rope["long_factor"])))


def _plain_inverse_frequencies(base: float, dims: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.int64).float() / dims))


def _factors(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float32).numpy()
