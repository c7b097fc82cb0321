"""Data-parallel calibration: wall time of `compress` on N ranks × 1 thread vs 1 rank × 1 thread.

Both runs go back to back in this one script (same machine load), each in its own process tree:
`python -m layerwise compress …` for one rank and `python -m torch.distributed.run --standalone
--nproc-per-node N -m layerwise compress …` (gloo) for N, with OMP_NUM_THREADS=1 in both. The two
checkpoints must hold the same bytes (the script says so, and fails if not).

    python benchmarks/dist_bench.py                                  # SmolLM2-135M, gptq 4-bit, 2 ranks
    python benchmarks/dist_bench.py --nsamples 16 --seqlen 64        # a quick check that it works

Speedups mean something only on an otherwise idle machine (compare `uptime`'s load with the cores).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Data-parallel calibration (torch.distributed, gloo)"


def compress(ranks: int, model: str, out: Path, extra: list[str]) -> float:
    """Seconds of one whole `compress` process tree (load, calibrate, solve, write)."""
    launcher = [sys.executable, "-m", "layerwise"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "layerwise"]
    cmd = [*launcher, "-q", "compress", model, "--out", str(out), "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def render(args, rows: list[tuple[int, float]], same: bool, command: str) -> str:
    base = rows[0][1]
    lines = [SECTION, "", f"`{command}`", "",
             f"Model `{args.model}`, `{' '.join(args.recipe)}`, {args.nsamples} × {args.seqlen}-token windows, "
             f"batch {args.batch_size}; load average at start {args.load:.1f} on {os.cpu_count()} cores.", "",
             "| ranks × threads | wall s | speedup |", "|---|---|---|"]
    lines += [f"| {n} × 1 | {s:.1f} | {base / s:.2f}× |" for n, s in rows]
    lines += ["", f"Checkpoints byte-identical across rank counts: {'yes' if same else 'NO'}."]
    return "\n".join(lines)


def update_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\n<!-- |\Z)", re.S)  # up to the next section or grid marker
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="~/.cache/smollm2-135m")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--recipe", nargs="+", default=["--method", "gptq", "--bits", "4", "--block-size", "32"])
    p.add_argument("--results", help="Markdown file whose section this run replaces (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args()
    args.load = os.getloadavg()[0]
    model = str(Path(args.model).expanduser())
    extra = [*args.recipe, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        rows, digests = [], []
        for n in (1, args.ranks):
            out = Path(tmp) / f"ranks-{n}"
            rows.append((n, compress(n, model, out, extra)))
            digests.append(digest(out))
            shutil.rmtree(out)
            print(f"{n} rank(s) × 1 thread: {rows[-1][1]:.1f} s", flush=True)
    command = "python benchmarks/dist_bench.py " + " ".join(sys.argv[1:])
    section = render(args, rows, len(set(digests)) == 1, command.strip())
    print(section)
    if args.results:
        update_results(Path(args.results), section)
    return 0 if len(set(digests)) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
