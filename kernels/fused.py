"""Fused quadratic CTAL ("flash" CTAL, docs/design.md section 3): never writes an N x N matrix.

For a tile of queries ``i`` and keys ``j`` the diffused affinity is formed as 9T shifted dots

    M[i, j] = bias_i + sum_{t, d} (w[i, t, d] n_t[i]) . n_t[j + d]      (zero outside the grid)

and immediately multiplied with the value tile: ``y[r, i] = sum_j M[i, j] v[r, j]``,
``r = (t', c)``.
``n = x / nrm`` is formed on the fly from ``x`` and the clamped norms (computed once).

Backward recomputes tiles (there is no softmax state). With ``dM[i, j] = sum_r dy[r, i] v[r, j]``:
- query side (``fused_query_bwd_kernel``): ``U_{t,d}[i] = sum_j dM[i, j] n_t[j + d]`` gives
  ``dn_t[i] += sum_d w[i, t, d] U_{t,d}[i]``, ``dw[i, t, d] = sum_b n_t[i] . U_{t,d}[i]`` and
  ``db[i] = sum_{b, j} dM[i, j]``;
- key side (``fused_key_bwd_kernel``): ``dn_t[k] += sum_d sum_i dM[i, k - d] w[i, t, d] n_t[i]``,
  then the normalization backward gives ``dx``;
- values (``fused_value_bwd_kernel``): ``dv[r, j] = sum_i dy[r, i] M[i, j]``.
All C channels of a pixel are one tile (C <= MAX_CHANNELS).

Work: forming M as 9T shifted dots costs ``9 T C`` multiply-adds per (i, j) pair, about 5x the
``T C + 9 T`` of the literal Gram + stencil order that ``ctal.ops.flops("quadratic")`` counts;
the row-halo variant of docs/design.md section 3 would close that gap. The forward and value-backward programs
each own ``BLOCK_R`` value rows and re-form their M tile, so M is formed ``cdiv(T C, BLOCK_R)``
times (``fused_tiles``); ``kernels.fused_plan.flops`` is the resulting count that ``auto``
uses. Tile offsets inside one batch item are int32 (``item_size_reason``).
Backward multiply-adds per (i, j) pair, with R = T C: query side ``T R + 9 T C`` (dM re-formed per
task), key side ``9 T R + 9 T C`` (dM re-formed per task and shift), values
``cdiv(R, BLOCK_R) 9 T C + R``. Forming dM once per tile for all tasks and shifts is the next
saving; it needs all T accumulators in one program (or atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctal.ops.custom_op import define_op

from ._common import (NORM_EPS, acc_dtype, acc_torch_dtype, cdiv, channel_block, channel_reason,
                      check_device, dot_dtype, grid_offsets, input_precision,
                      item_size_reason, l2norm_bwd_tile, poisoned, shifted_pixels, tl, triton,
                      warps)
from .affinity import l2norm
from .fused_plan import fused_tiles


@triton.jit
def _load_normalized(x_base, nrm_base, offs_c, c_ok, pix, ok, N, ACC: tl.constexpr):
    """``n[:, pix]`` as a [BN, BC] tile (pixels x channels), zero where ``~ok``."""
    xt = tl.load(x_base + offs_c[None, :] * N + pix[:, None],
                 mask=ok[:, None] & c_ok[None, :], other=0.0).to(ACC)  # [BN, BC]
    nrm = tl.load(nrm_base + pix, mask=ok, other=1.0).to(ACC)  # [BN]
    return xt / nrm[:, None]


@triton.jit
def _m_tile(x_base, nrm_base, w_ptr, bias_ptr, offs_i, i_ok, jy, jx, j_ok, T, C, N, H, W,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_C: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """The diffused affinity tile ``M[i, j]`` [BM, BN] of one batch item (zero for keys ``j``
    outside the grid). ``x_base``/``nrm_base`` point at batch item ``b``."""
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    c_ok = offs_c < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for t in range(T):
        xt_base = x_base + t * C * N
        nt_base = nrm_base + t * N
        qn = _load_normalized(xt_base, nt_base, offs_c, c_ok, offs_i, i_ok, N, ACC)  # [BM, BC]
        for d in range(9):
            jj, ok = shifted_pixels(jy, jx, j_ok, d // 3 - 1, d % 3 - 1, H, W)  # [BN]
            kn = _load_normalized(xt_base, nt_base, offs_c, c_ok, jj, ok, N, ACC)  # [BN, BC]
            wd = tl.load(w_ptr + (offs_i * T + t) * 9 + d, mask=i_ok, other=0.0).to(ACC)  # [BM]
            acc = tl.dot((qn * wd[:, None]).to(DOT), tl.trans(kn).to(DOT), acc,
                         input_precision=PREC, out_dtype=ACC)  # [BM, BN]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_i, mask=i_ok, other=0.0).to(ACC)  # [BM]
        acc += tl.where(j_ok[None, :], bias[:, None], 0.0)
    return acc


@triton.jit
def fused_fwd_kernel(x_ptr, nrm_ptr, v_ptr, w_ptr, bias_ptr, y_ptr, T, C, N, H, W,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr):
    """``y[b, r, i] = sum_j M[b, i, j] v[b, r, j]``; grid ``(cdiv(N, BM), cdiv(T*C, BR), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    offs_i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # [BM]
    i_ok = offs_i < N
    offs_r = (pid_r * BLOCK_R).to(tl.int32) + tl.arange(0, BLOCK_R)  # [BR]
    r_ok = offs_r < R
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    v_base = v_ptr + pid_b * R * N
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        offs_j, jy, jx, j_ok = grid_offsets(j0, BLOCK_N, N, W)  # [BN]
        m = _m_tile(x_base, nrm_base, w_ptr, bias_ptr, offs_i, i_ok, jy, jx, j_ok, T, C, N, H, W,
                    HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_C, ACC, DOT, PREC)  # [BM, BN]
        vt = tl.load(v_base + offs_r[None, :] * N + offs_j[:, None],
                     mask=j_ok[:, None] & r_ok[None, :], other=0.0)  # [BN, BR]
        acc = tl.dot(m.to(DOT), vt.to(DOT), acc, input_precision=PREC, out_dtype=ACC)  # [BM, BR]
    y_offs = offs_r[None, :] * N + offs_i[:, None]  # [BM, BR]
    tl.store(y_ptr + pid_b * R * N + y_offs, acc.to(y_ptr.dtype.element_ty),
             mask=i_ok[:, None] & r_ok[None, :])


@triton.jit
def _dm_tile(dy_base, v_base, offs_i, i_ok, pix_j, ok_j, R, N,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
             ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``dM[i, j] = sum_r dy[r, i] v[r, j]`` [BM, BN] for key pixels ``pix_j`` (zero where
    ``~ok_j``)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
        r_ok = offs_r < R
        dyt = tl.load(dy_base + offs_r[None, :] * N + offs_i[:, None],
                      mask=i_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
        vt = tl.load(v_base + offs_r[:, None] * N + pix_j[None, :],
                     mask=r_ok[:, None] & ok_j[None, :], other=0.0)  # [BR, BN]
        acc = tl.dot(dyt.to(DOT), vt.to(DOT), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def fused_query_bwd_kernel(x_ptr, nrm_ptr, v_ptr, w_ptr, dy_ptr, dnq_ptr, dw_part_ptr,
                           db_part_ptr, T, C, N, H, W,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                           PREC: tl.constexpr):
    """Query-side gradients of task ``t`` for a block of queries: ``dnq[b, t, :, i]`` (ACC dtype),
    ``dw_part[b, i, t, d]`` and (from ``t == 0`` programs) ``db_part[b, i]``;
    grid ``(cdiv(N, BM), T, B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    offs_i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # [BM]
    i_ok = offs_i < N
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    c_ok = offs_c < C
    taps = tl.arange(0, 16)  # [16] the 9 taps, padded
    xt_base = x_ptr + (pid_b * T + pid_t) * C * N
    nt_base = nrm_ptr + (pid_b * T + pid_t) * N
    dy_base = dy_ptr + pid_b * R * N
    v_base = v_ptr + pid_b * R * N
    qn = _load_normalized(xt_base, nt_base, offs_c, c_ok, offs_i, i_ok, N, ACC)  # [BM, BC]
    acc_dn = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    acc_dw = tl.zeros([BLOCK_M, 16], dtype=ACC)
    acc_db = tl.zeros([BLOCK_M], dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        offs_j, jy, jx, j_ok = grid_offsets(j0, BLOCK_N, N, W)  # [BN]
        dm = _dm_tile(dy_base, v_base, offs_i, i_ok, offs_j, j_ok, R, N, BLOCK_M, BLOCK_N,
                      BLOCK_R, ACC, DOT, PREC)  # [BM, BN]
        acc_db += tl.sum(dm, 1)
        for d in range(9):
            jj, ok = shifted_pixels(jy, jx, j_ok, d // 3 - 1, d % 3 - 1, H, W)  # [BN]
            kn = _load_normalized(xt_base, nt_base, offs_c, c_ok, jj, ok, N, ACC)  # [BN, BC]
            u = tl.dot(dm.to(DOT), kn.to(DOT), input_precision=PREC, out_dtype=ACC).to(ACC)  # [BM, BC]
            wd = tl.load(w_ptr + (offs_i * T + pid_t) * 9 + d, mask=i_ok, other=0.0).to(ACC)
            acc_dn += wd[:, None] * u
            part = tl.sum(qn * u, 1)  # [BM]
            acc_dw += tl.where(taps[None, :] == d, part[:, None], 0.0)
    dn_offs = offs_c[None, :] * N + offs_i[:, None]  # [BM, BC]
    tl.store(dnq_ptr + (pid_b * T + pid_t) * C * N + dn_offs, acc_dn,
             mask=i_ok[:, None] & c_ok[None, :])
    dw_offs = ((pid_b * N + offs_i[:, None]) * T + pid_t) * 9 + taps[None, :]  # [BM, 16]
    tl.store(dw_part_ptr + dw_offs, acc_dw, mask=i_ok[:, None] & (taps[None, :] < 9))
    tl.store(db_part_ptr + pid_b * N + offs_i, acc_db, mask=i_ok & (pid_t == 0))


@triton.jit
def fused_key_bwd_kernel(x_ptr, nrm_ptr, v_ptr, w_ptr, dy_ptr, dnq_ptr, dx_ptr, T, C, N, H, W,
                         EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                         DOT: tl.constexpr, PREC: tl.constexpr):
    """Key-side ``dn_t[k] = sum_d sum_i dM[i, k - d] w[i, t, d] n_t[i]``, plus the query side
    from ``dnq``, then the normalization backward: ``dx[b, t, :, k]``;
    grid ``(cdiv(N, BN), T, B)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    offs_k, ky, kx, k_ok = grid_offsets((pid_n * BLOCK_N).to(tl.int32), BLOCK_N, N, W)  # [BN]
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    c_ok = offs_c < C
    xt_base = x_ptr + (pid_b * T + pid_t) * C * N
    nt_base = nrm_ptr + (pid_b * T + pid_t) * N
    dy_base = dy_ptr + pid_b * R * N
    v_base = v_ptr + pid_b * R * N
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for i0 in range(0, N, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)  # [BM]
        i_ok = offs_i < N
        qn = _load_normalized(xt_base, nt_base, offs_c, c_ok, offs_i, i_ok, N, ACC)  # [BM, BC]
        for d in range(9):
            jj, ok = shifted_pixels(ky, kx, k_ok, 1 - d // 3, 1 - d % 3, H, W)  # j = k - d
            dm = _dm_tile(dy_base, v_base, offs_i, i_ok, jj, ok, R, N, BLOCK_M, BLOCK_N,
                          BLOCK_R, ACC, DOT, PREC)  # [BM, BN] = dM[i, k - d]
            wd = tl.load(w_ptr + (offs_i * T + pid_t) * 9 + d, mask=i_ok, other=0.0).to(ACC)
            acc = tl.dot(tl.trans(dm * wd[:, None]).to(DOT), qn.to(DOT), acc,
                         input_precision=PREC, out_dtype=ACC)  # [BN, BC]
    # epilogue: add the query side and apply the normalization backward (channels on axis 0)
    base = (pid_b * T + pid_t) * C * N  # int64; the tile offsets below stay int32
    offs = offs_c[:, None] * N + offs_k[None, :]  # [BC, BN]
    mask = c_ok[:, None] & k_ok[None, :]
    dn = tl.trans(acc) + tl.load(dnq_ptr + base + offs, mask=mask, other=0.0).to(ACC)  # [BC, BN]
    nrm = tl.load(nt_base + offs_k, mask=k_ok, other=1.0).to(ACC)  # [BN]
    n = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) / nrm[None, :]  # [BC, BN]
    dx = l2norm_bwd_tile(n, dn, nrm, EPS)
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_value_bwd_kernel(x_ptr, nrm_ptr, w_ptr, bias_ptr, dy_ptr, dv_ptr, T, C, N, H, W,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                           DOT: tl.constexpr, PREC: tl.constexpr):
    """``dv[b, r, j] = sum_i dy[b, r, i] M[b, i, j]`` (M recomputed);
    grid ``(cdiv(N, BN), cdiv(T*C, BR), B)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    offs_j, jy, jx, j_ok = grid_offsets((pid_n * BLOCK_N).to(tl.int32), BLOCK_N, N, W)  # [BN]
    offs_r = (pid_r * BLOCK_R).to(tl.int32) + tl.arange(0, BLOCK_R)  # [BR]
    r_ok = offs_r < R
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    dy_base = dy_ptr + pid_b * R * N
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=ACC)
    for i0 in range(0, N, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)  # [BM]
        i_ok = offs_i < N
        m = _m_tile(x_base, nrm_base, w_ptr, bias_ptr, offs_i, i_ok, jy, jx, j_ok, T, C, N, H, W,
                    HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_C, ACC, DOT, PREC)  # [BM, BN]
        dyt = tl.load(dy_base + offs_r[:, None] * N + offs_i[None, :],
                      mask=r_ok[:, None] & i_ok[None, :], other=0.0)  # [BR, BM]
        acc = tl.dot(dyt.to(DOT), m.to(DOT), acc, input_precision=PREC, out_dtype=ACC)  # [BR, BN]
    dv_offs = offs_r[:, None] * N + offs_j[None, :]  # [BR, BN]
    tl.store(dv_ptr + pid_b * R * N + dv_offs, acc.to(dv_ptr.dtype.element_ty),
             mask=r_ok[:, None] & j_ok[None, :])


# --- launchers -----------------------------------------------------------------------------

def _meta(x: Tensor) -> dict:
    C = x.shape[2]
    # Wide channel tiles: more warps for the [BM, BC] operands, 2 stages to bound shared memory.
    return dict(BLOCK_C=channel_block(C), ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype),
                PREC=input_precision(x.dtype), num_warps=warps(8 if channel_block(C) >= 128 else 4),
                num_stages=2)


def _blocks(C: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_R_CHUNK)``, see ``fused_tiles``."""
    t = fused_tiles(C)
    return t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_R"], t["BLOCK_R_CHUNK"]


def _check(x: Tensor) -> None:
    check_device(x, "triton-fused")
    B, T, C, H, W = x.shape
    why = channel_reason(C) or item_size_reason(T, C, H * W)
    if why is not None:
        raise ValueError(f"triton-fused: {why}")


def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The whole CTAL op, quadratic order, without any N x N matrix in memory: ``y (B, T, C, H, W)``
    and the clamped norms ``(B, T, N)`` (saved for backward)."""
    _check(x)
    B, T, C, H, W = x.shape
    N = H * W
    nrm = l2norm(x)
    y = poisoned(x.shape, x)
    BM, BN, BR, _ = _blocks(C)
    has_bias = bias is not None
    fused_fwd_kernel[(cdiv(N, BM), cdiv(T * C, BR), B)](
        x, nrm, v, weight, bias if has_bias else weight, y, T, C, N, H, W,
        HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, **_meta(x))
    return y, nrm


def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
             nrm: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    _check(x)
    B, T, C, H, W = x.shape
    N = H * W
    acc = acc_torch_dtype(x.dtype)
    BM, BN, BR, BRC = _blocks(C)
    meta = _meta(x)
    dnq = poisoned(x.shape, x, acc)
    dw_part = poisoned((B, N, T, 9), x, acc)
    db_part = poisoned((B, N), x, acc)
    fused_query_bwd_kernel[(cdiv(N, BM), T, B)](
        x, nrm, v, weight, dy, dnq, dw_part, db_part, T, C, N, H, W,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BRC, **meta)
    dx = poisoned(x.shape, x)
    fused_key_bwd_kernel[(cdiv(N, BN), T, B)](
        x, nrm, v, weight, dy, dnq, dx, T, C, N, H, W, EPS=NORM_EPS,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BRC, **meta)
    dv = poisoned(x.shape, x)
    has_bias = bias is not None
    fused_value_bwd_kernel[(cdiv(N, BN), cdiv(T * C, BR), B)](
        x, nrm, weight, bias if has_bias else weight, dy, dv, T, C, N, H, W,
        HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, **meta)
    dw = dw_part.sum(0).reshape(N, T, 3, 3).to(x.dtype)
    db = db_part.sum(0).to(x.dtype) if has_bias else None
    return dx, dv, dw, db


def _fake(x, v, weight, bias):
    B, T, C, H, W = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(B, T, H * W, dtype=acc_torch_dtype(x.dtype)))


fused_attention = define_op("triton_fused", forward, backward, fake=_fake, saved=("nrm",))
