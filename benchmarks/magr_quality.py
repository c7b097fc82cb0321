"""What `--magr` buys: GPTQ with and without it at each setting, back to back, on the same windows.

    python benchmarks/magr_quality.py ../shared/models/wt2-llama-4l --eval TEXT --setting "--bits 3" \
        --setting "--bits 4" --setting "--bits 3 --block-size 32"

Each compress is `layerwise compress MODEL --method gptq SETTING [--magr]` (calibration: 128 × 256
windows of ../shared/data/wikitext-2/valid.txt, seed 0), each perplexity `layerwise ppl CKPT --data
TEXT --seqlen 256`, every run a fresh process. Prints one Markdown row per run, with the perplexity
damage against the float model and MagR's damage as a fraction of plain GPTQ's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALIB = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt")


def layerwise(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "layerwise", "-q", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"layerwise {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def perplexity(model: str, text: str, seqlen: int) -> float:
    return json.loads(layerwise("ppl", model, "--data", text, "--seqlen", str(seqlen), "--json").splitlines()[-1])["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--eval", required=True, help="text file to score")
    parser.add_argument("--setting", action="append", required=True, help='GPTQ flags, e.g. "--bits 3 --block-size 32"')
    parser.add_argument("--calib", default=CALIB)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    base = perplexity(args.model, args.eval, args.seqlen)
    print(f"float model: ppl {base:.4f}")
    print("| GPTQ | MagR | ppl | Δppl | × plain GPTQ's Δppl | compress s |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="magr-quality-") as tmp:
        for setting in args.setting:
            plain = None
            for magr in (False, True):
                out = str(Path(tmp) / "ck")
                start = time.perf_counter()
                layerwise("compress", args.model, "--out", out, "--overwrite", "--method", "gptq", "--calib", args.calib,
                          *shlex.split(setting), *(["--magr"] if magr else []))
                seconds = time.perf_counter() - start
                ppl = perplexity(out, args.eval, args.seqlen)
                delta = ppl - base
                plain = delta if not magr else plain
                ratio = f"{delta / plain:.2f}" if magr and plain else "1.00"
                print(f"| {setting} | {'on' if magr else 'off'} | {ppl:.4f} | {delta:+.4f} | {ratio} | {seconds:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
