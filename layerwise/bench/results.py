"""Benchmark results as files: the Markdown section of a grid (table, protocol, acceptance checks),
CSV, JSON and the perplexity-vs-bits plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .measure import machine
from .plots import plot_ppl_vs_bits

COLUMNS = ("method", "settings", "ppl", "delta_ppl", "bits_per_weight", "checkpoint_mb", "compress_s",
           "time_vs_forward", "compress_cpu_s", "cpu_vs_forward", "peak_rss_mb", "gpu_peak_mb", "peer", "error")


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
    from layerwise.pipeline import versions

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
