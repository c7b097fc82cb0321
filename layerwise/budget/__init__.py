"""Fit a size budget: per-layer configs chosen from measured sensitivity, least loss for the bytes.

`layerwise compress MODEL --method gptq --target-bits 3.5` (or `--target-mb 60`): every block
linear's candidates (`menu.py`) are solved against its Hessian and priced in bytes (`measure.py`),
each layer's output error is weighed by how much of it reaches the loss (`loss_scale.py`), an exact
multiple-choice knapsack picks one candidate per layer (`knapsack.py`, `allocate.py`), and the
choice is compressed in the usual streaming order and saved as a plain per-layer recipe (`run.py`).
"""

from .allocate import Allocation, Target, allocate, allocate_from_table
from .menu import default_menu, menu_recipe

__all__ = ["Allocation", "Target", "allocate", "allocate_from_table", "default_menu", "menu_recipe"]
