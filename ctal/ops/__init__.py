"""CTAL operators. Tensors are laid out ``(B, T, C, H, W)``; ``N = H * W``.

Stages (the seed paper's pipeline, each checked against ``ctal.ops.reference``):
``affinity(x) -> (B, T, N, N)``, ``align(a, size) -> (B, N*T, H, W)``,
``diffuse(z, weight, bias) -> (B, N, N)``, ``propagate(m, v) -> (B, T, C, H, W)``.
The whole op: ``ctal_attention(x, v, weight, bias=None, backend="auto")``.

Autocast, one policy for every backend and for the stages (``ctal.ops.amp``): under
``torch.autocast`` for the inputs' device type, the floating inputs other than float64 are cast
to the autocast dtype (as for matmul-like ops) and the backend runs with autocast off, so the
forward and its backward compute in that dtype; the output has that dtype and the gradients
come back in each input's own dtype (the casts are recorded by autograd). A backend that cannot
compute in that dtype (``cpp`` and Triton under the CPU interpreter: no 16-bit) refuses with a
``RuntimeError`` saying so; ``auto`` picks among those that can.

Value checks: the inputs' shapes, dtypes and devices are always checked; NaN/Inf values only
when :class:`check_finite` (or ``CTAL_CHECK_FINITE=1``) turns that on, since it reads the values
(a device-to-host sync per tensor on CUDA, impossible inside CUDA-graph capture).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as validate
from .._checks import check_finite, check_grid, checking_finite
from . import amp, backends as _registered, reference  # noqa: F401  (registers every backend)
from .cost import Decision, backend_flops, decide, flops
from .registry import Backend, Problem, backends, check_backend, register_backend, register_stage, stage_impl

__all__ = ["affinity", "align", "diffuse", "propagate", "ctal_attention", "explain", "backends",
           "available_backends", "Backend", "Decision", "Problem", "flops", "backend_flops", "decide",
           "register_backend", "register_stage", "check_backend", "reference", "check_finite", "checking_finite"]


def affinity(x: Tensor, *, backend: str = "reference") -> Tensor:
    """Per-task cosine affinity ``A_t = n_t^T n_t``: ``(B, T, C, H, W) -> (B, T, N, N)``."""
    dtype = amp.autocast_dtype(x)
    x = amp.cast(dtype, x)
    validate.features(x)
    fn = stage_impl("affinity", backend)
    with amp.disabled(dtype, x):
        return fn(x)


def align(a: Tensor, size: tuple[int, int], *, backend: str = "reference") -> Tensor:
    """Task-interleave: ``(B, T, N, N) -> (B, N*T, H, W)`` with channel ``i*T + t = A_t[i]``."""
    dtype = amp.autocast_dtype(a)
    a = amp.cast(dtype, a)
    validate.values("a", a, 4, "(B, T, N, N) affinities")
    if a.shape[2] != a.shape[3]:
        raise ValueError(f"a must be (B, T, N, N) affinities, got shape {tuple(a.shape)}")
    H, W = check_grid(size)
    if H * W != a.shape[2]:
        raise ValueError(f"size {H}x{W} does not match N = {a.shape[2]} of the affinities")
    fn = stage_impl("align", backend)
    with amp.disabled(dtype, a):
        return fn(a, (H, W))


def diffuse(z: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
            backend: str = "reference") -> Tensor:
    """Grouped 3x3 conv (one group per query pixel) over aligned affinities: ``-> M (B, N, N)``."""
    dtype = amp.autocast_dtype(z)
    z, weight, bias = (amp.cast(dtype, t) for t in (z, weight, bias))
    validate.values("z", z, 4, "(B, N*T, H, W) aligned affinities")
    B, NT, H, W = z.shape
    N = H * W
    if NT % N != 0:
        raise ValueError(f"z must have N*T channels with N = H*W = {N}, got {NT}")
    validate.fusion_params(weight, bias, NT // N, H, W, z, like_name="z")
    fn = stage_impl("diffuse", backend)
    with amp.disabled(dtype, z):
        return fn(z, weight, bias)


def propagate(m: Tensor, v: Tensor, *, backend: str = "reference") -> Tensor:
    """``y[b, t, :, i] = sum_j M[b, i, j] v[b, t, :, j]``: ``-> (B, T, C, H, W)``."""
    dtype = amp.autocast_dtype(v)
    m, v = amp.cast(dtype, m), amp.cast(dtype, v)
    B, T, C, H, W = validate.features(v, "v")
    validate.values("m", m, 3, "(B, N, N) diffusion matrix")
    if tuple(m.shape) != (B, H * W, H * W):
        raise ValueError(f"m must have shape (B, N, N) = ({B}, {H * W}, {H * W}), got {tuple(m.shape)}")
    validate.same_kind("v", v, "m", m)
    fn = stage_impl("propagate", backend)
    with amp.disabled(dtype, v):
        return fn(m, v)


def ctal_attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                   backend: str = "auto") -> Tensor:
    """The CTAL op without the gamma blend: affinities of ``x``, diffusion by the grouped conv
    ``(weight (N, T, 3, 3), bias (N,))``, propagation of the values ``v``.

    ``backend`` is ``"auto"`` or any name in :func:`backends`; :func:`explain` tells what ``auto``
    picks and why. Every backend computes the same function as ``reference``.

    Under ``torch.autocast`` the inputs (float64 ones excepted) are cast to the autocast dtype and
    the backend runs with autocast off, so forward and backward compute in that dtype: the output
    has it, the gradients have each input's own dtype. A backend that cannot run that dtype
    raises a ``RuntimeError`` saying so. NaN/Inf inputs are an error only while
    :class:`check_finite` is on.
    """
    dtype = amp.autocast_dtype(x)
    x, v, weight, bias = (amp.cast(dtype, t) for t in (x, v, weight, bias))
    validate.attention_inputs(x, v, weight, bias)
    name = decide(Problem.of(x), backend, note=amp.refusal_note(dtype, x),
                  backward=_needs_backward(x, v, weight, bias)).backend
    with amp.disabled(dtype, x):
        return backends()[name].fn(x, v, weight, bias)


def _needs_backward(*tensors: Optional[Tensor]) -> bool:
    """Whether this call will be differentiated: then ``auto`` compares forward plus backward
    FLOPs (the kernels' backward work is not a fixed multiple of their forward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def explain(x: Tensor, v: Optional[Tensor] = None, weight: Optional[Tensor] = None,
            bias: Optional[Tensor] = None, *, backend: str = "auto") -> Decision:
    """The backend ``ctal_attention`` would run for these inputs, the reason, and the candidates
    with their FLOP counts and availability. ``print(explain(...))`` gives a table. ``v``,
    ``weight`` and ``bias`` are optional; when given, they are checked as ``ctal_attention``
    would check them. Under ``torch.autocast`` the decision is for the autocast dtype, as in
    ``ctal_attention``; like it, FLOPs are forward plus backward when an input requires grad."""
    dtype = amp.autocast_dtype(x)
    if v is None and weight is None and bias is None:
        validate.features(x)
    elif v is None or weight is None:
        raise ValueError("explain: give v and weight together (bias is optional), or x alone")
    else:
        validate.attention_inputs(*(amp.cast(dtype, t) for t in (x, v, weight, bias)))
    p = dataclasses.replace(Problem.of(x), dtype=amp.compute_dtype(x))
    return decide(p, backend, note=amp.refusal_note(dtype, x),
                  backward=_needs_backward(x, v, weight, bias))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (checked on a tiny problem); none on a
    CUDA device when this machine has no GPU."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    p = Problem(1, 1, 1, 1, 1, torch.float32, device)
    return [n for n, b in backends().items() if b.unsupported(p) is None]
