"""Per-architecture knowledge (installed as `layerwise.models`).

Each family is one declarative `Family` entry: where the decoder blocks live, which linear layers
share an input (one Hessian per group) in execution order, and the traits the export wrapper,
capture and `generate` reproduce (norms, multipliers, soft-caps, windows, rope, fused projections). Unknown decoders fall back to a generic
walk: the single `nn.ModuleList` of identical blocks, with groups discovered from one forward.
The bundled demo model lives in `wt2-llama-4l/`.
"""

from .families import FAMILIES, Family, LinearGroup, exportable_family, resolve_family

DEMO_MODEL_DIR = __path__[0] + "/wt2-llama-4l"

__all__ = ["FAMILIES", "Family", "LinearGroup", "exportable_family", "resolve_family", "DEMO_MODEL_DIR"]
