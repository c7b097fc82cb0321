"""Human and JSON views of a checkpoint's per-layer report, and the checks `decompress` makes on its
files, which `layerwise inspect` runs first (`check_files`): every shard the manifest names present and no other, each one's sha256
as recorded (unless verify is False), and every compressed layer's tensors in the shard its entry
names with the dtype and shape the entry implies (from the safetensors headers: no tensor is read).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from .checkpoint import MANIFEST, checked_shards, read_manifest
from .errors import CheckpointError
from .linears import describe_left_out
from .manifest import PARTS, expected_parts


def check_files(path: str | Path, manifest: dict, verify: bool = True) -> None:
    """Raise CheckpointError naming the first shard or tensor that disagrees with the manifest."""
    path = Path(path)
    layers, seen = manifest["layers"], set()
    for shard in checked_shards(path, manifest, verify):
        try:
            with safe_open(shard, framework="pt") as f:
                headers = {key: f.get_slice(key) for key in f.keys()}
                headers = {key: (t.get_dtype(), tuple(t.get_shape())) for key, t in headers.items()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{shard} is not a readable safetensors file ({str(e).strip().splitlines()[0]}); "
                                  "the checkpoint is damaged") from None
        for key, (dtype, shape) in headers.items():
            layer, sep, part = key.rpartition(".weight.")
            if not (sep and part in PARTS):
                continue
            if layer not in layers or layers[layer]["shard"] != shard.name:
                where = f"should be in {layers[layer]['shard']}" if layer in layers else "belongs to no layer"
                raise CheckpointError(f"{shard}: tensor {key} {where} per {MANIFEST}; the checkpoint is damaged or its "
                                      "shards were renamed, compress again")
            _check_header(path, key, dtype, shape, expected_parts(layers[layer]).get(part))
            seen.add(layer)
    missing = set(layers) - seen
    if missing:
        raise CheckpointError(f"{path}: checkpoint is incomplete, no tensors for {sorted(missing)[:3]}")


def _check_header(path: Path, key: str, dtype: str, shape: tuple, expected) -> None:
    if expected is None:
        raise CheckpointError(f"{path}: tensor {key} is not a part its layer's manifest entry stores; the checkpoint is damaged")
    dtypes, want = expected
    names = {str(d).replace("torch.", "") for d in dtypes}
    stored = {"U8": "uint8", "I8": "int8", "F16": "float16"}.get(dtype, dtype)
    if stored not in names or shape != want:
        raise CheckpointError(f"{path}: tensor {key} is {stored} {list(shape)}, the manifest implies "
                              f"{sorted(names)[0]} {list(want)}; the checkpoint is damaged, compress again")


def report_json(path: str | Path) -> dict:
    manifest = read_manifest(path)
    return {"totals": totals(path, manifest), "layers": manifest["layers"],
            "left_uncompressed": manifest.get("left_uncompressed")}


def totals(path: str | Path, manifest: dict | None = None) -> dict:
    manifest = manifest or read_manifest(path)
    layers = manifest["layers"].values()
    weights = sum(m["shape"][0] * m["shape"][1] for m in layers)
    bits = sum(m["report"]["bits_per_weight"] * m["shape"][0] * m["shape"][1] for m in layers)
    disk = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {
        "layers": len(manifest["layers"]),
        "compressed_weights": weights,
        "bits_per_weight": bits / weights if weights else None,
        "payload_bytes": int(bits / 8),
        "safetensors_bytes": disk,
        "compression_seconds": manifest.get("compression_seconds"),
    }


def report_table(path: str | Path) -> str:
    manifest = read_manifest(path)
    header = ("layer", "method", "scheme", "bits", "block/group", "sparsity", "bits/w", "rel.err", "damp", "sec")
    rows = [header]
    for name, m in manifest["layers"].items():
        r = m["report"]
        grouping = m.get("block_size") or ("x".join(map(str, m["lut_group"])) if m.get("lut_group") else "-")
        rows.append((
            name, r["method"], m["scheme"], str(m["bits"]), str(grouping), f"{r['sparsity']:.3f}",
            f"{r['bits_per_weight']:.3f}", f"{r['rel_error']:.2e}" + (" (w)" if r.get("error_space") == "weight" else ""),
            "-" if r["damping"] is None else f"{r['damping']:g}", f"{r['seconds']:.2f}",
        ))
        if r.get("notes"):
            rows.append(("  note: " + "; ".join(r["notes"]),) + ("",) * (len(header) - 1))
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    if any(m["report"].get("error_space") == "weight" for m in manifest["layers"].values()):
        lines.append("rel.err (w): |ΔW|²/|W|² in weight space (data-free method, no calibration inputs); "
                     "others: output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration inputs")
    lines.append(summary(path, manifest))
    if "budget" in manifest:
        lines.append(budget_line(path, manifest["budget"]))
    return "\n".join(lines)


def budget_line(path: str | Path, budget: dict) -> str:
    """How a `--target-bits/--target-mb` checkpoint's per-layer configs were chosen."""
    target = budget["target"]
    goal = (f"{target['bits']:g} bits/weight" if target.get("bits") is not None
            else f"{target['mb']:g} MB {target.get('format', 'coreml')} export")
    return (
        f"budget {goal}: configs chosen per layer by measured sensitivity; {budget['bits_per_weight']:.4f} bits/weight, "
        f"{budget['predicted_export_mb']:.2f} MB exported (predicted), predicted Δloss {budget['predicted_dloss']:.4g}; "
        f"rerun with --recipe {path}"
    )


def summary(path: str | Path, manifest: dict | None = None) -> str:
    manifest = manifest or read_manifest(path)
    t = totals(path, manifest)
    bpw = "n/a" if t["bits_per_weight"] is None else f"{t['bits_per_weight']:.3f}"
    left = manifest.get("left_uncompressed")  # absent in checkpoints written before it was recorded
    return (
        f"{path}: {t['layers']} layers compressed, {bpw} bits/weight over {t['compressed_weights']:,} weights; "
        + (f"{describe_left_out(left)}; " if left else "")
        + f"safetensors {t['safetensors_bytes'] / 1e6:.2f} MB; compression {t['compression_seconds'] or 0:.1f} s"
    )
