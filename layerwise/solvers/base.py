"""What every solver shares: its config base class and its result type."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError
from ..formats import CompressedWeight


@dataclass
class Solution:
    """A solver's answer for one linear layer."""

    compressed: CompressedWeight
    damping: float | None = None  # fraction of mean(diag H) finally used (None: data-free)
    notes: list[str] = field(default_factory=list)


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

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def check_bits(bits, allowed, key="bits") -> None:
    require(
        isinstance(bits, int) and not isinstance(bits, bool) and bits in allowed,
        f"{key}={bits!r} is not supported; use one of {sorted(allowed)}",
    )


def check_grid_fields(sym, mse_clip, block_size) -> None:
    """Type checks of the uniform-grid settings shared by RTN, GPTQ, SparseGPT and magnitude."""
    require(isinstance(sym, bool), f"sym={sym!r} must be true or false")
    require(isinstance(mse_clip, bool), f"mse_clip={mse_clip!r} must be true or false")
    require(
        block_size is None or (isinstance(block_size, int) and block_size > 0),
        f"block_size={block_size!r} must be a positive integer (or omitted for per-channel)",
    )


def check_block_size(block_size, in_features: int, name: str, key: str = "block_size") -> None:
    if block_size is None:
        return
    require(
        isinstance(block_size, int) and block_size > 0 and in_features % block_size == 0,
        f"{key}={block_size!r} does not divide the {in_features} input features of {name}; "
        f"use a divisor of {in_features} (e.g. 32, 64, 128) or omit it for per-channel",
    )


def to_float32(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).clone()


def stack_rows(weights: list[torch.Tensor]) -> tuple[torch.Tensor, list[slice]]:
    """Layers sharing one input as one float32 [Σ out, in] matrix (a fresh copy), and each layer's
    rows in it. One layer is just its float32 copy."""
    W = torch.cat([w.detach().to(torch.float32) for w in weights]) if len(weights) > 1 else to_float32(weights[0])
    ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
    return W, [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]
