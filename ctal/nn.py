"""``CrossTaskAffinity``: the CTAL block as a module (value projections, fusion conv, blend)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._checks import TaskOrderState, check_grid, check_task_names


class CrossTaskAffinity(TaskOrderState, nn.Module):
    """Cross-Task Affinity Learning on a fixed ``H x W`` grid.

    Per task ``t``: values ``v_t = proj_t(x_t)`` (3x3 conv, C -> C, with bias); one diffusion
    matrix ``M`` from all tasks' cosine affinities through a grouped 3x3 conv whose parameters are
    ``weight (H*W, T, 3, 3)`` and ``bias (H*W,)``; output ``gamma * M v_t + (1 - gamma) * x_t``.

    Args:
        tasks: task names (or their count; names are then ``"0"``, ``"1"``, ...): identifiers
            or plain numbers, not attributes of ``nn.ModuleDict`` (see ``check_task_names``).
        channels: feature channels C of every task.
        size: the feature grid ``(H, W)`` the fusion weights are built for.
        gamma: blend of the propagated features (the paper uses 0.05).
        backend: any ``ctal.ops`` backend name, or ``"auto"``; a validated attribute, may be
            changed at any time (an unknown name is a ValueError naming the valid ones).

    ``size`` is read-only: :meth:`resample` re-grids the fusion weights to another grid. The
    state dict records the grid (``grid_size``) and the task order (``task_order``): the fusion
    weight is indexed by query pixel and task position, so loading the state of another grid or
    of the same tasks in another order is a ``ValueError`` (states saved without these records
    still load).
    """

    def __init__(self, tasks: Union[Sequence[str], int], channels: int, size: tuple[int, int],
                 gamma: float = 0.05, backend: str = "auto"):
        super().__init__()
        if isinstance(tasks, int) and not isinstance(tasks, bool) and tasks > 0:
            tasks = [str(i) for i in range(tasks)]
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
            raise ValueError(f"tasks must be a list of task names or a positive count, got {tasks!r}")
        tasks = check_task_names(tasks)
        if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if (not isinstance(gamma, (int, float)) or isinstance(gamma, bool)
                or not 0.0 <= float(gamma) <= 1.0):
            raise ValueError(f"gamma must be a number in [0, 1] (the paper uses 0.05), got {gamma!r}")
        self._size = check_grid(size)
        self._backend = ops.check_backend(backend)
        self.tasks = tasks
        self.channels = channels
        self.gamma = float(gamma)
        T, N = len(tasks), self.size[0] * self.size[1]
        self.proj = nn.ModuleDict({t: nn.Conv2d(channels, channels, 3, padding=1) for t in tasks})
        self.weight = nn.Parameter(torch.empty(N, T, 3, 3))
        self.bias = nn.Parameter(torch.empty(N))
        # The grid is part of the state: fusion weights of a 5x6 grid have the shape of a 6x5
        # grid's, and loading them there would put every kernel on the wrong pixel.
        self.register_buffer("grid_size", torch.tensor(self._size))
        self.reset_fusion_parameters()

    @property
    def size(self) -> tuple[int, int]:
        """The ``(H, W)`` feature grid the fusion weights are built for (change it with
        :meth:`resample`)."""
        return self._size

    @property
    def backend(self) -> str:
        """The ``ctal.ops`` backend the op runs with (``"auto"`` or a name in ``ops.backends()``)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = ops.check_backend(name)

    @torch.no_grad()
    def resample(self, size: tuple[int, int], rescale: bool = True) -> "CrossTaskAffinity":
        """Re-grid the per-query fusion kernels to a new ``(H, W)`` feature grid, in place; returns
        ``self``. A resample to the current size changes nothing (same parameter objects).

        Each query pixel owns a ``(T, 3, 3)`` kernel and a bias; they are treated as a ``9T + 1``
        channel image over the query grid and resized bilinearly (antialiased when shrinking).
        With ``rescale`` the result is multiplied by ``N_old / N_new``: ``y_i = sum_j M_ij v_j``
        sums over all ``N`` keys, so keeping the per-key weight makes the output grow with ``N``.

        This is an approximation, not an equivalence: the 3x3 stencil still spans one key cell,
        which covers a different image distance on the new grid, and the learned kernels of
        neighbouring queries are blended. Fine-tune after resampling. New ``nn.Parameter``
        objects replace ``weight`` and ``bias``, so create the optimizer afterwards.
        """
        H1, W1 = check_grid(size)
        H0, W0 = self._size
        if (H0, W0) == (H1, W1):
            return self
        T = len(self.tasks)
        w = self.weight.detach().reshape(H0, W0, T * 9).permute(2, 0, 1)  # [9T, H0, W0]
        b = self.bias.detach().reshape(1, H0, W0)
        img = torch.cat([w, b], dim=0)[None]
        shrink = H1 < H0 or W1 < W0
        img = F.interpolate(img, size=(H1, W1), mode="bilinear", align_corners=False, antialias=shrink)[0]
        if rescale:
            img = img * (H0 * W0) / (H1 * W1)
        new_w = img[:-1].permute(1, 2, 0).reshape(H1 * W1, T, 3, 3).contiguous()
        new_b = img[-1].reshape(H1 * W1).contiguous()
        self.weight = nn.Parameter(new_w, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(new_b, requires_grad=self.bias.requires_grad)
        self._size = (H1, W1)
        self.grid_size.copy_(torch.tensor(self._size))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "grid_size"
        if key in state_dict:
            got = tuple(int(s) for s in state_dict[key].tolist())
            if got != self._size:
                raise ValueError(
                    f"{prefix or 'state'}: these fusion weights were trained on a {got[0]}x{got[1]} "
                    f"feature grid, this module is built for {self._size[0]}x{self._size[1]}; build "
                    f"it for {got} (or load into a {got} module and .resample({self._size}))")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys:  # saved before the grid was recorded
            missing_keys.remove(key)

    def reset_fusion_parameters(self) -> None:
        """Initialize the fusion weight/bias exactly like ``nn.Conv2d(N*T, N, 3, groups=N)``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight.shape[1] * 9
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"tasks={self.tasks}, channels={self.channels}, size={self.size}, "
                f"gamma={self.gamma}, backend={self.backend!r}")

    def _stack(self, x: Union[Mapping[str, Tensor], Tensor]) -> Tensor:
        if isinstance(x, Mapping):
            missing = [t for t in self.tasks if t not in x]
            extra = [t for t in x if t not in self.tasks]
            if missing or extra:
                raise ValueError(f"task features must have exactly the keys {self.tasks}; missing "
                                 f"{missing}, unexpected {extra}")
            first = x[self.tasks[0]]
            for t in self.tasks:
                f = x[t]
                if not isinstance(f, Tensor) or f.dim() != 4:
                    raise ValueError(f"features of task {t!r} must be a (B, C, H, W) tensor, got "
                                     f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
                if f.shape != first.shape:
                    raise ValueError(f"features of task {t!r} have shape {tuple(f.shape)}, task "
                                     f"{self.tasks[0]!r} has {tuple(first.shape)}; all tasks need "
                                     f"the same (B, {self.channels}, {self.size[0]}, {self.size[1]})")
            x = torch.stack([x[t] for t in self.tasks], dim=1)
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError("x must be a dict of (B, C, H, W) task features or a (B, T, C, H, W) tensor")
        _, T, C, H, W = x.shape
        if T != len(self.tasks) or C != self.channels:
            raise ValueError(f"expected {len(self.tasks)} tasks x {self.channels} channels, got T={T}, C={C}")
        if (H, W) != self.size:
            raise ValueError(
                f"input grid {H}x{W} differs from the {self.size[0]}x{self.size[1]} grid this module's "
                f"fusion weights were built for; build the module for this size "
                f"(or re-grid the weights explicitly with .resample(({H}, {W})))")
        return x

    def forward(self, x: Union[Mapping[str, Tensor], Tensor]):
        """``x``: dict task -> ``(B, C, H, W)`` or a ``(B, T, C, H, W)`` tensor; same type back."""
        as_dict = isinstance(x, Mapping)
        xs = self._stack(x)
        v = torch.stack([self.proj[t](xs[:, i]) for i, t in enumerate(self.tasks)], dim=1)
        # Under autocast the projections may return bf16/fp16 while x and the fusion parameters are
        # fp32; the op wants one dtype, so everything runs in the wider of the two.
        dtype = torch.promote_types(xs.dtype, v.dtype)
        y = ops.ctal_attention(xs.to(dtype), v.to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                               backend=self.backend)
        out = self.gamma * y + (1 - self.gamma) * xs
        if as_dict:
            return {t: out[:, i] for i, t in enumerate(self.tasks)}
        return out
