"""`layerwise export`: a checkpoint (compressed weights carried exactly) or a plain HF model in one
output format (`exporters`: a stateful iOS18 mlpackage by default), with the tokenizer beside it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .errors import ModelError
from .exporters import DEFAULT_FORMAT, ExportOptions, get_exporter
from .loading import load_checkpoint, load_tokenizer
from .outputs import atomic_directory, check_output, remove_stale
from .spill import Spill

log = logging.getLogger(__name__)


def export_model(model_path: str, out_path: str | Path, context: int = 512, multifunction: bool = False,
                 prefill_length: int = 64, last_logits_only: bool = False, overwrite: bool = False,
                 trust_remote_code: bool = False, verify: bool = True, allow_long_context: bool = False,
                 format: str = DEFAULT_FORMAT) -> dict:
    exporter = get_exporter(format)
    options = ExportOptions(context=context, multifunction=multifunction, prefill_length=prefill_length,
                            last_logits_only=last_logits_only, allow_long_context=allow_long_context)
    exporter.check(Path(out_path), options)
    out_path = check_output(out_path, overwrite, inputs=(model_path,))
    tokenizer_dir = exporter.tokenizer_dir(out_path)
    if tokenizer_dir is not None:
        check_output(tokenizer_dir, overwrite, inputs=(model_path,), flag="tokenizer folder")
    remove_stale(out_path)
    # the codes wait in a file beside the output until written (one layer at a time in memory)
    with Spill(out_path.parent) as spill:
        # dense=False: the compressed layers reach the exporter as codes only, never as dense copies
        loaded = load_checkpoint(model_path, trust_remote_code=trust_remote_code, verify=verify, dense=False,
                                 spill=spill)
        options = dataclasses.replace(options, metadata=provenance(loaded.manifest, model_path), source=str(model_path))
        report = exporter.export(loaded, out_path, options)
    if tokenizer_dir is not None:
        _save_tokenizer(model_path, tokenizer_dir, report, overwrite, trust_remote_code)
    return report


def provenance(manifest: dict | None, model_path: str) -> dict:
    """What an output records of where it came from: the source model and, for a checkpoint, its recipe."""
    if manifest is None:
        return {"layerwise.source_model": str(model_path)}
    return {"layerwise.source_model": manifest.get("source_model", str(model_path)), "layerwise.recipe": manifest["recipe"]}


def _save_tokenizer(model_path: str, tokenizer_dir: Path, report: dict, overwrite: bool, trust_remote_code: bool) -> None:
    try:
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    except ModelError:
        log.warning("no tokenizer found for %s; none written next to %s", model_path, report["path"])
        return
    with atomic_directory(tokenizer_dir, "tokenizer", overwrite, inputs=(model_path,), flag="tokenizer folder") as tmp:
        tokenizer.save_pretrained(tmp)
    report["tokenizer"] = str(tokenizer_dir)
