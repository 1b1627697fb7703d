"""Quadratic-order CTAL in PyTorch without the grouped conv: the exact same ``M`` as the literal
path, built as ``M = b + sum_{t,d} w[:, t, d] * shift_d(A_t)`` one task at a time.

The literal path's ``conv2d(groups=N)`` is very slow (on CPU its backward alone dominated a whole
CTALNet step); here the 3x3 stencil over the key grid is 9 broadcast multiply-adds per task, and
backward is explicit (GEMMs for ``M v`` and ``n^T n``, the adjoint stencil, the normalization
backward), so no ``T x N x N`` autograd graph is kept: peak extra memory is about three
``B x N x N`` buffers. This is the algorithm of docs/design.md section 3 in PyTorch, unfused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .custom_op import define_op
from .linear import _normalize, normalize_backward


def _task_affinity(nf: torch.Tensor, t: int, H: int, W: int) -> torch.Tensor:
    """``A_t`` of normalized features ``nf (B, T, C, N)`` as ``(B, N, H + 2, W + 2)``: query rows,
    zero-padded key grid."""
    a = nf[:, t].transpose(1, 2) @ nf[:, t]  # [B, N, N]
    return F.pad(a.view(a.shape[0], a.shape[1], H, W), (1, 1, 1, 1))


def diffusion_matrix(n: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``M (B, N, N)`` from normalized features ``n (B, T, C, H, W)``."""
    B, T, C, H, W = n.shape
    N = H * W
    nf = n.reshape(B, T, C, N)
    m = n.new_zeros(B, N, H, W)
    if bias is not None:
        m += bias.view(1, N, 1, 1)
    for t in range(T):
        ap = _task_affinity(nf, t, H, W)
        for d in range(9):
            dy, dx = divmod(d, 3)
            m.addcmul_(weight[:, t, dy, dx].view(1, N, 1, 1), ap[:, :, dy:dy + H, dx:dx + W])
    return m.view(B, N, N)


def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Returns ``y (B, T, C, H, W)`` and ``M (B, N, N)`` (kept for backward)."""
    n, _ = _normalize(x)
    m = diffusion_matrix(n, weight, bias)
    B, T, C, H, W = x.shape
    y = v.reshape(B, T * C, H * W) @ m.transpose(1, 2)  # [B, TC, N]
    return y.view(B, T, C, H, W), m


def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
             m: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``(dx, dv, dweight, dbias)`` of :func:`forward` (``dbias`` is None without bias)."""
    B, T, C, H, W = x.shape
    N = H * W
    n, norm = _normalize(x)
    nf = n.reshape(B, T, C, N)
    dyf, vf = dy.reshape(B, T * C, N), v.reshape(B, T * C, N)
    dm = dyf.transpose(1, 2) @ vf  # [B, N, N]: dM[i, j] = sum_tc dy[tc, i] v[tc, j]
    dv = (dyf @ m).view(B, T, C, H, W)
    dbias = dm.sum((0, 2)) if bias is not None else None
    dmg = dm.view(B, N, H, W)
    dweight = torch.empty_like(weight)
    dn = torch.empty_like(nf)
    for t in range(T):
        ap = _task_affinity(nf, t, H, W)
        dap = torch.zeros_like(ap)
        for d in range(9):
            dy_, dx_ = divmod(d, 3)
            dweight[:, t, dy_, dx_] = (dmg * ap[:, :, dy_:dy_ + H, dx_:dx_ + W]).sum((0, 2, 3))
            dap[:, :, dy_:dy_ + H, dx_:dx_ + W].addcmul_(weight[:, t, dy_, dx_].view(1, N, 1, 1), dmg)
        da = dap[:, :, 1:H + 1, 1:W + 1].reshape(B, N, N)
        dn[:, t] = nf[:, t] @ (da + da.transpose(1, 2))  # A = n^T n
    dx = normalize_backward(dn.view(B, T, C, H, W), n, norm)
    return dx, dv, dweight, dbias


def _fake(x, v, weight, bias):
    B, N = x.shape[0], x.shape[3] * x.shape[4]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(B, N, N)


quadratic_attention = define_op("quadratic", forward, backward, fake=_fake, saved=("m",))
