"""`layerwise export`: a checkpoint (compressed weights carried exactly) or a plain HF model (float16)
to a stateful iOS18 mlpackage, with the tokenizer saved next to it."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ModelError
from .loading import check_length, load_model, load_tokenizer
from .memory import check_fits
from .outputs import atomic_directory, check_output
from .spill import Spill

log = logging.getLogger(__name__)


def tokenizer_dir_for(out_path: Path) -> Path:
    """Where the tokenizer files go: `Model.mlpackage` → `Model-tokenizer/` beside it."""
    return out_path.with_name(f"{out_path.stem}-tokenizer")


def check_state_memory(config, context: int) -> None:
    """Refuse a context whose KV-cache states cannot fit in memory, before anything is allocated
    (tracing and conversion hold the float16 states and rope tables several times over)."""
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    need = 3 * (2 * config.num_hidden_layers * kv_heads * head_dim * 2 + 2 * head_dim * 4) * context
    check_fits(need, f"--context {context} (the KV-cache states)", "lower --context")


def export_model(model_path: str, out_path: str | Path, context: int = 512, multifunction: bool = False,
                 prefill_length: int = 64, last_logits_only: bool = False, overwrite: bool = False,
                 trust_remote_code: bool = False, verify: bool = True, allow_long_context: bool = False) -> dict:
    if Path(out_path).suffix != ".mlpackage":  # checked here too: importing coremltools prints noise
        raise ModelError(f"--out {out_path} must end in .mlpackage")
    if multifunction and not 1 <= prefill_length <= context:
        raise ModelError(f"--prefill-length {prefill_length} must lie in [1, --context {context}]")
    out_path = check_output(out_path, overwrite, inputs=(model_path,))
    tokenizer_dir = check_output(tokenizer_dir_for(out_path), overwrite, inputs=(model_path,), flag="tokenizer folder")
    # the codes wait in a file beside the output until written (one layer at a time in memory)
    with Spill(out_path.parent) as spill:
        # dense=False: the compressed layers reach the converter as codes only, never as dense copies
        model = load_model(model_path, trust_remote_code=trust_remote_code, verify=verify, dense=False, spill=spill)
        check_length(model.config, context, "--context", allow_long_context)
        check_state_memory(model.config, context)
        from .coreml import export_mlpackage

        compressed = getattr(model, "layerwise_compressed", {})
        manifest = getattr(model, "layerwise_manifest", None)
        metadata = {"layerwise.source_model": str(model_path)}
        if manifest is not None:
            metadata["layerwise.recipe"] = manifest["recipe"]
            metadata["layerwise.source_model"] = manifest.get("source_model", str(model_path))
        report = export_mlpackage(model, out_path, context=context, compressed=compressed, multifunction=multifunction,
                                  last_logits_only=last_logits_only, metadata=metadata, prefill_length=prefill_length,
                                  spill=spill)
    try:
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    except ModelError:
        log.warning("no tokenizer found for %s; none written next to the mlpackage", model_path)
        return report
    with atomic_directory(tokenizer_dir, "tokenizer", overwrite, inputs=(model_path,), flag="tokenizer folder") as tmp:
        tokenizer.save_pretrained(tmp)
    report["tokenizer"] = str(tokenizer_dir)
    return report
