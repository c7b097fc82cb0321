"""How much of a layer's output error reaches the model's loss: one scale per layer.

A layer's output changes by δy = ΔW x. To second order the loss changes by ½ δyᵀ F δy, with F the
Fisher of the loss with respect to that output (the mean of g gᵀ, g = ∂ loss / ∂y). Keeping F's
diagonal (one weight per output channel: the quantization noise of different rows is
uncorrelated) and taking g and δy independent over the calibration tokens gives

    Δloss ≈ Σ_j s_j · (ΔW H ΔWᵀ)_jj,   s_j = Σ_t g_tj² / (4 T),   H = 2/T Σ_t x_t x_tᵀ

where g_t is the gradient of the summed next-token loss with respect to the layer's output at
token t (so it carries every later token's dependence on it) and T the number of tokens. Per
channel, not one number per layer: a row scaled by c has c² its error and 1/c² its s_j, so the
product — and the allocation — does not change when a model moves scale between layers. One
backward pass per batch gives every layer's scales at once; no weight gradient is computed.

The token embedding [vocab, hidden] is a linear of one-hot inputs: row t changes the output only
where token t is, so its scale sums g² over those positions alone (and over the hidden channels,
its row error being |ΔW_t|², `measure`): s_t = c² Σ_{t' = t} |g_t'|² / (2 T · hidden), c the
scale the embedding module multiplies by. A tied output head adds its own output Fisher times
the mean of its input's (h) squared channel, H's diagonal taken as its mean: s_v · 2 Σ|h|² / (T · hidden).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..errors import DataError
from ..linears import linear_shape


def output_fisher_scales(
    model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 4, device: str = "auto"
) -> dict[str, torch.Tensor]:
    """{layer name: s [out] float64} (mean next-token loss per unit of each row's (ΔW H ΔWᵀ)_jj)
    over `windows` [N, L].

    The model runs whole on `device` in float32; every parameter and buffer goes back to the CPU in
    its own dtype afterwards, values unchanged (a blanket `model.to(float16)` would round the
    float32 rotary frequencies)."""
    dev = resolve_device(device)
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(device=dev, dtype=torch.float32)
    model.eval()
    sums = {name: torch.zeros(linear_shape(model.get_submodule(name))[0], dtype=torch.float64) for name in names}
    embed = model.get_input_embeddings()
    table = next((n for n in names if model.get_submodule(n) is embed), None)
    tied = table is not None and model.get_output_embeddings() is not None \
        and model.get_output_embeddings().weight is embed.weight
    extra = {"table": torch.zeros_like(sums[table]), "head": torch.zeros_like(sums[table]), "h2": 0.0} if table else {}
    sums = {n: s for n, s in sums.items() if n != table}
    handles = _embedding_hooks(model, extra, tied)

    def add_square(name, grad):  # returns None: the gradient flows on unchanged
        sums[name] += grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0).cpu()

    def keep_grad(name, out):
        out.register_hook(lambda g: add_square(name, g))

    for name in sums:
        handles.append(model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: keep_grad(name, o)))
    tokens = 0
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc="loss scales", unit="batch", disable=None):
                ids = windows[start : start + batch_size].to(dev)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise DataError(f"the next-token loss is {loss.item()} on calibration batch {start // batch_size}")
                predicted = ids.shape[0] * (ids.shape[1] - 1)
                (loss * predicted).backward()  # the summed loss: g_t as defined above
                tokens += predicted
    finally:
        for h in handles:
            h.remove()
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(device="cpu", dtype=dtype)
    scales = {name: sums[name] / (4 * tokens) for name in sums}
    if table is not None:
        hidden, c = embed.weight.shape[1], float(getattr(embed, "embed_scale", 1.0))
        scales[table] = c**2 * extra["table"] / (2 * tokens * hidden) + extra["head"] / (4 * tokens) * 2 * extra["h2"] / (tokens * hidden)
    return {name: scales[name] for name in names}


def _embedding_hooks(model: nn.Module, extra: dict, tied: bool) -> list:
    """The embedding's output made to carry a gradient (the first one the backward pass reaches), and,
    when `extra` asks, the per-token sums of |g|² (`table`), the tied head's output g² (`head`) and
    its inputs' Σ|h|² (`h2`)."""
    def on_embedding(module, inputs, out):
        out.requires_grad_(True)
        if extra:
            ids = inputs[0].reshape(-1).cpu()
            out.register_hook(lambda g: _accumulate(extra["table"].index_add_, 0, ids,
                                                    g.detach().double().pow(2).sum(-1).reshape(-1).cpu()))

    def on_head(module, inputs, out):
        extra["h2"] += float(inputs[0].detach().double().pow(2).sum())
        # float32 squares: the logits' gradient is [batch, length, vocab], too big to widen to float64
        out.register_hook(lambda g: _accumulate(extra["head"].add_, g.detach().pow(2).reshape(-1, g.shape[-1]).sum(0).double().cpu()))

    handles = [model.get_input_embeddings().register_forward_hook(on_embedding)]
    if extra and tied:
        handles.append(model.get_output_embeddings().register_forward_hook(on_head))
    return handles


def _accumulate(add, *args) -> None:
    """Call an in-place sum and return None: a gradient hook's result would replace the gradient."""
    add(*args)
