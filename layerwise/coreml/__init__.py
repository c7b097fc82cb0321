"""Core ML export: a stateful iOS18 mlpackage whose constexpr ops hold the compressed weights exactly.

`export_mlpackage` is the entry point; `standins` keeps the weights out of the conversion;
`swap_stand_ins` / `constexpr_weight` put them back, CompressedWeights as iOS18 constexpr ops.
coremltools is imported lazily (only when exporting).
"""

from .convert import export_mlpackage, package_bytes

__all__ = ["export_mlpackage", "package_bytes"]
