"""The registry of compression methods: one `Method` entry per recipe `method:` name.

An entry holds everything the rest of layerwise knows about a method: its config class, its solver
for a group of layers sharing one Hessian, whether that solver consumes the Hessian or takes
caller-given sensitivities, its `layerwise compress` flags and its default size-budget menu.
Adding a method is one entry (`register`) plus its solver; nothing else names methods.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from .errors import RecipeError
from .hessian import PreparedHessian
from .solvers import (
    GPTQConfig, KMeansConfig, MagnitudeConfig, MethodConfig, RTNConfig, SKMConfig, Solution, SparseGPTConfig, gptq_group,
    kmeans, magnitude, rtn, skm_group, sparsegpt_group,
)


class GroupSolve(Protocol):
    def __call__(self, weights: list[torch.Tensor], hessian: torch.Tensor | None, config: MethodConfig, *,
                 prepared: PreparedHessian | None = None, consume_hessian: bool = False,
                 sensitivities: list[torch.Tensor] | None = None) -> list[Solution]:
        """weights: [out_k, in] each, layers sharing one input; hessian: [in, in] float32 (None for a
        data-free config) → one Solution per layer, the same answers as solving each alone.
        prepared: `solvers.base.prepare_for(hessian, config)` when the caller has it (only for configs
        whose `hessian_preparation()` is not None). consume_hessian: only for `consumes_hessian`
        methods. sensitivities: [out_k, in] each, only when `wants_sensitivities(config)`."""


@dataclass(frozen=True)
class Option:
    """One argparse argument: `add_argument(*names, **settings)`; minimum: the value is an integer
    at least this (the CLI's `at_least` type)."""

    names: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    minimum: int | None = None


@dataclass(frozen=True)
class Flag:
    """A `layerwise compress` flag (several options: mutually exclusive) and the config key it sets
    when given. `dest` is the argparse destination; a value of None means not given. `when_set`:
    the config value for a store_true flag that is given (e.g. --no-error-feedback → False)."""

    dest: str
    options: tuple[Option, ...]
    key: str
    when_set: Any = None

    def config_items(self, value, key: str | None = None) -> dict:
        """{config key: value} for the parsed `value` ({} when the flag was not given)."""
        if self.when_set is not None:
            return {key or self.key: self.when_set} if value else {}
        return {} if value is None else {key or self.key: value}


@dataclass(frozen=True)
class Method:
    """One compression method (see the module docstring)."""

    name: str
    config: type[MethodConfig]
    solve: GroupSolve
    stacks: bool = False  # `solve` sweeps a group as one stacked matrix (else stacking.stack_runs keeps layers alone)
    consumes_hessian: bool = False  # takes consume_hessian=True and returns Solution.row_errors
    wants_sensitivities: Callable[[MethodConfig], bool] = lambda config: False
    flags: tuple[Flag, ...] = ()  # the compress flags that set this method's config keys
    flag_keys: Mapping[str, str] = field(default_factory=dict)  # flag dest → this method's key, where it differs
    derived: Callable[[dict], dict] | None = None  # further config items from the given ones (e.g. granularity)
    menu: tuple[Mapping[str, Any], ...] = ()  # size-budget candidates: overrides of the flags' config (none: no menu)


def _quant_flag(dest, names, help, **settings) -> Flag:
    return Flag(dest, (Option(names, {"help": help, **settings}),), dest)


# The flags in the order `layerwise compress --help` lists them; an entry names those it takes.
BITS = _quant_flag("bits", ("--bits",), "bits per weight (quantization, LUT indices, or joint with sparsity)", type=int)
BLOCK_SIZE = Flag("block_size", (Option(("--block-size",), {"help": "input columns per scale (omit: per-channel)"}, 1),),
                  "block_size")
SYM = Flag("sym", (Option(("--sym",), {"dest": "sym", "action": "store_true", "default": None, "help": "symmetric grid"}),
                   Option(("--asym",), {"dest": "sym", "action": "store_false", "help": "asymmetric grid (default)"})),
           "sym")
ACT_ORDER = _quant_flag("act_order", ("--act-order",), "GPTQ: columns by decreasing H_ii, with static groups (default on)",
                        action=argparse.BooleanOptionalAction, default=None)
MSE_CLIP = _quant_flag("mse_clip", ("--mse-clip",),
                       "MSE-optimal range clipping of the grid (default on for gptq/rtn, off for sparse methods)",
                       action=argparse.BooleanOptionalAction, default=None)
GRID = _quant_flag("grid", ("--grid",), "gptq/rtn: put the scales on the lattice whose MLX / GGUF export decodes to exactly "
                   "these weights (default float16: any float16 scale)", choices=("float16", "mlx", "gguf"))
DAMP = _quant_flag("damp", ("--damp",), "damping as a fraction of mean(diag H) (default 0.01)", type=float)
REFINE_STEPS = Flag("refine_steps", (Option(("--refine-steps",), {
    "help": "sparsegpt: CG steps re-solving the kept weights for the final mask (default 32; 0: off)"}, 0),), "refine_steps")
SPARSITY = _quant_flag("sparsity", ("--sparsity",), "fraction of zeros (sparsegpt / magnitude / joint skm)", type=float)
NM = _quant_flag("nm", ("--nm",), "n:m pattern, n kept of every m inputs, e.g. 2:4")
GROUP_SIZE = Flag("group_size", (Option(("--group-size",), {
    "help": "palettization: output channels sharing one LUT (omit: per-tensor)"}, 1),), "group_size")
NO_ERROR_FEEDBACK = Flag("no_error_feedback", (Option(("--no-error-feedback",), {
    "action": "store_true", "help": "skm: fit the palette without GPTQ-style feedback"}),), "error_feedback", when_set=False)
LUT_DTYPE = _quant_flag("lut_dtype", ("--lut-dtype",), "palettization: LUT entry type", choices=("float16", "int8", "uint8"))
FLAG_ORDER = (BITS, BLOCK_SIZE, SYM, ACT_ORDER, MSE_CLIP, GRID, DAMP, REFINE_STEPS, SPARSITY, NM, GROUP_SIZE, NO_ERROR_FEEDBACK,
              LUT_DTYPE)

QUANT_MENU = tuple({"bits": bits, "block_size": block} for bits in (2, 3, 4, 8) for block in (None, 128, 32))
PALETTE_MENU = tuple({"n_bits": bits} for bits in (2, 3, 4, 6))


def _one_by_one(solve_one: Callable[[torch.Tensor, torch.Tensor | None, MethodConfig], Solution]) -> GroupSolve:
    """The group solver of a method whose solver takes one layer: each layer alone, in order."""
    def solve(weights, hessian, config, *, prepared=None, consume_hessian=False, sensitivities=None):
        return [solve_one(w, hessian, config) for w in weights]

    solve.__name__ = solve.__qualname__ = f"{solve_one.__name__}_one_by_one"
    return solve


def _gptq(weights, hessian, config, *, prepared=None, consume_hessian=False, sensitivities=None):
    return gptq_group(weights, hessian, config, consume_hessian, prepared=prepared)


def _sparsegpt(weights, hessian, config, *, prepared=None, consume_hessian=False, sensitivities=None):
    return sparsegpt_group(weights, hessian, config)


def _skm(weights, hessian, config, *, prepared=None, consume_hessian=False, sensitivities=None):
    return skm_group(weights, hessian, config, sensitivities=sensitivities, prepared=prepared)


def _palette_granularity(given: dict) -> dict:
    return {"granularity": "per_grouped_channel" if given.get("group_size") else "per_tensor"}


_QUANT_FLAGS = (BITS, BLOCK_SIZE, SYM, MSE_CLIP, GRID)
_SPARSE_FLAGS = (SPARSITY, NM, BITS, BLOCK_SIZE, SYM, MSE_CLIP)
_PALETTE_FLAGS = (BITS, GROUP_SIZE, LUT_DTYPE)
_PALETTE = {"flag_keys": {"bits": "n_bits"}, "derived": _palette_granularity, "menu": PALETTE_MENU}
BUILTIN = (
    Method("gptq", GPTQConfig, _gptq, stacks=True, consumes_hessian=True, flags=_QUANT_FLAGS + (ACT_ORDER, DAMP),
           menu=QUANT_MENU),
    Method("rtn", RTNConfig, _one_by_one(rtn), flags=_QUANT_FLAGS, menu=QUANT_MENU),
    Method("sparsegpt", SparseGPTConfig, _sparsegpt, stacks=True, flags=_SPARSE_FLAGS + (DAMP, REFINE_STEPS)),
    Method("magnitude", MagnitudeConfig, _one_by_one(magnitude), flags=_SPARSE_FLAGS),
    Method("skm", SKMConfig, _skm, stacks=True, wants_sensitivities=lambda config: config.sensitivity == "fisher",
           flags=_PALETTE_FLAGS + (DAMP, SPARSITY, NO_ERROR_FEEDBACK), **_PALETTE),
    Method("kmeans", KMeansConfig, _one_by_one(kmeans), flags=_PALETTE_FLAGS, **_PALETTE),
)

_registry: dict[str, Method] = {entry.name: entry for entry in BUILTIN}


def register(entry: Method) -> None:
    """Add a method (e.g. one defined outside layerwise); its name must be new and its config
    class's `method` attribute must be that name."""
    if entry.name in _registry:
        raise ValueError(f"method {entry.name!r} is registered already")
    if entry.config.method != entry.name:
        raise ValueError(f"{entry.config.__name__}.method is {entry.config.method!r}, not {entry.name!r}")
    _registry[entry.name] = entry


def unregister(name: str) -> None:
    """Remove a method added by `register` (the built-in ones stay)."""
    if any(entry.name == name for entry in BUILTIN):
        raise ValueError(f"{name!r} is a built-in method")
    _registry.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered method, built-in ones first."""
    return tuple(_registry)


def method(name: str) -> Method:
    """The entry of method `name` (a RecipeError naming the known ones otherwise)."""
    entry = _registry.get(name)
    if entry is None:
        raise RecipeError(f"method={name!r} is unknown; use one of {sorted(_registry)}")
    return entry


def is_method(name) -> bool:
    return name in _registry


def flags() -> tuple[Flag, ...]:
    """The compress flags of every registered method: the built-in order, then newer ones."""
    used = {flag.dest: flag for entry in _registry.values() for flag in entry.flags}
    known = [flag for flag in FLAG_ORDER if flag.dest in used]
    return tuple(known) + tuple(flag for dest, flag in used.items() if flag not in known)


def config_from_flags(name: str, given: Mapping[str, Any]) -> dict:
    """Method `name`'s config dict from the parsed compress flags (`given`: {dest: value}). Every
    flag that was given enters it, also one the method does not take, so that its config class
    names the problem ("unknown key … for method …")."""
    entry = method(name)
    cfg: dict = {"method": name}
    switches = [flag for flag in flags() if flag.when_set is not None]
    for flag in flags():
        if flag not in switches:
            cfg.update(flag.config_items(given.get(flag.dest), entry.flag_keys.get(flag.dest)))
    if entry.derived is not None:
        cfg.update(entry.derived(given))
    for flag in switches:  # last, so that the first unknown key a config class names is a valued flag's
        cfg.update(flag.config_items(given.get(flag.dest), entry.flag_keys.get(flag.dest)))
    return cfg


def menu_keys() -> set[str]:
    """The config keys some registered default menu chooses (a budget's base must not fix them)."""
    return {key for entry in _registry.values() for candidate in entry.menu for key in candidate}


def solve_group(config: MethodConfig, weights: list[torch.Tensor], hessian: torch.Tensor | None, *,
                prepared: PreparedHessian | None = None, consume_hessian: bool = False,
                sensitivities: list[torch.Tensor] | None = None) -> list[Solution]:
    """Layers sharing `hessian` solved with `config` (see `GroupSolve`); a data-free config is
    handed no Hessian, and only methods that take them get `consume_hessian` and sensitivities."""
    entry = method(config.method)
    extra = {}
    if prepared is not None:
        extra["prepared"] = prepared
    if consume_hessian:
        extra["consume_hessian"] = True
    if sensitivities is not None:
        extra["sensitivities"] = sensitivities
    return entry.solve(weights, hessian if config.needs_hessian else None, config, **extra)


def wants_sensitivities(config: MethodConfig) -> bool:
    """Whether the layer's solver takes caller-given sensitivities (skm with sensitivity: fisher)."""
    return method(config.method).wants_sensitivities(config)
