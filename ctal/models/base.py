"""Common base of every ctal model: task bookkeeping, input checks and the output contract.

Output contract (``ctal/tasks.py``): ``{"final": {task: (B, C_t, H, W)}, "aux": {name: {task: ...}}}``
with every prediction bilinearly upsampled to the input's ``H x W``.

Resolution: every backbone here reduces by 32, so ``H`` and ``W`` must be multiples of 32. A model
whose parameters depend on the feature grid (anything with a CTAL block: one 3x3 fusion kernel
per query pixel) is *built for* ``input_size`` and rejects other sizes with a ValueError; its
``resample_ctal(new_size)`` re-grids the fusion weights explicitly (an approximation). Models
without grid-bound parameters accept any multiple of 32.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import TaskOrderState, check_grid, check_task_names
from ..tasks import TASKS

__all__ = ["MultiTaskModel", "check_size"]

SIZE_MULTIPLE = 32


def check_size(input_size, name: str = "input_size") -> tuple[int, int]:
    """``input_size`` as ``(H, W)``: positive ints, both multiples of 32."""
    H, W = check_grid(input_size, name)
    if H % SIZE_MULTIPLE or W % SIZE_MULTIPLE:
        raise ValueError(f"{name} {H}x{W}: both sides must be multiples of {SIZE_MULTIPLE} "
                         f"(the backbones reduce by 32)")
    return H, W


class MultiTaskModel(TaskOrderState, nn.Module):
    """Base class: ``tasks`` (names from ``ctal.tasks.TASKS``), ``num_outputs`` (channels per
    task), ``input_size`` (the training grid). Subclasses set ``grid_bound = True`` when they have
    parameters tied to the feature grid.

    The state dict records the task order (``task_order``, see :class:`ctal._checks.TaskOrderState`).
    Loading the state of the same tasks in another order is a ``ValueError``: most models hold
    tensors indexed by task position (fusion weights, mixing units, concatenations in task
    order) that would load without any key or shape error. Models whose every task tensor is
    keyed by task name set ``task_order_sensitive = False`` and load any order."""

    grid_bound = False
    task_order_sensitive = True

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], input_size):
        super().__init__()
        tasks = check_task_names(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; expected names from {TASKS}")
        missing = [t for t in tasks if t not in num_outputs]
        if missing:
            raise ValueError(f"num_outputs lacks {missing}")
        self.tasks = tasks
        self.num_outputs = {t: int(num_outputs[t]) for t in tasks}
        self.input_size = check_size(input_size)

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """Validate an image batch; return its ``(H, W)``."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, 3, H, W), got {shape}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if self.grid_bound and (H, W) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.input_size[0]}x{self.input_size[1]} "
                f"inputs (its CTAL fusion weights hold one kernel per feature-grid pixel) but got "
                f"{H}x{W}. Resize the images, build the model with input_size=({H}, {W}), or call "
                f"model.resample_ctal(({H}, {W})) to re-grid the fusion weights (approximate).")
        check_size((H, W), "input")
        return H, W

    @staticmethod
    def upsample(preds: Mapping[str, Tensor], size) -> dict[str, Tensor]:
        return {t: F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                for t, p in preds.items()}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, num_outputs={self.num_outputs}, input_size={self.input_size}"
