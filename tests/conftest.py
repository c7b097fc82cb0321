"""Shared fixtures: tiny real transformers models built from configs, saved as HF directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from layerwise.models import DEMO_MODEL_DIR


def _one_share_of_the_cores_per_worker() -> None:
    """Under pytest-xdist, each worker (and every process it starts) gets its share of the cores:
    two workers of two GEMM threads each on two cores spin against each other (the suite took 1.5 ×
    as long). Set before any test runs, so every test sees one thread count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_one_share_of_the_cores_per_worker()


def pytest_collection_modifyitems(config, items):
    """Files with `slow` tests first, so that the workers share the long tests out early instead of
    one finishing a 30-second test while the other has run out of work. Files stay whole (their
    module fixtures are built once)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_MODEL = SHARED / "models" / "wt2-llama-4l"
WIKITEXT = SHARED / "data" / "wikitext-2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def real_model(variable: str) -> tuple[Path | None, str]:
    """(the pretrained model directory the environment `variable` names, or None; the skip reason).
    Opt-in, so `make test` takes the same time on every machine: `make test-real` sets them."""
    value = os.environ.get(variable)
    path = Path(value).expanduser() if value else None
    if path is None:
        return None, f"real-weights test: set {variable} to the built model (make test-real)"
    if not (path / "config.json").exists():
        return None, f"{variable}={value} holds no config.json (build it with ../shared/models/*/make.py)"
    return path, ""


# What makes each family's tiny config exercise its differences (HF `model_type` → config overrides).
# Sliding windows are 16 tokens so that 64-token calibration windows and prompts run past them.
FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=16),
    "qwen2": dict(num_key_value_heads=1, tie_word_embeddings=True),  # q/k/v biases, tied, MQA
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),  # q/k norms per head
    "gemma": dict(head_dim=16, num_key_value_heads=1),  # (1 + w) norms, sqrt(hidden) embedding scale, GELU-tanh
    "gemma2": dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=24,  # soft-caps, sandwich norms
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=24,  # local/global rope, q/k norms
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0156,
                    logits_scaling=8.0),
    "olmo2": {},  # full-width q/k norms, post-norms
}
# Declared families (the first wave's and the second wave's), in the README table's order.
FAMILY_KINDS = tuple(FAMILY_OVERRIDES)

# Traits the ten tiny configs leave unexercised: variant name → (HF model_type, extra overrides).
FAMILY_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama3_rope": ("llama", dict(rope_parameters=dict(  # Llama 3.x frequency-dependent rope scaling
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "phi3_longrope": ("phi3", dict(  # longrope past its original length, partial rotary, a 16-token window
        sliding_window=16, original_max_position_embeddings=32, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, original_max_position_embeddings=32,
            short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[2.0, 2.5, 3.0, 3.5]))),
    "qwen3_window": ("qwen3", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),  # layer_types
}


def tiny_config(kind: str = "llama", **overrides):
    """A tiny config of HF model_type `kind` (see FAMILY_OVERRIDES) with the demo tokenizer's 4096 vocab."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    base.update(FAMILY_OVERRIDES.get(kind, {}))
    base.update(overrides)
    return AutoConfig.for_model(kind, **base)


def build_tiny_model(kind: str = "llama", seed: int = 0, dtype=torch.float16, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    with torch.no_grad():  # larger weights than HF's init so the tiny model's logits have a scale
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.to(dtype).eval()


def save_tiny_model(path: Path, kind: str = "llama", seed: int = 0, dtype=torch.float16, **overrides) -> Path:
    model = build_tiny_model(kind, seed, dtype, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(DEMO_MODEL_DIR) / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny models: llama (GQA, fp16), qwen2 (biases, tied, MQA), mistral (bf16)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": save_tiny_model(root / "llama", "llama"),
        "qwen2": save_tiny_model(root / "qwen2", "qwen2"),
        "mistral": save_tiny_model(root / "mistral", "mistral", dtype=torch.bfloat16),
    }


@pytest.fixture(scope="session")
def calib_text_file(tmp_path_factory) -> Path:
    """A short excerpt of the bundled calibration text (enough for 16 windows of 64)."""
    from layerwise.calib_data import BUNDLED_CALIBRATION

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(Path(BUNDLED_CALIBRATION).read_text()[:20000])
    return path
