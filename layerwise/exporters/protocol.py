"""What an output format provides: the `Exporter` protocol and the options `layerwise export` passes on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch.nn as nn

    from ..checkpoint import LoadedCheckpoint
    from ..formats import CompressedWeight


@dataclass(frozen=True)
class ExportOptions:
    """The export flags; a format uses those that mean something to it."""

    context: int = 512  # maximum tokens (KV-cache length)
    multifunction: bool = False  # prefill + decode functions sharing the weights
    prefill_length: int = 64  # query length of the prefill function
    last_logits_only: bool = False
    allow_long_context: bool = False  # a context beyond the model's max positions
    metadata: dict = field(default_factory=dict)  # provenance to store in the output (source model, recipe)
    source: str = ""  # the checkpoint or model exported: formats that carry the tokenizer read it there


class Exporter(Protocol):
    """One output format: checks, writes and prices its own bytes (for `--target-mb`)."""

    name: str  # the `--format` value
    suffix: str  # what `--out` must end in

    def check(self, out: Path, options: ExportOptions) -> None:
        """Refuse a bad `--out` or option combination (ModelError, one line) before anything is loaded."""

    def tokenizer_dir(self, out: Path) -> Path | None:
        """Where the tokenizer files go beside `out`; None when the format carries the tokenizer itself."""

    def export(self, loaded: LoadedCheckpoint, out: Path, options: ExportOptions) -> dict:
        """Write `out` (complete or not at all; every temporary thing beside it, named by
        `outputs.temporary_path`); returns a report with at least path, seconds and size_bytes."""

    def layer_bytes(self, cw: CompressedWeight) -> int:
        """Bytes the compressed layer `cw` takes in an output of this format."""

    def fixed_bytes(self, model: nn.Module, budgeted: list[str]) -> int:
        """Bytes of an output of `model` that do not depend on the budgeted layers' choice: every
        other tensor, the program or header, whatever the format adds."""
