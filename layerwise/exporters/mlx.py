"""MLX: a directory `mlx_lm.load` reads as it is (model.safetensors, config.json, tokenizer files).

An affine layer becomes an MLX quantized linear holding our codes: `weight` uint32 [out, in·bits/32]
(the codes as one little-endian bit stream per row, MLX's packing for every width), `scales` and
`biases` float16 [out, in / group], decoded by MLX as w = scale·q + bias with bias = −scale·z.
A block of B columns is B / group MLX groups sharing one scale (group the largest of 128, 64, 32
dividing B; per-channel grids too), and 7-bit codes ride in 8-bit words unchanged.
What MLX has no type for (LUT and dense layers, blocks not a multiple of 32) is written float16,
which holds our weights exactly. See `grid.scale_significand` for when the affine part is exact.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..formats import CompressedWeight, pack_bits
from ..outputs import publish, scratch_directory
from .protocol import ExportOptions
from .headers import provenance_bytes, safetensors_entry_bytes
from .tally import Tally, affine_codes, check_family, largest_difference

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (128, 64, 32)  # largest first: fewest scales
# model_types whose mlx-lm model reads Hugging Face tensor names as they are
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def mlx_layout(cw: CompressedWeight) -> tuple[int, int] | None:
    """(bits, group_size) of the MLX quantized linear that holds `cw`'s codes, or None (float16)."""
    if cw.scheme != "affine":
        return None
    bits = 8 if cw.bits == 7 else cw.bits
    group = next((g for g in MLX_GROUPS if cw.block_size % g == 0), None)
    if bits not in MLX_BITS or group is None:
        return None
    return bits, group


def mlx_tensors(cw: CompressedWeight, bits: int, group: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(weight uint32 [out, in·bits/32], scales, biases float16 [out, in / group]) of an affine layer."""
    out_f, in_f = cw.shape
    packed = pack_bits(affine_codes(cw).reshape(-1), bits).numpy()
    weight = packed.view("<u4").reshape(out_f, in_f * bits // 32)
    repeat = cw.block_size // group
    scales = cw.scale.repeat_interleave(repeat, dim=1)
    biases = (-(cw.scale.float() * cw.zero_point.float())).to(torch.float16).repeat_interleave(repeat, dim=1)
    return weight, scales, biases


def mlx_decoded(cw: CompressedWeight):
    """rows → what MLX's `dequantize` computes (float16 product, float16 sum) as float32."""
    bias = (-(cw.scale.float() * cw.zero_point.float())).to(torch.float16)
    codes = affine_codes(cw)

    def rows_of(rows: slice) -> torch.Tensor:
        s = cw.scale[rows].repeat_interleave(cw.block_size, dim=1)
        b = bias[rows].repeat_interleave(cw.block_size, dim=1)
        return (s * codes[rows].to(torch.float16) + b).float()

    return rows_of


class MLX:
    name = "mlx"
    suffix = ""  # a directory, named as the user likes

    def check(self, out: Path, options: ExportOptions) -> None:
        if Path(out).suffix in (".mlpackage", ".gguf"):
            raise ModelError(f"--out {out}: --format mlx writes a directory; give a name without {Path(out).suffix}")

    def tokenizer_dir(self, out: Path) -> None:
        return None  # the tokenizer files go inside the directory

    def export(self, loaded, out: Path, options: ExportOptions) -> dict:
        start = time.time()
        check_family(loaded.model, FAMILIES, self.name)
        out = Path(out)
        with scratch_directory(out) as scratch:
            folder = scratch / out.name
            folder.mkdir()
            tensors, quantization, tally = _weights(loaded)
            _save_safetensors(tensors, folder / "model.safetensors", options.metadata)
            _write_config(loaded.model.config, quantization, folder / "config.json")
            _copy_tokenizer(options.source, folder)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            publish(folder, out, "mlx")
        summary = tally.summary(self.name, "mlx")
        return {"path": str(out), "seconds": time.time() - start, "size_bytes": size, "summary": summary,
                "layers": tally.as_dict()}

    def layer_bytes(self, cw: CompressedWeight) -> int:
        layout = mlx_layout(cw)
        if layout is None:
            return 2 * cw.numel
        bits, group = layout
        return cw.numel * bits // 8 + 2 * 2 * cw.numel // group

    def fixed_bytes(self, model, budgeted: list[str]) -> int:
        """model.safetensors without the budgeted layers' data (the tokenizer files beside it are not counted)."""
        skip = {f"{n}.weight" for n in budgeted}
        # named_parameters lists a tied tensor once; every float tensor is written float16
        params = [(n, p) for n, p in model.named_parameters() if n not in skip]
        header = sum(safetensors_entry_bytes(n, p.dim()) for n, p in params)
        header += sum(safetensors_entry_bytes(f"{n}.weight", 2) * 3 for n in budgeted)  # weight, scales, biases
        return sum(2 * p.numel() for _, p in params) + header + provenance_bytes(budgeted)


def _weights(loaded) -> tuple[dict[str, np.ndarray], dict, Tally]:
    """Every tensor of the MLX model by name, the config's "quantization" entry, and the tally."""
    tensors: dict[str, np.ndarray] = {}
    layouts: dict[str, tuple[int, int] | None] = {}
    tally = Tally()
    for name, cw in loaded.compressed.items():
        layout = layouts[name] = mlx_layout(cw)
        if layout is None:
            tensors[f"{name}.weight"] = cw.dequantize().numpy()
            tally.convert(_kind(cw), "float16", name, 0.0)
            continue
        bits, group = layout
        weight, scales, biases = mlx_tensors(cw, bits, group)
        tensors.update({f"{name}.weight": weight, f"{name}.scales": scales.numpy(), f"{name}.biases": biases.numpy()})
        tally.carried(f"{bits}-bit groups of {group}", name, largest_difference(cw, mlx_decoded(cw)))
        if loaded.spill is not None:
            loaded.spill.release_all()  # this layer's codes go back to the file
    compressed = {f"{name}.weight" for name in loaded.compressed}
    for name, tensor in loaded.model.state_dict().items():
        if name in compressed or name in tensors or _tied_head(loaded.model, name):
            continue
        tensors[name] = tensor.to(torch.float16).numpy() if tensor.is_floating_point() else tensor.numpy()
    return tensors, _quantization(layouts), tally


def _kind(cw: CompressedWeight) -> str:
    if cw.scheme == "affine":
        return f"{cw.bits}-bit blocks of {cw.block_size}"
    return f"{cw.scheme}{' sparse' if cw.mask is not None else ''}"


def _tied_head(model, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _quantization(layouts: dict[str, tuple[int, int] | None]) -> dict | None:
    """mlx-lm's "quantization" entry: the most common (bits, group) as the default, every other
    layer named with its own, float16 layers named False (left unquantized)."""
    used = [layout for layout in layouts.values() if layout is not None]
    if not used:
        return None
    bits, group = max(set(used), key=used.count)
    entry: dict = {"group_size": group, "bits": bits, "mode": "affine"}
    for name, layout in sorted(layouts.items()):
        if layout is None:
            entry[name] = False
        elif layout != (bits, group):
            entry[name] = {"group_size": layout[1], "bits": layout[0], "mode": "affine"}
    return entry


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict) -> None:
    from safetensors.numpy import save_file

    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "mlx", **text})


def _write_config(config, quantization: dict | None, path: Path) -> None:
    raw = json.loads(config.to_json_string(use_diff=False))
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = raw["dtype"] = "float16"
    raw.update(_legacy_rope_keys(raw))
    if quantization is not None:  # mlx-lm writes both keys; it reads "quantization"
        raw["quantization"] = raw["quantization_config"] = quantization
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _legacy_rope_keys(raw: dict) -> dict:
    """The rope and window settings under the names mlx-lm's model args read (rope_theta,
    rope_scaling; Gemma 3's rope_local_base_freq and sliding_window_pattern), which newer
    transformers keep in `rope_parameters` (per attention kind) and `layer_types` instead;
    without them mlx-lm silently takes its own defaults."""
    rope = raw.get("rope_parameters") or {}
    keys: dict = {}
    if "full_attention" in rope:  # per attention kind (Gemma 3)
        keys["rope_local_base_freq"] = rope.get("sliding_attention", {}).get("rope_theta")
        rope = rope["full_attention"]
    if "rope_theta" in rope:
        keys["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        keys["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    kinds = raw.get("layer_types") or []
    if raw.get("model_type") == "gemma3_text" and "full_attention" in kinds:
        period = kinds.index("full_attention") + 1
        if any((kind == "full_attention") != ((i + 1) % period == 0) for i, kind in enumerate(kinds)):
            raise ModelError("--format mlx: mlx-lm's Gemma 3 needs full attention every n-th layer; "
                             f"this model's layer_types {kinds} is not periodic")
        keys["sliding_window_pattern"] = period
    return {k: v for k, v in keys.items() if v is not None and raw.get(k) is None}


def _copy_tokenizer(source: str, folder: Path) -> None:
    from ..loading import load_tokenizer

    try:
        load_tokenizer(source).save_pretrained(folder)
    except ModelError:
        raise ModelError(f"{source} has no tokenizer; mlx_lm.load needs one beside the weights") from None
    generation = Path(source) / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, folder / generation.name)
