"""Launch plan of the fused quadratic kernels (``kernels/fused.py``): tile sizes and the FLOPs the
launches really perform. Pure Python (no triton), so ``auto``'s cost model and the static report
(``python -m ctal.kernels.compile_check``) can use it anywhere."""
from __future__ import annotations

from ._common import cdiv, channel_block, tile


def fused_tiles(C: int) -> dict:
    """Tiles of the fused quadratic kernels for ``C`` channels.

    ``BLOCK_R`` value rows per program in the forward and value-backward kernels: each program
    re-forms its ``[BLOCK_M, BLOCK_N]`` tile of M, so the work is ``cdiv(T*C, BLOCK_R)`` times the
    M-forming work; 128 is the widest that compiles without register spills for C = 128 on sm_90
    (``python -m ctal.kernels.compile_check``). ``BLOCK_R_CHUNK`` is the reduction chunk over
    value rows when the backward kernels form dM (register use only)."""
    wide = channel_block(C) > 64  # wide channel tiles: smaller query/key tiles
    return dict(BLOCK_M=tile(32 if wide else 64), BLOCK_N=tile(32 if wide else 64),
                BLOCK_R=tile(128 if wide else 64), BLOCK_R_CHUNK=tile(32 if wide else 64))


def flops(p, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of the fused kernels as launched for problem ``p``: the forward,
    or forward plus backward with ``backward=True``.

    Per (query, key) pair, with R = T C: the forward forms M as 9T shifted dots of length C once
    per ``BLOCK_R`` block of value rows (``cdiv(R, BLOCK_R)`` times) and multiplies it with R value
    rows; the backward's query side re-forms dM per task (``T R + 9 T C``), its key side per task
    and shift (``9 T R + 9 T C``), and its value side re-forms M like the forward."""
    R = p.T * p.C
    forms = cdiv(R, fused_tiles(p.C)["BLOCK_R"])
    fwd = forms * 9 * R + R
    total = fwd
    if backward:
        total += (p.T * R + 9 * R) + (9 * p.T * R + 9 * R) + fwd
    return 2 * p.B * p.N * p.N * total
