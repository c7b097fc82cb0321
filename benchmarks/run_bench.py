"""Run a benchmark grid on the reference model and update benchmarks/RESULTS.md.

    python benchmarks/run_bench.py --grid spine      # fp16, RTN and GPTQ at 4/3 bits, per-channel / 32 / 128
    python benchmarks/run_bench.py --grid sparse     # magnitude vs SparseGPT, 50 % and 2:4, joint 4-bit
    python benchmarks/run_bench.py --grid palettize  # k-means vs SKM (with/without error feedback)
    python benchmarks/run_bench.py ~/.cache/smollm2-135m --grid smollm2   # another model: its path first

This is `layerwise bench` with the reference protocol filled in (see --help there).
"""

import sys
from pathlib import Path

from layerwise.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULTS = [
    str(SHARED / "models" / "wt2-llama-4l"),
    "--calib", str(SHARED / "data" / "wikitext-2" / "valid.txt"),
    "--eval", str(SHARED / "data" / "wikitext-2" / "test.txt"),
    "--nsamples", "128", "--seqlen", "256", "--seed", "0",
    "--results", str(REPO / "benchmarks" / "RESULTS.md"),
]

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):  # a model path instead of the reference model
        DEFAULTS[0] = str(Path(args.pop(0)).expanduser())
    sys.exit(main(["bench", *DEFAULTS, *args]))
