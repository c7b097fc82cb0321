"""Export table for RESULTS.md: conversion seconds, mlpackage MB vs the float16 mlpackage, ops present.

    python benchmarks/export_bench.py

Compresses ../shared/models/wt2-llama-4l (128 × 256 windows of WikiText-2 valid, seed 0) with each
recipe, exports each checkpoint (and the float16 model) with `layerwise export --context 512`, and
checks the decoded constexpr weights against the checkpoint bit for bit.
"""

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = str(SHARED / "models" / "wt2-llama-4l")
CALIB = str(SHARED / "data" / "wikitext-2" / "valid.txt")
RECIPES = {
    "gptq 4-bit block 32": ["--method", "gptq", "--bits", "4", "--block-size", "32"],
    "skm 4-bit group 16": ["--method", "skm", "--bits", "4", "--group-size", "16"],
    "sparsegpt 50 %": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "sparsegpt 50 % + 4-bit block 32": ["--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4", "--block-size", "32"],
}


def main() -> int:
    sys.path.insert(0, str(REPO / "tests" / "coreml"))
    from test_export import assert_bit_exact, load_program  # the same decoder the tests use

    from layerwise.bench.results import display_path, update_results
    from layerwise.checkpoint import load_compressed
    from layerwise.cli import main as cli
    from layerwise.export import export_model
    from layerwise.inspect import totals
    from layerwise.pipeline import versions

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        report = export_model(MODEL, Path(tmp) / "fp16.mlpackage")
        fp16_mb = report["size_bytes"] / 1e6
        rows.append(("float16", report["seconds"], fp16_mb, None, report, "–"))
        for name, flags in RECIPES.items():
            ck = Path(tmp) / name.replace(" ", "_").replace("%", "pct").replace("+", "")
            assert cli(["-q", "compress", MODEL, "--out", str(ck), "--calib", CALIB, "--nsamples", "128",
                        "--seqlen", "256", "--seed", "0", "--device", "cpu", *flags]) == 0
            pkg = ck.with_suffix(".mlpackage")
            report = export_model(str(ck), pkg)
            _, prog = load_program(pkg)
            kinds = assert_bit_exact(prog, load_compressed(ck).compressed)
            payload = totals(ck)["safetensors_bytes"] / 1e6
            rows.append((name, report["seconds"], report["size_bytes"] / 1e6, payload, report,
                         f"{len(kinds)} layers bit-exact"))
    v = versions()
    lines = [
        "## Core ML export",
        "",
        "Reproduce: `python benchmarks/export_bench.py`",
        "",
        f"`layerwise export CHECKPOINT --out Model.mlpackage --context 512` of checkpoints of `{display_path(MODEL)}` "
        "(128 × 256-token windows of WikiText-2 valid, seed 0). Conversion seconds are one run each "
        "(trace + convert + constexpr hand-over + save). Checkpoint MB is all its safetensors files; the "
        "package additionally holds the float16 rotary tables (2 × 512 × 64 entries). "
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, coremltools {v['coremltools']}.",
        "",
        "| checkpoint | convert s | mlpackage MB | vs float16 mlpackage | checkpoint MB | package / checkpoint | weights decoded | compressed ops | state + attention ops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, secs, mb, payload, report, exact in rows:
        ops = [o for o in ("read_state", "coreml_update_state", "slice_update", "scaled_dot_product_attention") if o in report["ops"]]
        comp = ", ".join(f"{k} ×{n}" for k, n in report["compressed"].items()) or "none (float16 consts)"
        ratio = f"{mb / payload:.3f}" if payload else "–"
        checkpoint = f"{payload:.2f}" if payload else "–"
        lines.append(f"| {name} | {secs:.1f} | {mb:.2f} | {mb / fp16_mb:.3f} | {checkpoint} | {ratio} | {exact} | {comp} | {', '.join(ops)} |")
    text = "\n".join(lines)
    update_results(REPO / "benchmarks" / "RESULTS.md", "export", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
