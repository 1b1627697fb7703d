"""Triton kernels for CTAL, one module per op family; installed as ``ctal.kernels``.

- ``affinity``: L2 norms, the normalized Gram (optionally stored task-interleaved), alignment;
- ``diffusion``: the grouped 3x3 diffusion conv producing ``M`` and propagation ``M v``;
- ``fused``: quadratic CTAL without any N x N matrix (docs/design.md section 3);
- ``linear``: linear-order CTAL with the shifted / weight-scaled operands formed in the GEMMs.

``register_backends()`` (called by ``ctal.ops`` on first backend lookup) registers the backends
``triton-staged`` and ``triton-fused`` (quadratic), ``triton-linear`` (linear) and the stage
implementations named ``triton``. Importing this package never needs triton; when triton or a
CUDA device is missing the backends report why through ``unsupported``.
"""
from __future__ import annotations

from typing import Callable, Optional

from ._common import (INTERPRET, MAX_CHANNELS, TRITON_IMPORT_ERROR, channel_reason,
                      device_reason, dtype_reason, fused_tiles, item_size_reason)

__all__ = ["register_backends", "staged_attention", "INTERPRET", "MAX_CHANNELS"]

_REGISTERED = False


def staged_attention(x, v, weight, bias=None):
    """The four stage kernels composed: the Gram kernel stores straight into the aligned layout
    (no separate alignment pass), then diffusion and propagation."""
    from . import affinity, diffusion
    z = affinity.affinity(x, interleaved=True)  # [B, N*T, H, W]
    return diffusion.propagate(diffusion.diffuse(z, weight, bias), v)


def _reason(p, channel_limited: bool) -> Optional[str]:
    why = device_reason(p.device) or dtype_reason(p.dtype)
    if why is None and channel_limited:  # the fused and linear kernels
        why = channel_reason(p.C) or item_size_reason(p.T, p.C, p.N)
    return why


def _missing(what: str) -> Callable:
    def fail(*args, **kwargs):
        raise RuntimeError(f"{what}: {TRITON_IMPORT_ERROR}")
    return fail


def fused_flops(p) -> int:
    """Forward work of the fused kernel as launched: each program forms its tile of ``M[i, j]``
    as 9T shifted dot products of length C (no separate Gram plus 3x3 stencil) for
    ``BLOCK_R`` of the ``T*C`` value rows, so M is formed ``cdiv(TC, BLOCK_R)`` times:
    ``2 B N^2 (cdiv(TC, BLOCK_R) 9TC + TC)``."""
    R = p.T * p.C
    forms = -(-R // fused_tiles(p.C)["BLOCK_R"])
    return 2 * p.B * p.N * p.N * (forms * 9 * R + R)


def register_backends() -> None:
    """Register the Triton backends and stage implementations with ``ctal.ops.dispatch``."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from ctal.ops.dispatch import Backend, register_backend, register_stage

    if TRITON_IMPORT_ERROR is None:
        from . import affinity, diffusion, fused, linear
        fused_fn, linear_fn, staged_fn = (fused.fused_attention, linear.linear_attention,
                                          staged_attention)
        stages = dict(affinity=lambda x: affinity.affinity(x), align=affinity.align,
                      diffuse=diffusion.diffuse, propagate=diffusion.propagate)
    else:
        fused_fn, linear_fn, staged_fn = (_missing("triton-fused"), _missing("triton-linear"),
                                          _missing("triton-staged"))
        stages = {s: _missing(f"{s} (triton)") for s in ("affinity", "align", "diffuse",
                                                         "propagate")}

    register_backend(Backend("triton-fused", "quadratic", "triton", fused_fn,
                             lambda p: _reason(p, channel_limited=True), cost=fused_flops))
    register_backend(Backend("triton-linear", "linear", "triton", linear_fn,
                             lambda p: _reason(p, channel_limited=True)))
    # The staged path materializes the affinities and M (it exists to run and check the stage
    # kernels); ``auto`` prefers the fused kernel, which does the same algorithm in O(N) memory.
    register_backend(Backend("triton-staged", "quadratic", "triton", staged_fn,
                             lambda p: _reason(p, channel_limited=False),
                             auto_eligible=False, materializes_nxn=True))
    for stage, fn in stages.items():
        register_stage(stage, "triton", fn)
