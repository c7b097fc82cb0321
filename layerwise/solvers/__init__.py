"""Solvers: pure functions (weight [out, in], hessian [in, in] | None, config) -> Solution.

The `*_group` solvers take several layers sharing one Hessian and sweep them as one stacked
matrix: (weights [[out_k, in]], hessian, config) -> [Solution] (the same answers as one by one).
Which recipe method uses which solver is `layerwise.methods`' registry.
"""

from .base import MethodConfig, Solution
from .gptq import gptq, gptq_group
from .magnitude import magnitude
from .palettize import kmeans, skm, skm_group
from .palettize_config import KMeansConfig, SKMConfig
from .quant_config import GPTQConfig, RTNConfig
from .rtn import rtn
from .sparse_config import MagnitudeConfig, SparseGPTConfig
from .sparsegpt import sparsegpt, sparsegpt_group

__all__ = [
    "MethodConfig", "Solution", "GPTQConfig", "RTNConfig", "SparseGPTConfig", "MagnitudeConfig",
    "SKMConfig", "KMeansConfig", "gptq", "rtn", "sparsegpt", "magnitude", "skm", "kmeans",
    "gptq_group", "sparsegpt_group", "skm_group",
]
