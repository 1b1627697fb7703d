"""GPU benchmark of the Triton CTAL backends against the reference and torch.compile(reference).

    python benchmarks/bench_triton.py                      # paper shapes, fp32 (IEEE) on CUDA
    python benchmarks/bench_triton.py --precision tf32     # TF32 tensor cores for fp32
    python benchmarks/bench_triton.py --precision bf16 --shapes nyuv2 n19200
    python benchmarks/bench_triton.py --dry-run            # tiny shape; TRITON_INTERPRET=1 on CPU

For every (shape, mode, backend): median milliseconds over ``--repeats`` timed runs after
``--warmup``, TFLOP/s from ``ctal.ops.flops`` (the backend's algorithm; fwd+bwd counts three
times the forward), and peak extra CUDA memory over the inputs. Speed-ups against ``reference``
and ``reference-compiled`` of the same run, and (for the linear algorithm) the fraction of the
measured dense-GEMM ceiling, i.e. a cuBLAS bmm of the linear form's own GEMM shapes.
Writes ``benchmarks/results/triton-<device>-<precision>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.shapes`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = ["nyuv2", "cityscapes", "pascal-swin", "n19200"]
TRITON_BACKENDS = ["triton-fused", "triton-linear", "triton-staged"]
DEFAULT_BACKENDS = TRITON_BACKENDS + ["linear", "reference", "reference-compiled"]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=PAPER,
                    help="shape names from benchmarks/shapes.py (default: the paper shapes)")
    ap.add_argument("--backends", nargs="+", default=None,
                    help=f"backend names, plus 'reference-compiled' (default: {DEFAULT_BACKENDS})")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-limit-gib", type=float, default=None,
                    help="skip cases whose literal N x N matrices would exceed this (default: "
                         "free device memory)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    ap.add_argument("--dry-run", action="store_true",
                    help="one tiny shape, 1 repeat, no torch.compile: checks the script end to end "
                         "(under TRITON_INTERPRET=1 without a GPU)")
    return ap.parse_args(argv)


def _shapes(names, dry_run):
    if dry_run:
        return {"dry-run": (1, 2, 3, 3, 5)}
    from benchmarks.shapes import resolve
    return resolve(names)


def _sync(dev):
    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize(dev)


def _gemm_ceiling(shape, dtype, dev, repeats):
    """TFLOP/s of cuBLAS on the linear form's two GEMMs ((9TC x N) @ (N x TC), batched over B)."""
    import torch
    B, T, C, H, W = shape
    N, P, R = H * W, 9 * T * C, T * C
    a = torch.randn(B, P, N, device=dev, dtype=dtype)
    b = torch.randn(B, N, R, device=dev, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        _sync(dev)
        t0 = time.perf_counter()
        torch.bmm(a, b)
        _sync(dev)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * B * P * N * R / statistics.median(times) / 1e12


def _case(name, shape, mode, dtype, dev, warmup, repeats, mem_limit):
    import torch
    from ctal import ops
    B, T, C, H, W = shape
    N = H * W
    problem = ops.Problem(B, T, C, H, W, dtype, dev)
    row = dict(backend=name, shape=list(shape), mode=mode, ms=None, tflops=None, peak_mb=None,
               status="ok")
    if name == "reference-compiled":
        fn, algorithm = torch.compile(ops.reference.ctal_attention), "quadratic"
    else:
        table = ops.backends()
        if name not in table:
            raise SystemExit(f"backend must be one of {sorted(table) + ['reference-compiled']}, "
                             f"got {name!r}")
        why = table[name].unsupported(problem)
        if why is not None:
            row["status"] = f"unsupported: {why}"
            return row
        algorithm = table[name].algorithm
        fn = lambda *a: ops.ctal_attention(*a, backend=name)  # noqa: E731
    row["algorithm"] = algorithm
    elt = torch.empty((), dtype=dtype).element_size()
    if name.startswith("reference") or name == "triton-staged":
        need = B * (T + 2) * N * N * elt * (2 if mode == "fwdbwd" else 1)
        if need > mem_limit:
            row["status"] = f"skipped: needs ~{need / 2 ** 30:.1f} GiB of N x N matrices"
            return row
    grad = mode == "fwdbwd"
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype).requires_grad_(grad)  # noqa: E731
    x, v, w, b = mk(B, T, C, H, W), mk(B, T, C, H, W), mk(N, T, 3, 3), mk(N)
    dy = torch.randn_like(x)

    def step():
        y = fn(x, v, w, b)
        if grad:
            y.backward(dy)
            for t in (x, v, w, b):
                t.grad = None

    try:
        for _ in range(warmup):
            step()
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        times = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as exc:  # recorded, not fatal
        row["status"] = f"out of memory: {str(exc).splitlines()[0]}"
        return row
    ms = statistics.median(times) * 1e3
    row["ms"] = ms
    row["tflops"] = ops.flops(algorithm, problem, backward=grad) / (ms * 1e-3) / 1e12
    if dev.type == "cuda":
        row["peak_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    return row


def main(argv=None) -> dict:
    args = _parse(argv)
    import torch
    import ctal.kernels as kernels

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.dry_run:
        raise SystemExit("bench_triton needs a CUDA device (use --dry-run to check the script)")
    if dev.type == "cpu" and not kernels.INTERPRET:
        raise SystemExit("--dry-run without a CUDA device needs TRITON_INTERPRET=1 set before "
                         "triton is imported")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    backends = args.backends or (TRITON_BACKENDS + ["linear", "reference"] if args.dry_run
                                 else DEFAULT_BACKENDS)
    warmup, repeats = (1, 1) if args.dry_run else (args.warmup, args.repeats)
    if args.memory_limit_gib is not None:
        mem_limit = args.memory_limit_gib * 2 ** 30
    elif dev.type == "cuda":
        mem_limit = 0.8 * torch.cuda.mem_get_info(dev)[0]
    else:
        mem_limit = 2 ** 30

    results = []
    for sname, shape in _shapes(args.shapes, args.dry_run).items():
        ceiling = None
        if dev.type == "cuda":
            ceiling = _gemm_ceiling(shape, dtype, dev, max(3, repeats // 2))
        for mode in args.modes:
            rows = []
            for name in backends:
                row = _case(name, shape, mode, dtype, dev, warmup, repeats, mem_limit)
                row["shape_name"] = sname
                rows.append(row)
                print(f"{sname:12s} {mode:7s} {name:20s} "
                      + (f"{row['ms']:9.3f} ms {row['tflops']:8.3f} TFLOP/s"
                         + (f" {row['peak_mb']:9.1f} MB" if row["peak_mb"] is not None else "")
                         if row["ms"] is not None else row["status"]), flush=True)
            base = {r["backend"]: r["ms"] for r in rows if r["ms"] is not None}
            for r in rows:
                if r["ms"] is None:
                    continue
                for ref in ("reference", "reference-compiled"):
                    if ref in base and r["backend"] != ref:
                        r[f"speedup_vs_{ref}"] = base[ref] / r["ms"]
                if ceiling is not None and r.get("algorithm") == "linear":
                    r["gemm_ceiling_tflops"] = ceiling
                    r["fraction_of_gemm_ceiling"] = r["tflops"] / ceiling
            results.extend(rows)

    import triton
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, precision=args.precision,
        dry_run=args.dry_run, warmup=warmup, repeats=repeats,
        flops_note="ctal.ops.flops of the backend's algorithm; fwd+bwd = 3x forward",
        results=results)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="bench_triton_")) / "dry-run.json"
    else:
        tag = report["device"].replace(" ", "-").lower()
        out = RESULTS / f"triton-{tag}-{args.precision}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    if "--dry-run" in sys.argv and not __import__("torch").cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    main()
