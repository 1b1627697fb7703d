"""Diffusion and propagation stages.

``diffuse``: the grouped 3x3 conv over the aligned affinities ``z (B, N*T, H, W)``, one group per
query pixel ``i`` (channels ``i*T .. i*T + T-1``), zero padding on the key grid:
``M[b, i, j] = bias_i + sum_t sum_d w[i, t, d] z[b, i*T + t, j + d]``  -> ``(B, N, N)``.
``propagate``: ``y[b, r, i] = sum_j M[b, i, j] v[b, r, j]`` with ``r = (t, c)``
-> ``(B, T, C, H, W)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctal.ops.custom_op import define_op

from ._common import (acc_dtype, acc_torch_dtype, cdiv, check_device, dot_dtype, grid_offsets,
                      input_precision, poisoned, shifted_pixels, tile, tl, triton, warps)


@triton.jit
def diffuse_fwd_kernel(z_ptr, w_ptr, bias_ptr, m_ptr, T, N, H, W,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       ACC: tl.constexpr):
    """``M[b, i, j]``; grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] queries (int64)
    i_ok = offs_i < N
    offs_j, jy, jx, j_ok = grid_offsets(pid_n * BLOCK_N, BLOCK_N, N, W)  # [BN] keys
    z_base = z_ptr + pid_b * T * N * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for t in range(T):
        row = (offs_i * T + t) * N  # [BM] start of z[b, i*T + t]
        for d in range(9):
            jj, ok = shifted_pixels(jy, jx, j_ok, d // 3 - 1, d % 3 - 1, H, W)  # [BN]
            wd = tl.load(w_ptr + (offs_i * T + t) * 9 + d, mask=i_ok, other=0.0).to(ACC)  # [BM]
            zt = tl.load(z_base + row[:, None] + jj[None, :],
                         mask=i_ok[:, None] & ok[None, :], other=0.0).to(ACC)  # [BM, BN]
            acc += wd[:, None] * zt
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_i, mask=i_ok, other=0.0).to(ACC)[:, None]
    m_offs = pid_b * N * N + offs_i[:, None] * N + offs_j[None, :]  # [BM, BN]
    tl.store(m_ptr + m_offs, acc.to(m_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def diffuse_bwd_kernel(dm_ptr, w_ptr, dz_ptr, T, N, H, W,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """``dz[b, i*T + t, k] = sum_d w[i, t, d] dM[b, i, k - d]`` (``k - d`` on the grid);
    grid ``(cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    i_ok = offs_i < N
    offs_k, ky, kx, k_ok = grid_offsets(pid_n * BLOCK_N, BLOCK_N, N, W)  # [BN]
    dm_rows = dm_ptr + pid_b * N * N + offs_i[:, None] * N  # [BM, 1]
    for t in range(T):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for d in range(9):
            jj, ok = shifted_pixels(ky, kx, k_ok, 1 - d // 3, 1 - d % 3, H, W)  # j = k - d
            wd = tl.load(w_ptr + (offs_i * T + t) * 9 + d, mask=i_ok, other=0.0).to(ACC)  # [BM]
            g = tl.load(dm_rows + jj[None, :], mask=i_ok[:, None] & ok[None, :],
                        other=0.0).to(ACC)  # [BM, BN]
            acc += wd[:, None] * g
        dz_offs = pid_b * T * N * N + (offs_i[:, None] * T + t) * N + offs_k[None, :]
        tl.store(dz_ptr + dz_offs, acc.to(dz_ptr.dtype.element_ty),
                 mask=i_ok[:, None] & k_ok[None, :])


@triton.jit
def diffuse_weight_bwd_kernel(dm_ptr, z_ptr, dw_ptr, B, T, N, H, W,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """``dw[i, t, d] = sum_b sum_j dM[b, i, j] z[b, i*T + t, j + d]``, a deterministic reduction
    (each program owns its rows); grid ``(cdiv(N, BLOCK_M), T)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    i_ok = offs_i < N
    taps = tl.arange(0, 16)  # [16] the 9 taps, padded to a power of two
    acc = tl.zeros([BLOCK_M, 16], dtype=ACC)
    for b in range(B):
        b64 = tl.cast(b, tl.int64)
        dm_rows = dm_ptr + b64 * N * N + offs_i[:, None] * N  # [BM, 1]
        z_rows = z_ptr + b64 * T * N * N + (offs_i[:, None] * T + pid_t) * N  # [BM, 1]
        for j0 in range(0, N, BLOCK_N):
            offs_j, jy, jx, j_ok = grid_offsets(j0, BLOCK_N, N, W)  # [BN]
            g = tl.load(dm_rows + offs_j[None, :], mask=i_ok[:, None] & j_ok[None, :],
                        other=0.0).to(ACC)  # [BM, BN]
            for d in range(9):
                jj, ok = shifted_pixels(jy, jx, j_ok, d // 3 - 1, d % 3 - 1, H, W)
                zt = tl.load(z_rows + jj[None, :], mask=i_ok[:, None] & ok[None, :],
                             other=0.0).to(ACC)  # [BM, BN]
                part = tl.sum(g * zt, 1)  # [BM]
                acc += tl.where(taps[None, :] == d, part[:, None], 0.0)
    dw_offs = (offs_i[:, None] * T + pid_t) * 9 + taps[None, :]  # [BM, 16]
    tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty),
             mask=i_ok[:, None] & (taps[None, :] < 9))


@triton.jit
def propagate_fwd_kernel(m_ptr, v_ptr, y_ptr, R, N, stride_mb, stride_mi, stride_mj,
                         BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``y[b, r, i] = sum_j M[b, i, j] v[b, r, j]`` with M read through its strides (the backward
    passes them swapped for ``dv = dy M``); grid ``(cdiv(N, BLOCK_M), cdiv(R, BLOCK_R), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    i_ok = offs_i < N
    r_ok = offs_r < R
    v_base = v_ptr + pid_b * R * N
    m_base = m_ptr + pid_b * stride_mb
    acc = tl.zeros([BLOCK_R, BLOCK_M], dtype=ACC)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < N
        vt = tl.load(v_base + offs_r[:, None] * N + offs_k[None, :],
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BR, BK]
        mt = tl.load(m_base + offs_i[None, :] * stride_mi + offs_k[:, None] * stride_mj,
                     mask=k_ok[:, None] & i_ok[None, :], other=0.0)  # [BK, BM] = M^T tile
        acc = tl.dot(vt.to(DOT), mt.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    y_offs = pid_b * R * N + offs_r[:, None] * N + offs_i[None, :]  # [BR, BM]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & i_ok[None, :])


# --- launchers -----------------------------------------------------------------------------

def _diffuse_forward(z: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    check_device(z, "diffuse (triton)")
    B, NT, H, W = z.shape
    N = H * W
    T = NT // N
    m = poisoned((B, N, N), z)
    BM, BN = tile(32), tile(64)
    has_bias = bias is not None
    diffuse_fwd_kernel[(cdiv(N, BM), cdiv(N, BN), B)](
        z, weight, bias if has_bias else weight, m, T, N, H, W, HAS_BIAS=has_bias,
        BLOCK_M=BM, BLOCK_N=BN, ACC=acc_dtype(z.dtype), num_warps=warps(4))
    return m


def _diffuse_backward(dm: Tensor, z: Tensor, weight: Tensor, bias: Optional[Tensor]
                      ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    has_bias = bias is not None
    B, NT, H, W = z.shape
    N = H * W
    T = NT // N
    dz = poisoned(z.shape, z)
    BM, BN = tile(32), tile(64)
    acc = acc_dtype(z.dtype)
    diffuse_bwd_kernel[(cdiv(N, BM), cdiv(N, BN), B)](dm, weight, dz, T, N, H, W, BLOCK_M=BM,
                                                      BLOCK_N=BN, ACC=acc, num_warps=warps(4))
    dw = poisoned(weight.shape, weight, acc_torch_dtype(z.dtype))
    # 8 warps: at 4, ptxas 12.8 (Triton 3.6) spills in bf16.
    diffuse_weight_bwd_kernel[(cdiv(N, BM), T)](dm, z, dw, B, T, N, H, W, BLOCK_M=BM,
                                                BLOCK_N=BN, ACC=acc, num_warps=warps(8))
    db = dm.sum((0, 2), dtype=acc_torch_dtype(z.dtype)).to(z.dtype) if has_bias else None
    return dz, dw.to(weight.dtype), db


def _diffuse_fake(z, weight, bias):
    B, NT, H, W = z.shape
    return z.new_empty(B, H * W, H * W)


diffuse = define_op("triton_diffuse", _diffuse_forward, _diffuse_backward, fake=_diffuse_fake)


def _propagate_launch(m: Tensor, v: Tensor, transpose_m: bool) -> Tensor:
    """``y[b, r, i] = sum_j M[b, i, j] v[b, r, j]`` (``M^T`` when ``transpose_m``)."""
    check_device(v, "propagate (triton)")
    B, N = m.shape[0], m.shape[1]
    R = v.numel() // (B * N)
    y = poisoned(v.shape, v)
    strides = (N * N, 1, N) if transpose_m else (N * N, N, 1)
    BR, BM = tile(64, 16), tile(64)
    propagate_fwd_kernel[(cdiv(N, BM), cdiv(R, BR), B)](
        m, v, y, R, N, *strides, BLOCK_R=BR, BLOCK_M=BM, BLOCK_K=tile(32),
        ACC=acc_dtype(v.dtype), DOT=dot_dtype(v.dtype), PREC=input_precision(v.dtype),
        num_warps=warps(4))
    return y


def _propagate_forward(m: Tensor, v: Tensor) -> Tensor:
    return _propagate_launch(m, v, transpose_m=False)


def _propagate_backward(dy: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, N = m.shape[0], m.shape[1]
    dv = _propagate_launch(m, dy, transpose_m=True)  # dv[r, j] = sum_i dy[r, i] M[i, j]
    # dM[i, j] = sum_r dy[r, i] v[r, j]: one batched GEMM (K = T*C).
    dm = torch.bmm(dy.reshape(B, -1, N).transpose(1, 2), v.reshape(B, -1, N))
    return dm, dv


def _propagate_fake(m, v):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


propagate = define_op("triton_propagate", _propagate_forward, _propagate_backward, fake=_propagate_fake)
