"""The checkpoints whose bytes the golden test pins: every method, recipe kind and scheduling path.

`python tests/golden/make_cases.py --write` records today's hashes into golden_hashes.json; the
test recomputes them and compares (a refactor must not move one bit)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SMALL = ["--nsamples", "8", "--seqlen", "64", "--seed", "0", "--device", "cpu"]

MIXED_RECIPE = """rules:
  - match: 'mlp\\.down_proj'
    config: {method: gptq, bits: 8}
  - match: 'layers\\.0\\.self_attn\\.o_proj'
    config: null
  - match: 'self_attn'
    config: {method: sparsegpt, nm: '2:4', bits: 4, block_size: 32}
  - match: '.*'
    config: {method: skm, n_bits: 3, granularity: per_grouped_channel, group_size: 16}
"""
COREMLTOOLS_RECIPE = """global_config:
  algorithm: gptq
  weight_dtype: int4
  quantization_scheme: symmetric
  granularity: per_block
  block_size: 32
module_name_configs:
  model.layers.1.mlp.down_proj: null
"""
LM_HEAD_RECIPE = """rules:
  - match: 'lm_head'
    config: {method: gptq, bits: 8, block_size: 32}
  - match: '.*'
    config: {method: gptq, bits: 4, block_size: 32}
"""

# name -> (tiny model kind, extra CLI flags); a recipe flag names a file written beside the case
CASES: dict[str, tuple[str, list[str]]] = {
    "gptq4-b32": ("llama", ["--method", "gptq", "--bits", "4", "--block-size", "32"]),
    "gptq3-channel-sym": ("llama", ["--method", "gptq", "--bits", "3", "--sym"]),
    "gptq4-no-act-order-no-staged": ("llama", ["--method", "gptq", "--bits", "4", "--block-size", "32",
                                               "--no-act-order", "--no-staged"]),
    "gptq2-b32-qwen2": ("qwen2", ["--method", "gptq", "--bits", "2", "--block-size", "32"]),
    "gptq4-b32-mistral-bf16": ("mistral", ["--method", "gptq", "--bits", "4", "--block-size", "32"]),
    "rtn4-b32": ("llama", ["--method", "rtn", "--bits", "4", "--block-size", "32"]),
    "rtn8-sym": ("llama", ["--method", "rtn", "--bits", "8", "--sym"]),
    "sparsegpt-50": ("llama", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "sparsegpt-2of4-q4": ("llama", ["--method", "sparsegpt", "--nm", "2:4", "--bits", "4", "--block-size", "32"]),
    "magnitude-50-q8": ("llama", ["--method", "magnitude", "--sparsity", "0.5", "--bits", "8"]),
    "skm4": ("llama", ["--method", "skm", "--bits", "4"]),
    "skm3-group16": ("llama", ["--method", "skm", "--bits", "3", "--group-size", "16"]),
    "skm4-sparse50": ("llama", ["--method", "skm", "--bits", "4", "--sparsity", "0.5"]),
    "kmeans4": ("llama", ["--method", "kmeans", "--bits", "4"]),
    "recipe-mixed": ("llama", ["--recipe", "mixed.yaml"]),
    "recipe-coremltools": ("llama", ["--recipe", "coremltools.yaml"]),
    "recipe-lm-head": ("llama", ["--recipe", "lm_head.yaml"]),
    "target-bits-3.5": ("llama", ["--target-bits", "3.5"]),
}
RECIPES = {"mixed.yaml": MIXED_RECIPE, "coremltools.yaml": COREMLTOOLS_RECIPE, "lm_head.yaml": LM_HEAD_RECIPE}
VOLATILE = ("seconds", "compression_seconds", "created", "versions", "source_model", "source", "inputs")


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def checkpoint_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every safetensors file, and of the manifest without timings, versions and paths."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}
    manifest = _stable(json.loads((directory / "layerwise.json").read_text()))
    manifest.pop("shards", None)  # names and hashes of the files above: already compared
    out["layerwise.json (stable fields)"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return out


def machine() -> dict:
    """What the bytes depend on besides the code: GEMM kernels and their summation order."""
    import torch

    from layerwise.matmul_precision import fast_matmul_is_accurate

    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bfloat16_units": fast_matmul_is_accurate(torch.device("cpu")), "threads": torch.get_num_threads()}


def make_case(name: str, tiny_dirs: dict, calib: Path, root: Path) -> Path:
    from layerwise.cli import main

    kind, flags = CASES[name]
    flags = [str(root / f) if f in RECIPES else f for f in flags]
    for file, text in RECIPES.items():
        (root / file).write_text(text)
    out = root / name
    rc = main(["-q", "compress", str(tiny_dirs[kind]), "--out", str(out), "--calib", str(calib), *SMALL, *flags])
    assert rc == 0, f"{name}: compress exited {rc}"
    return out


def make_demo(root: Path) -> Path:
    """The README demo's command on the bundled model, with fewer windows (the test's budget)."""
    from layerwise.calib_data import BUNDLED_CALIBRATION
    from layerwise.cli import main
    from layerwise.models import DEMO_MODEL_DIR

    out = root / "demo-gptq4-b32"
    rc = main(["-q", "compress", DEMO_MODEL_DIR, "--out", str(out), "--calib", BUNDLED_CALIBRATION, "--method", "gptq",
               "--bits", "4", "--block-size", "32", "--nsamples", "16", "--seqlen", "256", "--device", "cpu"])
    assert rc == 0
    return out


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    import torch

    from conftest import save_tiny_model
    from layerwise.calib_data import BUNDLED_CALIBRATION

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = {"llama": save_tiny_model(root / "llama", "llama"), "qwen2": save_tiny_model(root / "qwen2", "qwen2"),
                "mistral": save_tiny_model(root / "mistral", "mistral", dtype=torch.bfloat16)}
        calib = root / "calib.txt"
        calib.write_text(Path(BUNDLED_CALIBRATION).read_text()[:20000])
        hashes = {name: checkpoint_hashes(make_case(name, tiny, calib, root)) for name in CASES}
        hashes["demo"] = checkpoint_hashes(make_demo(root))
        hashes["_machine"] = machine()
    (HERE / "golden_hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(hashes)} cases")
