"""Linear-order CTAL (docs/design.md section 2) as GEMM kernels over prepared, padded operands.

Index conventions follow ``ctal.ops.linear`` with padded channels (``kernels/linear_plan.py``:
``CP`` channels, ``R = T * CP`` value rows ``r = t' * CP + c'``, ``P = 9 * R`` stacked rows
``p = (d * T + t) * CP + c`` for shift ``d = 3 * dy + dx``, task ``t``, channel ``c``) and the pixel
axis ``q = y * Wp + x`` of the padded grid. The operands are

    K~[p, q] = n_t[c, q + d]     (zero outside the grid)
    Q~[p, q] = w[q, t, d] n_t[c, q]

``linear_prep_fwd_kernel`` writes ``n`` (and ``v``) once in the dot dtype as three column-shifted
copies, each with a zero frame (one zero row above and below the image, zero columns past ``W``,
zero channels past ``C``), row pitch a multiple of 16 elements. A K~ tile for shift ``d`` is then a
plain block load from copy ``dx`` at the constant offset ``(dy + 1) Wp``: no per-element index
math or divide in the GEMM loops, and every tile address stays 16-element aligned (three copies
rather than one copy read at ``+-1`` columns, which would misalign every row by one element).
The fusion weight, prepared as ``wq[t * 9 + d, q]``, is a per-pixel scale of the A operand: the
row scale of the pixel-major ``Y`` GEMM, the column scale of the ``dG`` GEMM, whose pixels are
its K axis.

Forward: ``G = K~ V^T`` (``linear_state_fwd_kernel``, ``(B, P, R)`` in the dot dtype) and
``Y^T = Q~^T G + b (1^T V)`` (``linear_out_fwd_kernel``, pixels as the M dimension). The bias row
``sum_j v[:, j]`` (a sum over all pixels) is kept apart in the accumulator dtype and added in the
epilogue, never cast to a 16-bit dot operand. Backward: ``dG = Q~ dY^T`` and
``dV^T = K~^T dG + 1 (b^T dY)`` with the same two kernels, and ``linear_bwd_kernel`` forms
``dQ~ = G dY`` and ``dK~ = dG V`` (``V`` read from the copy shifted by ``-d``, which un-shifts
``dK~``) per task, channel block by pixel tile, folding them into ``dn``, ``dw`` and the
normalization backward; ``db = dY . sum_j v`` and ``b^T dY`` are small reductions in PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ctal.ops.custom_op import define_op

from ._common import (INTERPRET, NORM_EPS, acc_dtype, acc_torch_dtype, cdiv, channel_reason,
                      check_device, dot_dtype, input_precision, item_size_reason,
                      l2norm_bwd_tile, poisoned, tl, triton, warps)
from .affinity import l2norm
from .linear_plan import CONFIGS, dot_kind, interpreter_config, linear_layout, linear_tiles

_PREP_PIXELS = 64  # positions per program of the prep kernel


@triton.jit
def linear_prep_fwd_kernel(src_ptr, nrm_ptr, dst_ptr, T, C, H, W, Wp, L,
                           COPIES: tl.constexpr, NORMALIZE: tl.constexpr,
                           TRANSPOSED: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """``dst[b, a, t, c, s]`` (``(B, COPIES, T, BLOCK_C = CP, L)``, dst's dtype; with
    ``TRANSPOSED`` ``dst[b, a, s, t, c]``, rows of ``T * CP`` values per position): position
    ``s = (y + 1) Wp + x`` holds ``src[b, t, c, y, x + a - COPIES // 2]`` (divided by its norm with
    ``NORMALIZE``), zero off the grid, past ``W`` and for ``c >= C``;
    grid ``(cdiv(L, BS), T, B)``."""
    pid_s = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    N = H * W
    offs_s = (pid_s * BLOCK_S).to(tl.int32) + tl.arange(0, BLOCK_S)  # [BS]
    offs_c = tl.arange(0, BLOCK_C)  # [BC]
    y = offs_s // Wp - 1
    x = offs_s % Wp
    s_ok = offs_s < L
    row_ok = s_ok & (y >= 0) & (y < H) & (x < W)
    src_base = src_ptr + (pid_b * T + pid_t) * C * N
    nrm_base = nrm_ptr + (pid_b * T + pid_t) * N
    for a in tl.static_range(COPIES):
        xs = x + (a - COPIES // 2)  # [BS] source column of copy a
        ok = row_ok & (xs >= 0) & (xs < W)
        pix = y * W + xs
        val = tl.load(src_base + offs_c[:, None] * N + pix[None, :],
                      mask=(offs_c[:, None] < C) & ok[None, :], other=0.0).to(ACC)  # [BC, BS]
        if NORMALIZE:
            nrm = tl.load(nrm_base + pix, mask=ok, other=1.0).to(ACC)  # [BS]
            val = val / nrm[None, :]
        if TRANSPOSED:
            dst_base = dst_ptr + ((pid_b * COPIES + a) * L * T + pid_t) * BLOCK_C
            dst_offs = offs_s[None, :] * (T * BLOCK_C) + offs_c[:, None]  # [BC, BS]
        else:
            dst_base = dst_ptr + ((pid_b * COPIES + a) * T + pid_t) * BLOCK_C * L
            dst_offs = offs_c[:, None] * L + offs_s[None, :]  # [BC, BS]
        tl.store(dst_base + dst_offs, val.to(dst_ptr.dtype.element_ty), mask=s_ok[None, :])


@triton.jit
def _chunk(p, CP, T, Wp, IS_QUERY: tl.constexpr):
    """Shift ``d`` and task ``t`` of stacked row ``p = (d * T + t) * CP + c``, and where its operand
    lives: the copy of ``n`` (column shift) and the row offset (row shift). Q~ is unshifted: the
    middle copy, one frame row down."""
    td = p // CP
    d = td // T
    t = td % T
    if IS_QUERY:
        copy = 1
        shift = Wp
    else:
        copy = d % 3
        shift = (d // 3) * Wp
    return d, t, copy, shift


@triton.jit
def linear_state_fwd_kernel(op_ptr, w_ptr, src_ptr, s_ptr, T, Wp, L, Kp,
                            IS_QUERY: tl.constexpr, SRC_COPIES: tl.constexpr, CP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``S[b, p, r] = sum_q Op[p, q] Src[r, q]`` over the ``Kp`` padded pixels: ``G = K~ V^T`` or
    (``IS_QUERY``) ``dG = Q~ dY^T``. ``op`` holds the three copies of ``n``, ``src`` ``SRC_COPIES``
    copies of ``v`` or ``dy`` (the middle one is read). A block of ``BLOCK_M`` rows lies in one
    (shift, task) chunk. ``S`` is ``(B, P, R)``; grid ``(P / BM, R / BN, B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * CP
    P = 9 * R
    p0 = pid_m * BLOCK_M
    d, t, copy, shift = _chunk(p0, CP, T, Wp, IS_QUERY)  # the (shift, task) chunk of these rows
    offs_m = (p0 % CP).to(tl.int32) + tl.arange(0, BLOCK_M)  # [BM] channels
    offs_n = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)  # [BN] value rows
    offs_k = tl.arange(0, BLOCK_K)  # [BK] pixels
    op_base = op_ptr + ((pid_b * 3 + copy) * T + t) * CP * L + shift
    a_ptrs = op_base + offs_m[:, None] * L + offs_k[None, :]  # [BM, BK]
    src_base = src_ptr + (pid_b * SRC_COPIES + SRC_COPIES // 2) * R * L + Wp
    b_ptrs = src_base + offs_n[None, :] * L + offs_k[:, None]  # [BK, BN]
    w_ptrs = w_ptr + (t * 9 + d) * Kp + offs_k  # [BK]
    s_base = s_ptr + (pid_b * P + p0) * R + pid_n * BLOCK_N  # the one pointer kept for the store
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for _ in range(0, Kp, BLOCK_K):
        op = tl.load(a_ptrs)  # [BM, BK]
        if IS_QUERY:  # Q~ = w n: the weight scales the K (pixel) axis
            op = (op.to(ACC) * tl.load(w_ptrs)[None, :]).to(DOT)
            w_ptrs += BLOCK_K
        acc = tl.dot(op, tl.load(b_ptrs), acc, input_precision=PREC, out_dtype=ACC)  # [BM, BN]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    s_offs = tl.arange(0, BLOCK_M)[:, None] * R + tl.arange(0, BLOCK_N)[None, :]  # [BM, BN]
    tl.store(s_base + s_offs, acc.to(s_ptr.dtype.element_ty))


@triton.jit
def linear_out_fwd_kernel(op_ptr, w_ptr, s_ptr, sp_ptr, bias_ptr, out_ptr, T, C, H, W, Wp, L, Kp,
                          IS_QUERY: tl.constexpr, HAS_BIAS: tl.constexpr, CP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``out^T[b, i, r] = sum_p Op[p, i] S[b, p, r]`` plus the bias row, for a block of padded
    pixels ``i`` (M) by value rows ``r`` (N), K over the ``P`` stacked rows: ``Y`` (``Op = Q~``,
    plus ``b_i Sp[r]``) or (not ``IS_QUERY``) ``dV`` (``Op = K~``, plus ``Sp[r] = (b^T dY)[r]``).
    ``Sp`` is the fp32/fp64 bias row; ``out`` is ``(B, T, C, H, W)``, written at the real
    pixels; grid ``(Kp / BM, R / BN, B)``."""
    BK: tl.constexpr = BLOCK_K if BLOCK_K < CP else CP
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * CP
    P = 9 * R
    N = H * W
    offs_m = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # [BM] padded pixels
    offs_n = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)  # [BN] value rows
    offs_k = tl.arange(0, BK)  # [BK] channels
    op_base = op_ptr + pid_b * 3 * T * CP * L
    a_offs = offs_m[:, None] + offs_k[None, :] * L  # [BM, BK]
    s_ptrs = s_ptr + pid_b * P * R + offs_k[:, None] * R + offs_n[None, :]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, P, BK):
        d, t, copy, shift = _chunk(k0, CP, T, Wp, IS_QUERY)
        op = tl.load(op_base + ((copy * T + t) * CP + k0 % CP) * L + shift + a_offs)  # [BM, BK]
        if IS_QUERY:  # Q~ = w n: the weight scales the M (pixel) rows
            wv = tl.load(w_ptr + (t * 9 + d) * Kp + offs_m)  # [BM]
            op = (op.to(ACC) * wv[:, None]).to(DOT)
        acc = tl.dot(op, tl.load(s_ptrs), acc, input_precision=PREC, out_dtype=ACC)  # [BM, BN]
        s_ptrs += BK * R
    py = offs_m // Wp
    px = offs_m % Wp
    pix_ok = (py < H) & (px < W)
    pix = py * W + px  # [BM] pixel of the (B, T, C, H, W) output
    if HAS_BIAS:
        sp = tl.load(sp_ptr + pid_b * R + offs_n).to(ACC)  # [BN]
        if IS_QUERY:
            bv = tl.load(bias_ptr + pix, mask=pix_ok, other=0.0).to(ACC)  # [BM]
            acc += bv[:, None] * sp[None, :]
        else:
            acc += sp[None, :]
    t_out = offs_n // CP
    c_out = offs_n % CP
    out_offs = pid_b * T * C * N + ((t_out * C + c_out) * N)[None, :] + pix[:, None]  # [BM, BN]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=pix_ok[:, None] & (c_out < C)[None, :])


@triton.jit
def linear_bwd_kernel(x_ptr, nrm_ptr, n_ptr, vt_ptr, dyt_ptr, w_ptr, g_ptr, dg_ptr, dx_ptr,
                      dw_part_ptr,
                      T, C, H, W, Wp, L, Kp, EPS: tl.constexpr, CP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """For task ``t``, all ``CP`` channels and a block of padded pixels: per shift ``d``,
    ``dQ~_d = G_d dY`` and ``dK~_d = dG_d V(. - d)`` (K over the value rows), folded into
    ``dn = sum_d w_d dQ~_d + dK~_d`` and ``dw_part[b, n, t, d] = n . dQ~_d``, then ``dx`` through
    the normalization backward; grid ``(Kp / BN, T, B)``."""
    BK: tl.constexpr = BLOCK_K if BLOCK_K < CP else CP
    pid_n = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    R = T * CP
    P = 9 * R
    N = H * W
    offs_q = (pid_n * BLOCK_N).to(tl.int32) + tl.arange(0, BLOCK_N)  # [BN] padded pixels
    py = offs_q // Wp
    px = offs_q % Wp
    pix_ok = (py < H) & (px < W)
    pix = py * W + px  # [BN]
    offs_c = tl.arange(0, CP)  # [CP]
    offs_k = tl.arange(0, BK)  # [BK] value rows
    taps = tl.arange(0, 16)  # [16] the 9 taps, padded
    gk_offs = offs_c[:, None] * R + offs_k[None, :]  # [CP, BK]
    rq_offs = offs_q[None, :] * R + offs_k[:, None]  # [BK, BN] of the position-major copies
    g_base = g_ptr + pid_b * P * R
    dg_base = dg_ptr + pid_b * P * R
    dy_base = dyt_ptr + (pid_b * L + Wp) * R
    n_base = n_ptr + ((pid_b * 3 + 1) * T + pid_t) * CP * L + Wp
    acc_dn = tl.zeros([CP, BLOCK_N], dtype=ACC)
    acc_dw = tl.zeros([16, BLOCK_N], dtype=ACC)
    for d in range(9):
        row0 = (d * T + pid_t) * CP * R  # chunk (d, t) of G / dG
        g_ptrs = g_base + row0 + gk_offs
        dg_ptrs = dg_base + row0 + gk_offs
        dy_ptrs = dy_base + rq_offs
        # V at q - d: the copy for -dx, rows shifted by -dy
        v_ptrs = vt_ptr + ((pid_b * 3 + 2 - d % 3) * L + (2 - d // 3) * Wp) * R + rq_offs
        # two K loops rather than one with both dots: half the operand tiles in flight
        for _ in range(0, R, BK):
            acc_dn = tl.dot(tl.load(dg_ptrs), tl.load(v_ptrs), acc_dn, input_precision=PREC,
                            out_dtype=ACC)  # [CP, BN]
            dg_ptrs += BK
            v_ptrs += BK
        dq = tl.zeros([CP, BLOCK_N], dtype=ACC)
        for _ in range(0, R, BK):
            dq = tl.dot(tl.load(g_ptrs), tl.load(dy_ptrs), dq, input_precision=PREC,
                        out_dtype=ACC)  # [CP, BN]
            g_ptrs += BK
            dy_ptrs += BK
        wd = tl.load(w_ptr + (pid_t * 9 + d) * Kp + offs_q).to(ACC)  # [BN]
        acc_dn += dq * wd[None, :]
        # n from the prepared copy (dot dtype): holding it in registers across the loop spills
        nd = tl.load(n_base + offs_c[:, None] * L + offs_q[None, :]).to(ACC)  # [CP, BN]
        part = tl.sum(dq * nd, 0)  # [BN]
        acc_dw += tl.where(taps[:, None] == d, part[None, :], 0.0)
    xt_base = (pid_b * T + pid_t) * C * N
    xn_offs = offs_c[:, None] * N + pix[None, :]  # [CP, BN]
    xn_mask = (offs_c < C)[:, None] & pix_ok[None, :]
    nrm = tl.load(nrm_ptr + (pid_b * T + pid_t) * N + pix, mask=pix_ok, other=1.0).to(ACC)
    n = tl.load(x_ptr + xt_base + xn_offs, mask=xn_mask, other=0.0).to(ACC) / nrm[None, :]
    dx = l2norm_bwd_tile(n, acc_dn, nrm, EPS)  # [CP, BN]
    tl.store(dx_ptr + xt_base + xn_offs, dx.to(dx_ptr.dtype.element_ty), mask=xn_mask)
    dw_offs = (pix[None, :] * T + pid_t) * 9 + taps[:, None]  # [16, BN]
    tl.store(dw_part_ptr + pid_b * N * T * 9 + dw_offs, acc_dw,
             mask=(taps[:, None] < 9) & pix_ok[None, :])


# --- launchers -----------------------------------------------------------------------------

_TUNED: dict = {}


def _launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` with a config of the autotune set: on a GPU the best of ``CONFIGS``
    (Triton's autotuner, keyed on the sizes, tiles and precision; the first launch of a key times
    every config, which waits for the device; later launches do not), elsewhere (interpreter,
    ahead-of-time compilation) the single ``interpreter_config``."""
    if INTERPRET or not args[0].is_cuda:
        cfg = interpreter_config()
        kernel[grid](*args, **kwargs, BLOCK_K=cfg["BLOCK_K"], num_warps=warps(cfg["num_warps"]),
                     num_stages=cfg["num_stages"])
        return
    tuned = _TUNED.get(kernel)
    if tuned is None:
        configs = [triton.Config({"BLOCK_K": c["BLOCK_K"]}, num_warps=c["num_warps"],
                                 num_stages=c["num_stages"]) for c in CONFIGS]
        keys = [k for k in ("T", "C", "H", "W", "Kp", "CP", "IS_QUERY", "HAS_BIAS", "BLOCK_M",
                            "BLOCK_N", "PREC") if k in kernel.arg_names]
        tuned = _TUNED[kernel] = triton.autotune(configs=configs, key=keys)(kernel)
    tuned[grid](*args, **kwargs)


def _meta(x: Tensor) -> dict:
    return dict(ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype), PREC=input_precision(x.dtype))


def _tiles(x: Tensor) -> dict:
    kind = dot_kind(x.dtype, input_precision(x.dtype) == "tf32")
    return linear_tiles(x.shape[1], x.shape[2], kind)


def _layout(x: Tensor) -> dict:
    B, T, C, H, W = x.shape
    lay = linear_layout(T, C, H, W)
    if 3 * T * lay["CP"] * lay["L"] >= 2 ** 31:
        raise ValueError(f"triton-linear: x {tuple(x.shape)} is too large for int32 offsets "
                         f"inside one batch item of the padded operands")
    return lay


def _prepare(src: Tensor, nrm: Optional[Tensor], lay: dict, copies: int, dtype,
             transposed: bool = False) -> Tensor:
    """The zero-framed, padded copies ``(B, copies, T, CP, L)`` of ``src`` (normalized by ``nrm``
    when given) in ``dtype``; ``transposed``: ``(B, copies, L, T, CP)``."""
    B, T, C, H, W = src.shape
    CP, L = lay["CP"], lay["L"]
    shape = (B, copies, L, T, CP) if transposed else (B, copies, T, CP, L)
    out = poisoned(shape, src, dtype)
    linear_prep_fwd_kernel[(cdiv(L, _PREP_PIXELS), T, B)](
        src, nrm if nrm is not None else src, out, T, C, H, W, lay["Wp"], L, COPIES=copies,
        NORMALIZE=nrm is not None, TRANSPOSED=transposed, BLOCK_C=CP, BLOCK_S=_PREP_PIXELS,
        ACC=acc_dtype(src.dtype), num_warps=warps(8))
    return out


def _weights(weight: Tensor, x: Tensor, lay: dict) -> Tensor:
    """``wq[t * 9 + d, q]`` (accumulator dtype): the fusion weight on the padded pixel grid."""
    B, T, C, H, W = x.shape
    w = weight.to(acc_torch_dtype(x.dtype)).reshape(H, W, T * 9).permute(2, 0, 1)
    w = torch.nn.functional.pad(w, (0, lay["Wp"] - W)).reshape(T * 9, H * lay["Wp"])
    return torch.nn.functional.pad(w, (0, lay["Kp"] - H * lay["Wp"])).contiguous()


def _state(kp: Tensor, wq: Tensor, src: Tensor, x: Tensor, lay: dict, is_query: bool) -> Tensor:
    B, T = x.shape[:2]
    s = poisoned((B, lay["P"], lay["R"]), x, kp.dtype)
    t = _tiles(x)["state"]
    _launch(linear_state_fwd_kernel, (lay["P"] // t["BLOCK_M"], lay["R"] // t["BLOCK_N"], B),
            kp, wq, src, s, T, lay["Wp"], lay["L"], lay["Kp"], IS_QUERY=is_query,
            SRC_COPIES=src.shape[1], CP=lay["CP"], **t, **_meta(x))
    return s


def _out(kp: Tensor, wq: Tensor, s: Tensor, sp: Optional[Tensor], bias: Optional[Tensor],
         x: Tensor, lay: dict, is_query: bool) -> Tensor:
    B, T, C, H, W = x.shape
    out = poisoned(x.shape, x)
    t = _tiles(x)["out"]
    has_bias = bias is not None
    _launch(linear_out_fwd_kernel, (lay["Kp"] // t["BLOCK_M"], lay["R"] // t["BLOCK_N"], B),
            kp, wq, s, sp if has_bias else wq, bias if has_bias else wq, out, T, C, H, W,
            lay["Wp"], lay["L"], lay["Kp"], IS_QUERY=is_query, HAS_BIAS=has_bias, CP=lay["CP"],
            **t, **_meta(x))
    return out


def _row_sums(a: Tensor, scale: Optional[Tensor], lay: dict) -> Tensor:
    """``(B, R)`` in the accumulator dtype: ``sum_n scale[n] a[b, t, c, n]`` on the padded rows
    (elementwise products and a sum: a matmul here could run in TF32)."""
    B, T, C, H, W = a.shape
    a = a.to(acc_torch_dtype(a.dtype)).reshape(B, T, C, H * W)
    s = a.sum(-1) if scale is None else (a * scale.to(a.dtype)).sum(-1)
    return torch.nn.functional.pad(s, (0, lay["CP"] - C)).reshape(B, lay["R"]).contiguous()


def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole CTAL op in linear order: ``y``, then for the backward ``G`` ``(B, P, R)`` in the
    dot dtype, the bias row ``sum_j v`` ``(B, R)`` and the clamped norms ``(B, T, N)`` (both in
    the accumulator dtype)."""
    check_device(x, "triton-linear")
    why = item_size_reason(x.shape[1], x.shape[2], x.shape[3] * x.shape[4])
    if why is not None:
        raise ValueError(f"triton-linear: {why}")
    lay = _layout(x)
    nrm = l2norm(x)
    kp = _prepare(x, nrm, lay, 3, x.dtype)  # n: K~ and Q~
    vp = _prepare(v, None, lay, 1, x.dtype)
    wq = _weights(weight, x, lay)
    g = _state(kp, wq, vp, x, lay, is_query=False)  # G = K~ V^T
    gp = _row_sums(v, None, lay)  # row P of G: sum_j v[:, j]
    y = _out(kp, wq, g, gp, bias, x, lay, is_query=True)  # Y^T = Q~^T G + b gp
    return y, g, gp, nrm


def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
             g: Tensor, gp: Tensor, nrm: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    check_device(x, "triton-linear")
    why = channel_reason(x.shape[2])
    if why is not None:
        raise ValueError(f"triton-linear backward: {why}")
    B, T, C, H, W = x.shape
    N = H * W
    lay = _layout(x)
    acc = acc_torch_dtype(x.dtype)
    kp = _prepare(x, nrm, lay, 3, x.dtype)
    dyp = _prepare(dy, None, lay, 1, x.dtype)
    # position-major copies for linear_bwd_kernel, whose K axis is the value rows (K-major
    # operands; TF32 wgmma needs them); three of v: dK~ reads V at q - d
    vt = _prepare(v, None, lay, 3, x.dtype, transposed=True)
    dyt = _prepare(dy, None, lay, 1, x.dtype, transposed=True)
    wq = _weights(weight, x, lay)
    dg = _state(kp, wq, dyp, x, lay, is_query=True)  # dG = Q~ dY^T
    dgp = _row_sums(dy, bias, lay) if bias is not None else None  # row P of dG: b^T dY
    dv = _out(kp, wq, dg, dgp, bias, x, lay, is_query=False)  # dV^T = K~^T dG + 1 (b^T dY)
    dx = poisoned(x.shape, x)
    dw_part = poisoned((B, N, T, 9), x, acc)
    t = _tiles(x)["bwd"]
    _launch(linear_bwd_kernel, (lay["Kp"] // t["BLOCK_N"], T, B),
            x, nrm, kp, vt, dyt, wq, g, dg, dx, dw_part, T, C, H, W, lay["Wp"], lay["L"], lay["Kp"],
            EPS=NORM_EPS, CP=t["BLOCK_C"], BLOCK_N=t["BLOCK_N"], **_meta(x))
    dw = dw_part.sum(0).reshape(N, T, 3, 3).to(x.dtype)
    db = None
    if bias is not None:  # db[n] = sum_r gp[r] dy[r, n], elementwise (no TF32)
        gpr = gp.reshape(B, T, lay["CP"])[:, :, :C, None]
        db = (dy.to(acc).reshape(B, T, C, N) * gpr).sum((0, 1, 2)).to(x.dtype)
    return dx, dv, dw, db


def _fake(x, v, weight, bias):
    B, T, C, H, W = x.shape
    acc = acc_torch_dtype(x.dtype)
    lay = linear_layout(T, C, H, W)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(B, lay["P"], lay["R"]), x.new_empty(B, lay["R"], dtype=acc),
            x.new_empty(B, T, H * W, dtype=acc))


linear_attention = define_op("triton_linear", forward, backward, fake=_fake,
                             saved=("g", "gp", "nrm"))
