"""What MLX and GGUF exports share: the codes they carry, the families they take, and the one summary
line saying which layers went into which type and how far any exported weight lies from the
checkpoint's (never a silent conversion)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import ModelError
from ..formats import CompressedWeight

ROWS_AT_ONCE = 256  # rows compared at once when measuring an exported layer against the checkpoint


def affine_codes(cw: CompressedWeight) -> torch.Tensor:
    """uint8 [out, in] codes of an affine layer with every pruned weight at its block's zero point,
    so that s·(q − z) is exactly +0 there: a sparse layer is a dense grid with some zero steps."""
    codes = cw.codes
    if cw.mask is None:
        return codes
    zero = cw.zero_point.repeat_interleave(cw.block_size, dim=1)
    return torch.where(cw.mask, codes, zero)


def check_family(model, supported: tuple[str, ...], format_name: str) -> str:
    """The model_type, or a ModelError (one line) when `format_name` does not take this family."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in supported:
        raise ModelError(f"--format {format_name} does not support model_type {model_type!r}; "
                         f"it exports {', '.join(supported)}")
    return model_type


def largest_difference(cw: CompressedWeight, decoded_rows) -> float:
    """max |decoded − checkpoint| over the layer, `decoded_rows(rows)` giving the target's values
    (float32 [len(rows), in]) a few rows at a time."""
    worst = 0.0
    for r0 in range(0, cw.shape[0], ROWS_AT_ONCE):
        rows = slice(r0, r0 + ROWS_AT_ONCE)
        ours = cw.dequantize_rows(rows).float()
        worst = max(worst, float((decoded_rows(rows) - ours).abs().max()))
    return worst


@dataclass
class Tally:
    """Each compressed layer's destination type, why it was converted, and the largest difference."""

    exact: Counter = field(default_factory=Counter)  # target type → layers carried as their codes
    converted: Counter = field(default_factory=Counter)  # "what → type" → layers
    worst: float = 0.0
    worst_layer: str | None = None

    def carried(self, kind: str, name: str, difference: float) -> None:
        self.exact[kind] += 1
        self._note(name, difference)

    def convert(self, source: str, kind: str, name: str, difference: float) -> None:
        self.converted[f"{source} → {kind}"] += 1
        self._note(name, difference)

    def _note(self, name: str, difference: float) -> None:
        if difference > self.worst:
            self.worst, self.worst_layer = difference, name

    def summary(self, format_name: str, grid_hint: str) -> str:
        """One line: the types, the conversions, and the largest difference from the checkpoint."""
        if not self.exact and not self.converted:
            return f"{format_name}: no compressed layers; every tensor as stored, in float16 or float32"
        carried = ", ".join(f"{n} {k}" for k, n in sorted(self.exact.items())) or "none"
        line = f"{format_name}: layers carried as their codes: {carried}"
        if self.converted:
            line += "; converted: " + ", ".join(f"{n} {k}" for k, n in sorted(self.converted.items()))
        if self.worst == 0:
            return line + "; every weight equals the checkpoint's bit for bit"
        return (line + f"; largest difference from the checkpoint's weights {self.worst:.3g} (in {self.worst_layer}; "
                f"compress with --grid {grid_hint} for bit-exact weights)")

    def as_dict(self) -> dict:
        return {"exact": dict(self.exact), "converted": dict(self.converted), "max_abs_difference": self.worst,
                "worst_layer": self.worst_layer}
