"""Affinity and alignment stages: L2 norms, the normalized Gram, the task interleave.

``affinity``: ``A_t[b, i, j] = n_t[:, i] . n_t[:, j]`` with ``n = x / max(||x||, eps)``. The inverse
norms are computed once (``l2norm_fwd_kernel``) and applied in the Gram epilogue, so no normalized
copy of ``x`` is written. The Gram kernel takes the output strides, so it can store either the
``(B, T, N, N)`` layout or straight into the aligned ``(B, N*T, H, W)`` layout (``interleaved``).
``align``: ``(B, T, N, N) -> (B, N*T, H, W)`` with channel ``i*T + t`` holding ``A_t[i]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ctal.ops.custom_op import define_op

from ._common import (NORM_EPS, acc_dtype, cdiv, check_device, dot_dtype, full_like,
                      input_precision, poisoned, tile, tl, triton, warps)


@triton.jit
def l2norm_fwd_kernel(x_ptr, nrm_ptr, C, N, EPS: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """``nrm[bt, n] = max(||x[bt, :, n]||, eps)``; grid ``(cdiv(N, BLOCK_N), B*T)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bt = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    x_base = x_ptr + pid_bt * C * N
    ssq = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)  # [BC]
        mask = (offs_c[:, None] < C) & n_ok[None, :]
        xt = tl.load(x_base + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        xt = xt.to(ACC)  # [BC, BN]
        ssq += tl.sum(xt * xt, 0)
    nrm = tl.maximum(tl.sqrt(ssq), full_like(ssq, EPS))
    tl.store(nrm_ptr + pid_bt * N + offs_n, nrm, mask=n_ok)


@triton.jit
def l2norm_bwd_kernel(x_ptr, nrm_ptr, dn_ptr, dx_ptr, C, N, EPS: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """``dx = (dn - n (n . dn)) / nrm`` per pixel (any C: two passes over channel blocks);
    grid ``(cdiv(N, BLOCK_N), B*T)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bt = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    base = pid_bt * C * N
    nrm = tl.load(nrm_ptr + pid_bt * N + offs_n, mask=n_ok, other=1.0).to(ACC)  # [BN]
    proj = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)  # [BC]
        mask = (offs_c[:, None] < C) & n_ok[None, :]
        offs = base + offs_c[:, None] * N + offs_n[None, :]  # [BC, BN]
        n = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) / nrm[None, :]
        dn = tl.load(dn_ptr + offs, mask=mask, other=0.0).to(ACC)
        proj += tl.sum(n * dn, 0)
    proj = tl.where(nrm > full_like(nrm, EPS), proj, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & n_ok[None, :]
        offs = base + offs_c[:, None] * N + offs_n[None, :]
        n = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) / nrm[None, :]
        dn = tl.load(dn_ptr + offs, mask=mask, other=0.0).to(ACC)
        dx = (dn - n * proj[None, :]) / nrm[None, :]  # [BC, BN]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def affinity_fwd_kernel(x_ptr, nrm_ptr, a_ptr, T, C, N,
                        stride_ab, stride_at, stride_ai,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``a[b, t, i, j] = (x_i . x_j) / (nrm_i nrm_j)`` at ``b*stride_ab + t*stride_at + i*stride_ai
    + j``; grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B*T)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_bt = tl.program_id(2).to(tl.int64)
    pid_b = pid_bt // T
    pid_t = pid_bt % T
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] (int64)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] (int64)
    i_ok = offs_i < N
    j_ok = offs_j < N
    x_base = x_ptr + pid_bt * C * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)  # [BC]
        c_ok = offs_c < C
        xi = tl.load(x_base + offs_c[None, :] * N + offs_i[:, None],
                     mask=i_ok[:, None] & c_ok[None, :], other=0.0)  # [BM, BC]
        xj = tl.load(x_base + offs_c[:, None] * N + offs_j[None, :],
                     mask=c_ok[:, None] & j_ok[None, :], other=0.0)  # [BC, BN]
        acc = tl.dot(xi.to(DOT), xj.to(DOT), acc, input_precision=PREC, out_dtype=ACC)  # [BM, BN]
    ri = 1.0 / tl.load(nrm_ptr + pid_bt * N + offs_i, mask=i_ok, other=1.0).to(ACC)  # [BM]
    rj = 1.0 / tl.load(nrm_ptr + pid_bt * N + offs_j, mask=j_ok, other=1.0).to(ACC)  # [BN]
    a = acc * ri[:, None] * rj[None, :]  # [BM, BN]
    a_offs = pid_b * stride_ab + pid_t * stride_at + offs_i[:, None] * stride_ai + offs_j[None, :]
    tl.store(a_ptr + a_offs, a.to(a_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def align_fwd_kernel(a_ptr, z_ptr, T, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``z[b, i*T + t, j] = a[b, t, i, j]``; grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B*T)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_bt = tl.program_id(2).to(tl.int64)
    pid_b = pid_bt // T
    pid_t = pid_bt % T
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    src = pid_bt * N * N + offs_i[:, None] * N + offs_j[None, :]  # [BM, BN]
    dst = pid_b * T * N * N + (offs_i[:, None] * T + pid_t) * N + offs_j[None, :]
    tl.store(z_ptr + dst, tl.load(a_ptr + src, mask=mask), mask=mask)


@triton.jit
def align_bwd_kernel(dz_ptr, da_ptr, T, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The inverse permutation: ``da[b, t, i, j] = dz[b, i*T + t, j]``; grid as the forward."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_bt = tl.program_id(2).to(tl.int64)
    pid_b = pid_bt // T
    pid_t = pid_bt % T
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask = (offs_i[:, None] < N) & (offs_j[None, :] < N)
    src = pid_b * T * N * N + (offs_i[:, None] * T + pid_t) * N + offs_j[None, :]  # [BM, BN]
    dst = pid_bt * N * N + offs_i[:, None] * N + offs_j[None, :]
    tl.store(da_ptr + dst, tl.load(dz_ptr + src, mask=mask), mask=mask)


# --- launchers -----------------------------------------------------------------------------

def l2norm(x: Tensor) -> Tensor:
    """Clamped channel norms of contiguous ``x (B, T, C, H, W)``: ``(B, T, N)`` in the
    accumulator dtype (fp32, or fp64 for fp64 inputs)."""
    B, T, C, H, W = x.shape
    N = H * W
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    nrm = poisoned((B, T, N), x, acc)
    BN = tile(128)
    l2norm_fwd_kernel[(cdiv(N, BN), B * T)](x, nrm, C, N, EPS=NORM_EPS, BLOCK_C=tile(32, 16),
                                            BLOCK_N=BN, ACC=acc_dtype(x.dtype), num_warps=warps(4))
    return nrm


def l2norm_backward(dn: Tensor, x: Tensor, nrm: Tensor) -> Tensor:
    """``dx`` from ``dn = d loss / d n`` (both contiguous ``(B, T, C, H, W)``)."""
    B, T, C, H, W = x.shape
    N = H * W
    dx = poisoned(x.shape, x)
    BN = tile(128)
    l2norm_bwd_kernel[(cdiv(N, BN), B * T)](x, nrm, dn, dx, C, N, EPS=NORM_EPS,
                                            BLOCK_C=tile(32, 16), BLOCK_N=BN,
                                            ACC=acc_dtype(x.dtype), num_warps=warps(4))
    return dx


def _affinity_forward(x: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    check_device(x, "affinity (triton)")
    B, T, C, H, W = x.shape
    N = H * W
    nrm = l2norm(x)
    if interleaved:  # z[b, i*T + t, j]
        a = poisoned((B, N * T, H, W), x)
        strides = (T * N * N, N, T * N)
    else:  # a[b, t, i, j]
        a = poisoned((B, T, N, N), x)
        strides = (T * N * N, N * N, N)
    BM, BN = tile(64), tile(64)
    grid = (cdiv(N, BM), cdiv(N, BN), B * T)
    affinity_fwd_kernel[grid](x, nrm, a, T, C, N, *strides, BLOCK_M=BM, BLOCK_N=BN,
                              BLOCK_C=tile(32, 16), ACC=acc_dtype(x.dtype),
                              DOT=dot_dtype(x.dtype), PREC=input_precision(x.dtype),
                              num_warps=warps(4))
    return a, nrm


def _affinity_backward(da: Tensor, x: Tensor, nrm: Tensor, interleaved: bool) -> Tensor:
    B, T, C, H, W = x.shape
    N = H * W
    if interleaved:
        da = da.reshape(B, N, T, N).transpose(1, 2)  # [B, T, N(query), N(key)] view
    da = da.reshape(B, T, N, N)
    n = (x.reshape(B, T, C, N) / nrm.unsqueeze(2)).to(x.dtype)  # [B, T, C, N]
    # A = n^T n: dn = n (dA + dA^T), two GEMMs on the kernel's inputs.
    dn = torch.matmul(n, da) + torch.matmul(n, da.transpose(-1, -2))
    return l2norm_backward(dn.contiguous(), x, nrm)


def _affinity_fake(x, interleaved):
    B, T, C, H, W = x.shape
    N = H * W
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = x.new_empty(B, N * T, H, W) if interleaved else x.new_empty(B, T, N, N)
    return a, x.new_empty(B, T, N, dtype=acc)


_affinity = define_op("triton_affinity", _affinity_forward, _affinity_backward, fake=_affinity_fake,
                      saved=("nrm",))


def affinity(x: Tensor, interleaved: bool = False) -> Tensor:
    """``(B, T, C, H, W) -> (B, T, N, N)``, or ``(B, N*T, H, W)`` (already aligned) when
    ``interleaved``."""
    return _affinity(x, interleaved)


affinity.forward_op = _affinity.forward_op


def _align_launch(kernel, src: Tensor, out_shape, B: int, T: int, N: int) -> Tensor:
    check_device(src, "align (triton)")
    out = poisoned(out_shape, src)
    BM, BN = tile(32), tile(64)
    kernel[(cdiv(N, BM), cdiv(N, BN), B * T)](src, out, T, N, BLOCK_M=BM, BLOCK_N=BN,
                                              num_warps=warps(4))
    return out


def _align_forward(a: Tensor, H: int, W: int) -> Tensor:
    B, T, N, _ = a.shape
    return _align_launch(align_fwd_kernel, a, (B, N * T, H, W), B, T, N)


def _align_backward(dz: Tensor, H: int, W: int) -> Tensor:
    # T from the gradient's shape, so that the (B, T, N, N) input need not be kept for backward
    B, NT, N = dz.shape[0], dz.shape[1], H * W
    return _align_launch(align_bwd_kernel, dz, (B, NT // N, N, N), B, NT // N, N)


def _align_fake(a, H, W):
    B, T, N, _ = a.shape
    return a.new_empty(B, N * T, H, W)


def _align_backward_fake(dz, H, W):
    N = H * W
    return dz.new_empty(dz.shape[0], dz.shape[1] // N, N, N)


_align = define_op("triton_align", _align_forward, _align_backward, fake=_align_fake,
                   backward_fake=_align_backward_fake)


def align(a: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, T, N, N) -> (B, N*T, H, W)``: channel ``i*T + t`` holds ``A_t[i]`` on the key grid."""
    return _align(a, int(size[0]), int(size[1]))


align.forward_op = _align.forward_op
