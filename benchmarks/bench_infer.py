"""Inference throughput of ``ctal.predict``: ``python -m benchmarks.bench_infer``.

Images/s and peak memory of :class:`ctal.predict.Predictor` (preprocessing, the network,
postprocessing back to the image's size) on random images at the paper resolutions (NYUv2
288x384 with semseg / depth / normals, Cityscapes 128x256 with semseg / depth), CTALNet with
random weights (speed does not depend on them). Variants: the PyTorch model with the CTAL op on
a named backend (default ``reference``, ``linear`` and ``auto``, what ``ctal.predict`` runs by
default), and ``onnx``: the same model exported by
``ctal.export`` (linear-traceable form) and run by onnxruntime (the export happens before the
case, outside its time and memory).

Each case runs in its own subprocess (an out-of-memory is a recorded result). Peak MB is the
process's RSS high-water mark over its RSS just before the model is built (or the ONNX session
created; the mark is reset there): weights, activations, workspaces. The time is the median of
``--repeats`` calls on ``--batch`` images after one warm-up call. PyTorch and onnxruntime get the
same number of intra-op threads (``--threads``, default 1). The machine's load average is
recorded with the results: other processes on the CPU slow every case.
Writes ``benchmarks/results/infer-<device>-<date>T<hhmm>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_ops import environment
from benchmarks.tables import RESULTS, write_results

SETTINGS = {  # the paper's shapes: input size, tasks, classes
    "nyuv2": ((288, 384), ["semseg", "depth", "normals"], {"semseg": 13}),
    "cityscapes": ((128, 256), ["semseg", "depth"], {"semseg": 19}),
    "tiny": ((64, 64), ["semseg", "depth"], {"semseg": 5}),  # smoke test of the harness
}


def _model(case: dict, backend: str):
    import torch
    from ctal.models import build_model

    (H, W), tasks, classes = SETTINGS[case["dataset"]]
    torch.manual_seed(0)
    return build_model(case["model"], tasks, classes, (H, W), ctal_backend=backend).eval()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024


def _reset_peak_rss() -> float:
    """Start a new RSS high-water mark here (Linux: ``clear_refs`` 5); returns the RSS now, in
    MB. Without it, the lifetime peak of the process is the fallback."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss() -> float:
    try:
        return _status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _onnx_predictor(path: str, threads: int):
    """``ctal.predict``'s pre- and postprocessing around an onnxruntime session with ``threads``
    intra-op threads (the same count the PyTorch cases get)."""
    import onnxruntime as ort
    import torch
    from ctal.export import read_metadata
    from ctal.predict import Predictor

    meta = read_metadata(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def network(batch):
        outs = session.run(None, {"image": batch.numpy()})
        return dict(zip(meta["tasks"], (torch.from_numpy(o) for o in outs)))
    return Predictor(network, meta["tasks"], meta["input"]["shape"][2:], meta["num_classes"])


def _run_case(case: dict) -> dict:
    import numpy as np
    import torch
    from ctal.predict import Predictor

    torch.set_num_threads(case["threads"])
    (H, W), _, _ = SETTINGS[case["dataset"]]
    rng = np.random.default_rng(0)
    images = [rng.random((H, W, 3), dtype=np.float32) for _ in range(case["batch"])]
    base = _reset_peak_rss()  # the imports' transient peaks do not count
    if case["variant"] == "onnx":
        predictor = _onnx_predictor(case["onnx"], case["threads"])
    else:
        predictor = Predictor.from_model(_model(case, case["variant"]), "cpu")
    predictor(images)  # warm-up: lazy init, kernel selection, allocator
    times = []
    for _ in range(case["repeats"]):
        t0 = time.perf_counter()
        predictor(images)
        times.append(time.perf_counter() - t0)
    peak = _peak_rss() - base
    med = statistics.median(times)
    resolved = None
    if predictor.model is not None:  # what "auto" ran
        from ctal import ops
        from ctal.nn import CrossTaskAffinity
        block = next(m for m in predictor.model.modules() if isinstance(m, CrossTaskAffinity))
        x = torch.zeros(case["batch"], len(block.tasks), block.channels, *block.size)
        resolved = ops.explain(x, backend=block.backend).backend
    return dict(status="ok", ms_per_image=med * 1e3 / case["batch"], images_per_s=case["batch"] / med,
                peak_mb=peak, times_ms=[t * 1e3 for t in times], resolved_backend=resolved,
                torch_threads=torch.get_num_threads())


def _export_onnx(case: dict, folder: Path) -> tuple[str, float]:
    from ctal.export import export_model

    path = folder / f"{case['dataset']}-{case['model']}.onnx"
    t0 = time.perf_counter()
    export_model(_model(case, "auto"), path, format="onnx")  # verified against PyTorch
    return str(path), time.perf_counter() - t0


def markdown(results: list[dict], env: dict) -> str:
    load = env.get("load_avg")
    lines = [f"Inference (ctal.predict: preprocess + network + postprocess), {env.get('gpu') or env['cpu']} "
             f"({env['cpu_count']} cores), {results[0]['threads'] if results else '?'} thread(s), "
             f"batch {results[0]['batch'] if results else '?'}, fp32, "
             f"torch {env['torch']}, onnxruntime {env.get('onnxruntime')}, {env['date'][:10]}"
             + (f"; load average {load[0]:.1f} -> {load[1]:.1f} (other processes shared the CPU)" if load else ""),
             "", "| dataset (input) | model | CTAL | images/s | ms / image | peak MB | vs reference |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        (H, W), _, _ = SETTINGS[r["dataset"]]
        what = {"onnx": "ONNX Runtime (linear-traceable export)"}.get(r["variant"], f"PyTorch, {r['variant']}")
        if r["variant"] == "auto" and r.get("resolved_backend"):
            what += f" ({r['resolved_backend']})"
        head = f"| {r['dataset']} ({H}x{W}) | {r['model']} | {what} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | |")
            continue
        ratio = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        lines.append(f"{head} {r['images_per_s']:.2f} | {r['ms_per_image']:.0f} | {r['peak_mb']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def add_speedups(results: list[dict]) -> None:
    for r in results:
        ref = next((q for q in results if q["variant"] == "reference" and q["dataset"] == r["dataset"]
                    and q["model"] == r["model"] and q["status"] == "ok"), None)
        if ref and r["status"] == "ok":
            r["speedup"] = r["images_per_s"] / ref["images_per_s"]


def run_case(case: dict, timeout: float) -> dict:
    """One case in a fresh interpreter; failures become results."""
    cmd = [sys.executable, "-m", "benchmarks.bench_infer", "--case", json.dumps(case)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return dict(case, status=f"timeout>{timeout:.0f}s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["killed (likely out of memory)"])[-1]
        oom = "out of memory" in err.lower() or out.returncode in (-9, 137)
        return dict(case, status="oom" if oom else "error", error=err[:300])
    return dict(case, **json.loads(lines[-1]))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--datasets", default="nyuv2,cityscapes", help=f"comma list of {sorted(SETTINGS)}")
    ap.add_argument("--models", default="ctal", help="comma list of models with a CTAL block (ctal, m_ctal)")
    ap.add_argument("--variants", default="reference,linear,auto,onnx",
                    help="comma list: CTAL backends for the PyTorch model (auto: what ctal.predict runs "
                    "by default), and onnx")
    ap.add_argument("--batch", type=int, default=1, help="images per call (default 1: latency)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of PyTorch and onnxruntime "
                    "alike (default 1: on a shared CPU, waits between threads dominate otherwise)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--out", default=str(RESULTS), help="results folder ('' = do not write)")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))), flush=True)
        return []
    bad = [d for d in args.datasets.split(",") if d not in SETTINGS]
    if bad:
        raise SystemExit(f"--datasets: unknown {bad}; choose from {sorted(SETTINGS)}")
    import onnxruntime

    env = environment("cpu")
    env.update(onnxruntime=onnxruntime.__version__, load_avg=[os.getloadavg()[0]] * 2)
    cases = [dict(dataset=ds, model=m, variant=v, batch=args.batch, repeats=args.repeats, threads=args.threads)
             for ds in args.datasets.split(",") for m in args.models.split(",")
             for v in args.variants.split(",")]
    results = []
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for case in cases:
                if case["variant"] == "onnx":
                    try:
                        case["onnx"], case["export_s"] = _export_onnx(case, Path(tmp))
                    except Exception as e:  # noqa: BLE001 - a failed export is a result
                        results.append(dict(case, status="export failed", error=str(e)[:300]))
                        continue
                r = run_case(case, args.timeout)
                r.pop("onnx", None)  # a temporary path
                print(json.dumps(r), flush=True)
                results.append(r)
                add_speedups(results)
                env["load_avg"] = [env["load_avg"][0], os.getloadavg()[0]]
                if out is not None:  # after every case: a run stopped early keeps what it measured
                    write_results(out, "infer", env, results, markdown(results, env), quiet=True)
        except KeyboardInterrupt:
            print(f"interrupted after {len(results)} of {len(cases)} cases", file=sys.stderr)
    table = markdown(results, env)
    print(table)
    if out is not None:
        write_results(out, "infer", env, results, table)
    return results


if __name__ == "__main__":
    main()
