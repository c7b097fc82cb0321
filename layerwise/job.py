"""One `layerwise compress` run as one value: what to read, what to write, how; validated once.

The CLI builds a `CompressJob` from its flags (`cli._compress_job`), the Python API builds one
directly; `pipeline.compress_to_checkpoint(job)` and `budget.run.compress_to_budget(job)` take it.
`validate()` checks the whole input before anything is loaded or written (the output path, an
unfinished run, every weight shard's header against the model's skeleton), so a bad input is one
line and nothing on disk, never a failure half-way through the blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CheckpointWriter, is_checkpoint
from .devices import resolve_device
from .distributed import SINGLE, Ranks
from .errors import RecipeError
from .float_targets import DEFAULT_ALPHA, check_alpha, check_targets, is_float
from .loading import check_weights
from .outputs import check_output
from .recipe import Recipe
from .run_lock import check_unlocked

if TYPE_CHECKING:
    from .budget import Target

# a size budget without --method chooses among this method's bits × granularities
DEFAULT_BUDGET_METHOD = "gptq"


@dataclass
class CompressJob:
    """Everything a compress run reads and decides, by the CLI flag it comes from."""

    model: str  # MODEL: HF model directory, Hub id, or a layerwise checkpoint
    out: Path  # --out: the checkpoint directory to create
    recipe: Recipe  # --recipe or --method flags; with a target: the menu each layer chooses from
    calib: str  # --calib: wikitext2 | c4 | PATH
    nsamples: int = 128
    seqlen: int = 256
    seed: int = 0
    target: Target | None = None  # budget.Target (--target-bits / --target-mb), or None: compress with `recipe`
    device: str = "auto"
    batch_size: int = 8
    staged: bool = True  # False: --no-staged
    overwrite: bool = False
    resume: bool = False
    offload_activations: bool = False
    lazy: bool | None = None  # False: --eager-load; None: lazy for a HF model, eager for a checkpoint
    trust_remote_code: bool = False
    allow_non_finite: bool = False
    allow_long_context: bool = False
    fast_matmul: bool = True  # False: --exact-matmul
    targets: str = "compressed"  # --targets: fit the compressed model's own outputs, or the float model's (GPTAQ)
    float_alpha: float | None = None  # --float-alpha (with targets "float"; None: float_targets.DEFAULT_ALPHA)
    magr: bool = False  # --magr: shrink each grid-quantized layer's weight range first (magr.py)
    ranks: Ranks = SINGLE  # this process's place under torchrun / accelerate launch
    inputs: tuple = ()  # further paths the run reads (the recipe file): --out may not touch them
    _validated: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.out = Path(self.out)
        self.inputs = tuple(p for p in self.inputs if p is not None)
        for flag, value in (("--nsamples", self.nsamples), ("--seqlen", self.seqlen), ("--batch-size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{flag} {value!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError(f"--seed {self.seed!r} must be a non-negative integer")
        check_targets(self.targets)
        check_alpha(self.float_alpha, self.targets)
        if is_float(self.targets) and self.target is not None:
            raise RecipeError("--targets float cannot be combined with --target-bits/--target-mb (the budget weighs its "
                              "candidates on the compressed model's own outputs); compress the budget's recipe with "
                              "--recipe CHECKPOINT --targets float instead")
        if self.magr and self.target is not None:
            raise RecipeError("--magr cannot be combined with --target-bits/--target-mb (the budget measures its "
                              "candidates without it); compress the budget's recipe with --recipe CHECKPOINT --magr instead")

    @property
    def read_paths(self) -> tuple:
        """Every path the run reads: the model, the calibration text, the recipe file."""
        return (self.model, self.calib, *self.inputs)

    @property
    def eager(self) -> bool:
        """Whether the whole model is loaded by transformers (a budget needs it whole)."""

        if self.target is not None or self.lazy is False:
            return True
        return self.lazy is None and is_checkpoint(self.model)

    @property
    def targets_entry(self) -> dict:
        """What the manifest and the run record say about the targets: nothing for the default (earlier
        checkpoints say nothing and mean "compressed"; default runs keep their golden bytes)."""
        entry = {"magr": True} if self.magr else {}
        if self.targets == "compressed":
            return entry
        return {"targets": self.targets, "float_alpha": DEFAULT_ALPHA if self.float_alpha is None else self.float_alpha,
                **entry}

    @property
    def targets_record(self) -> str:
        """The run record's one `targets` value, so that --resume names a change of either in one line."""
        entry = self.targets_entry
        record = self.targets if "float_alpha" not in entry else f"{self.targets}, alpha {entry['float_alpha']:g}"
        return record + (", magr" if self.magr else "")

    def with_recipe(self, recipe: Recipe) -> CompressJob:
        """The same validated job compressing `recipe` (a budget's allocation)."""
        job = dataclasses.replace(self, recipe=recipe, target=None)
        job._validated = self._validated
        return job

    def validate(self) -> CompressJob:
        """Check the whole input once, before anything is loaded or written; later calls do nothing.

        Raises the LayerwiseError that names the first problem: another live run writing the same
        output (`run_lock`), the output path (`check_output`), the device, an unfinished run (or
        none to --resume), the model's weight files (`check_weights`).
        """
        if self._validated:
            return self
        if self.ranks.world == 1:  # first: no flag may touch a live run's output (several ranks: rank 0's writer)
            check_unlocked(Path(self.out))
        self.out = check_output(self.out, self.overwrite, self.read_paths)
        resolve_device(self.device)
        if self.ranks.world == 1:  # several ranks: rank 0 names it when opening the writer, to all of them
            CheckpointWriter(self.out, overwrite=self.overwrite, resume=self.resume).check_start()
        self._check_model()
        self._validated = True
        return self

    def _check_model(self) -> None:

        if not is_checkpoint(self.model):  # a checkpoint's manifest names and checks its own tensors
            check_weights(self.model, trust_remote_code=self.trust_remote_code, lazy=not self.eager)
