"""Linear-order CTAL (docs/design.md section 2) with the shifted / weight-scaled operands formed on the fly.

Index conventions follow ``ctal.ops.linear``: ``P = 9*T*C`` stacked rows ``p = d*T*C + t*C + c``
(shift ``d = 3*dy + dx``, task ``t``, channel ``c``) and ``R = T*C`` value rows ``r = t'*C + c'``.
The operands, never written to memory, are

    K~[p, j] = n_t[c, j + d]            (zero outside the grid)   plus row P:  1
    Q~[p, i] = w[i, t, d] n_t[c, i]                                plus row P:  bias_i (or 0)

The extra row carries the bias term: ``G = K~ V^T`` (``(P+1) x R``, row P = sum_j v[:, j]) and
``Y = G^T Q~`` is then exactly ``sum_{t,d} q^T G + b_i sum_j v``. Row P, a sum over all pixels,
is applied in the accumulator dtype after the dot loop, never cast to a 16-bit dot operand. Backward, with ``dY``:
``dG = Q~ dY^T`` (same kernel as G), ``dV = dG^T K~`` (same kernel as Y; row P gives ``b^T dY``),
and ``linear_bwd_kernel`` forms ``dQ~ = G dY`` and ``dK~ = dG V`` tile by tile, folding them into
``dn`` (un-shifting dK~ by reading V at ``k - d``), ``dw``, ``db`` and the normalization backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctal.ops.custom_op import define_op

from ._common import (NORM_EPS, acc_dtype, acc_torch_dtype, cdiv, channel_block, channel_reason,
                      check_device, dot_dtype, grid_offsets, input_precision, item_size_reason,
                      l2norm_bwd_tile, poisoned, shifted_pixels, tl, triton, warps)
from .affinity import l2norm
from .linear_plan import linear_tiles


@triton.jit
def _operand_tile(x_base, nrm_base, w_ptr, bias_ptr, offs_p, offs_n, ny, nx, n_ok, T, C, N, H, W,
                  IS_QUERY: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Rows ``offs_p`` [BP] x pixels ``offs_n`` [BN] of ``Q~`` (``IS_QUERY``) or ``K~``, for one
    batch item (``x_base``/``nrm_base`` point at it) -> [BP, BN]."""
    P = 9 * T * C
    d = offs_p // (T * C)  # [BP] shift
    t = (offs_p // C) % T  # [BP] task
    c = offs_p % C  # [BP] channel
    main = offs_p < P
    if IS_QUERY:
        pix = offs_n[None, :] + 0 * offs_p[:, None]  # [BP, BN]
        ok = main[:, None] & n_ok[None, :]
    else:
        sy = ny[None, :] + (d // 3 - 1)[:, None]  # [BP, BN]
        sx = nx[None, :] + (d % 3 - 1)[:, None]
        ok = main[:, None] & n_ok[None, :] & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
        pix = sy * W + sx
    xt = tl.load(x_base + (t * C + c)[:, None] * N + pix, mask=ok, other=0.0).to(ACC)
    nrm = tl.load(nrm_base + t[:, None] * N + pix, mask=ok, other=1.0).to(ACC)
    val = xt / nrm  # [BP, BN]
    extra = (offs_p == P)[:, None] & n_ok[None, :]  # [BP, BN] the bias / ones row
    if IS_QUERY:
        wd = tl.load(w_ptr + (offs_n[None, :] * T + t[:, None]) * 9 + d[:, None], mask=ok,
                     other=0.0).to(ACC)
        val = val * wd
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)  # [BN]
            val = tl.where(extra, bias[None, :], val)
    else:
        val = tl.where(extra, 1.0, val)
    return val


@triton.jit
def linear_state_fwd_kernel(x_ptr, nrm_ptr, w_ptr, bias_ptr, src_ptr, s_ptr, T, C, N, H, W,
                            IS_QUERY: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                            ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``S[b, p, r] = sum_n Op[p, n] src[b, r, n]``: ``G = K~ V^T`` or ``dG = Q~ dY^T``;
    ``S`` is ``(B, P+1, R)`` in the ACC dtype; grid ``(cdiv(P+1, BP), cdiv(R, BR), B)``."""
    pid_p = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    P1 = 9 * R + 1
    offs_p = (pid_p * BLOCK_P).to(tl.int32) + tl.arange(0, BLOCK_P)  # [BP]
    offs_r = (pid_r * BLOCK_R).to(tl.int32) + tl.arange(0, BLOCK_R)  # [BR]
    r_ok = offs_r < R
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    src_base = src_ptr + pid_b * R * N
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n, ny, nx, n_ok = grid_offsets(n0, BLOCK_N, N, W)  # [BN]
        op = _operand_tile(x_base, nrm_base, w_ptr, bias_ptr, offs_p, offs_n, ny, nx, n_ok,
                           T, C, N, H, W, IS_QUERY, HAS_BIAS, ACC)  # [BP, BN]
        st = tl.load(src_base + offs_r[None, :] * N + offs_n[:, None],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # [BN, BR]
        acc = tl.dot(op.to(DOT), st.to(DOT), acc, input_precision=PREC, out_dtype=ACC)  # [BP, BR]
    s_offs = (pid_b * P1 + offs_p[:, None]) * R + offs_r[None, :]  # [BP, BR]
    tl.store(s_ptr + s_offs, acc, mask=(offs_p[:, None] < P1) & r_ok[None, :])


@triton.jit
def linear_out_fwd_kernel(x_ptr, nrm_ptr, w_ptr, bias_ptr, s_ptr, out_ptr, T, C, N, H, W,
                          IS_QUERY: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``out[b, r, n] = sum_p S[b, p, r] Op[p, n]``: ``Y = G^T Q~`` or ``dV = dG^T K~``;
    grid ``(cdiv(N, BN), cdiv(R, BR), B)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    P1 = 9 * R + 1
    offs_n, ny, nx, n_ok = grid_offsets((pid_n * BLOCK_N).to(tl.int32), BLOCK_N, N, W)  # [BN]
    offs_r = (pid_r * BLOCK_R).to(tl.int32) + tl.arange(0, BLOCK_R)  # [BR]
    r_ok = offs_r < R
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    s_base = s_ptr + pid_b * P1 * R
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=ACC)
    for p0 in range(0, P1 - 1, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)  # [BP]
        st = tl.load(s_base + offs_p[None, :] * R + offs_r[:, None],
                     mask=r_ok[:, None] & (offs_p[None, :] < P1 - 1), other=0.0)  # [BR, BP]
        op = _operand_tile(x_base, nrm_base, w_ptr, bias_ptr, offs_p, offs_n, ny, nx, n_ok,
                           T, C, N, H, W, IS_QUERY, HAS_BIAS, ACC)  # [BP, BN]
        acc = tl.dot(st.to(DOT), op.to(DOT), acc, input_precision=PREC, out_dtype=ACC)  # [BR, BN]
    # The bias row P (a sum over all N pixels: sum_j v[:, j] in G, sum_i b_i dy[:, i] in dG) stays
    # in the accumulator dtype: cast to fp16 for the dot it overflows at realistic N.
    s_bias = tl.load(s_base + (P1 - 1) * R + offs_r, mask=r_ok, other=0.0).to(ACC)  # [BR]
    if IS_QUERY:
        if HAS_BIAS:
            b_n = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)  # [BN]
            acc += s_bias[:, None] * b_n[None, :]
    else:
        acc += s_bias[:, None] * tl.where(n_ok, 1.0, 0.0).to(ACC)[None, :]
    out_offs = pid_b * R * N + offs_r[:, None] * N + offs_n[None, :]  # [BR, BN]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def linear_bwd_kernel(x_ptr, nrm_ptr, v_ptr, w_ptr, dy_ptr, g_ptr, dg_ptr, dx_ptr, dw_part_ptr,
                      db_part_ptr, T, C, N, H, W, EPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """For task ``t`` and a block of pixels: ``dn = sum_d w_d dQ~_d + sum_d dK~_d(k - d)`` with
    ``dQ~ = G dY``, ``dK~ = dG V`` formed per tile, then ``dx`` (normalization backward),
    ``dw_part[b, n, t, d] = n . dQ~_d`` and (``t == 0``) ``db_part[b, n] = dQ~[P, n]``;
    grid ``(cdiv(N, BN), T, B)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * C
    P1 = 9 * R + 1
    offs_n, ny, nx, n_ok = grid_offsets((pid_n * BLOCK_N).to(tl.int32), BLOCK_N, N, W)  # [BN]
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    c_ok = offs_c < C
    taps = tl.arange(0, 16)  # [16] the 9 taps, padded
    xt_base = (pid_b * T + pid_t) * C * N  # int64 base of task t; tile offsets stay int32
    xn_offs = offs_c[:, None] * N + offs_n[None, :]  # [BC, BN]
    xn_mask = c_ok[:, None] & n_ok[None, :]
    nrm = tl.load(nrm_ptr + (pid_b * T + pid_t) * N + offs_n, mask=n_ok, other=1.0).to(ACC)
    n = tl.load(x_ptr + xt_base + xn_offs, mask=xn_mask, other=0.0).to(ACC) / nrm[None, :]  # [BC, BN]
    g_base = g_ptr + pid_b * P1 * R
    dg_base = dg_ptr + pid_b * P1 * R
    dy_base = dy_ptr + pid_b * R * N
    v_base = v_ptr + pid_b * R * N
    acc_dn = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    acc_dw = tl.zeros([16, BLOCK_N], dtype=ACC)
    for d in range(9):
        rows = d * R + pid_t * C + offs_c  # [BC] rows (d, t, c) of G / dG
        jj, ok = shifted_pixels(ny, nx, n_ok, 1 - d // 3, 1 - d % 3, H, W)  # j = n - d
        dq = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
        dk = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
            r_ok = offs_r < R
            s_offs = rows[:, None] * R + offs_r[None, :]  # [BC, BR]
            s_mask = c_ok[:, None] & r_ok[None, :]
            gt = tl.load(g_base + s_offs, mask=s_mask, other=0.0)  # [BC, BR]
            dgt = tl.load(dg_base + s_offs, mask=s_mask, other=0.0)  # [BC, BR]
            dyt = tl.load(dy_base + offs_r[:, None] * N + offs_n[None, :],
                          mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
            vt = tl.load(v_base + offs_r[:, None] * N + jj[None, :],
                         mask=r_ok[:, None] & ok[None, :], other=0.0)  # [BR, BN] v at n - d
            dq = tl.dot(gt.to(DOT), dyt.to(DOT), dq, input_precision=PREC, out_dtype=ACC)  # [BC, BN]
            dk = tl.dot(dgt.to(DOT), vt.to(DOT), dk, input_precision=PREC, out_dtype=ACC)  # [BC, BN]
        wd = tl.load(w_ptr + (offs_n * T + pid_t) * 9 + d, mask=n_ok, other=0.0).to(ACC)  # [BN]
        acc_dn += dq * wd[None, :] + dk
        part = tl.sum(dq * n, 0)  # [BN]
        acc_dw += tl.where(taps[:, None] == d, part[None, :], 0.0)
    dx = l2norm_bwd_tile(n, acc_dn, nrm, EPS)  # [BC, BN]
    tl.store(dx_ptr + xt_base + xn_offs, dx.to(dx_ptr.dtype.element_ty), mask=xn_mask)
    dw_offs = (offs_n[None, :] * T + pid_t) * 9 + taps[:, None]  # [16, BN]
    tl.store(dw_part_ptr + pid_b * N * T * 9 + dw_offs, acc_dw,
             mask=(taps[:, None] < 9) & n_ok[None, :])
    if HAS_BIAS:
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
            r_ok = offs_r < R
            g_last = tl.load(g_base + 9 * R * R + offs_r, mask=r_ok, other=0.0)  # [BR] row P
            dyt = tl.load(dy_base + offs_r[:, None] * N + offs_n[None, :],
                          mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)  # [BR, BN]
            db += tl.sum(g_last.to(ACC)[:, None] * dyt, 0)
        tl.store(db_part_ptr + pid_b * N + offs_n, db, mask=n_ok & (pid_t == 0))


# --- launchers -----------------------------------------------------------------------------

def _meta(x: Tensor) -> dict:
    # 8 warps: at 4 the [64, 64] accumulator plus the on-the-fly operand tile spill registers
    # (sm_90, C = 128; see benchmarks/RESOURCES.md).
    return dict(ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype), PREC=input_precision(x.dtype),
                num_warps=warps(8))


def _state(x, nrm, weight, bias, src, is_query: bool) -> Tensor:
    B, T, C, H, W = x.shape
    N, R = H * W, T * C
    P1 = 9 * R + 1
    s = poisoned((B, P1, R), x, acc_torch_dtype(x.dtype))
    t = linear_tiles(C)["state"]
    has_bias = bias is not None
    linear_state_fwd_kernel[(cdiv(P1, t["BLOCK_P"]), cdiv(R, t["BLOCK_R"]), B)](
        x, nrm, weight, bias if has_bias else weight, src, s, T, C, N, H, W,
        IS_QUERY=is_query, HAS_BIAS=has_bias, **t, **_meta(x))
    return s


def _out(x, nrm, weight, bias, s, is_query: bool) -> Tensor:
    B, T, C, H, W = x.shape
    N, R = H * W, T * C
    out = poisoned(x.shape, x)
    t = linear_tiles(C)["out"]
    has_bias = bias is not None
    linear_out_fwd_kernel[(cdiv(N, t["BLOCK_N"]), cdiv(R, t["BLOCK_R"]), B)](
        x, nrm, weight, bias if has_bias else weight, s, out, T, C, N, H, W,
        IS_QUERY=is_query, HAS_BIAS=has_bias, **t, **_meta(x))
    return out


def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]
            ) -> tuple[Tensor, Tensor, Tensor]:
    """The whole CTAL op in linear order (two GEMM kernels, O(N C) memory): ``y``,
    ``G (B, 9TC+1, TC)`` (ACC dtype) and the clamped norms ``(B, T, N)``."""
    check_device(x, "triton-linear")
    why = item_size_reason(x.shape[1], x.shape[2], x.shape[3] * x.shape[4])
    if why is not None:
        raise ValueError(f"triton-linear: {why}")
    nrm = l2norm(x)
    g = _state(x, nrm, weight, bias, v, is_query=False)  # G = K~ V^T
    y = _out(x, nrm, weight, bias, g, is_query=True)  # Y = G^T Q~
    return y, g, nrm


def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
             g: Tensor, nrm: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    check_device(x, "triton-linear")
    why = channel_reason(x.shape[2])
    if why is not None:
        raise ValueError(f"triton-linear backward: {why}")
    B, T, C, H, W = x.shape
    N = H * W
    acc = acc_torch_dtype(x.dtype)
    dg = _state(x, nrm, weight, bias, dy, is_query=True)  # dG = Q~ dY^T
    dv = _out(x, nrm, weight, bias, dg, is_query=False)  # dV = dG^T K~ (+ b^T dY via row P)
    dx = poisoned(x.shape, x)
    dw_part = poisoned((B, N, T, 9), x, acc)
    db_part = poisoned((B, N), x, acc)
    t = linear_tiles(C)["bwd"]
    linear_bwd_kernel[(cdiv(N, t["BLOCK_N"]), T, B)](
        x, nrm, v, weight, dy, g, dg, dx, dw_part, db_part, T, C, N, H, W, EPS=NORM_EPS,
        HAS_BIAS=bias is not None, **t,
        ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype), PREC=input_precision(x.dtype),
        num_warps=warps(8 if channel_block(C) >= 128 else 4), num_stages=2)
    dw = dw_part.sum(0).reshape(N, T, 3, 3).to(x.dtype)
    db = db_part.sum(0).to(x.dtype) if bias is not None else None
    return dx, dv, dw, db


def _fake(x, v, weight, bias):
    B, T, C, H, W = x.shape
    acc = acc_torch_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(B, 9 * T * C + 1, T * C, dtype=acc), x.new_empty(B, T, H * W, dtype=acc))


linear_attention = define_op("triton_linear", forward, backward, fake=_fake, saved=("g", "nrm"))
