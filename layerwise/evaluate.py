"""Perplexity: the whole text tokenized once, cut into non-overlapping windows of `seqlen` tokens
(the incomplete tail dropped), each window scored alone; ppl = exp(mean token NLL).

With a BOS id (the tokenizer adds one by default: Gemma, Llama 3) each window is BOS followed by
seqlen - 1 tokens of text, and BOS itself is never a target, so every text token is scored.

Memory does not grow with batch × vocabulary: a batch holds at most `LOGITS_BUDGET` bytes of
float32 logits (a 262,144-token vocabulary runs one window at a time), and the loss is taken over
a slice of positions at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerwise.calib_data import with_bos

from .errors import DataError, NumericalError
from .memory import check_fits

LOGITS_BUDGET = 512 * 2**20  # bytes of float32 logits one forward may return
LOSS_ROWS = 1024  # positions whose log-softmax is alive at once


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 256, batch_size: int = 8, device: str | torch.device = "cpu",
               bos: int | None = None) -> dict:
    """token_ids: [n] int64 text (no special tokens). Returns {"ppl", "nll", "tokens" (predicted),
    "windows", "seqlen", "bos_token_id"}."""
    if seqlen < 2 + (bos is not None) or batch_size < 1:
        raise DataError(f"need seqlen >= 2 and batch size >= 1 (got seqlen={seqlen}, batch size={batch_size})")
    text_len = seqlen - (bos is not None)
    n_windows = token_ids.numel() // text_len
    if n_windows < 1:
        raise DataError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = with_bos(token_ids[: n_windows * text_len].reshape(n_windows, text_len), bos)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batch_size = _batch_within_budget(batch_size, seqlen, vocab)
    if torch.device(device).type == "cpu" and isinstance(vocab, int):  # the batch's logits and one loss slice
        rows = min(batch_size, n_windows) * seqlen
        check_fits(4 * vocab * (2 * rows + 2 * min(rows, LOSS_ROWS)), f"--batch-size {batch_size} x --seqlen {seqlen}",
                   "lower --batch-size or --seqlen")
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False, disable=None):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # [B, L, vocab]
        total_nll += _nll_sum(logits[:, :-1], ids[:, 1:])
        total_tokens += ids[:, 1:].numel()
        del logits
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise NumericalError(
            "the model's logits hold NaN or Inf on this text, so its perplexity is undefined; check the weights "
            "(a damaged model or checkpoint) or evaluate in --dtype float32"
        )
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": n_windows, "seqlen": seqlen,
            "bos_token_id": bos}


def _batch_within_budget(batch_size: int, seqlen: int, vocab) -> int:
    """The largest batch ≤ batch_size whose float32 logits fit LOGITS_BUDGET (at least one window)."""
    if not isinstance(vocab, int):
        return batch_size
    return max(1, min(batch_size, LOGITS_BUDGET // (4 * seqlen * vocab)))


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ −log p(target) over logits: [B, T, vocab] (any float dtype), targets: [B, T], in float32
    slices of LOSS_ROWS positions (a whole-batch log-softmax is another copy of the logits)."""
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    total = 0.0
    for s in range(0, flat.shape[0], LOSS_ROWS):
        chunk = flat[s : s + LOSS_ROWS].float()
        total += F.cross_entropy(chunk, flat_targets[s : s + LOSS_ROWS], reduction="sum").item()
    return total
