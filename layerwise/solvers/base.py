"""What every solver shares: its config base class and its result type."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError
from ..formats import CompressedWeight
from ..hessian import PreparedHessian, prepare_hessian


@dataclass
class Solution:
    """A solver's answer for one linear layer."""

    compressed: CompressedWeight
    damping: float | None = None  # fraction of mean(diag H) finally used (None: data-free)
    notes: list[str] = field(default_factory=list)
    # float64 [out]: (ΔW H ΔWᵀ)ⱼⱼ per output row against the undamped H, from solvers whose sweep
    # gives it without H (GPTQ); the report uses it where the Hessian was consumed by the solve
    row_errors: torch.Tensor | None = None


@dataclass
class MethodConfig:
    """Base of every method's settings. Subclasses are dataclasses with validated fields."""

    method = "base"  # class attribute, overridden by subclasses
    needs_hessian = True

    @classmethod
    def from_dict(cls, raw: dict, where: str = "recipe") -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise RecipeError(
                    f"{where}: unknown key {key!r} for method {cls.method!r}; "
                    f"valid keys are {sorted(known)}"
                )
        try:
            return cls(**raw)
        except TypeError as e:  # e.g. a list where an int belongs
            raise RecipeError(f"{where}: {e}") from None

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        """Raise RecipeError when the settings cannot tile a [out, in] weight."""

    def hessian_preparation(self) -> tuple[float, bool] | None:
        """(damp, act_order): all the factored H⁻¹ of this config's solver depends on besides H,
        when its solver takes a shared one (`prepared=`, see `prepare_for`); None otherwise."""
        return None

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


# ---- field validators shared by every config (a bool is never an int or a number here) ----------
def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_flag(value, key: str) -> None:
    require(isinstance(value, bool), f"{key}={value!r} must be true or false")


def check_int(value, key: str, minimum: int = 1, hint: str = "") -> None:
    """An integer >= minimum (1: a positive count or size, 0: may be zero)."""
    kind = "positive integer" if minimum == 1 else f"integer >= {minimum}"
    require(is_int(value) and value >= minimum, f"{key}={value!r} must be a {kind}{hint}")


def check_damp(value) -> None:
    require(is_number(value) and 0 < value < 10, f"damp={value!r} must be a fraction of mean(diag H) in (0, 10), e.g. 0.01")


def check_fraction(value, key: str, hint: str = "e.g. 0.5") -> None:
    """A fraction in [0, 1)."""
    require(is_number(value) and 0 <= value < 1, f"{key}={value!r} must be a fraction in [0, 1), {hint}")


def divisors_hint(n: int, preferred=(8, 16, 32, 64, 128, 256)) -> str:
    """Up to three real divisors of n to suggest (the usual powers of two first)."""
    picks = [d for d in preferred if n % d == 0 and d < n] or [d for d in range(2, n) if n % d == 0]
    return f"e.g. {', '.join(map(str, picks[-3:]))}" if picks else f"{n} has no divisor but 1 and itself"


def check_bits(bits, allowed, key="bits") -> None:
    require(
        is_int(bits) and bits in allowed,
        f"{key}={bits!r} is not supported; use one of {sorted(allowed)}",
    )


def check_grid_fields(sym, mse_clip, block_size) -> None:
    """Type checks of the uniform-grid settings shared by RTN, GPTQ, SparseGPT and magnitude."""
    check_flag(sym, "sym")
    check_flag(mse_clip, "mse_clip")
    if block_size is not None:
        check_int(block_size, "block_size", hint=" (or omitted for per-channel)")


def check_block_size(block_size, in_features: int, name: str, key: str = "block_size") -> None:
    if block_size is None:
        return
    require(
        is_int(block_size) and block_size > 0 and in_features % block_size == 0,
        f"{key}={block_size!r} does not divide the {in_features} input features of {name}; "
        f"use a divisor of {in_features} ({divisors_hint(in_features)}) or omit it for per-channel",
    )


def to_float32(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).clone()


def stack_rows(weights: list[torch.Tensor]) -> tuple[torch.Tensor, list[slice]]:
    """Layers sharing one input as one float32 [Σ out, in] matrix (a fresh copy), and each layer's
    rows in it. One layer is just its float32 copy."""
    W = torch.cat([w.detach().to(torch.float32) for w in weights]) if len(weights) > 1 else to_float32(weights[0])
    return W, row_slices(weights)


def row_slices(weights: list[torch.Tensor]) -> list[slice]:
    """Each layer's rows in the stack of `weights` ([out_k, in] each)."""
    ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]


def act_order_perm(hessian: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """The act-order sweep order (decreasing H_ii), or None for the natural order."""
    return torch.argsort(torch.diag(hessian), descending=True) if act_order else None


def prepare_for(hessian: torch.Tensor, config: MethodConfig) -> PreparedHessian:
    """The factored H⁻¹ the solver of `config` computes for itself; candidates with equal
    `hessian_preparation()` may share one (`prepared=`: the same answers, one factorization)."""
    damp, act_order = config.hessian_preparation()
    return prepare_hessian(hessian, damp, perm=act_order_perm(hessian, act_order))
