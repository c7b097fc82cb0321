import pytest

from layerwise.errors import RecipeError
from layerwise.recipe import load_recipe, recipe_from_dict
from layerwise.solvers import GPTQConfig, RTNConfig, SparseGPTConfig


def test_rules_first_match_wins_and_null_skips():
    r = recipe_from_dict({"rules": [
        {"match": r"mlp\.down_proj", "config": {"method": "gptq", "bits": 8}},
        {"match": r"layers\.0\.", "config": None},
        {"match": ".*", "config": {"method": "rtn", "bits": 4, "block_size": 32}},
    ]})
    assert r.config_for("model.layers.0.mlp.down_proj") == GPTQConfig(bits=8)
    assert r.config_for("model.layers.0.self_attn.q_proj") is None
    assert r.config_for("model.layers.1.self_attn.q_proj") == RTNConfig(bits=4, block_size=32)
    assert not r.names_lm_head()


@pytest.mark.parametrize("raw,message", [
    ({"rules": [{"match": ".*", "config": {"method": "gptq", "bits": 9}}]}, "bits=9"),
    ({"rules": [{"match": ".*", "config": {"method": "gptq", "bits": 4, "group": 3}}]}, "unknown key 'group'"),
    ({"rules": [{"match": ".*", "config": {"method": "awq"}}]}, "method='awq' is unknown"),
    ({"rules": [{"match": "(", "config": None}]}, "not a valid regex"),
    ({"rules": [], "extra": 1}, "unknown top-level key"),
    ({"rules": [{"match": ".*", "config": {"method": "gptq", "damp": -1}}]}, "damp=-1"),
])
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(raw)


def test_coremltools_dialect_yaml(tmp_path):
    path = tmp_path / "ct.yaml"
    path.write_text("""
global_config:
  algorithm: gptq
  weight_dtype: uint4
  granularity: per_block
  block_size: 32
  quantization_scheme: affine
  use_activation_order_heuristic: true
module_name_configs:
  model.layers.0.mlp.down_proj:
    algorithm: gptq
    weight_dtype: int8
  model.layers.1.mlp.down_proj: null
  'model\\.layers\\.\\d+\\.self_attn\\.o_proj':
    algorithm: sparse_gpt
    target_sparsity: 0.5
    weight_dtype: int4
calibration_nsamples: 64
""")
    r = load_recipe(path)
    assert r.config_for("model.layers.0.mlp.down_proj") == GPTQConfig(bits=8, sym=True)
    assert r.config_for("model.layers.1.mlp.down_proj") is None
    assert r.config_for("model.layers.3.self_attn.o_proj") == SparseGPTConfig(sparsity=0.5, bits=4, sym=True)
    assert r.config_for("model.layers.0.mlp.up_proj") == GPTQConfig(bits=4, block_size=32, sym=False, act_order=True)


def test_coremltools_dialect_errors():
    with pytest.raises(RecipeError, match="granularity per_block needs block_size"):
        recipe_from_dict({"global_config": {"algorithm": "gptq", "granularity": "per_block"}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['foo'\]"):
        recipe_from_dict({"global_config": {"algorithm": "gptq", "foo": 1}})
    with pytest.raises(RecipeError, match="per_tensor"):
        recipe_from_dict({"global_config": {"algorithm": "gptq", "granularity": "per_tensor"}})
    with pytest.raises(RecipeError, match="Conv2d"):
        recipe_from_dict({"module_type_configs": {"Conv2d": {"algorithm": "gptq"}}})


def test_coremltools_n_m_ratio_counts_zeros():
    r = recipe_from_dict({"global_config": {"algorithm": "sparse_gpt", "n_m_ratio": [1, 4]}})
    assert r.config_for("x").nm == (3, 4)  # coremltools: 1 of every 4 set to zero → 3 kept
