"""Benchmark every CTAL op backend side by side: ``python -m benchmarks.bench_ops``.

Each (shape, backend, mode) case runs in its own subprocess so that peak memory is honest on
CPU too (peak RSS growth over the process's state just before the case; on CUDA the allocator's
peak) and an out-of-memory or crash is recorded as a result instead of ending the run.
Times are medians over ``--repeats`` runs after ``--warmup``; TFLOP/s use ``ctal.ops.flops`` of the
backend's algorithm (forward products; fwd+bwd counts three times the forward).

Dtypes: ``fp32`` (exact: TF32 off for matmuls *and* cuDNN convolutions), ``tf32`` (fp32 tensors,
TF32 tensor cores allowed everywhere, including the Triton dots), ``bf16``, ``fp16``, ``fp64``.
Pseudo-backends: ``reference-compiled`` is ``torch.compile`` of the reference; ``gemm-ceiling``
times one cuBLAS/MKL batched GEMM of the linear form's own shape (``(9TC x N) @ (N x TC)`` per
batch item), so each linear-algorithm row also reports the fraction of that ceiling it reaches.
Ratios (``vs reference``, ``vs compiled``) are between medians of this same run.
Writes ``benchmarks/results/ops-<device>-<date>T<hhmm>.json`` and a markdown table next to it.

On CUDA the times are CUDA-event spans (from just before the forward to just after the backward),
on CPU wall-clock spans. For time-boxed runs (scripts/gpu_session.sh): ``--jsonl`` appends each
result as one flushed JSON line, ``--deadline`` (Unix time) records the cases it leaves no time
for as ``skipped (deadline)`` instead of starting them, and ``--inprocess`` runs the CUDA cases in
this process (no interpreter start per case; the allocator's peak is reset per case) and goes
back to one process per case after a CUDA error that poisons the process. SIGINT ends the run
after writing what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.tables import RESULTS, add_ratios, markdown, write_results

DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp64": "float64", "fp16": "float16"}
PSEUDO = ("reference-compiled", "gemm-ceiling")


def _gemm_ceiling(shape, dtype, dev, sync, warmup, repeats) -> dict:
    """Median time and TFLOP/s of one batched GEMM of the linear form's shape."""
    import torch
    B, T, C, H, W = shape
    N, P, R = H * W, 9 * T * C, T * C
    a = torch.randn(B, P, N, device=dev, dtype=dtype)
    b = torch.randn(B, N, R, device=dev, dtype=dtype)
    times = _time(lambda: torch.bmm(a, b), dev, sync, warmup, repeats)
    med = statistics.median(times)
    flop = 2 * B * P * N * R
    return dict(status="ok", algorithm="gemm", median_ms=med * 1e3, p20_ms=min(times) * 1e3,
                p80_ms=max(times) * 1e3, gflop=flop / 1e9, tflops=flop / med / 1e12, peak_mb=0.0)


def _time(fn, dev, sync, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup``: CUDA events around each call on a
    GPU (the device's own span, unaffected by host jitter), wall clock on the CPU."""
    import torch
    times = []
    for i in range(warmup + repeats):
        sync()
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return times


def _run_case(case: dict) -> dict:
    """Runs in the child process: one backend, one shape, one mode."""
    import torch
    from ctal import ops

    dev = torch.device(case["device"])
    dtype = getattr(torch, DTYPES[case["dtype"]])
    tf32 = case["dtype"] == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32  # on by default in PyTorch: the reference's conv would use TF32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    B, T, C, H, W = case["shape"]
    name = case["backend"]
    if name == "gemm-ceiling":
        return _gemm_ceiling(case["shape"], dtype, dev, sync, case["warmup"], case["repeats"])
    p = ops.Problem(B, T, C, H, W, dtype, dev)
    if name not in PSEUDO:
        table = ops.backends()
        if name not in table:
            raise ValueError(f"backend must be one of {sorted(table) + list(PSEUDO)}, got {name!r}")
        why = table[name].unsupported(p)
        if why is not None:
            return dict(status="unsupported", error=why)
    torch.manual_seed(0)
    make = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
    x, v, w, b = make(B, T, C, H, W), make(B, T, C, H, W), make(H * W, T, 3, 3), make(H * W)
    grad = case["mode"] == "fwdbwd"
    for t in (x, v, w, b):
        t.requires_grad_(grad)
    if name == "reference-compiled":
        fn = torch.compile(ops.reference.ctal_attention)
        algorithm = "quadratic"
    else:
        algorithm = table[name].algorithm
        fn = lambda *a: ops.ctal_attention(*a, backend=name)  # noqa: E731
    dy = torch.randn_like(x)

    def step():
        y = fn(x, v, w, b)
        if grad:
            y.backward(dy)
            for t in (x, v, w, b):
                t.grad = None
        return y

    # Trigger lazy imports and one-time setup on a tiny problem so they do not count as memory.
    tiny = [t.detach()[:1, :, :1, :1, :1].clone().requires_grad_(grad) for t in (x, v)]
    tw, tb = w.detach()[:1].clone().requires_grad_(grad), b.detach()[:1].clone().requires_grad_(grad)
    if name != "reference-compiled":
        ty = fn(*tiny, tw, tb)
        if grad:
            ty.sum().backward()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    times = _time(step, dev, sync, case["warmup"], case["repeats"])
    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2 ** 20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    flop = ops.flops(algorithm, p, backward=grad)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [med] * 4
    return dict(status="ok", algorithm=algorithm, median_ms=med * 1e3, p20_ms=q[0] * 1e3,
                p80_ms=q[-1] * 1e3, gflop=flop / 1e9, tflops=flop / med / 1e12, peak_mb=peak_mb,
                timer="cuda-event" if dev.type == "cuda" else "wall")


# CUDA errors after which the process's context is unusable (later cases need a fresh process).
_STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert",
           "misaligned address", "illegal instruction")


def run_case_inprocess(case: dict) -> tuple[dict, bool]:
    """Runs one case in this process (meant for CUDA, where the allocator's peak can be reset per
    case); returns the result and whether the process's CUDA context is still usable."""
    import gc

    import torch
    try:
        result = dict(case, **_run_case(case))
        healthy = True
    except Exception as exc:  # failures are results, as in run_case
        msg = f"{type(exc).__name__}: {exc}".strip()
        healthy = not any(s in msg.lower() for s in _STICKY)
        status = "oom" if "out of memory" in msg.lower() else "error"
        result = dict(case, status=status, error=msg.splitlines()[0][:300] if msg else status)
    gc.collect()
    if healthy and case["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result, healthy


def run_case(case: dict, timeout: float) -> dict:
    """Runs one case in a fresh interpreter; failures become results."""
    cmd = [sys.executable, "-m", "benchmarks.bench_ops", "--case", json.dumps(case)]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return dict(case, status=f"timeout>{timeout:.0f}s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["killed (likely out of memory)"])[-1]
        status = "oom" if ("out of memory" in err.lower() or out.returncode in (-9, 137)) else "error"
        return dict(case, status=status, error=err[:300])
    return dict(case, **json.loads(lines[-1]))


def environment(device: str) -> dict:
    import torch
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or
               platform.machine(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        env["commit"] = None
    return env


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--shapes", default=None, help="comma list of shape or group names (default: "
                    "'paper' on cuda, 'cpu' on cpu); see benchmarks/shapes.py")
    ap.add_argument("--backends", default="all", help="comma list, 'all' = every backend that runs "
                    "on the device plus the pseudo-backends reference-compiled and gemm-ceiling")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--dtypes", default="fp32", help=f"comma list of {sorted(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--out", default=str(RESULTS), help="results folder ('' = do not write)")
    ap.add_argument("--report", action="store_true", help="then render plots and update the README "
                    "(python -m benchmarks.report)")
    ap.add_argument("--jsonl", help="also append each result to this file as one JSON line")
    ap.add_argument("--deadline", type=float, help="Unix time: cases that would start later (or "
                    "with under 5 s left) are recorded as skipped; per-case timeouts end there")
    ap.add_argument("--inprocess", action="store_true", help="CUDA: run the cases in this process "
                    "(on the CPU the RSS high-water mark cannot be reset, so cases keep their own)")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))), flush=True)
        return []

    import torch
    from ctal import ops
    from benchmarks.shapes import resolve

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = resolve((args.shapes or ("paper" if device == "cuda" else "cpu")).split(","))
    names = (ops.available_backends(device) + list(PSEUDO) if args.backends == "all"
             else args.backends.split(","))
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    if "tf32" in args.dtypes.split(",") and device != "cuda":
        raise SystemExit("--dtypes tf32 means TF32 tensor cores: it needs --device cuda")
    env = environment(device)
    results = []
    modes = args.modes.split(",")
    cases = [dict(name=s, shape=list(shape), backend=bk, mode=m, dtype=dt, device=device,
                  repeats=args.repeats, warmup=args.warmup)
             for s, shape in shapes.items() for dt in args.dtypes.split(",")
             for m in modes for bk in names
             if bk != "gemm-ceiling" or m == modes[0]]  # a rate: once per shape and dtype
    try:
        from tqdm import tqdm
        cases_iter = tqdm(cases, desc="ctal bench", unit="case")
    except ImportError:
        cases_iter = cases
    out = Path(args.out) if args.out else None
    inprocess = args.inprocess and device == "cuda"
    try:
        for case in cases_iter:
            left = None if args.deadline is None else args.deadline - time.time()
            if left is not None and left < 5:
                result = dict(case, status="skipped (deadline)")
            elif inprocess:
                result, inprocess = run_case_inprocess(case)
            else:
                result = run_case(case, args.timeout if left is None else min(args.timeout, left))
            results.append(result)
            add_ratios(results)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(result) + "\n")
            if out is not None:  # after every case: a run stopped early keeps what it measured
                write_results(out, "ops", env, results, markdown(results, env), quiet=True)
    except KeyboardInterrupt:
        print(f"interrupted after {len(results)} of {len(cases)} cases", file=sys.stderr)
    table = markdown(results, env)
    print(table)
    if out is not None:
        write_results(out, "ops", env, results, table)
        if args.report:
            report.main(["--results", str(out)])
    return results


if __name__ == "__main__":
    main()
