"""`layerwise bench`: a grid of recipes on one model, one calibration set, one evaluation text.

Each row runs in a fresh subprocess, so its peak RSS is its own. Within a row: load the model, cut
the calibration windows, compress (timed: no load, no evaluation), read the peak RSS, time one plain
float32 forward over the same calibration windows (the ratio's denominator, same process), then
evaluate perplexity. Rows are written as Markdown, CSV and JSON, plus a PNG of perplexity vs bits.
"""

from __future__ import annotations

import json
import logging
import os
import multiprocessing as mp
import platform
import resource
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COLUMNS = ("method", "settings", "ppl", "delta_ppl", "bits_per_weight", "checkpoint_mb", "compress_s",
           "time_vs_forward", "compress_cpu_s", "cpu_vs_forward", "peak_rss_mb", "gpu_peak_mb", "peer", "error")


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
    from .peers import PEERS

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
    from .peers import PEERS

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


def settings_label(cfg: dict | None) -> str:
    if cfg is None:
        return "float16"
    if cfg.get("peer"):
        return "coremltools peer"
    if "label" in cfg:
        return cfg["label"]
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "method")


def run_row(cfg: dict | None, model: str, calib: str, eval_text: str, nsamples: int, seqlen: int,
            seed: int, device: str, eval_tokens: int | None = None, threads: int | None = None) -> dict:
    """One grid row in a fresh process (`threads` torch threads, default torch's); returns its
    measurements (or the error)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_row_worker, (cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens, threads))


def evaluation_ids(tokenizer, eval_text: str, eval_tokens: int | None = None) -> torch.Tensor:
    """The evaluation text's token ids, the first `eval_tokens` of them when capped (a slow machine)."""
    from layerwise.calib_data import load_text, tokenize_text

    ids = tokenize_text(tokenizer, load_text(eval_text, "evaluation"))
    return ids if eval_tokens is None else ids[:eval_tokens]


def _row_worker(cfg, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens=None, threads=None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg is not None and cfg.get("peer"):  # a coremltools row: keeps its own error, like ours
        from .peers import measure_peer

        row = measure_peer(cfg["method"], model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens)
        return {**row, "threads": torch.get_num_threads()}
    row = {"method": "float16" if cfg is None else cfg["method"], "settings": settings_label(cfg), "peer": False,
           "threads": torch.get_num_threads()}
    try:
        row.update(_measure(cfg, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens))
    except Exception as e:  # a failing configuration keeps its row, with the error
        row["error"] = f"{type(e).__name__}: {e}"
        log.error("row %s failed:\n%s", row["settings"], traceback.format_exc())
    return row


def _measure(cfg, model_path, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens=None) -> dict:
    from layerwise.calib_data import calibration_windows
    from layerwise.checkpoint import load_compressed
    from layerwise.evaluate import perplexity
    from layerwise.inspect import totals
    from layerwise.loading import load_model, load_tokenizer
    from layerwise.job import CompressJob
    from layerwise.pipeline import compress_to_checkpoint
    from layerwise.recipe import Recipe, method_config, recipe_from_dict

    tokenizer = load_tokenizer(model_path)
    windows, _ = calibration_windows(calib, tokenizer, nsamples, seqlen, seed)
    out: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-"))
    try:
        if cfg is None:
            evaluated = load_model(model_path, dtype="float32")
            out["bits_per_weight"] = 16.0
            out["checkpoint_mb"] = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")) / 1e6
        else:
            model = load_model(model_path)
            if "rules" in cfg:
                recipe = recipe_from_dict({"rules": cfg["rules"]}, "bench")
            else:
                recipe = Recipe.single(method_config(dict(cfg), "bench"))
            cpu = time.process_time()
            path, result = compress_to_checkpoint(CompressJob(model_path, tmp / "ck", recipe, calib, seed=seed,
                                                              device=device), model=model, tokenizer=tokenizer,
                                                  windows=windows)
            out["compress_cpu_s"] = time.process_time() - cpu
            out["compress_s"] = result.seconds
            out["peak_rss_mb"] = _peak_rss_mb()
            out["gpu_peak_mb"] = gpu_peak_mb()
            t = totals(path)
            out["bits_per_weight"] = t["bits_per_weight"]
            out["checkpoint_mb"] = t["safetensors_bytes"] / 1e6
            out["layer_errors"] = {r.name: r.rel_error for r in result.layers}
            del model
            evaluated = load_compressed(path)
        if cfg is not None and any(rule.config.needs_hessian for rule in recipe.rules):  # calibrated: × forward
            out.update(timed_forward(load_model(model_path, dtype="float32"), windows))
            add_forward_ratios(out)
        res = perplexity(evaluated, evaluation_ids(tokenizer, eval_text, eval_tokens), seqlen=seqlen)
        out["ppl"] = res["ppl"]
        out["eval_tokens"] = res["tokens"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def time_forward(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Seconds of one plain float forward of `model` over the calibration windows."""
    model.eval()
    start = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start


def timed_forward(model, windows: torch.Tensor) -> dict:
    """One plain float forward over the windows: wall and CPU seconds (CPU: this process's time, which
    other work on a shared machine disturbs much less)."""
    cpu = time.process_time()
    wall = time_forward(model, windows)
    return {"forward_s": wall, "forward_cpu_s": time.process_time() - cpu}


def add_forward_ratios(row: dict) -> None:
    """Compression time over one forward, wall and CPU, where both are known."""
    if row.get("compress_s") and row.get("forward_s"):
        row["time_vs_forward"] = row["compress_s"] / row["forward_s"]
    if row.get("compress_cpu_s") and row.get("forward_cpu_s"):
        row["cpu_vs_forward"] = row["compress_cpu_s"] / row["forward_cpu_s"]


def gpu_peak_mb() -> float | None:
    """Peak bytes torch's CUDA allocator held in this process (MB), or None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 1e6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {platform.platform()}"


def run_grid(rows: list[dict | None], model: str, calib: str, eval_text: str, nsamples=128, seqlen=256, seed=0,
             device="cpu", progress=print, on_row=None, repeat: int = 1, eval_tokens: int | None = None,
             threads: int | None = None) -> list[dict]:
    """Run every row (`repeat` times, each in a fresh process); `on_row(results so far)` after each
    row, so a long grid leaves partial results."""
    results = []
    for i, cfg in enumerate(rows, 1):
        progress(f"[{i}/{len(rows)}] {settings_label(cfg) if cfg else 'float16'} {cfg['method'] if cfg else ''}")
        runs = [run_row(cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens, threads)
                for _ in range(repeat)]
        results.append(median_of_runs(runs))
        base = next((r["ppl"] for r in results if r["method"] == "float16" and "ppl" in r), None)
        for r in results:
            if base is not None and "ppl" in r:
                r["delta_ppl"] = r["ppl"] - base
        if on_row is not None:
            on_row(results, done=i == len(rows))
    return results


TIMED = ("compress_s", "forward_s", "time_vs_forward", "compress_cpu_s", "forward_cpu_s", "cpu_vs_forward")


def median_of_runs(runs: list[dict]) -> dict:
    """One row from repeated runs of it: the median of each time, the largest peak memory, and the
    rest (deterministic: perplexity, bits, sizes) from the first run. `runs` counts them."""
    row = dict(runs[0])
    row["runs"] = len(runs)
    if len(runs) == 1 or any(r.get("error") for r in runs):
        return row
    for key in TIMED:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = statistics.median(values)
    for key in ("peak_rss_mb", "gpu_peak_mb"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = max(values)
    return row


def markdown_table(rows: list[dict], fp16_mb: float | None = None) -> str:
    gpu = any(r.get("gpu_peak_mb") for r in rows)  # a GPU column only when a row ran on CUDA
    cpu = any(r.get("compress_cpu_s") for r in rows)  # CPU seconds where the rows measured them
    head = "| method | settings | ppl | Δppl vs fp16 | bits/weight | checkpoint MB | compress s | × forward |"
    head += " compress CPU s | CPU × forward |" if cpu else ""
    head += " peak RSS MB |" + (" GPU peak MB |" if gpu else "")
    width = 9 + 2 * cpu + gpu
    lines = [head, "|" + "---|" * width]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['settings']} | failed: {r['error']} |" + " |" * (width - 3))
            continue
        line = "| {m} | {s} | {ppl} | {d} | {b} | {mb} | {t} | {x} |".format(
            m=r["method"] + (" (peer)" if r.get("peer") else ""), s=r["settings"], ppl=_f(r.get("ppl"), 3),
            d=_f(r.get("delta_ppl"), 3, sign=True), b=_f(r.get("bits_per_weight"), 3), mb=_f(r.get("checkpoint_mb"), 2),
            t=_f(r.get("compress_s"), 1), x=_f(r.get("time_vs_forward"), 1))
        if cpu:
            line += f" {_f(r.get('compress_cpu_s'), 1)} | {_f(r.get('cpu_vs_forward'), 1)} |"
        line += f" {_f(r.get('peak_rss_mb'), 0)} |"
        lines.append(line + (f" {_f(r.get('gpu_peak_mb'), 0)} |" if gpu else ""))
    return "\n".join(lines)


def _f(v, digits, sign=False):
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def write_outputs(rows: list[dict], out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "csv": out_dir / f"{name}.csv", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    with open(paths["csv"], "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for r in rows:
            f.write(",".join(_csv(r.get(c)) for c in COLUMNS) + "\n")
    plot_ppl_vs_bits(rows, paths["png"], title=name)
    return paths


def _csv(v) -> str:
    if v is None:
        return ""
    text = f"{v:.6g}" if isinstance(v, float) else str(v)
    return '"' + text.replace('"', "'") + '"' if "," in text else text


def plot_ppl_vs_bits(rows: list[dict], path: Path, title: str = "") -> None:
    """Perplexity vs bits per weight for every row; the Pareto front drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r.get("ppl") is not None and r.get("bits_per_weight") is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    methods = sorted({r["method"] + (" (peer)" if r.get("peer") else "") for r in ok})
    for m in methods:
        pts = [r for r in ok if r["method"] + (" (peer)" if r.get("peer") else "") == m]
        ax.scatter([r["bits_per_weight"] for r in pts], [r["ppl"] for r in pts], label=m,
                   marker="x" if "(peer)" in m else "o", s=40)
    front = pareto_front(ok)
    ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("bits per weight (codes + scales + LUTs + masks)")
    ax.set_ylabel("perplexity")
    ppls = [r["ppl"] for r in ok]
    if ppls and max(ppls) / min(ppls) > 3:  # log only when collapsed rows would squash the rest
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both bits and perplexity, sorted by bits."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["ppl"])):
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def checks(grid: str, rows: list[dict]) -> list[str]:
    """The acceptance comparisons of a grid, as sentences computed from the rows."""
    by = {(r["method"], r["settings"]): r for r in rows if r.get("ppl") is not None}
    lines = []
    if grid.startswith("spine"):
        for r in rows:
            if r["method"] == "gptq" and "ppl" in r:
                # RTN at the same settings, else the grid's only RTN row (named in the sentence)
                rtn = by.get(("rtn", r["settings"]))
                others = [x for (m, _), x in by.items() if m == "rtn"]
                if rtn is None and len(others) == 1:
                    rtn = others[0]
                if rtn:
                    verdict = "beats" if r["ppl"] < rtn["ppl"] else "does NOT beat"
                    ratio = r["delta_ppl"] / rtn["delta_ppl"] if rtn.get("delta_ppl") else float("nan")
                    named = "" if rtn["settings"] == r["settings"] else f" ({rtn['settings']})"
                    lines.append(f"GPTQ {r['settings']}: {r['ppl']:.3f} {verdict} RTN{named} {rtn['ppl']:.3f} "
                                 f"(Δppl ratio GPTQ/RTN {ratio:.2f})")
    if grid.startswith("smollm2"):
        lines += peer_ratios(rows)
    if grid == "sparse":
        for pattern in ("sparsity=0.5", "nm=2:4"):
            sg, mg = by.get(("sparsegpt", pattern)), by.get(("magnitude", pattern))
            if sg and mg and mg.get("delta_ppl"):
                lines.append(f"SparseGPT {pattern}: Δppl {sg['delta_ppl']:+.3f} vs magnitude {mg['delta_ppl']:+.3f} "
                             f"(ratio {sg['delta_ppl'] / mg['delta_ppl']:.2f}; target ≤ 0.5)")
        joint, alone = by.get(("sparsegpt", "sparsity=0.5 bits=4 block_size=32")), by.get(("sparsegpt", "sparsity=0.5"))
        if joint and alone and alone.get("delta_ppl"):
            lines.append(f"joint 50 % + 4-bit block 32: Δppl {joint['delta_ppl']:+.3f} = "
                         f"{joint['delta_ppl'] / alone['delta_ppl']:.2f} × the 50 % alone (target ≤ 1.5)")
    if grid == "palettize":
        g16 = "n_bits={} granularity=per_grouped_channel group_size=16"
        for bits in (3, 4, 2):
            skm, km = by.get(("skm", g16.format(bits))), by.get(("kmeans", g16.format(bits)))
            if skm and km and km.get("delta_ppl"):
                lines.append(f"{bits}-bit group 16: SKM Δppl {skm['delta_ppl']:+.3f} vs k-means {km['delta_ppl']:+.3f} "
                             f"(ratio {skm['delta_ppl'] / km['delta_ppl']:.2f}; target ≤ 0.5 at 3-bit)")
        skm, gq = by.get(("skm", g16.format(3))), by.get(("gptq", "bits=3"))
        if skm and gq:
            lines.append(f"SKM 3-bit g16 {skm['ppl']:.3f} at {skm['bits_per_weight']:.3f} bits/w vs GPTQ 3-bit per-channel "
                         f"{gq['ppl']:.3f} at {gq['bits_per_weight']:.3f}; SKM/GPTQ compression time "
                         f"{skm['compress_s'] / gq['compress_s']:.2f} (× forward {skm['time_vs_forward']:.1f} vs {gq['time_vs_forward']:.1f})")
    return lines


def peer_ratios(rows: list[dict]) -> list[str]:
    """Each coremltools peer against our row right before it (the matching setting): time and Δppl
    ratios (issue 15's targets: time ≤ 0.6 ×, Δppl ≤ 0.8 ×)."""
    lines = []
    for ours, peer in zip(rows, rows[1:]):
        if not peer.get("peer") or ours.get("peer") or ours.get("error") or peer.get("error"):
            continue
        parts = []
        if ours.get("compress_s") and peer.get("compress_s"):
            parts.append(f"time {ours['compress_s']:.1f} s vs {peer['compress_s']:.1f} s "
                         f"({ours['compress_s'] / peer['compress_s']:.2f} ×)")
        if ours.get("compress_cpu_s") and peer.get("compress_cpu_s"):
            parts.append(f"CPU {ours['compress_cpu_s']:.1f} s vs {peer['compress_cpu_s']:.1f} s "
                         f"({ours['compress_cpu_s'] / peer['compress_cpu_s']:.2f} ×)")
        if ours.get("delta_ppl") is not None and peer.get("delta_ppl"):
            parts.append(f"Δppl {ours['delta_ppl']:+.3f} vs {peer['delta_ppl']:+.3f} "
                         f"({ours['delta_ppl'] / peer['delta_ppl']:.2f} ×)")
        if parts:
            lines.append(f"{ours['method']} {ours['settings']} vs {peer['method']}: " + "; ".join(parts))
    return lines


def update_results(md_path: Path, grid: str, section: str) -> None:
    """Replace (or append) this grid's section of RESULTS.md, between its markers."""
    start, end = f"<!-- grid:{grid} -->", f"<!-- /grid:{grid} -->"
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_path.write_text(text)


def _cpu_note(rows: list[dict]) -> str:
    if not any(r.get("compress_cpu_s") for r in rows):
        return ""
    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    return ("Compress CPU s is the row process's CPU time (`time.process_time`) over the same call, with "
            f"{' / '.join(map(str, threads))} torch thread(s); CPU × forward divides it by the forward's CPU "
            "time. On a shared machine CPU seconds of a one-thread process are the stable measure.")


def _runs_note(rows: list[dict]) -> str:
    runs = max((r.get("runs", 1) for r in rows), default=1)
    if runs == 1:
        return "One run per row: every number is from a single run."
    return f"{runs} runs per row, each in a fresh process: times are medians, peak memory the largest."


def display_path(path: str) -> str:
    """A path as RESULTS.md shows it: relative to the working directory (the repository, where the
    benchmarks run) or to the home directory, never this machine's absolute path; names pass through."""
    if not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    if not rel.startswith(os.path.join(os.pardir, os.pardir)):  # inside the repo or beside it (../shared)
        return rel
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path.startswith(home + os.sep) else os.path.basename(path)


def render_section(grid: str, rows: list[dict], command: str, model: str, calib: str, eval_text: str,
                   nsamples: int, seqlen: int, seed: int, png: Path | None) -> str:
    from .pipeline import versions

    model, calib, eval_text = display_path(model), display_path(calib), display_path(eval_text)

    v = versions()
    forward = [r["forward_s"] for r in rows if r.get("forward_s")]
    rss_note = ""
    model_mb = next((r["checkpoint_mb"] for r in rows if r["method"] == "float16" and r.get("checkpoint_mb")), None)
    if model_mb:
        rss_note = f" The model's float16 weights take {model_mb:.1f} MB."
    parts = [
        f"## Grid `{grid}`",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Model `{model}`; calibration {nsamples} × {seqlen}-token windows of `{calib}` (seed {seed}); "
        f"perplexity on `{eval_text}`, non-overlapping {seqlen}-token windows. "
        f"Versions: layerwise {v['layerwise']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"coremltools {v['coremltools']}, Python {v['python']}. Machine: {machine()}.",
        "",
        "Bits/weight counts every stored byte of the compressed layers (codes, scales, zero points, LUTs, "
        "masks); checkpoint MB is all safetensors files, including the float16 embeddings and lm_head. "
        "Compress s excludes model load and evaluation; × forward divides it by one plain float32 forward "
        "over the same calibration windows timed in the same process "
        f"(median {sorted(forward)[len(forward) // 2]:.2f} s)." if forward else "",
        _cpu_note(rows),
        f"Peak RSS is the row's own process. {_runs_note(rows)}{rss_note}",
        "",
        markdown_table(rows),
    ]
    extra = checks(grid, rows)
    if extra:
        parts += ["", *[f"- {line}" for line in extra]]
    if png is not None:
        parts += ["", f"![perplexity vs bits per weight, grid {grid}]({png.name})"]
    return "\n".join(parts)
