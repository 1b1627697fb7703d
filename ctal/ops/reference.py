"""Literal CTAL: the seed paper's computation, stage by stage, materializing N x N matrices.

This is the ground truth every other backend is tested against. Layout conventions:
task features ``x`` and values ``v`` are ``(B, T, C, H, W)``, ``N = H * W``, fusion ``weight`` is
``(N, T, 3, 3)`` and ``bias`` ``(N,)`` (the grouped conv's own parameter shapes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default eps


def affinity(x: torch.Tensor) -> torch.Tensor:
    """Cosine affinity per task: ``(B, T, C, H, W) -> (B, T, N, N)``, query rows, key columns."""
    n = F.normalize(x.flatten(3), dim=2, eps=NORM_EPS)  # [B, T, C, N]
    return n.transpose(-1, -2) @ n  # [B, T, N, N]


def align(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Task-interleave affinities: ``(B, T, N, N) -> (B, N*T, H, W)``, channel ``i*T + t`` holds
    ``A_t[i]`` viewed on the key grid, so one conv group sees every task of query pixel ``i``."""
    B, T, N, _ = a.shape
    H, W = size
    return a.transpose(1, 2).reshape(B, N * T, H, W)


def diffuse(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Grouped 3x3 conv over the aligned affinities (one group per query pixel): ``-> M (B, N, N)``."""
    N = weight.shape[0]
    if z.device.type == "cpu":
        # A channels-last copy of its own, not a view: Inductor lays out CPU conv inputs
        # channels-last, and for a view that is also saved for backward it must order symbolic
        # strides, which fails once H and W are dynamic (recompiling for a second grid size).
        # The values are the same, and this conv runs about 2x faster so in eager mode on CPU.
        z = z.contiguous(memory_format=torch.channels_last)
    m = F.conv2d(z, weight, bias, padding=1, groups=N)  # [B, N, H, W]
    return m.flatten(2)


def propagate(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``y[b, t, :, i] = sum_j M[b, i, j] v[b, t, :, j]``: ``(B, N, N), (B, T, C, H, W) -> (B, T, C, H, W)``."""
    vf = v.flatten(3)  # [B, T, C, N]
    y = vf @ m.transpose(-1, -2).unsqueeze(1)  # [B, T, C, N]
    return y.view_as(v) if v.is_contiguous() else y.reshape(v.shape)


def ctal_attention(x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The four stages composed literally."""
    size = (x.shape[-2], x.shape[-1])
    return propagate(diffuse(align(affinity(x), size), weight, bias), v)
