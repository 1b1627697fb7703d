"""Exact linear-order CTAL (docs/design.md, section 2) in PyTorch: two GEMMs, no N x N matrix.

``M[i, j] = b_i + sum_{t,d} w[i,t,d] n_t[i]^T n_t[j+d]`` is linear in the affinities, so

    y_t'[:, i] = b_i * sum_j v_t'[:, j] + sum_{t,d} (w[i,t,d] n_t[i])^T G_{t,d,t'},
    G_{t,d,t'} = sum_j n_t[j+d] v_t'[:, j]^T.

With ``P = 9*T*C`` stacked (shift d, task t, channel c) rows and ``R = T*C`` value rows:
``K (B, P, N)`` holds the shifted normalized features, ``Q (B, P, N)`` the weight-scaled ones,
``G = K V^T (B, P, R)`` and ``Y = G^T Q + sumV b^T (B, R, N)``.
``forward``/``backward`` are autograd-free bodies; :data:`linear_attention` is the custom op
made of them, :func:`traceable_attention` the forward alone under autograd (for export).
``K`` and ``Q`` are rebuilt in backward instead of being saved.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .custom_op import define_op
from .reference import NORM_EPS


def _normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``n = x / max(||x||, eps)`` over channels; returns ``n`` and the clamped norm."""
    norm = x.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)  # [B, T, 1, H, W]
    return x / norm, norm


def _shifted(n: torch.Tensor) -> torch.Tensor:
    """``K[b, d, t, c, y, x] = n[b, t, c, y+dy-1, x+dx-1]`` (zero outside): ``(B, 9, T, C, H, W)``."""
    H, W = n.shape[-2:]
    p = F.pad(n, (1, 1, 1, 1))
    return torch.stack([p[..., dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], dim=1)


def _unshift(dk: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_shifted`: ``(B, 9, T, C, H, W) -> (B, T, C, H, W)``."""
    H, W = dk.shape[-2:]
    dp = dk.new_zeros(dk.shape[0], *dk.shape[2:4], H + 2, W + 2)
    for d in range(9):
        dy, dx = divmod(d, 3)
        dp[..., dy:dy + H, dx:dx + W] += dk[:, d]
    return dp[..., 1:H + 1, 1:W + 1]


def _weight_grid(weight: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``(N, T, 3, 3) -> (9, T, 1, H, W)``, the per-query-pixel fusion weight per shift."""
    N, T = weight.shape[:2]
    return weight.reshape(H, W, T, 9).permute(3, 2, 0, 1).unsqueeze(2)


def _pixel_sum(vm: Tensor) -> Tensor:
    """``sum_j v[:, j]`` over all N pixels, ``(B, R, 1)``: in fp32 for 16-bit inputs, where a sum
    of N values overflows long before its product with a small bias does."""
    acc = torch.float32 if vm.dtype in (torch.float16, torch.bfloat16) else vm.dtype
    return vm.sum(2, keepdim=True, dtype=acc)


def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Returns ``y (B, T, C, H, W)`` and the small ``G (B, 9TC, TC)`` for reuse in backward."""
    B, T, C, H, W = x.shape
    N, P, R = H * W, 9 * T * C, T * C
    n, _ = _normalize(x)
    k = _shifted(n).reshape(B, P, N)
    vm = v.reshape(B, R, N)
    g = k @ vm.transpose(1, 2)  # [B, P, R]
    q = (n.unsqueeze(1) * _weight_grid(weight, H, W)).reshape(B, P, N)
    y = g.transpose(1, 2) @ q  # [B, R, N]
    if bias is not None:
        y = y + (_pixel_sum(vm) * bias).to(y.dtype)  # sum_j v[:, j] * b_i
    return y.reshape(B, T, C, H, W), g


def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
             g: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``(dx, dv, dweight, dbias)`` of :func:`forward` (``dbias`` is None without bias)."""
    B, T, C, H, W = x.shape
    N, P, R = H * W, 9 * T * C, T * C
    n, norm = _normalize(x)
    wgrid = _weight_grid(weight, H, W)  # [9, T, 1, H, W]
    k = _shifted(n).reshape(B, P, N)
    q = (n.unsqueeze(1) * wgrid).reshape(B, P, N)
    vm = v.reshape(B, R, N)
    dym = dy.reshape(B, R, N)

    dg = q @ dym.transpose(1, 2)  # [B, P, R]
    dq = (g @ dym).reshape(B, 9, T, C, H, W)
    dk = (dg @ vm).reshape(B, 9, T, C, H, W)
    dvm = dg.transpose(1, 2) @ k  # [B, R, N]
    dbias = None
    if bias is not None:
        dvm = dvm + (dym @ bias).unsqueeze(2)
        dbias = (dym * _pixel_sum(vm)).sum((0, 1)).to(bias.dtype)

    # Q = w * n: fold the 9 shifts back into the weight and into n.
    dweight = (dq * n.unsqueeze(1)).sum((0, 3))  # [9, T, H, W]
    dweight = dweight.permute(2, 3, 1, 0).reshape(N, T, 3, 3)
    dn = (dq * wgrid).sum(1) + _unshift(dk)
    return normalize_backward(dn, n, norm), dvm.reshape(B, T, C, H, W), dweight, dbias


def normalize_backward(dn: torch.Tensor, n: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through ``n = x / max(||x||, eps)`` (channels on dim 2); the clamp passes no
    gradient to the norm below eps."""
    proj = (n * dn).sum(2, keepdim=True)
    return (dn - torch.where(norm > NORM_EPS, n * proj, torch.zeros_like(proj))) / norm


def _fake(x, v, weight, bias):
    B, T, C = x.shape[:3]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(B, 9 * T * C, T * C)


linear_attention = define_op("linear", forward, backward, fake=_fake, saved=("g",))


def traceable_attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The same forward as plain differentiable torch ops (autograd, no custom op): what model
    export traces, since ONNX Runtime, TorchScript and ExportedProgram consumers have no
    ``ctal::`` ops. Training should keep :data:`linear_attention`, whose backward saves memory."""
    return forward(x, v, weight, bias)[0]
