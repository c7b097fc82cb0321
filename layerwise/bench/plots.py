"""The perplexity-vs-bits plot of a grid. matplotlib (the `bench` extra) is imported only here, and
only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path

from layerwise.errors import LayerwiseError


def require_matplotlib():
    """The matplotlib module, on its file-only backend; a LayerwiseError naming the fix without it."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise LayerwiseError("the benchmark plots need matplotlib: pip install 'layerwise[bench]'") from None
    matplotlib.use("Agg")
    return matplotlib


def plot_ppl_vs_bits(rows: list[dict], path: Path, title: str = "") -> None:
    """Perplexity vs bits per weight for every row; the Pareto front drawn as a line."""
    matplotlib = require_matplotlib()
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
