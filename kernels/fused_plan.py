"""Launch plan of the fused quadratic kernels (``kernels/fused.py``): tile sizes, scratch sizes and
the FLOPs the launches really perform. Pure Python (no triton), so ``auto``'s cost model and the
static report (``python -m ctal.kernels.compile_check``) can use it anywhere."""
from __future__ import annotations

from ._common import cdiv, channel_block, next_pow2, tile


def fused_tiles(C: int, H: int, W: int, dots: str = "tensor") -> dict:
    """Tiles of the fused quadratic kernels for ``C`` channels on an ``H x W`` grid. ``dots``:
    ``"tensor"`` (TF32 / bf16 / fp16 tensor cores), ``"fp32"`` (exact fp32 dots, which Triton
    runs as FMAs with each operand's K slice in registers) or ``"fp64"``; the FMA paths take
    smaller query / chunk / value-row tiles (by channel tile) so that nothing spills on sm_90 at
    C <= 128 in fp32, TF32, bf16 and fp16 (``python -m ctal.kernels.compile_check``; fp64 keeps up
    to 64 bytes of local memory per thread in the forward and 8 in the query backward). The key
    tiles, and so the FLOPs, are the same for every ``dots``.

    - ``BLOCK_M`` queries per forward program (per loop step in the value backward);
      ``BLOCK_M_QUERY`` per query-backward program (wider with tensor cores: the key side of
      ``dn`` is one atomic add per key and channel per query block); ``BLOCK_N`` keys per loop
      step of the forward / query backward;
      ``BLOCK_N_VALUE`` keys per value-backward program (wide, so its Gram halo is a small part).
    - ``BLOCK_H``: the Gram is formed in chunks of ``BLOCK_H`` keys. ``LEAD`` (the stencil reach
      ``W + 1`` rounded up to whole chunks) is how far the Gram runs ahead of the key tile, so
      chunks start on multiples of ``BLOCK_H``.
    - ``RING``: columns of the per-program Gram ring (a power of two holding the key tile, its
      lead and the ``W + 1`` keys behind it; or the whole grid when that is smaller).
    - ``VALUE_RING``: columns of the value backward's Gram scratch (a power of two holding its key
      tile plus ``LEAD`` keys on both sides).
    - ``BLOCK_R``: value rows per ``M . V`` / ``dM`` product (registers only: every program
      covers all ``T C`` value rows, so M and dM are formed once per tile).
    """
    if dots not in ("tensor", "fp32", "fp64"):
        raise ValueError(f"dots must be 'tensor', 'fp32' or 'fp64', not {dots!r}")
    N = H * W
    bn, bnv, grain = tile(128), tile(256), tile(32, 16)
    if dots == "tensor":
        bm, bmq, bh, br = tile(32), tile(64), grain, tile(32)
    elif dots == "fp32" and channel_block(C) <= 64:
        bm, bh, br = tile(32), tile(16), tile(16)
        bmq = bm
    else:  # fp32 with a 128-channel tile, fp64
        bm, bh, br = tile(16), tile(16), tile(16 if dots == "fp64" else 32)
        bmq = bm
    lead = cdiv(W + 1, grain) * grain  # a multiple of every BLOCK_H above
    ring = next_pow2(min(N, bn + lead + W + 1))
    return dict(BLOCK_M=bm, BLOCK_M_QUERY=bmq, BLOCK_N=bn, BLOCK_N_VALUE=bnv, BLOCK_H=bh, BLOCK_R=br, LEAD=lead,
                RING=ring, VALUE_RING=next_pow2(bnv + 2 * lead))


def value_halo_keys(H: int, W: int) -> int:
    """Keys whose Gram the value backward forms per query: for each key tile, the tile and the
    ``LEAD`` keys on both sides, clipped to the grid."""
    N = H * W
    t = fused_tiles(0, H, W)
    bnv, lead = t["BLOCK_N_VALUE"], t["LEAD"]
    return sum(min(j0 + bnv + lead, N) - max(j0 - lead, 0) for j0 in range(0, N, bnv))


def flops(p, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of the fused kernels as launched for problem ``p``: the forward,
    or forward plus backward with ``backward=True``. Counted over real (query, key, channel,
    value-row) elements; tile padding (partial tiles, channels below the channel tile, masked
    chunk columns) is not counted.

    Per (query, key) pair, with R = T C:
    - forward: each Gram entry once per task (``T C``, the ring), the stencil (``9 T``) and
      ``M . V`` (``R``), the quadratic minimum;
    - query backward: ``dM`` once (``R``), the Gram again (``T C``), ``dw`` and ``dS`` stencils
      (``18 T``), ``dn`` of the queries and of the keys (``2 T C``);
    - value backward: the Gram over each key tile plus its halo (``value_halo_keys`` keys per
      query, ``T C`` each), the stencil (``9 T``) and ``dV`` (``R``)."""
    B, N, T, C = p.B, p.N, p.T, p.C
    R = T * C
    total = N * N * (T * C + 9 * T + R)
    if backward:
        total += N * N * (R + 3 * T * C + 18 * T)
        total += N * value_halo_keys(p.H, p.W) * T * C + N * N * (9 * T + R)
    return 2 * B * total
