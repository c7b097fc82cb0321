"""Solvers: pure functions (weight [out, in], hessian [in, in] | None, config) -> Solution.

`METHODS` maps each recipe method name to its config class and solver function.
"""

from .base import MethodConfig, Solution
from .gptq import gptq
from .magnitude import magnitude
from .palettize import kmeans, skm
from .palettize_config import KMeansConfig, SKMConfig
from .quant_config import GPTQConfig, RTNConfig
from .rtn import rtn
from .sparse_config import MagnitudeConfig, SparseGPTConfig
from .sparsegpt import sparsegpt

METHODS: dict[str, tuple[type[MethodConfig], object]] = {
    "gptq": (GPTQConfig, gptq),
    "rtn": (RTNConfig, rtn),
    "sparsegpt": (SparseGPTConfig, sparsegpt),
    "magnitude": (MagnitudeConfig, magnitude),
    "skm": (SKMConfig, skm),
    "kmeans": (KMeansConfig, kmeans),
}

__all__ = [
    "METHODS", "MethodConfig", "Solution", "GPTQConfig", "RTNConfig", "SparseGPTConfig", "MagnitudeConfig",
    "SKMConfig", "KMeansConfig", "gptq", "rtn", "sparsegpt", "magnitude", "skm", "kmeans",
]
