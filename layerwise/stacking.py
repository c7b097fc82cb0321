"""Which layers of one input group are solved as one stacked matrix.

Layers that read the same input (q/k/v, gate/up) share one Hessian; when they also share one
configuration, the methods whose solver stacks (`methods.Method.stacks`) sweep their rows together: one
`prepare_hessian`, one Cholesky, one sweep, the results split back per layer. Every step of those
solvers is row-wise, so the answer is the one-by-one answer (tests/test_stacking.py).
"""

from __future__ import annotations

from . import methods
from .solvers import MethodConfig


def stack_runs(names: list[str], plan: dict[str, MethodConfig], enabled: bool = True) -> list[list[str]]:
    """`names` (one input group, in execution order) cut into runs solved together: layers with
    equal configs of a method whose solver stacks share a run; every other layer is alone."""
    runs: list[list[str]] = []
    for name in names:
        config = plan[name]
        run = next((r for r in runs if enabled and methods.method(config.method).stacks and plan[r[0]] == config), None)
        if run is None:
            runs.append([name])
        else:
            run.append(name)
    return runs
