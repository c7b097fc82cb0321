"""Which layers a run solves and with which config, checked before any work starts."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from layerwise.models.families import Family, get_module

from . import methods
from .errors import RecipeError
from .recipe import Recipe
from .linears import (
    describe_left_out, is_compressible, left_out_summary, left_out_weights, linear_shape, refuse_expert_tensors,
)
from .solvers import MethodConfig

log = logging.getLogger(__name__)


def plan_layers(model: nn.Module, family: Family, config_for: Callable[[str], MethodConfig | None],
                head: bool = False, sensitivity: dict[str, torch.Tensor] | None = None,
                embedding: MethodConfig | None = None) -> dict[str, MethodConfig]:
    """{layer name: config} for the token embedding when `embedding` (the config of the rule that
    names it), then every block linear `config_for` gives a config (None: left alone), in
    execution order, then the lm_head when `head` (the recipe names it); each config checked
    against its layer's shape, and a method that wants sensitivities against `sensitivity`."""
    sensitivity = sensitivity or {}
    plan = {}
    if embedding is not None:
        plan[family.embeddings] = check_embedding_config(model, family, embedding)
    for i, block in enumerate(get_module(model, family.blocks)):
        refuse_expert_tensors(block, f"{family.blocks}.{i}")
        for rel, module in block.named_modules():
            if is_compressible(module):
                name = f"{family.blocks}.{i}.{rel}"
                _add(plan, name, module, config_for(name), sensitivity)
    if head:
        if getattr(model.config, "tie_word_embeddings", False):
            raise RecipeError(f"lm_head is tied to the input embeddings; it cannot be compressed on its own (remove the "
                              f"lm_head rule; a rule naming {family.embeddings.rsplit('.', 1)[-1]} compresses the "
                              "embedding, which is the output head too)")
        _add(plan, family.lm_head, get_module(model, family.lm_head), config_for(family.lm_head), sensitivity)
    if not plan:
        log.warning("the recipe selects no layer: the checkpoint will be uncompressed")
    return plan


def embedding_config(recipe: Recipe, family: Family) -> MethodConfig | None:
    """The config of the first rule that spells out the embedding's name and matches it (None: kept)."""
    rule = recipe.spelled_rule(family.embeddings, family.embeddings.rsplit(".", 1)[-1])
    if rule is not None and rule.menu:
        raise RecipeError(f"{family.embeddings}: a menu for the token embedding (rule {rule.pattern!r}) is not chosen by "
                          "the size budget; give the embedding one config (e.g. rtn, bits 8)")
    return None if rule is None else rule.config


def check_embedding_config(model: nn.Module, family: Family, config: MethodConfig) -> MethodConfig:
    """`config` checked for the token embedding [vocab, hidden]: a data-free method (its input is a
    one-hot token, so a Hessian would be diagonal counts, not what the method means) of a shape it fits."""
    name = family.embeddings
    if config.needs_hessian or methods.wants_sensitivities(config):
        free = sorted(n for n in methods.names() if not methods.method(n).config.needs_hessian)
        raise RecipeError(f"{name}: method {config.method} calibrates on the layer's inputs, and the token embedding's "
                          f"input is a one-hot token; use a data-free method for it ({', '.join(free)})")
    weight = get_module(model, name).weight
    config.check_shape(*weight.shape, name)
    return config


def _add(plan: dict, name: str, module: nn.Module, config: MethodConfig | None, sensitivity: dict) -> None:
    if config is None:
        return
    config.check_shape(*linear_shape(module), name)
    if methods.wants_sensitivities(config) and name not in sensitivity:
        raise RecipeError(
            f"{name}: sensitivity: fisher needs per-weight sensitivities; pass LayerwiseCompressor(..., "
            "sensitivity=layerwise.sensitivity.fisher_sensitivity(model, loss_fn, data)) or use "
            "sensitivity: hessian_diag"
        )
    plan[name] = config


def left_out(model: nn.Module, family: Family, plan: dict[str, MethodConfig]) -> dict:
    """The block weights the plan keeps in float16 and why (`linears.left_out_summary`), with a
    warning when that is most of them."""
    blocks = get_module(model, family.blocks)
    summary = left_out_summary(left_out_weights(blocks, family.blocks, set(plan)), blocks)
    if plan and summary["parameters"] * 2 > summary["block_parameters"]:
        log.warning("most block weights stay float16: %s", describe_left_out(summary))
    return summary
