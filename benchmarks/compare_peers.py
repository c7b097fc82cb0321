"""Side by side with coremltools: each peer row next to our row at the matching setting.

    python benchmarks/run_bench.py --grid peers     # writes bench-peers.json: pairs run back to back
    python benchmarks/compare_peers.py [benchmarks/bench-peers.json]

Both rows of a pair come from the same `--grid peers` run, one right after the other (each in its own
process), so the time ratio compares two runs under the same machine load. Writes the `peers`
section of RESULTS.md, `peers-vs-ours.png` (every row, perplexity vs bits per weight) and
`layer-errors.png` (per-layer relative error by block, our GPTQ 4-bit block 32).
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    from layerwise.bench.grids import settings_label
    from layerwise.bench.plots import plot_ppl_vs_bits
    from layerwise.bench.peers import PEERS
    from layerwise.bench.results import update_results

    rows_file = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "bench-peers.json"
    rows = json.loads(rows_file.read_text())
    peers = {r["method"]: r for r in rows if r.get("peer")}
    ours = {(r["method"], r["settings"]): r for r in rows if not r.get("peer")}
    lines = [
        "## Side by side with coremltools.optimize.torch",
        "",
        f"Rows from `{rows_file.name}`, written by `python benchmarks/run_bench.py --grid peers` (full table "
        "in the `peers` grid section); this comparison: `python benchmarks/compare_peers.py`. Same model, same "
        "128 × 256 calibration windows (same token ids, same order), same evaluation. Each pair ran back to "
        "back, each side in its own process, one run each (single-run numbers, not medians); `ours / peer` "
        "is the ratio of the two compression times (model load and evaluation excluded on both sides), "
        "`× fwd` each side's time over one float forward of the calibration windows in its own process. "
        "Our GPTQ rows use our defaults (act-order with static groups, MSE clipping) on the peer's grid "
        "(symmetric 4-bit, float16 scales); coremltools' GPTQ runs with its defaults.",
        "",
        "| setting | ours | ours ppl | peer | peer ppl | ours bits/w | peer bits/w | ours s | peer s | time ours / peer | ours × fwd | peer × fwd | ours ≤ peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for peer_name, peer in PEERS.items():
        cfg = dict(peer["ours"])
        method, settings = cfg["method"], settings_label(cfg)
        p, o = peers.get(peer_name), ours.get((method, settings))
        if p is None or o is None or o.get("ppl") is None:
            ours_text = "–" if o is None else o.get("error", "–")
            peer_text = "missing" if p is None else p.get("error") or f"{p['ppl']:.3f}"
            lines.append(f"| {settings} | {method} | {ours_text} | {peer_name} | {peer_text} | | | | | | | | not measured |")
            continue
        if p.get("error"):
            lines.append(f"| {settings} | {method} | {o['ppl']:.3f} | {peer_name} | failed: {p['error']} | | | | | | | | – |")
            continue
        verdict = "yes" if o["ppl"] <= p["ppl"] else "**no**"
        lines.append(
            f"| {settings} | {method} | {o['ppl']:.3f} | {peer_name} | {p['ppl']:.3f} | {o['bits_per_weight']:.3f} | "
            f"{p['bits_per_weight']:.3f} | {o['compress_s']:.1f} | {p['compress_s']:.1f} | "
            f"{o['compress_s'] / p['compress_s']:.2f} | {o['time_vs_forward']:.1f} | {p['time_vs_forward']:.1f} | {verdict} |")
    lines += ["", "![all rows and peers](peers-vs-ours.png)", "", "![per-layer error, GPTQ 4-bit block 32 symmetric](layer-errors.png)"]
    plot_ppl_vs_bits(rows, HERE / "peers-vs-ours.png",
                     title="wt2-llama-4l: layerwise rows and coremltools peers")
    plot_layer_errors(ours.get(("gptq", "bits=4 block_size=32 sym=True")), HERE / "layer-errors.png")
    text = "\n".join(lines)
    update_results(HERE / "RESULTS.md", "peers-side-by-side", text)
    print(text)
    return 0


def plot_layer_errors(row, path: Path) -> None:
    if not row or not row.get("layer_errors"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind: dict[str, list[tuple[int, float]]] = {}
    for name, err in row["layer_errors"].items():
        parts = name.split(".")
        by_kind.setdefault(parts[-1], []).append((int(parts[2]), err))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for kind, pts in sorted(by_kind.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [e for _, e in pts], marker="o", label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("relative error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)")
    ax.set_yscale("log")
    ax.set_title("GPTQ 4-bit block 32: per-layer error by block")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
