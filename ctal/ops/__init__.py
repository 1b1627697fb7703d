"""CTAL operators. Tensors are laid out ``(B, T, C, H, W)``; ``N = H * W``.

Stages (the seed paper's pipeline, each checked against ``ctal.ops.reference``):
``affinity(x) -> (B, T, N, N)``, ``align(a, size) -> (B, N*T, H, W)``,
``diffuse(z, weight, bias) -> (B, N, N)``, ``propagate(m, v) -> (B, T, C, H, W)``.
The whole op: ``ctal_attention(x, v, weight, bias=None, backend="auto")``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference, validate
from .dispatch import Backend, Decision, Problem, backends, decide, flops, register_backend

__all__ = ["affinity", "align", "diffuse", "propagate", "ctal_attention", "explain", "backends",
           "available_backends", "Backend", "Decision", "Problem", "flops", "register_backend",
           "reference"]


def affinity(x: Tensor, *, backend: str = "reference") -> Tensor:
    """Per-task cosine affinity ``A_t = n_t^T n_t``: ``(B, T, C, H, W) -> (B, T, N, N)``."""
    validate.features(x)
    return dispatch.stage_impl("affinity", backend)(x)


def align(a: Tensor, size: tuple[int, int], *, backend: str = "reference") -> Tensor:
    """Task-interleave: ``(B, T, N, N) -> (B, N*T, H, W)`` with channel ``i*T + t = A_t[i]``."""
    validate.values("a", a, 4, "(B, T, N, N) affinities")
    if a.shape[2] != a.shape[3]:
        raise ValueError(f"a must be (B, T, N, N) affinities, got shape {tuple(a.shape)}")
    H, W = _grid(size)
    if H * W != a.shape[2]:
        raise ValueError(f"size {H}x{W} does not match N = {a.shape[2]} of the affinities")
    return dispatch.stage_impl("align", backend)(a, (H, W))


def diffuse(z: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
            backend: str = "reference") -> Tensor:
    """Grouped 3x3 conv (one group per query pixel) over aligned affinities: ``-> M (B, N, N)``."""
    validate.values("z", z, 4, "(B, N*T, H, W) aligned affinities")
    B, NT, H, W = z.shape
    N = H * W
    if NT % N != 0:
        raise ValueError(f"z must have N*T channels with N = H*W = {N}, got {NT}")
    validate.fusion_params(weight, bias, NT // N, H, W, z, like_name="z")
    return dispatch.stage_impl("diffuse", backend)(z, weight, bias)


def propagate(m: Tensor, v: Tensor, *, backend: str = "reference") -> Tensor:
    """``y[b, t, :, i] = sum_j M[b, i, j] v[b, t, :, j]``: ``-> (B, T, C, H, W)``."""
    B, T, C, H, W = validate.features(v, "v")
    validate.values("m", m, 3, "(B, N, N) diffusion matrix")
    if tuple(m.shape) != (B, H * W, H * W):
        raise ValueError(f"m must have shape (B, N, N) = ({B}, {H * W}, {H * W}), got {tuple(m.shape)}")
    validate.same_kind("v", v, "m", m)
    return dispatch.stage_impl("propagate", backend)(m, v)


def ctal_attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                   backend: str = "auto") -> Tensor:
    """The CTAL op without the gamma blend: affinities of ``x``, diffusion by the grouped conv
    ``(weight (N, T, 3, 3), bias (N,))``, propagation of the values ``v``.

    ``backend`` is ``"auto"`` or any name in :func:`backends`; :func:`explain` tells what ``auto``
    picks and why. Every backend computes the same function as ``reference``.
    """
    validate.attention_inputs(x, v, weight, bias)
    name = decide(Problem.of(x), backend).backend
    return backends()[name].fn(x, v, weight, bias)


def explain(x: Tensor, v: Optional[Tensor] = None, weight: Optional[Tensor] = None,
            bias: Optional[Tensor] = None, *, backend: str = "auto") -> Decision:
    """The backend ``ctal_attention`` would run for these inputs, the reason, and the candidates
    with their FLOP counts and availability. ``print(explain(...))`` gives a table. ``v``,
    ``weight`` and ``bias`` are optional; when given, they are checked as ``ctal_attention``
    would check them."""
    if v is None and weight is None and bias is None:
        validate.features(x)
    elif v is None or weight is None:
        raise ValueError("explain: give v and weight together (bias is optional), or x alone")
    else:
        validate.attention_inputs(x, v, weight, bias)
    return decide(Problem.of(x), backend)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (checked on a tiny problem); none on a
    CUDA device when this machine has no GPU."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    p = Problem(1, 1, 1, 1, 1, torch.float32, device)
    return [n for n, b in backends().items() if b.unsupported(p) is None]


def _grid(size) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])



# Register the Triton / compiled-extension backends now, not lazily inside a first call that
# may be running under torch.compile (registration is not traceable).
dispatch._load_optional_backends()
