"""Solvers: pure functions (weight [out, in], hessian [in, in] | None, config) -> Solution.

`METHODS` maps each recipe method name to its config class and solver function. `GROUP_SOLVERS`
holds the methods that can also solve several layers sharing one Hessian as one stacked matrix:
(weights [[out_k, in]], hessian, config) -> [Solution] (the same answers as one by one).
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

METHODS: dict[str, tuple[type[MethodConfig], object]] = {
    "gptq": (GPTQConfig, gptq),
    "rtn": (RTNConfig, rtn),
    "sparsegpt": (SparseGPTConfig, sparsegpt),
    "magnitude": (MagnitudeConfig, magnitude),
    "skm": (SKMConfig, skm),
    "kmeans": (KMeansConfig, kmeans),
}
GROUP_SOLVERS = {"gptq": gptq_group, "sparsegpt": sparsegpt_group, "skm": skm_group}
# solvers that take consume_hessian=True (factor H in the caller's buffer) and return Solution.row_errors
CONSUMES_HESSIAN = {"gptq"}

__all__ = [
    "METHODS", "GROUP_SOLVERS", "CONSUMES_HESSIAN", "MethodConfig", "Solution", "GPTQConfig", "RTNConfig", "SparseGPTConfig", "MagnitudeConfig",
    "SKMConfig", "KMeansConfig", "gptq", "rtn", "sparsegpt", "magnitude", "skm", "kmeans",
]
