"""Launch plan of the linear-order kernels (``kernels/linear.py``): the padded layout, tile sizes,
the autotune set and the FLOPs the launches really perform. Pure Python (no triton), so
``auto``'s cost model and the static report (``python -m ctal.kernels.compile_check``) can use it
anywhere.

Layout. Channels are padded to ``CP = channel_block(C)`` (a power of two, 16..128), image rows to a
pitch ``Wp = W`` rounded up to 16 elements, and the pixel axis of every GEMM runs over the padded
grid ``q = y * Wp + x`` (``Kp`` positions, ``H * Wp`` rounded up to the widest pixel tile). The
prepared copies have one zero row above and below the image (``L = Kp + 2 Wp`` positions), so a
3x3 shift ``(dy, dx)`` is the copy for ``dx`` read at the constant offset ``(dy + 1) Wp``. At the
paper shapes (``W`` a multiple of 16, ``H W`` a multiple of 128, ``C = 128``) nothing is padded.
"""
from __future__ import annotations

import os

from ._common import GPU_TILES, INTERPRET, cdiv, channel_block, tile

# The autotune set on a GPU: (BLOCK_K, num_warps, num_stages). BLOCK_K only changes how the
# K loops are cut (every K extent is a multiple of 64 or of the channel block; the kernels cap
# BLOCK_K at the channel block), never the padded work, so the FLOP count below holds whichever
# config the autotuner keeps. Each compiles for sm_90 without spills and within shared memory,
# with the tiles of ``linear_tiles`` for each dot kind (fp32 exact and TF32, bf16, fp16, fp64).
CONFIGS = [dict(BLOCK_K=64, num_warps=8, num_stages=3),
           dict(BLOCK_K=32, num_warps=8, num_stages=4),
           dict(BLOCK_K=64, num_warps=8, num_stages=2)]


def interpreter_config() -> dict:
    """The one config launched where there is nothing to autotune on (the interpreter, which
    cannot benchmark a set, and ahead-of-time compilation): config ``CTAL_LINEAR_CONFIG`` of
    ``CONFIGS`` (default 0), or under the interpreter without ``CTAL_GPU_TILES=1`` small blocks
    and one warp."""
    if INTERPRET and not GPU_TILES:
        return dict(BLOCK_K=16, num_warps=1, num_stages=1)
    return dict(CONFIGS[int(os.environ.get("CTAL_LINEAR_CONFIG", "0"))])


def _row_block(R: int) -> int:
    """The largest power of two <= 128 dividing ``R = T * CP`` (so value-row tiles need no mask)."""
    b = 128
    while R % b:
        b //= 2
    return b


def linear_layout(T: int, C: int, H: int, W: int) -> dict:
    """Padded sizes: ``CP`` channels, row pitch ``Wp``, ``Kp`` pixel positions of the GEMMs, ``L``
    positions per prepared row, ``R = T * CP`` value rows and ``P = 9 * R`` stacked rows."""
    CP = channel_block(C)
    Wp = cdiv(W, 16) * 16
    pix = tile(128)  # the widest pixel tile of the kernels below
    Kp = cdiv(H * Wp, pix) * pix
    R = T * CP
    return dict(CP=CP, Wp=Wp, Kp=Kp, L=Kp + 2 * Wp, R=R, P=9 * R)


def dot_kind(dtype, tf32: bool) -> str:
    """Which units the dots run on: ``"tensor"`` (TF32, bf16, fp16 tensor cores), ``"fp32"`` (exact
    fp32 on the FMA units) or ``"fp64"``."""
    name = str(dtype).replace("torch.", "")
    if name == "float64":
        return "fp64"
    return "fp32" if name == "float32" and not tf32 else "tensor"


def linear_tiles(T: int, C: int, kind: str = "tensor") -> dict:
    """Output tiles of the three GEMM kernels (``BLOCK_K`` comes from the autotune config):
    ``state`` (``S = Op Src^T``: ``G`` and ``dG``; rows of one (shift, task) chunk by value rows),
    ``out`` (``out^T = Op^T S``: ``Y`` and ``dV``; pixels by value rows) and ``bwd`` (``dQ~``,
    ``dK~`` folded into ``dn``; all channels of a task by pixels). ``kind`` (:func:`dot_kind`):
    the backward's pixel block narrows for exact fp32 dots above 64 channels and for fp64, and
    fp64 uses 64-wide tiles, so that the configs compile within registers and shared memory on
    sm_90. Tiles always
    divide the padded extents, so the work (``flops``) does not depend on them."""
    CP = channel_block(C)
    wide = 64 if kind == "fp64" else 128
    BR = min(_row_block(T * CP), tile(wide))
    pixels = {"tensor": 64, "fp32": 32 if CP > 64 else 64, "fp64": 16}[kind]
    return dict(state=dict(BLOCK_M=min(CP, tile(wide)), BLOCK_N=BR),
                out=dict(BLOCK_M=tile(wide), BLOCK_N=BR),
                bwd=dict(BLOCK_C=CP, BLOCK_N=tile(pixels)))


def flops(p, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of the linear kernels as launched for problem ``p`` (over the
    padded channels and pixel grid): the forward, or forward plus backward with ``backward=True``.
    Every launch's grid times its tile covers the padded extents exactly, so this is
    ``state + out`` forward (each ``P x R x Kp``) and again ``state + out + 2 T Kp 9 CP R``
    backward (``dQ~`` and ``dK~`` for each task's channels)."""
    lay = linear_layout(p.T, p.C, p.H, p.W)
    P, R, Kp, CP = lay["P"], lay["R"], lay["Kp"], lay["CP"]
    gemm = P * R * Kp  # one of G = K~ V^T, Y = Q~^T G (and dG, dV)
    macs = 2 * gemm
    if backward:
        macs += 2 * gemm + p.T * Kp * 9 * 2 * CP * R
    return 2 * p.B * macs
