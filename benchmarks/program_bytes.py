"""What an exported package holds besides the weight file (model.mil, Manifest.json), per family:
a fixed part and a part per decoder block, measured on tiny models of 2 and 4 blocks whose layers
mix forms (4-bit blocks of 32, 3-bit per-channel LUT, 8-bit per-channel, 2-bit blocks of 32).

    python benchmarks/program_bytes.py [--kinds llama,qwen3,...]

`layerwise.coreml.layout.PROGRAM_BYTES` prices `--target-mb` with these figures (rounded up);
the tiny configs are the test suite's (`tests/conftest.py`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

MIXED_RULES = [  # every form the export writes, so the program has each kind of constexpr op
    {"match": r"q_proj|qkv_proj|gate_proj|gate_up_proj", "config": {"method": "rtn", "bits": 4, "block_size": 32}},
    {"match": r"k_proj|up_proj", "config": {"method": "rtn", "bits": 3}},
    {"match": r"v_proj|o_proj", "config": {"method": "rtn", "bits": 8}},
    {"match": r".*", "config": {"method": "rtn", "bits": 2, "block_size": 32}},
]


def program_bytes(kind: str, blocks: int, work: Path) -> int:
    from conftest import FAMILY_OVERRIDES, save_tiny_model
    from layerwise.calib_data import BUNDLED_CALIBRATION
    from layerwise.cli import main
    from layerwise.coreml import package_bytes
    from layerwise.job import CompressJob
    from layerwise.pipeline import compress_to_checkpoint
    from layerwise.recipe import recipe_from_dict

    overrides = {"num_hidden_layers": blocks}
    types = FAMILY_OVERRIDES.get(kind, {}).get("layer_types")
    if types:  # the two-layer pattern repeated
        overrides["layer_types"] = (types * blocks)[:blocks]
    src = save_tiny_model(work / f"{kind}-{blocks}", kind, **overrides)
    ckpt, pkg = work / f"{kind}-{blocks}-ckpt", work / f"{kind}-{blocks}.mlpackage"
    compress_to_checkpoint(CompressJob(str(src), ckpt, recipe_from_dict({"rules": MIXED_RULES}), BUNDLED_CALIBRATION,
                                       8, 32, device="cpu"))
    assert main(["-q", "export", str(ckpt), "--out", str(pkg), "--context", "512", "--allow-long-context"]) == 0
    return package_bytes(pkg) - package_bytes(pkg / "Data" / "com.apple.CoreML" / "weights")


def main() -> None:
    from conftest import FAMILY_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(FAMILY_KINDS))
    args = p.parse_args()
    print("| family (model_type) | 2 blocks | 4 blocks | per block | fixed |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            two, four = (program_bytes(kind, n, Path(tmp)) for n in (2, 4))
            per_block = (four - two) / 2
            print(f"| {kind} | {two} | {four} | {per_block:.0f} | {two - 2 * per_block:.0f} |", flush=True)


if __name__ == "__main__":
    main()
