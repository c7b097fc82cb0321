"""`layerwise generate`: stream text from a HF model, a layerwise checkpoint or (on macOS) an mlpackage.

A model or checkpoint decodes through `StatefulCausalLM`, the same wrapper `layerwise export`
converts (its KV cache in float32 or float16), so what you read here is what the package computes.
An `.mlpackage` runs through Core ML with an `MLState` (macOS only: elsewhere Core ML cannot
predict, and the command says so). One prefill call takes the whole prompt (sliding windows are
applied inside the wrapper / program), then one call per new token.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import ModelError

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: new tokens after the first (which the prefill produces) per decode second."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


# A step function: (input ids [1, q] int32, past length) -> logits of the last position [vocab] float32.
Step = Callable[[np.ndarray, int], np.ndarray]


def wrapper_step(model: torch.nn.Module, context: int, cache_dtype: torch.dtype = torch.float32) -> Step:
    """Decode through the export wrapper over a CPU float32 copy of `model`."""
    from .coreml.convert import cpu_float32
    from .models.stateful import StatefulCausalLM, causal_mask

    wrapper = StatefulCausalLM(cpu_float32(model), context=context, cache_dtype=cache_dtype,
                               last_logits_only=True).eval()

    @torch.no_grad()
    def step(ids: np.ndarray, past: int) -> np.ndarray:
        logits = wrapper(torch.from_numpy(ids), causal_mask(ids.shape[1], past))
        return logits[0, -1].float().numpy()

    return step


def coreml_step(package: str | Path) -> tuple[Step, int]:
    """Decode through Core ML with an MLState (macOS); returns the step and the package's context."""
    if sys.platform != "darwin":
        raise ModelError(
            f"{package} is a Core ML package and Core ML predictions need macOS (this is {sys.platform}); "
            "run `layerwise generate` on the checkpoint or model it was exported from — same wrapper, same math"
        )
    import coremltools as ct

    probe = ct.models.MLModel(str(package), skip_model_load=True)
    meta = dict(probe.user_defined_metadata)
    functions = meta.get("layerwise.functions", "main").split(",")
    function = "decode" if "decode" in functions else "main"  # a multifunction package: decode, one token a call
    mlmodel = ct.models.MLModel(str(package), function_name=None if function == "main" else function)
    state = mlmodel.make_state()
    single = function == "decode"

    def step(ids: np.ndarray, past: int) -> np.ndarray:
        from .models.stateful import causal_mask

        chunks = [ids[:, i : i + 1] for i in range(ids.shape[1])] if single else [ids]
        for chunk in chunks:
            mask = causal_mask(chunk.shape[1], past).numpy().astype(np.float16)
            out = mlmodel.predict({"input_ids": chunk.astype(np.int32), "causal_mask": mask}, state)["logits"]
            past += chunk.shape[1]
        return np.asarray(out[0, -1], dtype=np.float32)

    return step, int(meta.get("layerwise.context", "0"))


def sample(logits: np.ndarray, temperature: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else one draw from softmax(logits / T) with the seeded generator."""
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = torch.softmax(torch.from_numpy(logits).double() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_ids(step: Step, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, eos_ids: tuple[int, ...] = (), stats: list | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids (stopping after an end-of-sequence id)."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    logits = step(np.asarray([prompt_ids], dtype=np.int32), 0)
    prefill = time.perf_counter() - start
    past, produced = len(prompt_ids), 0
    start = time.perf_counter()
    while produced < max_new_tokens:
        token = sample(logits, temperature, generator)
        produced += 1
        yield token
        if token in eos_ids or produced == max_new_tokens:
            break
        logits = step(np.asarray([[token]], dtype=np.int32), past)
        past += 1
    if stats is not None:
        stats.append(GenerationStats(len(prompt_ids), produced, prefill, time.perf_counter() - start))


def stream_text(tokenizer, tokens: Iterator[int], hidden: tuple[int, ...] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive (decoding the whole continuation so multi-token characters print
    whole); `hidden` ids (end of sequence) are not shown, other special tokens are (WikiText's <unk>)."""
    new: list[int] = []
    shown = ""
    for token in tokens:
        if token in hidden:
            continue
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text[len(shown):]
        shown = text


def generate(model_path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
             cache_dtype: str = "float32", write: Callable[[str], None] | None = None) -> tuple[str, GenerationStats]:
    """Generate from a model directory, checkpoint or mlpackage; `write` receives the text as it streams."""
    from .exporters import get_exporter
    from .loading import load_model, load_tokenizer

    if max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ModelError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if cache_dtype not in CACHE_DTYPES:
        raise ModelError(f"cache dtype {cache_dtype!r} must be one of {sorted(CACHE_DTYPES)}")
    path = Path(model_path)
    if path.suffix == ".mlpackage":
        if not path.is_dir():
            raise ModelError(f"no Core ML package at {model_path}")
        step, context = coreml_step(path)
        tokenizer = load_tokenizer(str(get_exporter("coreml").tokenizer_dir(path)))
        eos = _eos_ids(tokenizer=tokenizer)
    else:
        model = load_model(model_path)
        tokenizer = load_tokenizer(model_path)
        eos = _eos_ids(model=model, tokenizer=tokenizer)
        context = None
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not prompt_ids:
        raise ModelError("the prompt is empty after tokenization; give some text with --prompt")
    needed = len(prompt_ids) + max_new_tokens
    if context is None:
        step = wrapper_step(model, needed, CACHE_DTYPES[cache_dtype])
    elif needed > context:
        raise ModelError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new ones exceed the package's "
                         f"context of {context}; shorten the prompt or --max-new-tokens, or export a longer --context")
    stats: list[GenerationStats] = []
    pieces = []
    for piece in stream_text(tokenizer, generate_ids(step, prompt_ids, max_new_tokens, temperature,
                                                                  seed, eos, stats), eos):
        pieces.append(piece)
        if write is not None:
            write(piece)
    return "".join(pieces), stats[0]


def _eos_ids(model=None, tokenizer=None) -> tuple[int, ...]:
    ids = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids += value if isinstance(value, list) else [value]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return tuple(sorted({int(i) for i in ids if i is not None}))


def stats_line(stats: GenerationStats) -> str:
    return json.dumps({"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                       "prefill_seconds": round(stats.prefill_seconds, 3),
                       "tokens_per_second": round(stats.tokens_per_second, 1)})
