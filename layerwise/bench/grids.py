"""The benchmark grids: each a list of rows, a row being one recipe (a method config, or rules with a
label), None for the float16 baseline, or a coremltools peer (see `peers.PEERS`)."""

from __future__ import annotations

from .peers import PEERS


def _q(method, bits, block=None, **kw):
    return {"method": method, "bits": bits, **({"block_size": block} if block else {}), **kw}


def _pal(method, bits, group_size, **kw):
    if group_size is None:
        return {"method": method, "n_bits": bits, "granularity": "per_tensor", **kw}
    return {"method": method, "n_bits": bits, "granularity": "per_grouped_channel", "group_size": group_size, **kw}


def _peer(name):
    """A coremltools peer row (layerwise.peers.PEERS): same model, windows and evaluation."""
    return {"method": name, "peer": True}


def _b128(method, bits, **kw):
    """Blocks of 128 inputs; down_proj of the reference model has 704 inputs (not a multiple of
    128), so a rule gives it blocks of 64 — stated in the row's settings, never silently."""
    cfg = _q(method, bits, 128, **kw)
    return {"method": method, "label": f"bits={bits} block_size=128 (down_proj 64){_kw(kw)}",
            "rules": [{"match": r"mlp\.down_proj", "config": {**cfg, "block_size": 64}}, {"match": ".*", "config": cfg}]}


def _kw(kw):
    return "".join(f" {k}={v}" for k, v in kw.items())


def _peer_pairs():
    """Every coremltools peer right after our row at the matching setting (one run, same load)."""
    rows = [None]
    for name, peer in PEERS.items():
        rows += [dict(peer["ours"]), _peer(name)]
    return rows


GRIDS: dict[str, list[dict | None]] = {
    # issue 2: fp16, RTN and GPTQ at 4 and 3 bits, per-channel and blocks of 32 / 128 (defaults:
    # GPTQ with act-order and MSE clipping, RTN with MSE clipping)
    "spine": [None] + [c for b in (4, 3) for c in (_q("rtn", b), _q("gptq", b), _q("rtn", b, 32), _q("gptq", b, 32),
                                                     _b128("rtn", b), _b128("gptq", b))],
    # what each default buys at 3-bit block 32: textbook min-max RTN / GPTQ, then one switch at a time
    "spine-extra": [None, _q("rtn", 3, 32, mse_clip=False), _q("gptq", 3, 32, act_order=False, mse_clip=False),
                    _q("gptq", 3, 32, act_order=True, mse_clip=False), _q("gptq", 3, 32, act_order=False, mse_clip=True)],
    "sparse": [None]
    + [{"method": m, "sparsity": 0.5} for m in ("magnitude", "sparsegpt")]
    + [{"method": m, "nm": "2:4"} for m in ("magnitude", "sparsegpt")]
    + [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "block_size": 32}],
    # most telling rows first: a grid cut short still answers the acceptance questions
    "palettize": [None]
    + [_pal(m, b, 16, **fb) for b in (3, 4) for m, fb in (("skm", {}), ("kmeans", {}), ("skm", {"error_feedback": False}))]
    + [_pal(m, 2, 16) for m in ("skm", "kmeans")]
    + [_pal(m, b, None, **fb) for b in (4, 3) for m, fb in (("kmeans", {}), ("skm", {"error_feedback": False}), ("skm", {}))]
    + [_q("gptq", 3), _b128("gptq", 3)],
    "quick": [None, _q("rtn", 4, 32), _q("gptq", 4, 32)],
}
GRIDS["peers"] = _peer_pairs()  # issue "side by side with coremltools": every coremltools.optimize.torch peer


def _smollm2_rows():
    """A real pretrained model (issue 15): each coremltools peer right after our row at its setting,
    then our data-free bar at the same setting; the acceptance pairs first, so a grid cut short
    still answers them. SmolLM2's weights already lie on a 4-bit grid per 32 inputs: no 4-bit
    block-32 rows (see ../shared/models/smollm2-135m/make.py)."""
    def pair(peer, bar):
        return [dict(PEERS[peer]["ours"]), _peer(peer), bar]

    return ([None]
            + pair("ct-gptq-3bit-block32", _q("rtn", 3, 32, sym=True))
            + pair("ct-gptq-4bit-per-channel", _q("rtn", 4, sym=True))
            + pair("ct-sparsegpt-50", {"method": "magnitude", "sparsity": 0.5})
            + pair("ct-skm-3bit-g16", _pal("kmeans", 3, 16)) + [_peer("ct-ptp-3bit-g16")]
            + [_q("gptq", 2, 32, sym=True), _q("rtn", 2, 32, sym=True)]  # coremltools' GPTQ has no uint2
            + pair("ct-sparsegpt-2:4", {"method": "magnitude", "nm": "2:4"}))


GRIDS["smollm2"] = _smollm2_rows()
# the same rows in two halves (each with the float16 baseline), to run side by side on two cores
GRIDS["smollm2-gptq"] = [None, *GRIDS["smollm2"][1:7], *GRIDS["smollm2"][14:16]]
GRIDS["smollm2-sparse-palettize"] = [None, *GRIDS["smollm2"][7:14], *GRIDS["smollm2"][16:]]


def _gemma3_rows():
    """Gemma 3 270M (issue 24): float16, then every quantization row with the coremltools peers at its
    setting right after it, the most telling pairs first (a grid cut short, or resumed across
    sittings with `bench --resume`, still answers them). Its weights mostly lie on 5-bit grids
    (../shared/models/gemma3-270m/make.py): 4 bits and below only."""
    def pair(peer, *more):
        return [dict(PEERS[peer]["ours"]), _peer(peer), *(_peer(m) for m in more)]

    return ([None]
            + pair("ct-gptq-3bit-block32") + pair("ct-gptq-4bit-block32") + pair("ct-sparsegpt-50")
            + pair("ct-skm-3bit-g16", "ct-ptp-3bit-g16") + pair("ct-skm-4bit-g16", "ct-ptp-4bit-g16"))


GRIDS["gemma3"] = _gemma3_rows()


def settings_label(cfg: dict | None) -> str:
    if cfg is None:
        return "float16"
    if cfg.get("peer"):
        return "coremltools peer"
    if "label" in cfg:
        return cfg["label"]
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "method")
