"""Output formats by name: `layerwise export --format NAME` and the price `--target-mb` budgets with.

A format is one entry in `EXPORTERS` plus its module (see `protocol.Exporter`); it reads a
`LoadedCheckpoint` (model, CompressedWeights, manifest), never attributes of the model.
"""

from __future__ import annotations

from ..errors import ModelError
from .coreml import CoreML
from .gguf import GGUF
from .mlx import MLX
from .protocol import ExportOptions, Exporter

EXPORTERS: dict[str, Exporter] = {exporter.name: exporter for exporter in (CoreML(), MLX(), GGUF())}
DEFAULT_FORMAT = "coreml"


def get_exporter(name: str = DEFAULT_FORMAT) -> Exporter:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise ModelError(f"unknown output format {name!r}; use one of {sorted(EXPORTERS)}") from None


__all__ = ["DEFAULT_FORMAT", "EXPORTERS", "ExportOptions", "Exporter", "get_exporter"]
