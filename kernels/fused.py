"""Fused quadratic CTAL ("flash" CTAL, docs/design.md section 3): never writes an N x N matrix.

For a block of queries ``I`` and a tile of keys ``J`` the diffused affinity is the Gram of each
task followed by the per-query 3x3 stencil,

    S_t[i, k] = n_t[i] . n_t[k],     M[i, j] = bias_i + sum_{t, d} w[i, t, d] S_t[i, j + d]

(zero where ``j + d`` leaves the grid), and is multiplied with the value rows at once:
``y[r, i] = sum_j M[i, j] v[r, j]``, ``r = (t', c)``. ``n = x / nrm`` is formed on the fly from
``x`` and the clamped norms (computed once). The bias is constant along a row of M, so it is
kept out of the rounded operands: ``y[r, i] = bias_i sum_j v[r, j] + sum_j (M - bias)[i, j]
v[r, j]`` (in TF32 this cuts the emulated forward error about sevenfold, since rounding the
bias with M gives errors of one sign that add up over the keys). For the same reason TF32 dot
operands are rounded to nearest rather than truncated by the tensor cores (``_operand``).

Row halo. In the flattened key order, the stencil of tile ``J`` reads the keys of ``J`` widened
by ``W + 1`` on each side. Triton cannot shift a register tile, so the Gram is formed once per
(query, key) with tensor-core dots and stored in a per-program scratch buffer (global memory,
small enough to stay in L1/L2), and the stencil reloads it 9 times shifted, in fp32 (``tl.debug_barrier()``
orders the stores before the shifted loads, and the loads before the next overwrite). The
forward and query-backward programs own a query block and walk the keys in order, so the scratch
is a ring per task: each step adds the Gram of the ``BLOCK_N`` keys ``LEAD >= W + 1`` ahead of
the tile and keeps the ``W + 1`` keys behind it, so every Gram entry is formed once. ``M`` is
formed once per tile and applied to every value row; the ``(BLOCK_M, T C)`` output block is
accumulated in place over the key tiles (fp32 scratch for half-precision outputs).

Backward (no softmax state; tiles are recomputed). With ``dM[i, j] = sum_r dy[r, i] v[r, j]``:
- query side (``fused_query_bwd_kernel``, one program per query block, rings for ``S_t`` and
  ``dM``): ``dw[i, t, d] = sum_j dM[i, j] S_t[i, j + d]`` and the Gram gradient
  ``dS_t[i, k] = sum_d w[i, t, d] dM[i, k - d]``, which gives ``dn_t[i] += dS_t[i, :] . n_t`` and
  ``dn_t[k] += dS_t[:, k] . n_t[I]``. The key side sums over query blocks, so ``dn`` is
  accumulated with fp32/fp64 atomic adds (not bitwise deterministic; see ``_alert_atomics``);
  ``dx`` is the normalization backward of ``dn``.
- values (``fused_value_bwd_kernel``, one program per key tile): ``dv[r, j] = sum_i dy[r, i]
  M[i, j]``, M recomputed from the Gram of the tile and its halo, accumulated in place over the
  query blocks.
- ``db[i] = sum_{b, j} dM[i, j] = sum_b dy[b, :, i] . (sum_j v[b, :, j])`` in PyTorch.
``kernels.fused_plan.flops`` counts what these launches perform; ``auto`` uses it as the cost.
Scratch (fp32, or fp64): ``B N T RING`` elements in the forward, ``B N (T + 1) RING`` in the query
backward, with ``RING`` the key tile plus about ``2 W`` keys, rounded up to a power of two
(``fused_tiles``).
All C channels of a pixel are one tile (C <= MAX_CHANNELS); tile offsets inside one batch item
are int32 (``item_size_reason``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ctal.ops.custom_op import define_op

from ._common import (acc_dtype, acc_torch_dtype, cdiv, channel_block, channel_reason,
                      check_device, dot_dtype, grid_offsets, input_precision, item_size_reason,
                      poisoned, shifted_pixels, tl, triton, warps)
from .affinity import l2norm, l2norm_backward
from .fused_plan import fused_tiles


@triton.jit
def _load_normalized(x_base, nrm_base, offs_c, c_ok, pix, ok, N, ACC: tl.constexpr):
    """``n[:, pix]`` as a [BN, BC] tile (pixels x channels), zero where ``~ok``."""
    xt = tl.load(x_base + offs_c[None, :] * N + pix[:, None],
                 mask=ok[:, None] & c_ok[None, :], other=0.0).to(ACC)  # [BN, BC]
    nrm = tl.load(nrm_base + pix, mask=ok, other=1.0).to(ACC)  # [BN]
    return xt / nrm[:, None]


@triton.jit
def _operand(a, DOT: tl.constexpr, PREC: tl.constexpr):
    """``a`` as a ``tl.dot`` operand. In TF32 it is first rounded to nearest (ties away): the
    tensor cores ignore the low 13 bits of an fp32 operand, and that truncation shrinks every
    product by about 2**-11 on average, a bias that adds up over the dots' long sums."""
    if PREC == "tf32":
        bits = a.to(tl.int32, bitcast=True)
        a = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return a.to(DOT)


@triton.jit
def _gram_to_scratch(x_base, nrm_base, scratch, offs_i, i_ok, lo, hi, base, T, C, N,
                     BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                     RING: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                     PREC: tl.constexpr, STAGES: tl.constexpr):
    """``S_t[i, k]`` for the keys ``lo <= k < hi`` of every task, stored in column
    ``(k - base) mod RING`` of task ``t``'s [BM, RING] scratch (``lo`` on a chunk boundary);
    ``STAGES``: software-pipelining depth of the key loop."""
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    c_ok = offs_c < C
    rows = tl.arange(0, BLOCK_M)  # [BM]
    for t in range(T):
        xt_base = x_base + t * C * N
        nt_base = nrm_base + t * N
        qn = _operand(_load_normalized(xt_base, nt_base, offs_c, c_ok, offs_i, i_ok, N, ACC),
                      DOT, PREC)  # [BM, BC]
        for k0 in tl.range(lo, hi, BLOCK_H, num_stages=STAGES):
            keys = k0 + tl.arange(0, BLOCK_H)  # [BH]
            k_ok = keys < hi
            kn = _load_normalized(xt_base, nt_base, offs_c, c_ok, keys, k_ok, N, ACC)  # [BH, BC]
            s = tl.dot(qn, tl.trans(_operand(kn, DOT, PREC)),
                       input_precision=PREC, out_dtype=ACC)  # [BM, BH]
            dst = scratch + t * BLOCK_M * RING + rows[:, None] * RING \
                + ((keys - base) & (RING - 1))[None, :]  # [BM, BH]
            tl.store(dst, s, mask=k_ok[None, :])


@triton.jit
def _stencil_from_scratch(scratch, w_ptr, offs_i, i_ok, jy, jx, j_ok, base, T, H, W,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RING: tl.constexpr,
                          ACC: tl.constexpr):
    """``sum_{t, d} w[i, t, d] S_t[i, j + d]`` [BM, BN] for keys ``(jy, jx)``, reading ``S_t``
    from the scratch written by ``_gram_to_scratch`` (zero where ``j + d`` is off the grid)."""
    rows = tl.arange(0, BLOCK_M)  # [BM]
    m = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for t in range(T):
        for d in range(9):
            jj, ok = shifted_pixels(jy, jx, j_ok, d // 3 - 1, d % 3 - 1, H, W)  # [BN]
            s = tl.load(scratch + t * BLOCK_M * RING + rows[:, None] * RING
                        + ((jj - base) & (RING - 1))[None, :],
                        mask=ok[None, :], other=0.0)  # [BM, BN]
            wd = tl.load(w_ptr + (offs_i * T + t) * 9 + d, mask=i_ok, other=0.0).to(ACC)  # [BM]
            m += wd[:, None] * s
    return m


@triton.jit
def fused_fwd_kernel(x_ptr, nrm_ptr, v_ptr, w_ptr, bias_ptr, vsum_ptr, y_ptr, ring_ptr, T, C, N, H, W,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     LEAD: tl.constexpr, RING: tl.constexpr, ACC: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr):
    """``y[b, r, i] = sum_j M[b, i, j] v[b, r, j]`` for all ``T C`` rows ``r`` (``y`` in the
    accumulator dtype); ``ring``: ``T`` [BM, RING] Gram rings per program;
    grid ``(cdiv(N, BM), B)``. The bias enters as ``bias_i vsum[b, r]`` (``vsum = sum_j v``), not
    through the dot: it is constant along a row of M, so rounding it with M (TF32, bf16) would
    give errors of one sign that add up over the keys."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    R = T * C
    offs_i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # [BM]
    i_ok = offs_i < N
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    v_base = v_ptr + pid_b * R * N
    y_base = y_ptr + pid_b * R * N
    ring = ring_ptr + (pid_b * tl.cdiv(N, BLOCK_M) + pid_m) * (T * BLOCK_M * RING)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_i, mask=i_ok, other=0.0).to(ACC)  # [BM]
    for j0 in range(0, N, BLOCK_N):
        # Gram of the keys entering the ring: [0, BN + LEAD) at the first tile, then the next BN
        lo = tl.where(j0 > 0, j0 + LEAD, 0)
        hi = tl.minimum(j0 + BLOCK_N + LEAD, N)
        _gram_to_scratch(x_base, nrm_base, ring, offs_i, i_ok, lo, hi, 0, T, C, N,
                         BLOCK_M, BLOCK_H, BLOCK_C, RING, ACC, DOT, PREC, 2)  # _meta's stages
        tl.debug_barrier()  # the ring's stores before its shifted loads
        offs_j, jy, jx, j_ok = grid_offsets(j0, BLOCK_N, N, W)  # [BN]
        m = _stencil_from_scratch(ring, w_ptr, offs_i, i_ok, jy, jx, j_ok, 0, T, H, W,
                                  BLOCK_M, BLOCK_N, RING, ACC)  # [BM, BN], M - bias
        m = _operand(m, DOT, PREC)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
            r_ok = offs_r < R
            y_offs = offs_r[None, :] * N + offs_i[:, None]  # [BM, BR]
            y_mask = i_ok[:, None] & r_ok[None, :]
            acc = tl.load(y_base + y_offs, mask=y_mask & (j0 > 0), other=0.0)  # [BM, BR]
            if HAS_BIAS:
                vs = tl.load(vsum_ptr + pid_b * R + offs_r, mask=r_ok, other=0.0)  # [BR]
                acc += tl.where(j0 == 0, bias[:, None] * vs[None, :], 0.0)
            vt = tl.load(v_base + offs_r[None, :] * N + offs_j[:, None],
                         mask=j_ok[:, None] & r_ok[None, :], other=0.0)  # [BN, BR]
            acc = tl.dot(m, _operand(vt, DOT, PREC), acc, input_precision=PREC, out_dtype=ACC)
            tl.store(y_base + y_offs, acc, mask=y_mask)
        tl.debug_barrier()  # this tile's ring loads before the next tile overwrites slots


@triton.jit
def fused_query_bwd_kernel(x_ptr, nrm_ptr, v_ptr, w_ptr, dy_ptr, dn_ptr, dw_part_ptr, ring_ptr,
                           T, C, N, H, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           LEAD: tl.constexpr, RING: tl.constexpr, ACC: tl.constexpr,
                           DOT: tl.constexpr, PREC: tl.constexpr):
    """For a block of queries: ``dw_part[b, i, t, d]`` and, by atomic adds, the Gram gradient's
    share of ``dn[b, t, :, k]`` for the queries and for every key; ``ring``: ``T`` Gram rings and
    one ``dM`` ring, [BM, RING] each, per program; grid ``(cdiv(N, BM), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    R = T * C
    offs_i = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # [BM]
    i_ok = offs_i < N
    rows = tl.arange(0, BLOCK_M)  # [BM]
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    c_ok = offs_c < C
    taps = tl.arange(0, 16)  # [16] the 9 taps, padded
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    dy_base = dy_ptr + pid_b * R * N
    v_base = v_ptr + pid_b * R * N
    ring = ring_ptr + (pid_b * tl.cdiv(N, BLOCK_M) + pid_m) * ((T + 1) * BLOCK_M * RING)
    dm_ring = ring + T * BLOCK_M * RING
    for j0 in range(0, N, BLOCK_N):
        lo = tl.where(j0 > 0, j0 + LEAD, 0)
        hi = tl.minimum(j0 + BLOCK_N + LEAD, N)
        for k0 in range(lo, hi, BLOCK_H):  # dM of the keys entering the ring, once for all tasks
            keys = k0 + tl.arange(0, BLOCK_H)  # [BH]
            k_ok = keys < hi
            dm = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
                r_ok = offs_r < R
                dyt = tl.load(dy_base + offs_r[None, :] * N + offs_i[:, None],
                              mask=i_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
                vt = tl.load(v_base + offs_r[:, None] * N + keys[None, :],
                             mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BR, BH]
                dm = tl.dot(_operand(dyt, DOT, PREC), _operand(vt, DOT, PREC), dm,
                            input_precision=PREC, out_dtype=ACC)
            tl.store(dm_ring + rows[:, None] * RING + (keys & (RING - 1))[None, :], dm,
                     mask=k_ok[None, :])
        _gram_to_scratch(x_base, nrm_base, ring, offs_i, i_ok, lo, hi, 0, T, C, N,
                         BLOCK_M, BLOCK_H, BLOCK_C, RING, ACC, DOT, PREC, 2)  # _meta's stages
        tl.debug_barrier()  # the rings' stores before their shifted loads
        for t in range(T):
            xt_base = x_base + t * C * N
            nt_base = nrm_base + t * N
            s_ring = ring + t * BLOCK_M * RING
            qn = _operand(_load_normalized(xt_base, nt_base, offs_c, c_ok, offs_i, i_ok, N, ACC),
                          DOT, PREC)  # [BM, BC]
            acc_q = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
            acc_w = tl.zeros([BLOCK_M, 16], dtype=ACC)
            for c0 in range(j0, tl.minimum(j0 + BLOCK_N, N), BLOCK_H):
                offs_k, ky, kx, k_ok = grid_offsets(c0, BLOCK_H, N, W)  # [BH]
                dm = tl.load(dm_ring + rows[:, None] * RING + (offs_k & (RING - 1))[None, :],
                             mask=k_ok[None, :], other=0.0)  # [BM, BH] dM[i, j], j = offs_k
                ds = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)  # dS_t[i, k], k = offs_k
                for d in range(9):
                    wd = tl.load(w_ptr + (offs_i * T + t) * 9 + d, mask=i_ok, other=0.0).to(ACC)
                    jj, ok = shifted_pixels(ky, kx, k_ok, d // 3 - 1, d % 3 - 1, H, W)  # j + d
                    s = tl.load(s_ring + rows[:, None] * RING + (jj & (RING - 1))[None, :],
                                mask=ok[None, :], other=0.0)  # [BM, BH]
                    part = tl.sum(dm * s, 1)  # [BM]
                    acc_w += tl.where(taps[None, :] == d, part[:, None], 0.0)
                    jj, ok = shifted_pixels(ky, kx, k_ok, 1 - d // 3, 1 - d % 3, H, W)  # k - d
                    dmk = tl.load(dm_ring + rows[:, None] * RING + (jj & (RING - 1))[None, :],
                                  mask=ok[None, :], other=0.0)  # [BM, BH]
                    ds += wd[:, None] * dmk
                kn = _load_normalized(xt_base, nt_base, offs_c, c_ok, offs_k, k_ok, N, ACC)  # [BH, BC]
                ds = _operand(ds, DOT, PREC)
                acc_q = tl.dot(ds, _operand(kn, DOT, PREC), acc_q, input_precision=PREC,
                               out_dtype=ACC)  # [BM, BC]
                dk = tl.dot(tl.trans(ds), qn, input_precision=PREC, out_dtype=ACC)  # [BH, BC]
                tl.atomic_add(dn_ptr + (pid_b * T + t) * C * N + offs_c[None, :] * N
                              + offs_k[:, None], dk, mask=k_ok[:, None] & c_ok[None, :],
                              sem="relaxed")
            tl.atomic_add(dn_ptr + (pid_b * T + t) * C * N + offs_c[None, :] * N
                          + offs_i[:, None], acc_q, mask=i_ok[:, None] & c_ok[None, :],
                          sem="relaxed")
            # dw: this program's rows only, accumulated in place over the key tiles
            dw_offs = ((pid_b * N + offs_i[:, None]) * T + t) * 9 + taps[None, :]  # [BM, 16]
            dw_mask = i_ok[:, None] & (taps[None, :] < 9)
            acc_w += tl.load(dw_part_ptr + dw_offs, mask=dw_mask & (j0 > 0), other=0.0)
            tl.store(dw_part_ptr + dw_offs, acc_w, mask=dw_mask)
        tl.debug_barrier()  # this tile's ring loads before the next tile overwrites slots


@triton.jit
def fused_value_bwd_kernel(x_ptr, nrm_ptr, w_ptr, dyb_ptr, dy_ptr, dv_ptr, scratch_ptr,
                           T, C, N, H, W, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr, LEAD: tl.constexpr, RING: tl.constexpr,
                           ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``dv[b, r, j] = sum_i dy[b, r, i] M[b, i, j]`` for a tile of keys and all ``T C`` rows
    (``dv`` in the accumulator dtype), M recomputed from the Gram of the tile and ``LEAD`` keys on
    each side; ``scratch``: ``T`` [BM, RING] per program; grid ``(cdiv(N, BN), B)``. The bias
    enters outside the dot, as ``dyb[b, r] = sum_i dy[b, r, i] bias_i`` (see the forward)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    R = T * C
    j0 = (pid_n * BLOCK_N).to(tl.int32)
    offs_j, jy, jx, j_ok = grid_offsets(j0, BLOCK_N, N, W)  # [BN]
    lo = tl.maximum(j0 - LEAD, 0)
    hi = tl.minimum(j0 + BLOCK_N + LEAD, N)
    x_base = x_ptr + pid_b * R * N
    nrm_base = nrm_ptr + pid_b * T * N
    dy_base = dy_ptr + pid_b * R * N
    dv_base = dv_ptr + pid_b * R * N
    scratch = scratch_ptr + (pid_b * tl.cdiv(N, BLOCK_N) + pid_n) * (T * BLOCK_M * RING)
    for i0 in range(0, N, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)  # [BM]
        i_ok = offs_i < N
        # Unpipelined Gram loop: with a second stage its prefetch buffers, live beside the
        # [BR, BN] accumulator and the dy tile, exceed 255 registers under Triton 3.6 (TF32,
        # exact fp32, fp64) and spill.
        _gram_to_scratch(x_base, nrm_base, scratch, offs_i, i_ok, lo, hi, j0 - LEAD, T, C, N,
                         BLOCK_M, BLOCK_H, BLOCK_C, RING, ACC, DOT, PREC, 1)
        tl.debug_barrier()  # the scratch stores before its shifted loads
        m = _stencil_from_scratch(scratch, w_ptr, offs_i, i_ok, jy, jx, j_ok, j0 - LEAD, T, H,
                                  W, BLOCK_M, BLOCK_N, RING, ACC)  # [BM, BN], M - bias
        m = _operand(m, DOT, PREC)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
            r_ok = offs_r < R
            dyt = tl.load(dy_base + offs_r[:, None] * N + offs_i[None, :],
                          mask=r_ok[:, None] & i_ok[None, :], other=0.0)  # [BR, BM]
            dv_offs = offs_r[:, None] * N + offs_j[None, :]  # [BR, BN]
            dv_mask = r_ok[:, None] & j_ok[None, :]
            acc = tl.load(dv_base + dv_offs, mask=dv_mask & (i0 > 0), other=0.0)  # [BR, BN]
            if HAS_BIAS:
                db_r = tl.load(dyb_ptr + pid_b * R + offs_r, mask=r_ok, other=0.0)  # [BR]
                acc += tl.where(i0 == 0, db_r[:, None], 0.0)
            acc = tl.dot(_operand(dyt, DOT, PREC), m, acc, input_precision=PREC, out_dtype=ACC)
            tl.store(dv_base + dv_offs, acc, mask=dv_mask)
        tl.debug_barrier()  # this block's scratch loads before the next block overwrites it


# --- launchers -----------------------------------------------------------------------------

def _meta(x: Tensor) -> dict:
    # 8 warps at every C: the [BM, BN] stencil tiles and the value backward's [BR, BN] block set
    # the register use, not the channel tile; 2 stages bound the shared memory.
    return dict(BLOCK_C=channel_block(x.shape[2]), ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype),
                PREC=input_precision(x.dtype), num_warps=warps(8), num_stages=2)


def _tiles(x: Tensor) -> dict:
    """``fused_tiles`` for the dots ``x``'s dtype and the TF32 setting select."""
    B, T, C, H, W = x.shape
    if x.dtype == torch.float64:
        dots = "fp64"
    elif x.dtype == torch.float32 and input_precision(x.dtype) == "ieee":
        dots = "fp32"
    else:
        dots = "tensor"
    return fused_tiles(C, H, W, dots)


def _check(x: Tensor) -> None:
    check_device(x, "triton-fused")
    B, T, C, H, W = x.shape
    why = channel_reason(C) or item_size_reason(T, C, H * W)
    if why is not None:
        raise ValueError(f"triton-fused: {why}")


def _alert_atomics() -> None:
    """The backward accumulates ``dn`` with atomic adds, so its rounding depends on the order the
    programs run in; follow ``torch.use_deterministic_algorithms`` like PyTorch's own ops."""
    if torch.are_deterministic_algorithms_enabled():
        msg = ("triton-fused backward accumulates dx with atomic adds and is not deterministic; "
               "use backend 'linear' or 'quadratic' under torch.use_deterministic_algorithms")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg)


def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The whole CTAL op, quadratic order, without any N x N matrix in memory: ``y (B, T, C, H, W)``
    and the clamped norms ``(B, T, N)`` (saved for backward)."""
    _check(x)
    B, T, C, H, W = x.shape
    N = H * W
    tiles = _tiles(x)
    BM, RING = tiles["BLOCK_M"], tiles["RING"]
    acc = acc_torch_dtype(x.dtype)
    nrm = l2norm(x)
    y = poisoned(x.shape, x, acc)  # accumulated in place over the key tiles
    ring = poisoned((B * cdiv(N, BM) * T * BM * RING,), x, acc)
    has_bias = bias is not None
    vsum = v.reshape(B, T * C, N).to(acc).sum(2) if has_bias else nrm  # [B, T C]
    fused_fwd_kernel[(cdiv(N, BM), B)](
        x, nrm, v, weight, bias if has_bias else weight, vsum, y, ring, T, C, N, H, W,
        HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=tiles["BLOCK_N"], BLOCK_H=tiles["BLOCK_H"],
        BLOCK_R=tiles["BLOCK_R"], LEAD=tiles["LEAD"], RING=RING, **_meta(x))
    return y.to(x.dtype), nrm


def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
             nrm: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    _check(x)
    _alert_atomics()
    B, T, C, H, W = x.shape
    N = H * W
    R = T * C
    acc = acc_torch_dtype(x.dtype)
    tiles = _tiles(x)
    BM, RING, BNV, VRING = tiles["BLOCK_M"], tiles["RING"], tiles["BLOCK_N_VALUE"], tiles["VALUE_RING"]
    common = dict(BLOCK_H=tiles["BLOCK_H"], BLOCK_R=tiles["BLOCK_R"], LEAD=tiles["LEAD"],
                  **_meta(x))
    dn = torch.zeros(x.shape, dtype=acc, device=x.device)  # atomic adds from every program
    dw_part = poisoned((B, N, T, 9), x, acc)
    BMQ = tiles["BLOCK_M_QUERY"]
    ring = poisoned((B * cdiv(N, BMQ) * (T + 1) * BMQ * RING,), x, acc)
    fused_query_bwd_kernel[(cdiv(N, BMQ), B)](
        x, nrm, v, weight, dy, dn, dw_part, ring, T, C, N, H, W,
        BLOCK_M=BMQ, BLOCK_N=tiles["BLOCK_N"], RING=RING, **common)
    del ring
    dx = l2norm_backward(dn, x, nrm)
    dv = poisoned(x.shape, x, acc)  # accumulated in place over the query blocks
    scratch = poisoned((B * cdiv(N, BNV) * T * BM * VRING,), x, acc)
    has_bias = bias is not None
    dy_rows = dy.reshape(B, R, N).to(acc)
    dyb = dy_rows @ bias.to(acc) if has_bias else nrm  # [B, T C]
    fused_value_bwd_kernel[(cdiv(N, BNV), B)](
        x, nrm, weight, dyb, dy, dv, scratch, T, C, N, H, W,
        HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BNV, RING=VRING, **common)
    dw = dw_part.sum(0).reshape(N, T, 3, 3).to(x.dtype)
    db = None
    if has_bias:  # sum_j dM[i, j] = dy[:, i] . sum_j v[:, j]
        db = torch.einsum("brn,br->n", dy_rows, v.reshape(B, R, N).to(acc).sum(2)).to(x.dtype)
    return dx, dv.to(x.dtype), dw, db


def _fake(x, v, weight, bias):
    B, T, C, H, W = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(B, T, H * W, dtype=acc_torch_dtype(x.dtype)))


fused_attention = define_op("triton_fused", forward, backward, fake=_fake, saved=("nrm",))
