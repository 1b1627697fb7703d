"""Triton kernels for CTAL, one module per op family; installed as ``ctal.kernels``.

- ``affinity``: L2 norms, the normalized Gram (optionally stored task-interleaved), alignment;
- ``diffusion``: the grouped 3x3 diffusion conv producing ``M`` and propagation ``M v``;
- ``fused``: quadratic CTAL without any N x N matrix, Gram formed once per tile and the 3x3
  stencil applied to it (docs/design.md section 3);
- ``linear``: linear-order CTAL: operands prepared once as padded, aligned copies in the dot
  dtype, then GEMM kernels (the fusion weight is a per-pixel scale of an operand);
- ``staged``: the stage kernels composed into the whole op.

``ctal.ops.backends`` registers them as the backends ``triton-fused`` and ``triton-staged``
(quadratic) and ``triton-linear`` (linear), and as the stage implementations named ``triton``.
Importing this package never needs triton (the kernel modules do); when triton or a CUDA device
is missing, :func:`unsupported` says why.
"""
from __future__ import annotations

from typing import Optional

from ._common import (INTERPRET, MAX_CHANNELS, TRITON_IMPORT_ERROR, channel_reason,
                      device_reason, dtype_reason, item_size_reason)

__all__ = ["unsupported", "INTERPRET", "MAX_CHANNELS",
           "TRITON_IMPORT_ERROR"]


def unsupported(p, channel_limited: bool) -> Optional[str]:
    """Why the Triton kernels cannot run problem ``p`` (None when they can). The fused and linear
    kernels hold all channels of a pixel in one tile (``channel_limited``)."""
    why = device_reason(p.device) or dtype_reason(p.dtype)
    if why is None and channel_limited:
        why = channel_reason(p.C) or item_size_reason(p.T, p.C, p.N)
    return why
