"""Candidate menus: which configs a size budget may choose from, per layer.

By default (`--method gptq` or `rtn` with `--target-*`) every block linear may take any of
{2, 3, 4, 8} bits × {per-channel, blocks of 128, blocks of 32}; with `--method skm` (or `kmeans`)
{2, 3, 4, 6}-bit palettes (each method's `menu` in `layerwise.methods`). The other flags given (`--sym`, `--no-act-order`, `--group-size`, …)
apply to every candidate. A recipe can give its own `menu:` per rule instead.
"""

from __future__ import annotations

import torch.nn as nn

from layerwise.models.families import get_module, resolve_family

from .. import methods
from ..errors import RecipeError
from ..linears import is_compressible, linear_shape
from ..plan import check_embedding_config
from ..recipe import Recipe, Rule, method_config
from ..solvers import MethodConfig


def default_menu(base: dict) -> tuple[MethodConfig, ...]:
    """The default candidates for `base`, a method config dict (e.g. from the command-line flags):
    its method's registered menu (`methods.Method.menu`), each candidate's keys over `base`."""
    method = base.get("method")
    menu = methods.method(method).menu if methods.is_method(method) else ()
    if not menu:
        with_menu = [name for name in methods.names() if methods.method(name).menu]
        raise RecipeError(
            f"--target-bits/--target-mb choose bits for {', '.join(with_menu)}, not {method!r}; "
            "use one of those methods or a recipe whose rules give a 'menu'"
        )
    raws = [{**base, **candidate} for candidate in menu]
    if set(base) & methods.menu_keys():
        raise RecipeError("--bits and --block-size are what a budget chooses; drop them when giving --target-bits/--target-mb")
    return tuple(method_config(raw, "default menu") for raw in raws)


def menu_recipe(base: dict) -> Recipe:
    """One rule: every block linear chooses from the default menu of `base`'s method."""
    return Recipe((Rule(".*", None, default_menu(base)),))


def layer_menus(model: nn.Module, recipe: Recipe) -> dict[str, tuple[MethodConfig, ...]]:
    """{block linear name: its candidates that fit its shape}, in execution order, after the token
    embedding's when a rule spells it out (data-free candidates; `plan.check_embedding_config`). A rule with one
    `config` gives a menu of one (its bytes count against the budget); `config: null` skips the layer."""
    family = resolve_family(model)
    if recipe.names_lm_head():
        raise RecipeError("a size budget covers the block linears only; remove the lm_head rule")
    menus = _embedding_menu(model, family, recipe)
    for i, block in enumerate(get_module(model, family.blocks)):
        for rel, module in block.named_modules():
            if not is_compressible(module):
                continue
            name = f"{family.blocks}.{i}.{rel}"
            rule = recipe.rule_for(name)
            if rule is None or (rule.config is None and not rule.menu):
                continue
            menus[name] = _fitting(rule.menu or (rule.config,), module, name)
    if not menus:
        raise RecipeError("the recipe selects no layer for the budget; give a rule with a menu that matches some layers")
    return menus


def _embedding_menu(model: nn.Module, family, recipe: Recipe) -> dict[str, tuple[MethodConfig, ...]]:
    """{embedding name: its data-free candidates} when a rule spells out the embedding ({}: kept float16)."""
    name = family.embeddings
    rule = recipe.spelled_rule(name, name.rsplit(".", 1)[-1])
    if rule is None or (rule.config is None and not rule.menu):
        return {}
    return {name: tuple(check_embedding_config(model, family, c) for c in rule.menu or (rule.config,))}


def _fitting(menu: tuple[MethodConfig, ...], module: nn.Module, name: str) -> tuple[MethodConfig, ...]:
    """The candidates whose block or group sizes tile this layer (e.g. no blocks of 128 for 704 inputs)."""
    out_features, in_features = linear_shape(module)
    fitting = []
    for config in menu:
        try:
            config.check_shape(out_features, in_features, name)
        except RecipeError:
            continue
        fitting.append(config)
    if not fitting:
        menu[0].check_shape(out_features, in_features, name)  # raises, naming the problem
    return tuple(fitting)
