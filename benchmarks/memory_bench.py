"""Peak memory of `compress` on a model larger than the working set: lazy vs eager loading vs
coremltools' LayerwiseCompressor, and of `export`.

Builds (once) a random-weight Llama of ≥ 3 GB in float16 — hidden 3072, 14 blocks, vocabulary 32k,
saved in 1 GB shards — under ~/.cache (never in the repository), then runs each measurement in its
own process under `/usr/bin/time -f %M` (peak resident set, the child alone). Every row of a window
setting runs back to back in this one script, so the ratios compare runs under the same machine load.

    python benchmarks/memory_bench.py                                   # everything, to the end
    python benchmarks/memory_bench.py --stop-after-blocks 2 --extra=--no-mse-clip --runs lazy,eager,coremltools
    python benchmarks/memory_bench.py --export CKPT[,CKPT…] [--export-baseline DIR]   # export only

`--export` measures `layerwise export` of existing checkpoints (section `memory-export`), each next to
a bare `import` of what export imports, and, with `--export-baseline DIR` (a checkout of an older
commit), the same export by that code back to back.

`--stop-after-blocks K` sends SIGTERM to `compress` once K block shards are complete (the interrupted
run is resumable, and the peak of the steady per-block working set is reached by then); the shards
written by the lazy and the eager run are then compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "~/.cache/layerwise-bench/llama-3g"
CONFIG = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=14, num_attention_heads=24,
              num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)
GPTQ = ["--method", "gptq", "--bits", "4", "--block-size", "32"]


def build_model(directory: Path) -> None:
    """Random float16 Llama saved in 1 GB safetensors shards, with the demo tokenizer (ids < 4096)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerwise.models import DEMO_MODEL_DIR

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(DEMO_MODEL_DIR) / name, tmp / name)
    tmp.rename(directory)


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def measured(cmd: list[str], stop_dir: Path | None = None, stop_after: int = 0, timeout: float | None = None,
             cwd: Path = REPO) -> dict:
    """Run `cmd` under /usr/bin/time; SIGTERM it once `stop_after` shards exist in `stop_dir`, or after `timeout`."""
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"memory-bench-{os.getpid()}.time"
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-o", str(report), "-f", "%M", *cmd], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stopped = None
    while proc.poll() is None:
        time.sleep(1)
        shards = len(list(stop_dir.glob("block-*.safetensors"))) if stop_dir is not None and stop_dir.is_dir() else 0
        if (stop_after and shards >= stop_after) or (timeout and time.perf_counter() - start > timeout):
            stopped = f"{shards} block shards" if stop_after else f"{timeout:.0f} s"
            for pid in _children(proc.pid):  # the measured command itself, below /usr/bin/time
                # SIGTERM, not SIGINT: a job started in the background (nohup … &) ignores SIGINT; the
                # CLI stops on SIGTERM the same resumable way
                os.kill(pid, signal.SIGTERM)
            proc.wait()
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    lines = [line for line in report.read_text().splitlines() if line.strip()]
    peak_kb = int(lines[-1]) if lines and lines[-1].strip().isdigit() else None
    ok = proc.returncode == 0 or stopped is not None
    if not ok:
        print(err[-2000:], file=sys.stderr)
    return {"peak_mb": peak_kb / 1024 if peak_kb else None, "seconds": seconds, "stopped": stopped,
            "rc": proc.returncode, "ok": ok}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out] or [pid]


def shard_hashes(directory: Path, names: set[str] | None = None) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))
            if names is None or p.name in names}


def coremltools_child(model: str, calib: str, nsamples: int, seqlen: int) -> None:
    """coremltools' LayerwiseCompressor (GPTQ uint4 per-block 32) as layerwise.bench.peers drives it."""
    from layerwise.calib_data import calibration_windows
    from layerwise.loading import load_model, load_tokenizer
    from layerwise.bench.peers import compress_peer

    windows, _ = calibration_windows(calib, load_tokenizer(model), nsamples, seqlen, 0)
    compress_peer("ct-gptq-4bit-block32", load_model(model, dtype="float32"), windows, "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=DEFAULT_MODEL)
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--windows", default="8x256,32x512", help="NxL settings, comma separated")
    p.add_argument("--runs", default="lazy,eager,coremltools,export")
    p.add_argument("--stop-after-blocks", type=int, default=0, help="SIGTERM compress after K block shards (0: run to the end)")
    p.add_argument("--ct-timeout", type=float, default=0, help="SIGTERM coremltools after this many seconds (0: none)")
    p.add_argument("--extra", default="", help="more compress flags, e.g. --extra=--no-mse-clip")
    p.add_argument("--work", default="~/.cache/layerwise-bench/runs", help="where checkpoints are written")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    p.add_argument("--export", help="export only: checkpoint directories, comma separated (section memory-export)")
    p.add_argument("--export-baseline", help="with --export: a checkout of older code, its export run back to back")
    p.add_argument("--export-baseline-max-mb", type=float, default=500,
                   help="run the baseline only on checkpoints up to this size (the old export held a float32 copy)")
    p.add_argument("--build", help=argparse.SUPPRESS)
    p.add_argument("--coremltools-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        return build_model(Path(args.build))
    if args.coremltools_child:
        m, c, n, L = args.coremltools_child
        return coremltools_child(m, c, int(n), int(L))

    model = Path(args.model_dir).expanduser()
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.export:
        return export_only(args, work)
    if not model.is_dir():
        print(f"building {model} …", flush=True)
        subprocess.run([sys.executable, __file__, "--build", str(model)], check=True)
    size = model_bytes(model)
    runs = args.runs.split(",")
    extra = args.extra.split()
    py = [sys.executable, "-m", "layerwise.cli", "-q"]
    rows = []
    for setting in args.windows.split(","):
        n, L = (int(x) for x in setting.split("x"))
        acts = n * L * CONFIG["hidden_size"] * 4
        outs = {}
        for run in [r for r in runs if r in ("lazy", "eager")]:
            out = work / f"{run}-{setting}"
            _clean(out)
            cmd = [*py, "compress", str(model), "--out", str(out), *GPTQ, "--calib", args.calib, "--nsamples", str(n),
                   "--seqlen", str(L), "--device", "cpu", "--overwrite", *extra] + (["--eager-load"] if run == "eager" else [])
            print(f"[{setting}] {run} …", flush=True)
            res = measured(cmd, out.parent / f".{out.name}.partial", args.stop_after_blocks)
            outs[run] = out if out.is_dir() else out.parent / f".{out.name}.partial"
            rows.append({"setting": setting, "run": f"layerwise compress ({run})", "acts": acts, **res})
            print(rows[-1], flush=True)
        if "coremltools" in runs:
            print(f"[{setting}] coremltools …", flush=True)
            cmd = [sys.executable, __file__, "--coremltools-child", str(model), args.calib, str(n), str(L)]
            res = measured(cmd, timeout=args.ct_timeout or None)
            rows.append({"setting": setting, "run": "coremltools LayerwiseCompressor", "acts": acts, **res})
            print(rows[-1], flush=True)
        if "lazy" in outs and "eager" in outs:
            a = shard_hashes(outs["lazy"])
            b = shard_hashes(outs["eager"], set(a))
            same = bool(a) and a == b
            rows.append({"setting": setting, "run": f"lazy == eager: {len(a)} shards byte for byte: {same}", "acts": acts,
                         "peak_mb": None, "seconds": None, "stopped": None, "ok": same})
        if "export" in runs and "lazy" in outs and outs["lazy"].name.endswith(setting):
            pkg = work / f"export-{setting}.mlpackage"
            print(f"[{setting}] export …", flush=True)
            res = measured([*py, "export", str(outs["lazy"]), "--out", str(pkg), "--context", "512", "--overwrite"])
            ckpt = model_bytes(outs["lazy"])
            rows.append({"setting": setting, "run": f"layerwise export (checkpoint {ckpt / 1e9:.2f} GB)", "acts": acts,
                         **res, "ref": ckpt})
    section = render(rows, size, args, model)
    print(section)
    from layerwise.bench.results import update_results

    update_results(REPO / args.results, "memory-" + args.windows.replace(",", "-"), section)


EXPORT_IMPORTS = "import torch, transformers, coremltools, layerwise.cli, layerwise.coreml.convert"


def export_only(args, work: Path) -> None:
    """Peak RSS of `layerwise export` per checkpoint (and of the baseline code, and of the imports alone)."""
    from layerwise.bench.measure import machine
    from layerwise.bench.results import display_path, update_results

    codes = [("this code", REPO)]
    if args.export_baseline:
        codes.append(("baseline", Path(args.export_baseline).expanduser().resolve()))
    rows = []
    for label, src in codes:
        res = measured([sys.executable, "-c", EXPORT_IMPORTS], cwd=src)
        rows.append({"checkpoint": "(imports only)", "code": label, "size": None, **res})
        print(rows[-1], flush=True)
    for ckpt in (Path(c).expanduser() for c in args.export.split(",")):
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        for label, src in codes:
            if label == "baseline" and size > args.export_baseline_max_mb * 2**20:
                rows.append({"checkpoint": display_path(str(ckpt)), "code": label, "size": size, "peak_mb": None,
                             "seconds": 0, "ok": True, "note": f"not run: over --export-baseline-max-mb "
                             f"{args.export_baseline_max_mb:.0f}"})
                continue
            pkg = work / f"export-{ckpt.name}.mlpackage"
            cmd = [sys.executable, "-m", "layerwise.cli", "-q", "export", str(ckpt), "--out", str(pkg), "--context", "512",
                   "--overwrite"]
            print(f"[{ckpt.name}] export ({label}) …", flush=True)
            rows.append({"checkpoint": display_path(str(ckpt)), "code": label, "size": size, **measured(cmd, cwd=src)})
            print(rows[-1], flush=True)
    load = os.getloadavg()
    cmd = "python benchmarks/memory_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "## Memory: `layerwise export` of a checkpoint",
        "",
        f"Command: `{cmd.strip()}`  ",
        "Each row its own process under `/usr/bin/time -f %M` (peak resident set); `layerwise -q export CKPT --out "
        "PKG --context 512`; `(imports only)`: `python -c \"" + EXPORT_IMPORTS + "\"`.  ",
        f"Machine: {machine()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared).",
        "",
        "| checkpoint | code | checkpoint (MB) | peak RSS (MB) | × checkpoint | budget 2 × (MB) | seconds | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        peak, size = r["peak_mb"], r["size"]
        note = r.get("note") or ("" if r["ok"] else f"failed (rc {r.get('rc')})")
        ratio = f"{peak * 2**20 / size:.2f}" if peak and size else ""
        budget = f"{2 * size / 2**20:.0f}" if size else ""
        lines.append(f"| {r['checkpoint']} | {r['code']} | {f'{size / 2**20:.1f}' if size else ''} | "
                     f"{f'{peak:.0f}' if peak else ''} | {ratio} | {budget} | {r['seconds']:.0f} | {note} |")
    lines += ["", "MB = 2^20 bytes. Checkpoint size: every file in its directory."]
    section = "\n".join(lines)
    print(section)
    update_results(REPO / args.results, "memory-export", section)


def _clean(out: Path) -> None:
    import shutil

    for path in (out, out.parent / f".{out.name}.partial", out.parent / f".{out.name}.activations"):
        shutil.rmtree(path, ignore_errors=True)


def render(rows: list[dict], size: int, args, model: Path) -> str:
    from layerwise.bench.measure import machine
    from layerwise.bench.results import display_path

    load = os.getloadavg()
    cmd = "python benchmarks/memory_bench.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        f"## Memory: models larger than memory (lazy loading), {args.windows} windows",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Model: random-weight Llama, {size / 1e9:.2f} GB float16 ({CONFIG['num_hidden_layers']} blocks, hidden "
        f"{CONFIG['hidden_size']}, MLP {CONFIG['intermediate_size']}, vocabulary {CONFIG['vocab_size']}, 1 GB shards) at "
        f"`{display_path(str(model))}`; calibration `{display_path(args.calib)}`; compress `{' '.join(GPTQ + args.extra.split())}`.  ",
        f"Machine: {machine()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared).",
        "",
        "| windows | run | peak RSS (MB) | × fp16 model | budget (MB) | seconds | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        peak = r.get("peak_mb")
        ref = r.get("ref", size)
        budget = ""
        if r["run"].startswith("layerwise compress"):
            limit = 0.5 * size + (r["acts"] if r["setting"] != "8x256" else 0)
            budget = f"{limit / 2**20:.0f}"
        elif r["run"].startswith("layerwise export"):
            budget = f"{2 * ref / 2**20:.0f}"
        note = f"stopped after {r['stopped']}" if r.get("stopped") else ("" if r.get("ok") else f"failed (rc {r.get('rc')})")
        lines.append(
            f"| {r['setting']} | {r['run']} | {peak:.0f} | {peak * 2**20 / ref:.2f} | {budget} | {r['seconds']:.0f} | {note} |"
            if peak else f"| {r['setting']} | {r['run']} | | | | | {note} |"
        )
    lines += [
        "",
        "Budget: 0.5 × the float16 model for 8 × 256 windows, 0.5 × model + the activations (N × L × hidden × 4 B) "
        "otherwise; 2 × the checkpoint for export. Peak RSS is the child's own (`/usr/bin/time -f %M`).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
