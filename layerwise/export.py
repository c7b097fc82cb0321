"""`layerwise export`: a checkpoint (compressed weights carried exactly) or a plain HF model (float16)
to a stateful iOS18 mlpackage, with the tokenizer saved next to it."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ModelError
from .loading import load_model, load_tokenizer

log = logging.getLogger(__name__)


def tokenizer_dir_for(out_path: Path) -> Path:
    """Where the tokenizer files go: `Model.mlpackage` → `Model-tokenizer/` beside it."""
    return out_path.with_name(f"{out_path.stem}-tokenizer")


def export_model(model_path: str, out_path: str | Path, context: int = 512, multifunction: bool = False,
                 prefill_length: int = 64, last_logits_only: bool = False, overwrite: bool = False) -> dict:
    from .coreml import export_mlpackage

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise ModelError(f"output {out_path} already exists; choose another --out or pass --overwrite")
    model = load_model(model_path)
    compressed = getattr(model, "layerwise_compressed", {})
    manifest = getattr(model, "layerwise_manifest", None)
    metadata = {"layerwise.source_model": str(model_path)}
    if manifest is not None:
        metadata["layerwise.recipe"] = manifest["recipe"]
        metadata["layerwise.source_model"] = manifest.get("source_model", str(model_path))
    report = export_mlpackage(model, out_path, context=context, compressed=compressed, multifunction=multifunction,
                              last_logits_only=last_logits_only, metadata=metadata, prefill_length=prefill_length)
    try:
        load_tokenizer(model_path).save_pretrained(tokenizer_dir_for(out_path))
        report["tokenizer"] = str(tokenizer_dir_for(out_path))
    except ModelError:
        log.warning("no tokenizer found for %s; none written next to the mlpackage", model_path)
    return report
