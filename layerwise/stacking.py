"""Which layers of one input group are solved as one stacked matrix.

Layers that read the same input (q/k/v, gate/up) share one Hessian; when they also share one
configuration, the group solvers (`solvers.GROUP_SOLVERS`) sweep their rows together: one
`prepare_hessian`, one Cholesky, one sweep, the results split back per layer. Every step of those
solvers is row-wise, so the answer is the one-by-one answer (tests/test_stacking.py).
"""

from __future__ import annotations

from .solvers import GROUP_SOLVERS, MethodConfig


def stack_runs(names: list[str], plan: dict[str, MethodConfig], enabled: bool = True) -> list[list[str]]:
    """`names` (one input group, in execution order) cut into runs solved together: layers with
    equal configs of a method that has a group solver share a run; every other layer is alone."""
    runs: list[list[str]] = []
    for name in names:
        config = plan[name]
        run = next((r for r in runs if enabled and config.method in GROUP_SOLVERS and plan[r[0]] == config), None)
        if run is None:
            runs.append([name])
        else:
            run.append(name)
    return runs
