"""The float model's side of `--targets float`: its block inputs, carried beside the compressed ones.

The walker streams X̃ (what the compressed blocks make) through the blocks; with float targets it
also carries X, the uncompressed model's hidden states. Each block, while it still holds its float
weights, runs once on X: the inputs of the group leaders fitted to float targets are kept per batch
(the float inputs the cross term pairs with X̃'s, `float_targets.CrossAccumulator`; which leaders:
`float_targets.fitted_leaders`) and its outputs are the next block's X.
A replayed block (`--resume`) is read again with its float weights (lazy loading) and only advances X.

Memory: X is a second set of block inputs, and the leaders' inputs of one block are kept for every
batch until their stage is solved (an MLP's intermediate-wide down_proj input only with
`--targets float-all`); both are
memory-mapped files under the offload directory with `--offload-activations`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .activations import Activations
from .capture import BlockInput, run_block
from .errors import ModelError
from .float_targets import fitted_leaders
from .linears import is_compressible, linear_shape

log = logging.getLogger(__name__)


class FloatStream:
    """X per calibration batch (`hidden`) and, for the block being solved, its leaders' float inputs."""

    def __init__(self, batches: Activations, directory: Path | None, device: torch.device):
        """batches: the captured block-0 inputs (X = X̃ there); directory: offload folder or None."""
        self.directory, self.device = directory, device
        self.hidden = Activations(self._folder("hidden"), device)
        for batch in batches:  # a copy: the two streams part after block 0
            self.hidden.append(replace(batch, hidden=batch.hidden.clone()))
        self.inputs: dict[str, Activations] = {}
        log.info("float targets: the float model's block inputs %.0f MB %s, and each block's group inputs until "
                 "their group is solved", self.hidden.nbytes() / 1e6, "on disk" if directory is not None else "in memory")

    def _folder(self, name: str) -> Path | None:
        return self.directory / "float" / name if self.directory is not None else None

    def record(self, block: nn.Module, index: int, leaders: list[str]) -> None:
        """Run the float `block` (number `index`) on X: keep each leader's input per batch (the leaders
        fitted to float targets), then X ← its outputs."""
        self.drop_inputs()
        self.inputs = {name: Activations(self._folder(f"in-{k}"), self.device) for k, name in enumerate(leaders)}
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, inp):
                if name in seen:
                    raise ModelError(f"{name} runs more than once in one forward of block {index}; --targets float "
                                     "needs each linear to run once per block (use --targets compressed)")
                seen[name] = inp[0].detach().to(torch.float32).clone()
            return hook

        def step(batch: BlockInput) -> torch.Tensor:
            seen.clear()
            out = run_block(block, batch, index)
            for name in leaders:
                if name not in seen:
                    raise ModelError(f"{name} never ran in block {index}'s forward; use --targets compressed")
                self.inputs[name].append(BlockInput(seen.pop(name), []))
            return out

        handles = [block.get_submodule(name).register_forward_pre_hook(keep(name)) for name in leaders]
        try:
            self.hidden.advance(step)
        finally:
            for h in handles:
                h.remove()

    def advance(self, block: nn.Module, index: int) -> None:
        """X ← the float `block`'s outputs (a replayed block: nothing is solved)."""
        self.drop_inputs()
        self.hidden.advance(lambda batch: run_block(block, batch, index))

    def holds(self, leader: str) -> bool:
        """Whether `leader`'s group in the recorded block is fitted to float targets (its inputs are kept)."""
        return leader in self.inputs

    def input_of(self, batch: int, leader: str) -> torch.Tensor:
        """The float input [B, L, in] of `leader` in batch number `batch` (of this rank's share)."""
        return self.inputs[leader][batch].hidden

    def drop(self, leader: str) -> None:
        """Forget `leader`'s float inputs (its group is solved)."""
        stored = self.inputs.pop(leader, None)
        if stored is not None:
            stored.close()

    def drop_inputs(self) -> None:
        for name in list(self.inputs):
            self.drop(name)

    def close(self) -> None:
        self.drop_inputs()
        self.hidden.close()


def bytes_per_token(block: nn.Module, groups, hidden: int, every: bool) -> int:
    """float32 bytes per calibration token the float stream holds at most: X (`hidden` wide) and one
    block's fitted group leaders' inputs (`leader_bytes_per_token`)."""
    return 4 * hidden + leader_bytes_per_token(block, groups, every)


def leader_bytes_per_token(block: nn.Module, groups, every: bool) -> int:
    """float32 bytes per calibration token of one block's fitted group leaders' inputs in the float
    model, held until their groups are solved (`groups`: the family's, or None: every compressible
    linear's input; every: --targets float-all, `fitted_leaders`)."""
    if groups is not None:
        leaders = [g[0] for g in groups]
    else:
        leaders = [name for name, m in block.named_modules() if is_compressible(m)]
    return 4 * sum(linear_shape(block.get_submodule(name))[1] for name in fitted_leaders(block, leaders, every))
