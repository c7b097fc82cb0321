"""What fingerprinting a run's inputs costs: the same `layerwise compress` with and without it, back to back.

Each run is a fresh process calling `layerwise.cli.main`; "off" replaces `pipeline.Inputs` (the
weights' background sha256, the windows' and tokenizer's hashes) with nothing, and with --shards
also the sha256 of each written shard that the run record keeps. Runs alternate on/off so that
drift on a shared machine falls on both; the median wall time of each side gives the ratio.

    python benchmarks/fingerprint_cost.py ~/.cache/gemma3-270m --method rtn --bits 4 --block-size 32
    python benchmarks/fingerprint_cost.py ~/.cache/gemma3-270m --method gptq --bits 4 --block-size 32 \\
        --nsamples 16 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
from layerwise import checkpoint, fingerprint, pipeline
mode, argv = sys.argv[1], sys.argv[2:]
made = []
if mode == "on":
    class Recorded(fingerprint.Inputs):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)
    pipeline.Inputs = Recorded
else:
    pipeline.Inputs = lambda *a, **kw: None
    if mode == "off-shards":
        checkpoint.shard_entry = lambda path: {"sha256": "", "size": 0}
from layerwise.cli import main
start, cpu = time.perf_counter(), time.process_time()
code = main(argv)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
hashed = f"{len(made[0].digests)}/{len(made[0].files)}" if made else ""
hash_cpu = made[0].cpu_seconds if made else 0.0
print(json.dumps({"code": code, "seconds": seconds, "cpu": cpu, "hashed": hashed, "hash_cpu": hash_cpu}))
"""


def run_once(mode: str, model: str, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["-q", "compress", model, "--out", str(out), "--device", "cpu", *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compress ({mode}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hash_alone(model: Path) -> float:
    """Seconds to sha256 the weight files in the foreground (page cache warm after the first run)."""
    from layerwise.fingerprint import sha256_of_file

    start = time.perf_counter()
    for f in sorted(model.glob("*.safetensors")):
        sha256_of_file(f)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", action="store_true", help="'off' also skips hashing the written shards")
    args, extra = parser.parse_known_args()
    off = "off-shards" if args.shards else "off"
    times: dict[str, list[float]] = {"on": [], off: []}
    shares: list[float] = []  # the hashing thread's CPU time / the whole run's (robust to a busy machine)
    with tempfile.TemporaryDirectory(prefix="fingerprint-cost-") as tmp:
        for i in range(args.repeats):
            for mode in (("on", off) if i % 2 == 0 else (off, "on")):
                result = run_once(mode, args.model, Path(tmp) / "ck", extra)
                times[mode].append(result["seconds"])
                if mode == "on":
                    shares.append(result["hash_cpu"] / result["cpu"])
                print(f"{mode:>10}: {result['seconds']:.2f} s wall, {result['cpu']:.1f} s CPU" + (
                    f"; weight files hashed before the run ended: {result['hashed']}, in {result['hash_cpu']:.2f} s CPU"
                    if mode == "on" else ""))
    hashing = hash_alone(Path(args.model).expanduser())
    on, without = statistics.median(times["on"]), statistics.median(times[off])
    print(f"median with fingerprint {on:.2f} s, without {without:.2f} s: ratio {on / without:.4f} "
          f"({100 * (on / without - 1):+.1f} %)")
    print(f"hashing's share of the run's CPU time: {100 * statistics.median(shares):.2f} %; hashing the weights "
          f"alone, in the foreground (what --resume waits for): {hashing:.2f} s")


if __name__ == "__main__":
    main()
