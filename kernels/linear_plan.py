"""Launch plan of the linear-order kernels (``kernels/linear.py``): tile sizes and the FLOPs the
launches really perform. Pure Python (no triton), so ``auto``'s cost model and the static report
(``python -m ctal.kernels.compile_check``) can use it anywhere."""
from __future__ import annotations

from ._common import cdiv, channel_block, tile


def linear_tiles(C: int) -> dict:
    """Tiles: ``state`` (``G = K~ V^T``, ``dG``), ``out`` (``Y = G^T Q~``, ``dV``) and ``bwd``
    (``dQ~``/``dK~`` folded into ``dn``, ``dw``, ``db``)."""
    return dict(state=dict(BLOCK_P=tile(64), BLOCK_R=tile(64), BLOCK_N=tile(32)),
                out=dict(BLOCK_P=tile(32), BLOCK_R=tile(64), BLOCK_N=tile(64)),
                bwd=dict(BLOCK_N=tile(32 if C > 64 else 64), BLOCK_R=tile(16),
                         BLOCK_C=channel_block(C)))


def _padded(n: int, block: int) -> int:
    return cdiv(n, block) * block


def flops(p, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of the linear kernels as launched for problem ``p`` (tiles
    padded to their block sizes): the forward, or forward plus backward with ``backward=True``."""
    R, N = p.T * p.C, p.N
    P1 = 9 * R + 1
    t = linear_tiles(p.C)
    s, o, b = t["state"], t["out"], t["bwd"]
    state = _padded(P1, s["BLOCK_P"]) * _padded(R, s["BLOCK_R"]) * _padded(N, s["BLOCK_N"])
    out = _padded(N, o["BLOCK_N"]) * _padded(R, o["BLOCK_R"]) * _padded(P1 - 1, o["BLOCK_P"])
    macs = state + out
    if backward:
        macs += state + out + p.T * _padded(N, b["BLOCK_N"]) * 9 * 2 * b["BLOCK_C"] * _padded(R, b["BLOCK_R"])
    return 2 * p.B * macs
