"""Read coremltools' optimization config dialect into our ordered rules.

coremltools resolves a module's config by name, then type, then the global config. We translate
that into rules in the same precedence: one exact-name (or regex) rule per `module_name_configs`
entry, then `module_type_configs['Linear']` as a catch-all, then `global_config` as a catch-all.

Key mapping (coremltools → layerwise), per algorithm:

| coremltools                                   | layerwise                          |
| --------------------------------------------- | ---------------------------------- |
| `algorithm: gptq`                             | `method: gptq`                     |
| `algorithm: sparse_gpt`                       | `method: sparsegpt`                |
| `n_bits` present (SKMPalettizer / PostTrainingPalettizer module config) | `method: skm` (`algorithm: kmeans` for data-free) |
| `weight_dtype: int4 / uint4 / int8 / …`       | `bits: 4 / 4 / 8 / …` (float16/32: not quantized) |
| `quantization_scheme: symmetric / affine`     | `sym: true / false`                |
| `granularity` or `quantization_granularity: per_channel / per_block` + `block_size` | `block_size: null / N` |
| `hessian_dampening`                           | `damp`                             |
| `use_activation_order_heuristic`              | `act_order`                        |
| `processing_group_size`                       | `lazy_batch` (gptq), `column_block` (sparsegpt) |
| `target_sparsity`, `n_m_ratio: [n, m]`        | `sparsity`, `nm: "n:m"` (n zeros of every m, as in coremltools) |
| `n_bits`, `granularity`, `group_size`, `lut_dtype`, `cluster_dim` | same names          |

Top-level `layers`, `calibration_nsamples` and `input_cacher` are accepted and ignored (layerwise
always streams every decoder block; the CLI's --nsamples decides the sample count).

A key the YAML leaves out takes layerwise's default, not coremltools', except the ones that decide
the stored format (`weight_dtype`, `quantization_scheme`): a GPTQ config without
`use_activation_order_heuristic` runs with act-order (static groups) and MSE clipping, which only
change how well the solver does, never what Core ML receives.
"""

from __future__ import annotations

import logging
import re
from typing import Iterator

from .errors import RecipeError

log = logging.getLogger(__name__)

_TOP_KEYS = {"global_config", "module_type_configs", "module_name_configs", "layers", "calibration_nsamples", "input_cacher"}
_LINEAR_TYPES = {"Linear", "nn.Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"}


def coremltools_rules(data: dict, where: str) -> Iterator[tuple[str, dict | None, str]]:
    """(pattern, our method config dict or None, where it came from) per rule, in precedence order;
    translated one at a time, so that the first bad entry is the one reported."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} in a coremltools config; valid: {sorted(_TOP_KEYS)}")
    ignored = sorted(set(data) & {"layers", "calibration_nsamples", "input_cacher"})
    if ignored:
        log.info("coremltools config keys %s are ignored (all decoder blocks are streamed)", ignored)
    found = False
    for name, cfg in (data.get("module_name_configs") or {}).items():
        at = f"{where}: module_name_configs[{name!r}]"
        pattern = name if _looks_like_regex(name) else re.escape(name)
        found = True
        yield f"^(?:{pattern})$", translate(cfg, at), at
    for type_name, cfg in (data.get("module_type_configs") or {}).items():
        at = f"{where}: module_type_configs[{type_name!r}]"
        if type_name not in _LINEAR_TYPES:
            raise RecipeError(f"{at}: only Linear layers are compressed; module type {type_name!r} is not supported")
        found = True
        yield ".*", translate(cfg, at), at
    if data.get("global_config") is not None:
        at = f"{where}: global_config"
        found = True
        yield ".*", translate(data["global_config"], at), at
    if not found:
        raise RecipeError(f"{where}: the coremltools config names no module and has no global_config")


def translate(cfg: dict | None, where: str) -> dict | None:
    """One coremltools module config → our method config dict (None stays None)."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where}: expected a mapping or null")
    cfg = dict(cfg)
    algorithm = cfg.pop("algorithm", None)
    if algorithm == "gptq":
        return _translate_gptq(cfg, where)
    if algorithm == "sparse_gpt":
        return _translate_sparse_gpt(cfg, where)
    if algorithm in (None, "skm", "kmeans") and "n_bits" in cfg:
        return _translate_palettizer(cfg, algorithm or "skm", where)
    raise RecipeError(
        f"{where}: algorithm={algorithm!r} is not supported; use 'gptq', 'sparse_gpt', or a palettizer "
        "config with 'n_bits'"
    )


def _translate_gptq(cfg: dict, where: str) -> dict | None:
    bits = _bits(cfg.pop("weight_dtype", "uint8"), where)
    out = {"method": "gptq"}
    out.update(_grid(cfg, "granularity", where))
    _move(cfg, out, "hessian_dampening", "damp")
    _move(cfg, out, "use_activation_order_heuristic", "act_order")
    _move(cfg, out, "processing_group_size", "lazy_batch")
    _reject_normal_float(cfg, where)
    _no_leftovers(cfg, where)
    if bits is None:
        return None  # float weight_dtype: the layer stays uncompressed
    out["bits"] = bits
    return out


def _translate_sparse_gpt(cfg: dict, where: str) -> dict:
    bits = _bits(cfg.pop("weight_dtype", "float32"), where)
    out = {"method": "sparsegpt"}
    nm = cfg.pop("n_m_ratio", None)
    sparsity = cfg.pop("target_sparsity", 0.5)
    if nm is not None:
        if not (isinstance(nm, (list, tuple)) and len(nm) == 2):
            raise RecipeError(f"{where}: n_m_ratio={nm!r} must be two integers [n, m]")
        n_zero, m = nm  # coremltools: n of every m are set to zero
        out["nm"] = f"{m - n_zero}:{m}"
    else:
        out["sparsity"] = sparsity
    grid = _grid(cfg, "quantization_granularity", where)
    if bits is not None:
        out["bits"] = bits
        out.update(grid)
    _move(cfg, out, "hessian_dampening", "damp")
    _move(cfg, out, "processing_group_size", "column_block")
    _reject_normal_float(cfg, where)
    _no_leftovers(cfg, where)
    return out


def _translate_palettizer(cfg: dict, method: str, where: str) -> dict:
    out = {"method": method}
    for key in ("n_bits", "granularity", "group_size", "lut_dtype", "cluster_dim"):
        _move(cfg, out, key, key)
    if cfg.pop("enable_per_channel_scale", False):
        raise RecipeError(f"{where}: enable_per_channel_scale is not supported; remove it")
    cfg.pop("weight_threshold", None)  # size threshold: every block linear is compressed here
    _no_leftovers(cfg, where)
    return out


def _bits(dtype, where: str) -> int | None:
    text = str(dtype).replace("torch.", "")
    if text in ("float32", "float16", "fp32", "fp16"):
        return None
    m = re.fullmatch(r"u?int(\d+)", text)
    if not m:
        raise RecipeError(f"{where}: weight_dtype={dtype!r} is not understood; use int4, uint4, int8, uint8, …")
    return int(m.group(1))


def _grid(cfg: dict, key: str, where: str) -> dict:
    out = {}
    granularity = cfg.pop(key, "per_channel")
    block_size = cfg.pop("block_size", None)
    scheme = cfg.pop("quantization_scheme", "symmetric")
    if scheme not in ("symmetric", "affine"):
        raise RecipeError(f"{where}: quantization_scheme={scheme!r}; use 'symmetric' or 'affine'")
    out["sym"] = scheme == "symmetric"
    if granularity == "per_block":
        if block_size is None:
            raise RecipeError(f"{where}: granularity per_block needs block_size")
        out["block_size"] = block_size
    elif granularity != "per_channel":
        raise RecipeError(f"{where}: {key}={granularity!r} is not supported; use per_channel or per_block")
    return out


def _move(src: dict, dst: dict, key: str, new_key: str) -> None:
    if key in src:
        dst[new_key] = src.pop(key)


def _reject_normal_float(cfg: dict, where: str) -> None:
    if cfg.pop("enable_normal_float", False):
        raise RecipeError(f"{where}: enable_normal_float is not supported; use a uniform grid or palettization (n_bits)")


def _no_leftovers(cfg: dict, where: str) -> None:
    if cfg:
        raise RecipeError(f"{where}: unknown key(s) {sorted(cfg)} for this algorithm")


def _looks_like_regex(name: str) -> bool:
    return any(ch in name for ch in "*+?[]()|\\^$")
