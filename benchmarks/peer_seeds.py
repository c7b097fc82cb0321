"""One matched pair (ours vs a coremltools peer) over several calibration seeds, for the settings
where a single seed leaves the two within noise of each other.

    python benchmarks/peer_seeds.py [--pair ct-sparsegpt-50] [--seeds 0 1 2]

Each run is a `layerwise bench` row (own process, same windows for both sides of a seed, same
evaluation); writes the `peer-seeds` section of RESULTS.md.
"""

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = str(SHARED / "models" / "wt2-llama-4l")
CALIB = str(SHARED / "data" / "wikitext-2" / "valid.txt")
EVAL = str(SHARED / "data" / "wikitext-2" / "test.txt")


def main() -> int:
    from layerwise.bench.grids import settings_label
    from layerwise.bench.peers import PEERS
    from layerwise.bench.results import update_results
    from layerwise.bench.rows import run_row

    p = argparse.ArgumentParser()
    p.add_argument("--pair", default="ct-sparsegpt-50", choices=sorted(PEERS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    ours_cfg = dict(PEERS[args.pair]["ours"])
    lines = [
        f"## {args.pair} vs ours ({ours_cfg['method']} {settings_label(ours_cfg)}) over calibration seeds",
        "",
        f"Reproduce: `python benchmarks/peer_seeds.py --pair {args.pair} --seeds {' '.join(map(str, args.seeds))}`",
        "",
        "Each seed draws a different set of 128 × 256-token windows of WikiText-2 valid, the same for both "
        "sides; perplexity on WikiText-2 test. One run per cell.",
        "",
        "| seed | ours ppl | peer ppl | ours − peer | ours s | peer s |",
        "|---|---|---|---|---|---|",
    ]
    diffs = []
    for seed in args.seeds:
        ours = run_row(ours_cfg, MODEL, CALIB, EVAL, 128, 256, seed, "cpu")
        peer = run_row({"method": args.pair, "peer": True}, MODEL, CALIB, EVAL, 128, 256, seed, "cpu")
        if ours.get("error") or peer.get("error"):
            lines.append(f"| {seed} | {ours.get('error', '')} | {peer.get('error', '')} | | | |")
            continue
        diffs.append(ours["ppl"] - peer["ppl"])
        lines.append(f"| {seed} | {ours['ppl']:.3f} | {peer['ppl']:.3f} | {diffs[-1]:+.3f} | "
                     f"{ours['compress_s']:.1f} | {peer['compress_s']:.1f} |")
        print(lines[-1], flush=True)
    if diffs:
        lines += ["", f"Mean ours − peer over {len(diffs)} seeds: {statistics.mean(diffs):+.4f} "
                      f"(ours lower in {sum(d < 0 for d in diffs)} of {len(diffs)})."]
    update_results(REPO / "benchmarks" / "RESULTS.md", "peer-seeds", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
