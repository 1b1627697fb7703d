"""CPU benchmark of the compiled extension: the "cpp" backend (C++ gathers/scatters with
at::parallel_for around BLAS GEMMs) against the PyTorch linear path ("linear") and the literal
reference, forward and forward+backward, B=1, T=3, C=128, grids up to the NYUv2 72x96.

    .venv/bin/python benchmarks/bench_cpu.py                   # cpu group: 18x24, 36x48, 72x96
    .venv/bin/python benchmarks/bench_cpu.py --shapes tiny --repeat 3
    .venv/bin/python benchmarks/bench_cpu.py --no-reference-above 3000

Prints a table with ratios and writes benchmarks/results/cpu-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.shapes import resolve  # noqa: E402
from ctal import ops  # noqa: E402
from ctal.ops import dispatch, extension  # noqa: E402


def _time(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time in ms (CPU work is synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(backend: str, shape, dtype, repeat: int) -> dict:
    B, T, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(B, T, C, H, W, generator=g, dtype=dtype) for _ in range(2))
    w = torch.randn(H * W, T, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(H * W, generator=g, dtype=dtype)
    dy = torch.randn(B, T, C, H, W, generator=g, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, v, w, b)]

    def fwd():
        with torch.no_grad():
            ops.ctal_attention(x, v, w, b, backend=backend)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        ops.ctal_attention(*leaves, backend=backend).backward(dy)

    p = dispatch.Problem(B, T, C, H, W, dtype, torch.device("cpu"))
    algo = ops.backends()[backend].algorithm
    f_ms = _time(fwd, repeat)
    fb_ms = _time(fwd_bwd, repeat)
    return dict(backend=backend, algorithm=algo, shape=list(shape), fwd_ms=f_ms, fwd_bwd_ms=fb_ms,
                fwd_gflops=dispatch.flops(algo, p) / f_ms / 1e6,
                fwd_bwd_gflops=(dispatch.flops(algo, p) + dispatch.flops(algo, p, backward=True))
                / fb_ms / 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["cpu"], help="shape or group names (benchmarks/shapes.py)")
    ap.add_argument("--backends", nargs="+", default=["cpp", "linear", "reference"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-reference-above", type=int, default=10 ** 9, metavar="N",
                    help="skip the reference when H*W exceeds N (it holds (T+2) N^2 floats)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shapes = resolve(args.shapes)
    if "cpp" in args.backends and not extension.is_built():
        print(f"note: {extension.build_error()}; benchmarking the other backends", file=sys.stderr)
        args.backends = [b for b in args.backends if b != "cpp"]

    rows = []
    for name, shape in shapes.items():
        for backend in args.backends:
            if backend == "reference" and shape[3] * shape[4] > args.no_reference_above:
                continue
            r = bench_one(backend, shape, dtype, args.repeat)
            r["name"] = name
            rows.append(r)
            print(f"  {name:<12} {backend:<10} fwd {r['fwd_ms']:10.2f} ms  fwd+bwd {r['fwd_bwd_ms']:10.2f} ms",
                  file=sys.stderr, flush=True)

    print(f"\nCPU, {torch.get_num_threads()} threads, {args.dtype}, median of {args.repeat}")
    print(f"{'shape':<12} {'backend':<10} {'fwd ms':>10} {'fwd+bwd ms':>11} {'GFLOP/s':>8} "
          f"{'vs ref':>8} {'vs linear':>9}")
    for r in rows:
        same = {x["backend"]: x for x in rows if x["name"] == r["name"]}
        ref, lin = same.get("reference"), same.get("linear")
        r["speedup_vs_reference"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref else None
        r["speedup_vs_linear"] = lin["fwd_bwd_ms"] / r["fwd_bwd_ms"] if lin else None
        fmt = lambda s: f"{s:7.2f}x" if s else "      -"  # noqa: E731
        print(f"{r['name']:<12} {r['backend']:<10} {r['fwd_ms']:10.2f} {r['fwd_bwd_ms']:11.2f} "
              f"{r['fwd_bwd_gflops']:8.1f} {fmt(r['speedup_vs_reference']):>8} {fmt(r['speedup_vs_linear']):>9}")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = os.path.join(args.out, f"cpu-{stamp:%Y%m%d-%H%M%S}.json")
    meta = dict(device="cpu", processor=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                date=stamp.isoformat(), dtype=args.dtype, repeat=args.repeat,
                extension_built=extension.is_built(), parallel=torch.__config__.parallel_info())
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print(f"\nwrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
