"""The Python entry point for a compress run: one `CompressJob` in, a checkpoint out."""

from __future__ import annotations

from pathlib import Path

from .budget.run import compress_to_budget
from .engine import CompressionResult
from .job import CompressJob
from .pipeline import compress_to_checkpoint


def compress(job: CompressJob) -> tuple[Path, CompressionResult]:
    """Validate `job` once, then compress block by block into `job.out` — to its recipe, or with a
    size `target` to the per-layer choice the budget makes. Returns (checkpoint path, result)."""
    if job.target is not None:
        path, result, _ = compress_to_budget(job.validate())
        return path, result
    return compress_to_checkpoint(job.validate())
