"""What `--targets float` costs: the same `layerwise compress` with compressed and with float targets, back to back.

Each run is a fresh process calling `layerwise.cli.main`; the runs alternate (compressed, float,
float-all, then float-all, float, compressed, ...) so that drift on a shared machine falls on every
side. Reported: the median wall and CPU seconds (all threads of the process, `time.process_time`) of
each side and their ratios to compressed's. CPU is the steadier figure on a busy machine.

    python benchmarks/float_targets_cost.py ~/.cache/smollm2-135m --method gptq --bits 3 --block-size 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from layerwise.cli import main
start, cpu = time.perf_counter(), time.process_time()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""

SIDES = ("compressed", "float", "float-all")


def run_once(targets: str, model: str, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["-q", "compress", model, "--out", str(out), "--device", "cpu", "--targets", targets, *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compress --targets {targets} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side")
    args, extra = parser.parse_known_args()
    wall: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="float-targets-cost-") as tmp:
        for i in range(args.repeats):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                result = run_once(side, args.model, Path(tmp) / "ck", extra)
                wall[side].append(result["seconds"])
                cpu[side].append(result["cpu"])
                print(f"{side:>10}: {result['seconds']:.1f} s wall, {result['cpu']:.1f} s CPU", flush=True)
    medians = {side: (statistics.median(wall[side]), statistics.median(cpu[side])) for side in SIDES}
    w0, c0 = medians["compressed"]
    for side in SIDES:
        w, c = medians[side]
        print(f"median {side}: {w:.1f} s wall / {c:.1f} s CPU; / compressed: wall {w / w0:.2f} x, CPU {c / c0:.2f} x")
