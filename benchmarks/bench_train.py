"""End-to-end training throughput: ``python -m benchmarks.bench_train``.

Images/s and peak memory of full training steps (forward, multitask loss with deep supervision,
backward, Adam step) of CTALNet and M-CTALNet on random NYUv2- or Cityscapes-shaped batches, with
the CTAL op on the literal ``reference`` path vs another backend (default: what ``auto`` picks),
side by side in one run. Each case runs in its own subprocess (honest peak memory; an
out-of-memory is a recorded result). Peak MB is everything training holds at its high-water
mark (weights, optimizer state, activations, workspaces): the CUDA allocator's peak, or on CPU the
growth of the process's peak RSS from just before the model is built. The step time is the
median of ``--steps`` steps after one warm-up step. ``--amp bf16|fp16`` runs the forward and the
loss under ``torch.autocast`` (fp16 with a gradient scaler); the last step's loss and whether every
step's loss was finite are recorded.
Writes ``benchmarks/results/train-<device>-<date>T<hhmm>.json`` (rewritten after every case, so a
run stopped early keeps what it measured); ``--jsonl`` also appends each result as a JSON line and
``--deadline`` (Unix time) records the cases it leaves no time for as ``skipped (deadline)``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from benchmarks.bench_ops import RESULTS, environment, write_results

SETTINGS = {  # the paper's training shapes: input size, tasks, classes
    "nyuv2": ((288, 384), ["semseg", "depth", "normals"], {"semseg": 13}),
    "cityscapes": ((128, 256), ["semseg", "depth"], {"semseg": 19}),
    "tiny": ((64, 64), ["semseg", "depth"], {"semseg": 5}),  # smoke test of the harness
}


def _run_case(case: dict) -> dict:
    import torch
    from ctal.losses import MultiTaskLoss
    from ctal.models import build_model

    dev = torch.device(case["device"])
    (H, W), tasks, classes = SETTINGS[case["dataset"]]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = build_model(case["model"], tasks, classes, (H, W), ctal_backend=case["backend"]).to(dev)
    crit = MultiTaskLoss(tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    B = case["batch"]
    images = torch.randn(B, 3, H, W, device=dev)
    targets = {"semseg": torch.randint(0, classes["semseg"], (B, H, W), device=dev),
               "depth": torch.rand(B, 1, H, W, device=dev) + 0.5,
               "normals": torch.nn.functional.normalize(torch.randn(B, 3, H, W, device=dev), dim=1)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = case.get("amp")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp else nullcontext
    scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
    losses = []

    def step():
        with autocast():
            total, _ = crit(model(images), {t: targets[t] for t in tasks})
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            opt.step()
        losses.append(total.detach())

    step()  # warm-up: lazy init, allocator, optimizer state
    sync()
    times = []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    losses = [float(v) for v in losses]  # one host sync, after the timed steps
    peak = (torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    med = statistics.median(times)
    from ctal.nn import CrossTaskAffinity
    block = next(m for m in model.modules() if isinstance(m, CrossTaskAffinity))
    from ctal import ops
    x = torch.zeros(B, len(tasks), block.channels, *block.size, device=dev)
    return dict(status="ok", resolved_backend=ops.explain(x, backend=case["backend"]).backend,
                step_ms=med * 1e3, images_per_s=B / med, peak_mb=peak, loss=losses[-1],
                finite=all(v == v and abs(v) != float("inf") for v in losses))


def markdown(results: list[dict], env: dict, batch: int, amp: str | None = None) -> str:
    lines = [f"Training step (fwd + loss + bwd + Adam), {env.get('gpu') or 'CPU'}, batch {batch}"
             + (f", {amp} autocast" if amp else "") + f", torch {env['torch']}, {env['date'][:10]}", "",
             "| dataset | model | CTAL backend | images/s | step ms | peak MB | vs reference |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['dataset']} | {r['model']} | {r['backend']} | {r['status']} | | | |")
        else:
            name = r["backend"] if r["backend"] != "auto" else f"auto ({r['resolved_backend']})"
            if r.get("finite") is False:
                name += " (loss not finite)"
            lines.append(f"| {r['dataset']} | {r['model']} | {name} | {r['images_per_s']:.2f} | "
                         f"{r['step_ms']:.0f} | {r['peak_mb']:.0f} | {r.get('speedup', 0):.2f}x |")
    return "\n".join(lines) + "\n"


def add_speedups(results: list[dict]) -> None:
    for r in results:
        ref = next((q for q in results if q["backend"] == "reference" and q["dataset"] == r["dataset"]
                    and q["model"] == r["model"] and q["status"] == "ok"), None)
        if ref and r["status"] == "ok":
            r["speedup"] = r["images_per_s"] / ref["images_per_s"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--datasets", default="nyuv2,cityscapes")
    ap.add_argument("--models", default="ctal,m_ctal")
    ap.add_argument("--backends", default="reference,auto", help="CTAL op backends to compare")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CUDA (the paper's), 2 on CPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (default: none, fp32)")
    ap.add_argument("--jsonl", help="also append each result to this file as one JSON line")
    ap.add_argument("--deadline", type=float, help="Unix time: cases that would start later (or "
                    "with under 10 s left) are recorded as skipped; case timeouts end there")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))), flush=True)
        return []
    import subprocess

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (8 if device == "cuda" else 2)
    results = []
    root = Path(__file__).resolve().parent.parent
    env = environment(device)
    cases = [dict(dataset=ds, model=model, backend=backend, device=device, batch=batch,
                  steps=args.steps, amp=args.amp)
             for ds in args.datasets.split(",") for model in args.models.split(",")
             for backend in args.backends.split(",")]
    try:
        for case in cases:
            left = None if args.deadline is None else args.deadline - time.time()
            timeout = args.timeout if left is None else min(args.timeout, left)
            if left is not None and left < 10:
                r = dict(case, status="skipped (deadline)")
            else:
                try:
                    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--case",
                                          json.dumps(case)], capture_output=True, text=True,
                                         timeout=timeout, cwd=root)
                    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                    if out.returncode == 0 and lines:
                        r = dict(case, **json.loads(lines[-1]))
                    else:
                        err = (out.stderr.strip().splitlines() or ["killed (likely out of memory)"])[-1]
                        oom = "out of memory" in err.lower() or out.returncode in (-9, 137)
                        r = dict(case, status="oom" if oom else "error", error=err[:300])
                except subprocess.TimeoutExpired:
                    r = dict(case, status=f"timeout>{timeout:.0f}s")
            print(json.dumps(r), flush=True)
            results.append(r)
            add_speedups(results)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
            if args.out:  # after every case: a run stopped early keeps what it measured
                write_results(Path(args.out), "train", env, results,
                              markdown(results, env, batch, args.amp), quiet=True)
    except KeyboardInterrupt:
        print(f"interrupted after {len(results)} of {len(cases)} cases", file=sys.stderr)
    table = markdown(results, env, batch, args.amp)
    print(table)
    if args.out:
        write_results(Path(args.out), "train", env, results, table)
    return results


if __name__ == "__main__":
    main()
