"""Quadratic CTAL as the stage kernels composed: the Gram kernel stores straight into the aligned
layout (no separate alignment pass), then diffusion and propagation. It materializes the
affinities and ``M``; it exists to run and check the stage kernels end to end."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .affinity import affinity
from .diffusion import diffuse, propagate


def staged_attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    z = affinity(x, interleaved=True)  # [B, N*T, H, W]
    return propagate(diffuse(z, weight, bias), v)
