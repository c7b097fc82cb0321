"""The Python API: one CompressJob in, the same checkpoint the CLI writes for the same flags."""

import pytest

import layerwise
from golden.make_cases import checkpoint_hashes, make_case
from layerwise.budget import Target
from layerwise.recipe import Recipe, method_config


@pytest.mark.parametrize("case, recipe, target", [
    ("gptq4-b32", {"method": "gptq", "bits": 4, "block_size": 32}, None),
    ("target-bits-3.5", None, 3.5),
])
@pytest.mark.slow
def test_api_job_writes_the_cli_checkpoint(case, recipe, target, tiny_dirs, calib_text_file, tmp_path):
    from layerwise.budget import menu_recipe

    cli_out = make_case(case, tiny_dirs, calib_text_file, tmp_path)
    job = layerwise.CompressJob(
        model=str(tiny_dirs["llama"]), out=tmp_path / "api", calib=str(calib_text_file), nsamples=8, seqlen=64,
        device="cpu", recipe=Recipe.single(method_config(recipe, "test")) if recipe else menu_recipe({"method": "gptq"}),
        target=Target(bits=target) if target else None,
    )
    path, result = layerwise.compress(job)
    assert checkpoint_hashes(path) == checkpoint_hashes(cli_out)
    loaded = layerwise.load_compressed(path)
    assert set(loaded.compressed) == {r.name for r in result.layers} and loaded.manifest["layers"]
