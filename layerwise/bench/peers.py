"""Peer rows for `layerwise bench`: the same compressions done by coremltools.optimize.torch.

Same model (the float16 weights loaded as float32, an exact upcast), the same calibration windows
(`calibration_windows(calib, tokenizer, nsamples, seqlen, seed)`, one window per element, same order)
and the same evaluation (`perplexity` on the whole tokenized evaluation text at `seqlen`). Only the
nn.Linear layers inside the decoder blocks (`model.layers.*`) are compressed; embeddings and lm_head
stay as they are. coremltools writes the compressed values back into the dense float32 weights, so
the model evaluated is the peer's result itself (dequantized / palettized / pruned weights).

Bits per weight are computed from each peer's configuration for the compressed layers, counting
what its Core ML export stores (float16 scales and LUTs, a 1-bit mask for sparse weights):
  quantization, symmetric: n + 16/B        (B = block size, or in_features per channel; the zero
                                             point is implied: uint4 symmetric = int4 around 8)
  quantization, affine:    n + 16/B + n/B  (an n-bit zero point per scale)
  palettization, LUT per group of G output rows: n + 2**n * 16 / (G * in_features)
  sparse, float16 values kept: 16 * kept_fraction + 1   (kept_fraction measured on the result)
averaged over the compressed layers weighted by their number of weights.
"""

from __future__ import annotations

import logging
import os
import re
import time

import torch

from layerwise.calib_data import bos_token_id

from .measure import add_forward_ratios, evaluation_ids, gpu_peak_mb, peak_rss_mb, timed_forward

log = logging.getLogger(__name__)

BLOCKS = r"model\.layers\.\d+"  # the decoder blocks of a HF LlamaForCausalLM (and Mistral, Qwen2, ...)
TARGETS = BLOCKS + r"\..*"  # any module inside a block; only nn.Linear ones are compressed


_PALETTIZERS = {  # kind: (our method at the same setting, the peer's settings line)
    "skm": ("skm", "SKMPalettizer {}-bit, LUT per 16 output channels"),
    "ptp": ("kmeans", "PostTrainingPalettizer {}-bit k-means, LUT per 16 output channels (data-free)"),
}


def _palettizer(kind: str, n_bits: int) -> dict:
    """A palettizer peer with one LUT per 16 output channels (see _PALETTIZERS)."""
    method, settings = _PALETTIZERS[kind]
    config = {"n_bits": n_bits, "granularity": "per_grouped_channel", "group_size": 16}
    return {"ours": {"method": method, **config}, "kind": kind, "settings": settings.format(n_bits), "config": config}


# Each peer names `ours`: the layerwise config at the matching setting (same bits, granularity and
# symmetry), run next to it in the `peers` grid.
PEERS: dict[str, dict] = {
    # LayerwiseCompressor: GPTQ / SparseGPT block by block (coremltools defaults: damping 0.01,
    # processing group 128, no activation order). GPTQ accepts only unsigned weight dtypes (uint4).
    "ct-gptq-4bit-per-channel": {
        "ours": {"method": "gptq", "bits": 4, "sym": True},
        "kind": "layerwise", "settings": "LayerwiseCompressor GPTQ uint4 symmetric per-channel",
        "config": {"algorithm": "gptq", "weight_dtype": "uint4", "granularity": "per_channel"},
    },
    "ct-gptq-4bit-block32": {
        "ours": {"method": "gptq", "bits": 4, "block_size": 32, "sym": True},
        "kind": "layerwise", "settings": "LayerwiseCompressor GPTQ uint4 symmetric per-block 32",
        "config": {"algorithm": "gptq", "weight_dtype": "uint4", "granularity": "per_block", "block_size": 32},
    },
    # uint3: coremltools' GPTQ reads the bit width from the dtype's name (it has no uint2)
    "ct-gptq-3bit-block32": {
        "ours": {"method": "gptq", "bits": 3, "block_size": 32, "sym": True},
        "kind": "layerwise", "settings": "LayerwiseCompressor GPTQ uint3 symmetric per-block 32",
        "config": {"algorithm": "gptq", "weight_dtype": "uint3", "granularity": "per_block", "block_size": 32},
    },
    # weight_dtype float32 = no quantization (the default uint8 would also quantize to 8 bits)
    "ct-sparsegpt-50": {
        "ours": {"method": "sparsegpt", "sparsity": 0.5},
        "kind": "layerwise", "settings": "LayerwiseCompressor SparseGPT 50% unstructured",
        "config": {"algorithm": "sparse_gpt", "target_sparsity": 0.5, "weight_dtype": "float32"},
    },
    "ct-sparsegpt-2:4": {
        "ours": {"method": "sparsegpt", "nm": "2:4"},
        "kind": "layerwise", "settings": "LayerwiseCompressor SparseGPT 2:4",
        "config": {"algorithm": "sparse_gpt", "n_m_ratio": [2, 4], "weight_dtype": "float32"},
    },
    # SKMPalettizer: Fisher-weighted k-means; sensitivity from next-token cross-entropy per window
    "ct-skm-4bit-g16": _palettizer("skm", 4),
    "ct-skm-3bit-g16": _palettizer("skm", 3),
    "ct-ptp-4bit-g16": _palettizer("ptp", 4),  # PostTrainingPalettizer: data-free k-means
    "ct-ptp-3bit-g16": _palettizer("ptp", 3),
    "ct-ptq-int4-block32": {
        "ours": {"method": "rtn", "bits": 4, "block_size": 32, "sym": True},
        "kind": "ptq", "settings": "PostTrainingQuantizer int4 symmetric per-block 32 (data-free RTN)",
        "config": {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32},
    },
}


def measure_peer(name: str, model_path: str, calib: str, eval_text: str, nsamples: int, seqlen: int, seed: int,
                 device: str = "cpu", eval_tokens: int | None = None) -> dict:
    """One peer row, with the keys of bench's rows. Any failure is kept in the row as `error`."""
    peer = PEERS.get(name)
    row = {"method": name, "settings": peer["settings"] if peer else "?", "peer": True, "checkpoint_mb": None}
    try:
        if peer is None:
            raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        row.update(_measure(peer, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens))
    except Exception as e:  # the row stays, with the error, so the table shows the failure
        lines = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"
        log.exception("peer %s failed", name)
    return row


def _measure(peer, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens=None) -> dict:
    from layerwise.calib_data import calibration_windows
    from layerwise.evaluate import perplexity
    from layerwise.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    windows, _ = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    model = load_model(model_path, dtype="float32")
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(TARGETS, n)}
    if not targets:
        raise ValueError(f"no nn.Linear layers match {TARGETS!r}; the peers expect model.layers.* decoder blocks")
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    weighted = (torch.nn.Linear, torch.nn.Embedding)
    before = {n: _checksum(m.weight) for n, m in model.named_modules() if isinstance(m, weighted)}
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

    _import_coremltools()  # the (slow) import stays outside the timed call
    start, cpu = time.perf_counter(), time.process_time()
    model = compress_peer(peer, model, windows, dev)
    out = {"compress_s": time.perf_counter() - start, "compress_cpu_s": time.process_time() - cpu}
    out["peak_rss_mb"] = peak_rss_mb()
    out["gpu_peak_mb"] = gpu_peak_mb()
    model.zero_grad(set_to_none=True)  # SKM leaves its squared gradients behind
    model = model.cpu().float().eval().requires_grad_(False)

    modules = dict(model.named_modules())
    changed = [n for n in targets if _checksum(modules[n].weight) != before[n]]
    untouched = [n for n in before if n not in targets and _checksum(modules[n].weight) != before[n]]
    if untouched:
        raise RuntimeError(f"the peer changed layers outside the decoder blocks: {', '.join(untouched[:3])}")
    if not changed:
        raise RuntimeError("the peer left every target weight unchanged")
    out["layers_changed"] = f"{len(changed)}/{len(targets)}"
    kept = {n: float((modules[n].weight != 0).float().mean()) for n in targets}
    out["bits_per_weight"] = peer_bits(peer, shapes, kept)

    if peer["kind"] in ("layerwise", "skm"):  # calibrated: × forward (data-free peers have no windows to compare)
        out.update(timed_forward(load_model(model_path, dtype="float32"), windows))
        add_forward_ratios(out)
    res = perplexity(model, evaluation_ids(tokenizer, eval_text, eval_tokens), seqlen=seqlen, bos=bos_token_id(tokenizer))
    out["ppl"] = res["ppl"]
    out["eval_tokens"] = res["tokens"]
    return out


def compress_peer(peer: str | dict, model, windows: torch.Tensor, device: str = "cpu"):
    """Run a peer's coremltools compression call on a HF causal LM; returns the compressed model.

    In place where the API allows (the post-training optimizers still keep a deep copy of the
    original). `windows`: [nsamples, seqlen] token ids, fed one window per element, in order.
    """
    _import_coremltools()
    peer = PEERS[peer] if isinstance(peer, str) else peer
    kind, cfg = peer["kind"], dict(peer["config"])
    model.config.use_cache = False  # else a KV cache is threaded through the cached layer kwargs
    samples = [windows[i : i + 1] for i in range(windows.shape[0])]  # one window per element, same order
    if kind == "layerwise":
        from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

        config = LayerwiseCompressorConfig.from_dict({
            "global_config": cfg, "layers": [BLOCKS], "input_cacher": "gpt", "calibration_nsamples": len(samples),
        })
        return LayerwiseCompressor(model, config).compress(samples, device=device, inplace=True)
    if kind == "skm":
        from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

        config = SKMPalettizerConfig.from_dict({"module_name_configs": {TARGETS: cfg},
                                                "calibration_nsamples": len(samples)})
        with torch.enable_grad():
            return SKMPalettizer(model, config).compress(dataloader=samples, loss_fn=next_token_loss, inplace=True)
    if kind == "ptp":
        from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

        config = PostTrainingPalettizerConfig.from_dict({"module_name_configs": {TARGETS: cfg}})
        return PostTrainingPalettizer(model, config).compress(inplace=True)
    if kind == "ptq":
        from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

        model.requires_grad_(False)  # it reads weights with .numpy()
        config = PostTrainingQuantizerConfig.from_dict({"module_name_configs": {TARGETS: cfg}})
        return PostTrainingQuantizer(model, config).compress(inplace=True)
    raise ValueError(f"unknown peer kind {kind!r}")


def _import_coremltools() -> None:
    import coremltools.optimize.torch  # noqa: F401  (installs its own INFO-level log handler)

    if "COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL" not in os.environ:
        logging.getLogger("coremltools.optimize.torch").setLevel(logging.WARNING)


def next_token_loss(model, window: torch.Tensor) -> torch.Tensor:
    """SKM's loss: mean next-token cross-entropy of one calibration window (HF shifts the labels)."""
    window = window.to(next(model.parameters()).device)
    return model(input_ids=window, labels=window, use_cache=False).loss


def peer_bits(peer: dict, shapes: dict[str, tuple], kept: dict[str, float] | None = None) -> float:
    """Bits per weight over the compressed layers (formulas in the module docstring)."""
    cfg, total, bits = peer["config"], 0, 0.0
    for name, (out_f, in_f) in shapes.items():
        numel = out_f * in_f
        if cfg.get("algorithm") == "sparse_gpt":
            b = 16 * (kept or {}).get(name, 1 - cfg.get("target_sparsity", 0.5)) + 1
        elif "n_bits" in cfg:  # palettization, one float16 LUT of 2**n entries per group of output rows
            n, group = cfg["n_bits"], cfg.get("group_size") or out_f
            b = n + 2**n * 16 / (group * in_f)
        else:  # linear quantization with float16 scales
            n = int(re.search(r"\d+", cfg["weight_dtype"]).group())
            block = cfg.get("block_size") or in_f
            affine = cfg.get("quantization_scheme", "symmetric") == "affine"
            # PostTrainingQuantizer stores a zero point for unsigned dtypes; GPTQ's uint4 symmetric is int4
            affine = affine or (peer["kind"] == "ptq" and cfg["weight_dtype"].startswith("u"))
            b = n + 16 / block + (n / block if affine else 0)
        total += numel
        bits += b * numel
    return bits / total


def _checksum(weight: torch.Tensor) -> tuple[float, float]:
    w = weight.detach().double()
    return float(w.sum()), float((w * w).sum())
