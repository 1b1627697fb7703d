"""The benchmark shape registry: (B, T, C, H, W) at the paper settings (NYUv2, Cityscapes, PASCAL-Context)."""
from __future__ import annotations

SHAPES = {
    "nyuv2": (8, 3, 128, 72, 96),        # 288x384 input, features at 1/4
    "cityscapes": (8, 2, 128, 32, 64),   # 128x256 input, features at 1/4
    "pascal-swin": (8, 5, 128, 16, 16),  # 512x512 input, Swin features at 1/32
    "n19200": (8, 3, 128, 120, 160),     # the size the reference cannot hold on one 80 GB GPU
}
# Scaling curve: N grows at fixed T, C.
SWEEP = {f"sweep-{h}x{w}": (1, 3, 128, h, w) for h, w in
         [(9, 12), (18, 24), (27, 36), (36, 48), (54, 72), (72, 96)]}
# What this (2-core) machine class can measure: batch 1, up to the NYUv2 grid.
CPU = {f"cpu-{h}x{w}": (1, 3, 128, h, w) for h, w in [(18, 24), (36, 48), (72, 96)]}
TINY = {"tiny": (1, 2, 8, 5, 7)}
GROUPS = {"paper": SHAPES, "sweep": SWEEP, "cpu": CPU, "tiny": TINY}


def resolve(names: list[str]) -> dict[str, tuple]:
    """Shape names or group names -> {name: (B, T, C, H, W)}."""
    out = {}
    every = {k: v for g in GROUPS.values() for k, v in g.items()}
    for n in names:
        if n in GROUPS:
            out.update(GROUPS[n])
        elif n in every:
            out[n] = every[n]
        else:
            raise SystemExit(f"unknown shape {n!r}; choose from groups {sorted(GROUPS)} or {sorted(every)}")
    return out
