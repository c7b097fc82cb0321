"""Recipes: which linear layer gets which method.

Our dialect is an ordered list of rules; the first whose regex is found in a layer's full name
(`re.search`, e.g. "model.layers.3.mlp.down_proj") decides, and `config: null` leaves the layer as is::

    rules:
      - match: 'mlp\\.down_proj'
        config: {method: gptq, bits: 8}
      - match: '.*'
        config: {method: gptq, bits: 4, block_size: 32}

Layers inside the decoder blocks are candidates; `lm_head` only when a rule's pattern spells out
`lm_head`, and the token embedding only when a rule's pattern spells out the family's embedding
name (`embed_tokens`): a catch-all never compresses either, since both are usually a large share
of a small model and the embedding needs a data-free method. A rule may give a `menu` of candidate configs instead
of one `config`: `layerwise compress --target-bits/--target-mb` then chooses one per layer
(`layerwise.budget`) and writes the choice as a plain recipe. coremltools' dialect (`global_config`,
`module_type_configs`, `module_name_configs`) is translated by `coremltools_dialect.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import methods
from .coremltools_dialect import coremltools_rules
from .errors import RecipeError
from .solvers import MethodConfig


@dataclass(frozen=True)
class Rule:
    pattern: str
    config: MethodConfig | None
    menu: tuple[MethodConfig, ...] = ()  # candidates for a size budget (then config is None)

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]

    def config_for(self, name: str) -> MethodConfig | None:
        """The first matching rule's config for layer `name` (None: leave uncompressed)."""
        rule = self.rule_for(name)
        if rule is not None and rule.menu:
            raise RecipeError(
                f"{name} has a menu of candidate configs (rule {rule.pattern!r}); give --target-bits or "
                "--target-mb to choose among them, or replace the menu by one config"
            )
        return None if rule is None else rule.config

    def rule_for(self, name: str) -> Rule | None:
        """The first rule whose pattern is found in `name`."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def names_lm_head(self) -> bool:
        return any("lm_head" in rule.pattern and (rule.config is not None or rule.menu) for rule in self.rules)

    def spelled_rule(self, name: str, word: str) -> Rule | None:
        """The first rule that matches `name` and whose pattern spells out `word` (the embedding's
        last path component): a catch-all before it does not count."""
        return next((r for r in self.rules if word in r.pattern and r.matches(name)), None)

    def with_embeddings(self, config: MethodConfig, word: str = "embed_tokens") -> "Recipe":
        """This recipe with a rule for the token embedding in front (`compress --embeddings`)."""
        return Recipe((Rule(re.escape(word), config), *self.rules))

    def to_dict(self) -> dict:
        return {"rules": [_rule_dict(r) for r in self.rules]}

    @classmethod
    def single(cls, config: MethodConfig) -> "Recipe":
        """One method for every block linear (what the CLI flags build)."""
        return cls((Rule(".*", config),))


def _rule_dict(rule: Rule) -> dict:
    if rule.menu:
        return {"match": rule.pattern, "menu": [c.to_dict() for c in rule.menu]}
    return {"match": rule.pattern, "config": None if rule.config is None else rule.config.to_dict()}


def method_config(raw: dict | None, where: str) -> MethodConfig | None:
    """Build and validate one method config dict (with a `method` key)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a method config must be a mapping or null, got {type(raw).__name__}")
    raw = dict(raw)
    method = raw.pop("method", None)
    if not methods.is_method(method):
        raise RecipeError(f"{where}: method={method!r} is unknown; use one of {sorted(methods.names())}")
    return methods.method(method).config.from_dict(raw, where=f"{where} (method {method})")


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    if any(k in data for k in ("global_config", "module_type_configs", "module_name_configs")):
        return Recipe(tuple(Rule(pattern, method_config(raw, at)) for pattern, raw, at in coremltools_rules(data, where)))
    unknown = set(data) - {"rules"}
    if unknown:
        raise RecipeError(
            f"{where}: unknown top-level key(s) {sorted(unknown)}; expected 'rules' "
            "(or coremltools' global_config / module_type_configs / module_name_configs)"
        )
    rules_raw = data.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        raise RecipeError(f"{where}: 'rules' must be a non-empty list of {{match, config}} entries")
    rules = []
    for i, entry in enumerate(rules_raw):
        at = f"{where}: rules[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"match", "config", "menu"} or "match" not in entry \
                or ("config" in entry and "menu" in entry):
            raise RecipeError(
                f"{at} must have the keys 'match' and 'config' (or 'match' and 'menu', a list of configs) (got {entry!r})"
            )
        pattern = _compile_check(entry["match"], at)
        if "menu" in entry:
            rules.append(Rule(pattern, None, _menu(entry["menu"], at)))
        else:
            rules.append(Rule(pattern, method_config(entry.get("config"), at)))
    return Recipe(tuple(rules))


def _menu(raw, where: str) -> tuple[MethodConfig, ...]:
    if not isinstance(raw, list) or not raw or any(c is None for c in raw):
        raise RecipeError(f"{where}: 'menu' must be a non-empty list of method configs (one is chosen per layer)")
    return tuple(method_config(c, f"{where}.menu[{i}]") for i, c in enumerate(raw))


def load_recipe(path: str | Path) -> Recipe:
    """A YAML/JSON recipe file, or a layerwise checkpoint directory (the recipe it was made with)."""
    path = Path(path)
    if (path / "layerwise.json").is_file():
        import json

        return recipe_from_dict(json.loads((path / "layerwise.json").read_text())["recipe"], where=str(path))
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; give the recipe's YAML/JSON file (or a layerwise checkpoint)")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {path} is not UTF-8 text; save it as UTF-8 YAML/JSON") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(data, where=str(path))


def _compile_check(pattern, where: str) -> str:
    if not isinstance(pattern, str):
        raise RecipeError(f"{where}: 'match' must be a regex string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"{where}: 'match' {pattern!r} is not a valid regex ({e})") from None
    return pattern
