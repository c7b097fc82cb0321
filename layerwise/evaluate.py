"""Perplexity: the whole text tokenized once, cut into non-overlapping windows of `seqlen` tokens
(the incomplete tail dropped), each window scored alone; ppl = exp(mean token NLL).

With a BOS id (the tokenizer adds one by default: Gemma, Llama 3) each window is BOS followed by
seqlen - 1 tokens of text, and BOS itself is never a target, so every text token is scored.

Memory does not grow with batch × vocabulary. For a declared family the output head is applied a
slice of positions at a time (`LOSS_BYTES` of float32 logits alive at once), with the family's
logit scale and final soft-cap as the HF forward applies them; the model's own forward stops at the
head's input. Other models return whole logits, a batch of at most `LOGITS_BUDGET` bytes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerwise.calib_data import with_bos
from layerwise.models.families import Family, get_module, resolve_family

from .errors import DataError, NumericalError
from .matmul_precision import fast_float32_matmul, fast_matmul_is_accurate
from .memory import check_fits

LOGITS_BUDGET = 512 * 2**20  # bytes of float32 logits one forward may return (models of no declared family)
LOSS_BYTES = 64 * 2**20  # float32 logits of the positions scored at once


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 256, batch_size: int = 8, device: str | torch.device = "cpu",
               bos: int | None = None, fast_matmul: bool = True) -> dict:
    """token_ids: [n] int64 text (no special tokens). Returns {"ppl", "nll", "tokens" (predicted),
    "windows", "seqlen", "bos_token_id", "matmul"}. fast_matmul: float32 products through bfloat16
    units where the device keeps float32 accuracy (`matmul_precision`; the output head of a large
    vocabulary is most of the work, ~3 × faster with AVX512-BF16), else plain float32."""
    if seqlen < 2 + (bos is not None) or batch_size < 1:
        raise DataError(f"need seqlen >= 2 and batch size >= 1 (got seqlen={seqlen}, batch size={batch_size})")
    text_len = seqlen - (bos is not None)
    n_windows = token_ids.numel() // text_len
    if n_windows < 1:
        raise DataError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = with_bos(token_ids[: n_windows * text_len].reshape(n_windows, text_len), bos)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    family = _declared_family(model)
    batch_size = batch_size if family is not None else _batch_within_budget(batch_size, seqlen, vocab)
    if torch.device(device).type == "cpu" and isinstance(vocab, int):  # the logits alive at once, twice
        alive = LOSS_BYTES if family is not None else 4 * vocab * min(batch_size, n_windows) * seqlen
        check_fits(3 * alive, f"--batch-size {batch_size} x --seqlen {seqlen}", "lower --batch-size or --seqlen")
    model.eval()
    fast = fast_matmul and fast_matmul_is_accurate(torch.device(device))
    total_nll, total_tokens = 0.0, 0
    with fast_float32_matmul(torch.device(device), fast):
        for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False, disable=None):
            ids = windows[start : start + batch_size].to(device)
            total_nll += _window_nll(model, family, ids)
            total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise NumericalError(
            "the model's logits hold NaN or Inf on this text, so its perplexity is undefined; check the weights "
            "(a damaged model or checkpoint) or evaluate in --dtype float32"
        )
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": n_windows, "seqlen": seqlen,
            "bos_token_id": bos, "matmul": "bfloat16-units" if fast else "float32"}


def _declared_family(model) -> Family | None:
    """The family entry whose head transform we reproduce; None: score the model's own logits."""
    try:
        family = resolve_family(model)
    except Exception:  # not a decoder we know (any model with .logits is still scored whole)
        return None
    return family if family.exportable and family.lm_head else None


def _batch_within_budget(batch_size: int, seqlen: int, vocab) -> int:
    """The largest batch ≤ batch_size whose float32 logits fit LOGITS_BUDGET (at least one window)."""
    if not isinstance(vocab, int):
        return batch_size
    return max(1, min(batch_size, LOGITS_BUDGET // (4 * seqlen * vocab)))


def _window_nll(model, family: Family | None, ids: torch.Tensor) -> float:
    """Σ −log p(next token) over ids: [B, L] (the first position is never a target)."""
    if family is None:
        logits = model(input_ids=ids, use_cache=False).logits  # [B, L, vocab]
        return sum(_nll_sum(logits[b, :-1], ids[b, 1:], lambda x: x) for b in range(ids.shape[0]))
    head = get_module(model, family.lm_head)
    with _head_input(model, family.lm_head) as kept:
        model(input_ids=ids, use_cache=False)
    hidden = kept[0][:, :-1].reshape(-1, kept[0].shape[-1])  # [B·(L-1), hidden], the final norm applied
    scale, cap = family.logit_scale, family.softcap(model.config)[1]
    raw = None if scale is None else getattr(model.config, scale.field, None)

    def logits_of(rows):  # as the HF forward does it: head, × or ÷ the config's scale, final soft-cap
        logits = head(rows)
        if raw is not None:  # Granite divides by logits_scaling (power −1): the same float op as HF
            logits = logits / raw if scale.power == -1.0 else logits * scale.value(model.config)
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    return _nll_sum(hidden, ids[:, 1:].reshape(-1), logits_of)


@contextlib.contextmanager
def _head_input(model, path: str):
    """The output head swapped for one that keeps its input and returns no logits ([..., 0]),
    so the model's forward never holds [B, L, vocab]."""
    head = get_module(model, path)
    kept: list[torch.Tensor] = []
    model.set_submodule(path, _KeepInput(kept))
    try:
        yield kept
    finally:
        model.set_submodule(path, head)


class _KeepInput(torch.nn.Module):
    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept

    def forward(self, x):
        self.kept.append(x)
        return x[..., :0]


def _nll_sum(rows: torch.Tensor, targets: torch.Tensor, logits_of) -> float:
    """Σ −log p(target): rows [T, ·] give logits_of(rows) [T, vocab] (any float dtype), targets [T];
    taken LOSS_BYTES of float32 logits at a time (one row first, to learn the vocabulary)."""
    total, start, step = 0.0, 0, 1
    while start < rows.shape[0]:
        logits = logits_of(rows[start : start + step]).float()
        total += F.cross_entropy(logits, targets[start : start + step], reduction="sum").item()
        start += step
        step = max(1, LOSS_BYTES // (4 * logits.shape[-1]))
    return total
