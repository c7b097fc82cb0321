"""Perplexity: the whole text tokenized once, cut into non-overlapping windows of `seqlen` tokens
(the incomplete tail dropped), each window scored alone; ppl = exp(mean token NLL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import DataError, NumericalError
from .memory import check_fits


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 256, batch_size: int = 8, device: str | torch.device = "cpu") -> dict:
    """token_ids: [n] int64. Returns {"ppl", "nll", "tokens" (predicted), "windows", "seqlen"}."""
    if seqlen < 2 or batch_size < 1:
        raise DataError(f"need seqlen >= 2 and batch size >= 1 (got seqlen={seqlen}, batch size={batch_size})")
    n_windows = token_ids.numel() // seqlen
    if n_windows < 1:
        raise DataError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = token_ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if torch.device(device).type == "cpu" and isinstance(vocab, int):  # float32 logits of a batch, ~3 copies
        check_fits(3 * 4 * min(batch_size, n_windows) * seqlen * vocab, f"--batch-size {batch_size} x --seqlen {seqlen}",
                   "lower --batch-size")
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False, disable=None):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [B, L, vocab]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise NumericalError(
            "the model's logits hold NaN or Inf on this text, so its perplexity is undefined; check the weights "
            "(a damaged model or checkpoint) or evaluate in --dtype float32"
        )
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": n_windows, "seqlen": seqlen}
