"""Solvers: pure functions (weight [out, in], hessian [in, in] | None, config) -> Solution.

`METHODS` maps each recipe method name to its config class and solver function.
"""

from .base import MethodConfig, Solution
from .gptq import gptq
from .quant_config import GPTQConfig, RTNConfig
from .rtn import rtn

METHODS: dict[str, tuple[type[MethodConfig], object]] = {
    "gptq": (GPTQConfig, gptq),
    "rtn": (RTNConfig, rtn),
}

__all__ = ["METHODS", "MethodConfig", "Solution", "GPTQConfig", "RTNConfig", "gptq", "rtn"]
