"""Core ML: a stateful iOS18 mlpackage (`layerwise.coreml`), its tokenizer in a folder beside it."""

from __future__ import annotations

from pathlib import Path

from ..coreml.layout import exported_bytes, fixed_bytes
from ..errors import ModelError
from ..loading import check_length
from ..memory import check_fits
from .protocol import ExportOptions


class CoreML:
    name = "coreml"
    suffix = ".mlpackage"

    def check(self, out: Path, options: ExportOptions) -> None:
        if Path(out).suffix != self.suffix:  # checked before loading: importing coremltools prints noise
            raise ModelError(f"--out {out} must end in {self.suffix}")
        if options.multifunction and not 1 <= options.prefill_length <= options.context:
            raise ModelError(f"--prefill-length {options.prefill_length} must lie in [1, --context {options.context}]")

    def tokenizer_dir(self, out: Path) -> Path:
        """`Model.mlpackage` → `Model-tokenizer/` beside it."""
        return Path(out).with_name(f"{Path(out).stem}-tokenizer")

    def export(self, loaded, out: Path, options: ExportOptions) -> dict:
        from ..coreml import export_mlpackage

        check_length(loaded.model.config, options.context, "--context", options.allow_long_context)
        check_state_memory(loaded.model.config, options.context)
        return export_mlpackage(
            loaded.model, out, context=options.context, compressed=loaded.compressed,
            multifunction=options.multifunction, last_logits_only=options.last_logits_only,
            metadata=options.metadata, prefill_length=options.prefill_length, spill=loaded.spill,
        )

    def layer_bytes(self, cw) -> int:
        return exported_bytes(cw)

    def fixed_bytes(self, model, budgeted: list[str]) -> int:
        return fixed_bytes(model, budgeted)


def check_state_memory(config, context: int) -> None:
    """Refuse a context whose KV-cache states cannot fit in memory, before anything is allocated
    (tracing and conversion hold the float16 states and rope tables several times over)."""
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    need = 3 * (2 * config.num_hidden_layers * kv_heads * head_dim * 2 + 2 * head_dim * 4) * context
    check_fits(need, f"--context {context} (the KV-cache states)", "lower --context")
