"""Upper bounds on the bytes a file's header adds around the weights (MLX's safetensors JSON, GGUF's
tensor directory), and on the provenance written into it: the budget subtracts them from
`--target-mb` before choosing, so an MLX or GGUF export lands at or just below the target."""

from __future__ import annotations

import re

# one rule of the recipe stored as provenance, besides its escaped layer name: the longest config we
# write ({"method": "gptq", "bits": 4, "block_size": 32, "sym": false, "mse_clip": true, ...}) and slack
RECIPE_RULE_BYTES = 240
PROVENANCE_BYTES = 1024  # the source model's path and the keys around the recipe
OFFSET_DIGITS = 12  # data offsets up to 10¹² bytes


def provenance_bytes(budgeted: list[str]) -> int:
    """The recipe a budget writes (one rule per budgeted layer) and the source path, as stored metadata."""
    return PROVENANCE_BYTES + sum(RECIPE_RULE_BYTES + len(re.escape(n)) for n in budgeted)


def safetensors_entry_bytes(name: str, ndim: int) -> int:
    """`"name":{"dtype":"F16","shape":[a,b],"data_offsets":[x,y]},` with every number at its widest."""
    return len(name) + 52 + ndim * (OFFSET_DIGITS + 1) + 2 * (OFFSET_DIGITS + 1)


def gguf_tensor_info_bytes(name: str, ndim: int, alignment: int = 32) -> int:
    """One tensor's directory entry (name, dims, type, offset) and the padding before its data."""
    return 8 + len(name) + 4 + 8 * ndim + 4 + 8 + alignment - 1
