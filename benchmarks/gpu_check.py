"""The checks of one GPU session (scripts/gpu_session.sh), each a subcommand writing JSON:

    python -m benchmarks.gpu_check versions --out versions.json
    python -m benchmarks.gpu_check stamp --so build/gpu/_C...so --arch 9.0     (scripts/gpu_prebuild.sh)
    python -m benchmarks.gpu_check ext --dir build/gpu --json ext.json --env-file ext.env
    python -m benchmarks.gpu_check correctness --backends triton --jsonl correctness.jsonl --jobs 4
    python -m benchmarks.gpu_check sanitize-case --dtypes fp32,bf16          (under compute-sanitizer)
    python -m benchmarks.gpu_check fastest --ops DIR --correctness correctness.jsonl

``correctness`` runs a curated list of cases through the public API,
``ctal.ops.ctal_attention(x, v, weight, bias, backend=name)``, and compares the output and the
gradients of x, v, weight and bias with ``backend="reference"`` in float64 on the same (rounded)
inputs: relative error ``||a - b|| / ||b||`` below 1e-5 for exact fp32, 2e-3 for TF32, 2e-2 for
bf16/fp16 (1e-10 for fp64). One JSON line per case is appended and flushed as soon as the case
ends, so a run cut by a deadline keeps every finished case. Cases run in ``--jobs`` worker
processes (Triton's JIT compiles on the CPU, one kernel at a time per process); a worker that
dies or hits a sticky CUDA error is restarted after the case that broke it, which is recorded.

Only the standard library is imported at module level: ``stamp`` runs in the prebuild venv and
``fastest`` must work where torch is broken.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- correctness cases --------------------------------------------------------------------------

# (B, T, C, H, W): the paper's feature grids at batch 2 (the error does not depend on B, the memory
# of the fp64 reference does), and two odd shapes that leave every tile partly filled: C = 37
# (one 64-wide channel tile), C = 129 with T = 5 (a 256-wide channel tile, several value-row tiles).
SHAPES = {"nyuv2": (2, 3, 128, 72, 96), "cityscapes": (2, 2, 128, 32, 64),
          "pascal": (2, 5, 128, 16, 16), "odd-a": (2, 3, 37, 9, 11), "odd-b": (1, 5, 129, 13, 7)}
TINY_SHAPES = {"tiny-a": (1, 2, 8, 5, 7), "tiny-b": (2, 3, 5, 4, 6)}
# mode -> (torch dtype name, tolerance on the relative error)
MODES = {"fp32": ("float32", 1e-5), "tf32": ("float32", 2e-3), "bf16": ("bfloat16", 2e-2),
         "fp16": ("float16", 2e-2), "fp64": ("float64", 1e-10)}
# Per backend, most valuable first: the NYUv2 grid in the three precisions training uses, then
# the other datasets, then the odd shapes. Kernel specializations (dtype, precision, bias, channel
# tile) are what costs JIT time on a GPU, so each case adds at least one new one.
_KERNEL_PLAN = [("nyuv2", "fp32", True), ("nyuv2", "bf16", True), ("nyuv2", "tf32", True),
                ("cityscapes", "bf16", False), ("pascal", "bf16", True), ("odd-a", "fp32", True),
                ("odd-b", "bf16", False), ("cityscapes", "fp32", True), ("pascal", "fp16", False)]
PLANS = {
    "triton-linear": _KERNEL_PLAN,
    "triton-fused": _KERNEL_PLAN,
    # The staged path materializes N x N (it exists to check the stage kernels): fewer cases.
    "triton-staged": [("nyuv2", "fp32", True), ("nyuv2", "bf16", True), ("odd-a", "fp32", False),
                      ("pascal", "tf32", True)],
    "cuda-linear": [("nyuv2", "fp32", True), ("nyuv2", "bf16", True), ("nyuv2", "tf32", True),
                    ("cityscapes", "bf16", False), ("odd-a", "fp32", True), ("odd-b", "bf16", False),
                    ("pascal", "fp16", True)],
    # cuda-fused refuses the NYUv2 grid (shared memory); that refusal is recorded too.
    "cuda-fused": [("cityscapes", "fp32", True), ("cityscapes", "bf16", True), ("pascal", "tf32", False),
                   ("pascal", "bf16", True), ("odd-a", "fp32", True), ("odd-b", "bf16", False),
                   ("nyuv2", "bf16", True)],
}
TINY_PLAN = [("tiny-a", "fp32", True), ("tiny-b", "fp64", False)]
GROUPS = {"triton": ["triton-linear", "triton-fused", "triton-staged"],
          "cuda": ["cuda-linear", "cuda-fused"]}
# Messages of CUDA errors after which the process's context is unusable.
STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert",
          "misaligned address", "illegal instruction", "an illegal", "cuda error: unknown error")


def expand_backends(spec: str) -> list[str]:
    out = []
    for name in spec.split(","):
        for b in GROUPS.get(name.strip(), [name.strip()]):
            if b and b not in out:
                out.append(b)
    return out


def plan_cases(backends: list[str], tiny: bool) -> list[dict]:
    """The cases in value order: every backend's first case, then every backend's second, ..."""
    shapes = TINY_SHAPES if tiny else SHAPES
    plans = {b: (TINY_PLAN if tiny else PLANS.get(b, _KERNEL_PLAN)) for b in backends}
    cases = []
    for rank in range(max((len(p) for p in plans.values()), default=0)):
        for b in backends:
            if rank < len(plans[b]):
                shape_name, mode, bias = plans[b][rank]
                cases.append(dict(id=f"{b}/{shape_name}/{mode}/{'bias' if bias else 'nobias'}",
                                  backend=b, shape_name=shape_name, shape=list(shapes[shape_name]),
                                  mode=mode, bias=bias, tol=MODES[mode][1]))
    for i, c in enumerate(cases):
        c["index"] = i
    return cases


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64; any NaN/Inf gives inf."""
    import torch
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_case(case: dict, device: str) -> dict:
    """Output and the four gradients of one backend against the float64 reference."""
    import torch
    from ctal import ops

    dtype = getattr(torch, MODES[case["mode"]][0])
    dev = torch.device(device)
    B, T, C, H, W = case["shape"]
    table = ops.backends()
    if case["backend"] not in table:
        return dict(status="error", error=f"unknown backend {case['backend']!r}; have {sorted(table)}")
    why = table[case["backend"]].unsupported(ops.Problem(B, T, C, H, W, dtype, dev))
    if why is not None:
        return dict(status="unsupported", error=why)
    gen = torch.Generator().manual_seed(1000 + case["index"])
    mk = lambda *s: torch.randn(*s, generator=gen).to(dev)  # noqa: E731
    w = mk(H * W, T, 3, 3) / 9  # the module init's scale: M stays moderate, rounding is measured
    raw = [mk(B, T, C, H, W), mk(B, T, C, H, W), w, mk(H * W) if case["bias"] else None]
    ins = [None if t is None else t.to(dtype) for t in raw]
    dy = mk(B, T, C, H, W).to(dtype)
    names = ["y", "dx", "dv", "dweight", "dbias"][:5 if case["bias"] else 4]

    def run(inputs, grad_out, backend):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        y = ops.ctal_attention(*leaves, backend=backend)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
        return [y.detach(), *grads]

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case["mode"] == "tf32"
    torch.backends.cudnn.allow_tf32 = case["mode"] == "tf32"
    try:
        got = run(ins, dy, case["backend"])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    want = run([None if t is None else t.double() for t in ins], dy.double(), "reference")
    errors = {n: rel_err(g, r) for n, g, r in zip(names, got, want)}
    wrong_dtype = [n for n, g in zip(names, got) if g.dtype != dtype]
    worst = max(errors.values())
    ok = worst < case["tol"] and not wrong_dtype
    out = dict(status="pass" if ok else "fail", errors=errors, worst=worst)
    if wrong_dtype:
        out["error"] = f"{', '.join(wrong_dtype)} not in {dtype}"
    return out


def _append(path: Path, record: dict) -> None:
    """One JSON line, written with a single O_APPEND write so that workers never interleave."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of ``path`` (a line cut by a kill is ignored)."""
    out = []
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def worker(args) -> int:
    """Runs the given case indices in order; exit 3 after a sticky CUDA error (the caller restarts
    a fresh process for the rest)."""
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cases = {c["index"]: c for c in plan_cases(expand_backends(args.backends), args.tiny)}
    for i in json.loads(args.cases):
        case = cases[i]
        t0 = time.perf_counter()
        sticky = False
        try:
            result = check_case(case, device)
        except Exception as exc:  # a failure is a result
            msg = f"{type(exc).__name__}: {exc}".strip()
            sticky = device == "cuda" and any(s in msg.lower() for s in STICKY)
            oom = "out of memory" in msg.lower()
            result = dict(status="oom" if oom else "error", error=msg[:500])
        if device == "cuda" and not sticky:
            try:  # an asynchronous kernel error surfaces here
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as exc:
                sticky = True
                result = dict(status="error", error=f"after the case: {type(exc).__name__}: {exc}"[:500])
        result.update(case, device=device, run=args.run, seconds=round(time.perf_counter() - t0, 3))
        _append(Path(args.jsonl), result)
        print(f"[{result['status']:>11}] {case['id']} {result['seconds']:.1f}s "
              f"{result.get('worst', '')} {result.get('error', '')[:200]}", flush=True)
        if sticky:
            return 3
    return 0


def correctness(args) -> int:
    """Spreads the cases over ``--jobs`` workers (round robin, so each worker starts with the most
    valuable cases); restarts a worker that dies, after recording the case it died in."""
    jsonl = Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    cases = plan_cases(expand_backends(args.backends), args.tiny)
    done = {r.get("index") for r in read_jsonl(jsonl) if r.get("run") == args.run}
    todo = [c["index"] for c in cases if c["index"] not in done]
    jobs = max(1, min(args.jobs, len(todo) or 1))
    queues = [todo[k::jobs] for k in range(jobs)]
    logdir = Path(args.logs) if args.logs else jsonl.parent
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"{len(cases)} cases ({len(todo)} to run) on {jobs} worker(s): "
          f"{', '.join(expand_backends(args.backends))}", flush=True)

    def start(k):
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "worker", "--backends", args.backends,
               "--jsonl", str(jsonl), "--run", args.run, "--cases", json.dumps(queues[k])]
        cmd += ["--tiny"] if args.tiny else []
        log = open(logdir / f"{args.run}-worker{k}.log", "a")
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log

    procs = {k: start(k) for k in range(jobs) if queues[k]}
    # A case (its JIT compiles included) that runs past --case-timeout is killed with its worker.
    progress = {k: (0, time.monotonic()) for k in procs}
    try:
        while procs:
            time.sleep(0.2)
            finished = {r.get("index") for r in read_jsonl(jsonl) if r.get("run") == args.run}
            for k, (proc, log) in list(procs.items()):
                rc = proc.poll()
                done_k = sum(i in finished for i in queues[k])
                if done_k != progress[k][0]:
                    progress[k] = (done_k, time.monotonic())
                hung = rc is None and time.monotonic() - progress[k][1] > args.case_timeout
                if rc is None and not hung:
                    continue
                if hung:
                    proc.kill()
                    rc = proc.wait()
                log.close()
                del procs[k]
                rest = [i for i in queues[k] if i not in finished]
                if rc == 0 or not rest:
                    continue
                if rc != 3:  # died (or was killed) inside rest[0] without writing its line
                    case = cases[rest[0]]
                    tail = (logdir / f"{args.run}-worker{k}.log").read_text(errors="replace")
                    what = (f"timeout: no result after {args.case_timeout:.0f}s" if hung else
                            f"worker exit {rc}: {(tail.strip().splitlines() or [''])[-1]}")
                    _append(jsonl, dict(case, status="timeout" if hung else "crashed", run=args.run,
                                        error=what[:500]))
                    rest = rest[1:]
                queues[k] = rest
                if rest:
                    procs[k] = start(k)
                    progress[k] = (0, time.monotonic())
    except KeyboardInterrupt:  # the session's deadline: workers got the same SIGINT
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("correctness: interrupted; finished cases are in", jsonl, flush=True)
        return 130
    results = [r for r in read_jsonl(jsonl) if r.get("run") == args.run]
    bad = [r for r in results if r["status"] not in ("pass", "unsupported")]
    print(f"correctness: {sum(r['status'] == 'pass' for r in results)} pass, {len(bad)} not, "
          f"{sum(r['status'] == 'unsupported' for r in results)} unsupported", flush=True)
    return 1 if bad else 0


# --- environment ------------------------------------------------------------------------------

def _cmd_line(cmd: list[str], pick=lambda lines: lines[0]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return pick(lines) if lines else None


def versions(args) -> int:
    from importlib import metadata
    info = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), python=platform.python_version(),
                executable=sys.executable, machine=platform.machine(), cpu_count=os.cpu_count(),
                ext_suffix=sysconfig.get_config_var("EXT_SUFFIX"),
                dry_run=os.environ.get("GPU_SESSION_DRY_RUN", "0") == "1",
                triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")
    for pkg in ("torch", "triton", "numpy", "timm", "torchvision", "pytest", "setuptools"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    torch_git=torch.version.git_version, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), capability="%d.%d" % (props.major, props.minor),
                        sm_count=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                        gpu_memory_gb=round(props.total_memory / 2**30, 1))
    except Exception as exc:
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    info["nvidia_smi"] = _cmd_line(["nvidia-smi", "--format=csv,noheader",
                                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm"])
    info["nvcc"] = _cmd_line(["nvcc", "--version"], lambda lines: lines[-1])
    info["compute_sanitizer"] = _cmd_line(["compute-sanitizer", "--version"], lambda lines: lines[-1])
    info["commit"] = _cmd_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    text = json.dumps(info, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if "torch_error" not in info else 1


# --- the compiled extension: prebuilt stamp and its verification ---------------------------------

def sources_digest(root: Path = ROOT) -> str:
    """sha256 over what the extension is built from (csrc/ and setup.py): a prebuilt extension
    from other sources is stale."""
    h = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file()) + [root / "setup.py"]
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stamp(args) -> int:
    """Writes ``<so>.stamp.json``: what the prebuilt extension was built for and from."""
    import torch
    so = Path(args.so)
    record = dict(file=so.name, sha256=file_digest(so), size=so.stat().st_size,
                  sources_sha256=sources_digest(), torch=torch.__version__,
                  torch_git=torch.version.git_version, torch_cuda=torch.version.cuda,
                  python=platform.python_version(), ext_suffix=sysconfig.get_config_var("EXT_SUFFIX"),
                  arch=args.arch, nvcc=_cmd_line(["nvcc", "--version"], lambda lines: lines[-1]),
                  built=time.strftime("%Y-%m-%dT%H:%M:%S%z"), build_seconds=args.build_seconds)
    Path(str(so) + ".stamp.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


def _stamp_problems(so: Path) -> list[str]:
    """Why a prebuilt extension does not fit this machine and checkout (empty when it does)."""
    import torch
    stamp_path = Path(str(so) + ".stamp.json")
    if not stamp_path.exists():
        return [f"{stamp_path.name} is missing (rerun scripts/gpu_prebuild.sh)"]
    st = json.loads(stamp_path.read_text())
    problems = []
    if st.get("torch") != torch.__version__:
        problems.append(f"built for torch {st.get('torch')}, this is torch {torch.__version__}")
    if st.get("sha256") != file_digest(so):
        problems.append("the file differs from the one the stamp describes")
    if st.get("sources_sha256") != sources_digest():
        problems.append("csrc/ or setup.py changed since the prebuild (stale)")
    if torch.cuda.is_available():
        cap = "%d.%d" % torch.cuda.get_device_capability(0)
        archs = [a.replace("+PTX", "") for a in str(st.get("arch", "")).replace(",", ";").split(";")]
        if cap not in archs:
            problems.append(f"built for sm {st.get('arch')}, this GPU is {cap}")
    return problems


def _smoke_extension() -> str | None:
    """Imports ctal._C (through CTAL_EXT_PATH when set) and runs it once; None when it works."""
    import torch
    from ctal import ops
    from ctal.ops import extension
    if not extension.is_built():
        return f"does not import: {extension.build_error()}"
    cuda = torch.cuda.is_available()
    if cuda and not extension.with_cuda():
        return "imports, but was built without CUDA"
    names = ["cuda-linear", "cuda-fused"] if cuda else ["cpp"]
    dev = "cuda" if cuda else "cpu"
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dev)  # noqa: E731
    x, v, w, b = mk(2, 3, 5, 5, 7), mk(2, 3, 5, 5, 7), mk(35, 3, 3, 3) / 9, mk(35)
    want = ops.ctal_attention(x, v, w, b, backend="reference")
    for name in names:
        err = rel_err(ops.ctal_attention(x, v, w, b, backend=name), want)
        if not err < 1e-10:
            return f"{name} runs but disagrees with the reference (relative error {err:.3g})"
    return None


def _try_extension(so: Path | None) -> str | None:
    """Imports and runs ``so`` (None: whatever ``ctal._C`` resolves to); None when it works."""
    if so is not None:
        os.environ["CTAL_EXT_PATH"] = str(so.resolve())
    try:
        return _smoke_extension()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def ext(args) -> int:
    """Picks the extension for this interpreter: ``--so`` as given, else the prebuilt
    ``<dir>/_C<EXT_SUFFIX>`` after its stamp checks, else (``--checkout-fallback``) the one the
    checkout itself holds (``ctal/_C*.so`` from a local build); imports it and runs a tiny case.
    Writes ``--json`` (status, path, reasons) and, when one works, the line to source to use it
    to ``--env-file``. Exit 0 when one works, 3 when none does (the session then builds one)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = Path(args.so) if args.so else Path(args.dir) / f"_C{suffix}"
    record = dict(path=str(so), ext_suffix=suffix, source="prebuilt" if not args.so else "given")
    if not so.exists():
        have = sorted(p.name for p in Path(args.dir or ".").glob("_C*.so")) if not args.so else []
        record.update(status="missing", reasons=[f"no {so.name} for this Python ({platform.python_version()})"
                                                  + (f"; have {have}" if have else "")])
    else:
        problems = [] if args.no_stamp else _stamp_problems(so)
        if problems:
            record.update(status="mismatch", reasons=problems)
        else:
            why = _try_extension(so)
            record.update(status="ok" if why is None else "broken", reasons=[why] if why else [])
    line = f"export CTAL_EXT_PATH={shlex.quote(str(so.resolve()))}"
    if record["status"] != "ok" and args.checkout_fallback and record["status"] != "broken":
        own = ROOT / "ctal" / f"_C{suffix}"
        if own.exists():
            why = _try_extension(None)
            record["reasons"].append(f"checkout's own {own.name}: " + ("works" if why is None else why))
            if why is None:
                record.update(status="ok", path=str(own), source="checkout")
                line = "unset CTAL_EXT_PATH"
        else:
            record["reasons"].append(f"the checkout has no {own.name} either")
    if record["status"] == "ok" and args.env_file:
        Path(args.env_file).write_text(line + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0 if record["status"] == "ok" else 3


# --- compute-sanitizer case ---------------------------------------------------------------------

def sanitize_case(args) -> int:
    """Both CUDA backends, forward and backward, on tiny grids (partly filled tiles) in each dtype:
    fp32 takes the FMA paths, bf16 the WMMA tensor-core paths. The 12x40 grid (N * 4 bytes a
    multiple of 16) takes cuda-fused's cp.async staging and wraps its ring of M key chunks; the
    odd grids take the plain-load fallback."""
    import torch
    from ctal import ops
    for mode in args.dtypes.split(","):
        dtype = getattr(torch, MODES[mode][0])
        for shape in ((2, 3, 5, 5, 7), (1, 2, 20, 6, 9), (1, 2, 16, 12, 40)):
            B, T, C, H, W = shape
            gen = torch.Generator().manual_seed(0)
            mk = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype).requires_grad_()  # noqa: E731
            for name in ("cuda-linear", "cuda-fused"):
                x, v, w, b = mk(B, T, C, H, W), mk(B, T, C, H, W), mk(H * W, T, 3, 3), mk(H * W)
                ops.ctal_attention(x, v, w, b, backend=name).float().sum().backward()
    torch.cuda.synchronize()
    print("sanitize case ran:", args.dtypes)
    return 0


# --- the fastest verified kernel backend -------------------------------------------------------

def fastest(args) -> int:
    """The fastest Triton/CUDA backend at a shape/dtype (forward+backward) among those whose
    correctness cases all passed; prints its name (nothing when there is none)."""
    passed, failed = set(), set()
    for r in read_jsonl(Path(args.correctness)):
        if r.get("status") == "pass":
            passed.add(r["backend"])
        elif r.get("status") not in ("unsupported", "skipped"):
            failed.add(r["backend"])
    best = None
    for p in sorted(Path(args.ops).rglob("ops-*.json")):
        for r in json.loads(p.read_text()).get("results", []):
            if (r.get("status") == "ok" and r.get("name") == args.shape and r.get("dtype") == args.dtype
                    and r.get("mode") == "fwdbwd" and r["backend"].startswith(("triton-", "cuda-"))
                    and r["backend"] in passed - failed
                    and (best is None or r["median_ms"] < best["median_ms"])):
                best = r
    if best:
        print(best["backend"])
    return 0


def sick(args) -> int:
    """Prints the backends (comma-separated) with a case that hung or crashed its worker: running
    them again in a shared process could take every later case down with them."""
    bad = sorted({r["backend"] for r in read_jsonl(Path(args.correctness))
                  if r.get("status") in ("timeout", "crashed")})
    print(",".join(bad))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--out")
    p = sub.add_parser("stamp")
    p.add_argument("--so", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--build-seconds", type=float)
    p = sub.add_parser("ext")
    p.add_argument("--dir", default=str(ROOT / "build" / "gpu"))
    p.add_argument("--so", help="this file instead of <dir>/_C<EXT_SUFFIX>")
    p.add_argument("--json")
    p.add_argument("--env-file")
    p.add_argument("--no-stamp", action="store_true", help="skip the stamp checks (a fresh local build)")
    p.add_argument("--checkout-fallback", action="store_true",
                   help="when the prebuilt one does not fit, try the checkout's own ctal/_C*.so")
    for name in ("correctness", "worker"):
        p = sub.add_parser(name)
        p.add_argument("--backends", default="triton", help="names or groups: " + ", ".join(
            f"{k} = {','.join(v)}" for k, v in GROUPS.items()))
        p.add_argument("--jsonl", required=True)
        p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes, fp32/fp64")
        p.add_argument("--run", default="correctness", help="a label kept in each line (one "
                       "JSONL file can hold several runs)")
        if name == "worker":
            p.add_argument("--cases", required=True)
        else:
            p.add_argument("--jobs", type=int, default=1)
            p.add_argument("--logs")
            p.add_argument("--case-timeout", type=float, default=150,
                           help="seconds one case may take, its JIT compiles included")
    p = sub.add_parser("sanitize-case")
    p.add_argument("--dtypes", default="fp32,bf16")
    p = sub.add_parser("fastest")
    p.add_argument("--ops", required=True, help="folder of bench_ops JSON results")
    p.add_argument("--correctness", required=True)
    p.add_argument("--shape", default="nyuv2")
    p.add_argument("--dtype", default="bf16")
    p = sub.add_parser("sick")
    p.add_argument("--correctness", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        return worker(args)
    return {"versions": versions, "stamp": stamp, "ext": ext, "correctness": correctness,
            "sanitize-case": sanitize_case, "fastest": fastest, "sick": sick}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
