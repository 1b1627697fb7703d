"""ctal entry point. Until the training pipeline lands, this runs a small real demonstration of
the CTAL op: the exact linear form against the literal reference on NYUv2-shaped features."""
from __future__ import annotations

import time

import torch

from ctal import ops


def main() -> None:
    torch.manual_seed(0)
    B, T, C, H, W = 1, 3, 128, 36, 48
    x, v = torch.randn(B, T, C, H, W), torch.randn(B, T, C, H, W)
    w, b = torch.randn(H * W, T, 3, 3), torch.randn(H * W)
    print(ops.explain(x, v, w, b))
    out = {}
    for name in ("reference", "linear"):
        t0 = time.perf_counter()
        out[name] = ops.ctal_attention(x, v, w, b, backend=name)
        print(f"{name:>9}: {1e3 * (time.perf_counter() - t0):8.1f} ms")
    err = (out["linear"] - out["reference"]).norm() / out["reference"].norm()
    print(f"relative difference linear vs reference: {err:.2e}")


if __name__ == "__main__":
    main()
