"""Every declared family entry matches the real transformers modules and config fields it names."""

from __future__ import annotations

import pytest
import torch.nn as nn

from layerwise.errors import ModelError
from layerwise.models.families import FAMILIES, SLIDING, ConfigScalar, QKNorm, exportable_family, get_module, resolve_family
from conftest import FAMILY_KINDS, build_tiny_model


def test_every_declared_family_has_a_tiny_config():
    assert {f.name for f in FAMILIES} == set(FAMILY_KINDS)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_entry_names_real_modules_and_config_fields(kind):
    model = build_tiny_model(kind)
    family = resolve_family(model)
    assert family.name == kind and family.exportable
    cfg = model.config
    blocks = get_module(model, family.blocks)
    for block in blocks:
        for group in family.groups:
            for rel in group:
                assert isinstance(get_module(block, rel), nn.Linear), rel
        for norm in vars(family.block_norms).values():
            if norm:
                get_module(block, norm)
        if family.qk_norm is not QKNorm.NONE:
            q_norm = get_module(block, family.attention.q_norm)
            width = q_norm.weight.numel()
            head_dim = block.self_attn.head_dim
            assert width == (head_dim if family.qk_norm is QKNorm.PER_HEAD else cfg.num_attention_heads * head_dim)
    get_module(model, family.embeddings), get_module(model, family.rotary), get_module(model, family.final_norm)
    assert getattr(cfg, family.activation) is not None
    assert getattr(cfg, family.norm_eps) > 0
    for scalar in (family.embed_scale, family.residual_scale, family.attention_scale, family.logit_scale):
        if scalar is not None:
            assert isinstance(scalar, ConfigScalar) and scalar.value(cfg) is not None, scalar
    assert len(family.layer_windows(cfg)) == cfg.num_hidden_layers
    assert len(family.rope_keys(cfg)) == cfg.num_hidden_layers


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3_text"])
def test_windows_follow_the_config(kind):
    cfg = build_tiny_model(kind).config
    family = resolve_family(build_tiny_model(kind))
    windows = family.layer_windows(cfg)
    expected = [16 if getattr(cfg, "layer_types", None) is None or t == SLIDING else None
                for t in (getattr(cfg, "layer_types", None) or [SLIDING] * cfg.num_hidden_layers)]
    assert list(windows) == expected and 16 in windows


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("stablelm", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    assert resolve_family(model).supports() == ("compress",)
    with pytest.raises(ModelError, match="supported families are llama, mistral"):
        exportable_family(model)
