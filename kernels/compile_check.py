"""Static report of the GPU kernels, without a GPU: every Triton launch compiled for sm_90 exactly as
the JIT would compile it, and the CUDA kernels of csrc/ compiled with nvcc.

    python -m ctal.kernels.compile_check                          # paper shapes, TF32 and bf16
    python -m ctal.kernels.compile_check --markdown --cuda        # benchmarks/RESOURCES.md
    python -m ctal.kernels.compile_check --shapes 1x3x16x4x8 --dtypes fp32 fp64 --backends triton-linear
    python -m ctal.kernels.compile_check --json report.json       # every record, machine-readable

**Launches.** Each Triton backend's forward and backward run on ``meta`` tensors of the requested
shape (no data is allocated or computed) with kernel launches intercepted. For each launch,
Triton's own JIT code computes what ``kernel[grid](...)`` would compile: the binder made by
``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args`` give the
signature, the constexprs, the options (``num_warps``, ``num_stages``) and the specialization
attributes (integer arguments divisible by 16 or equal to 1, 16-byte pointer alignment: a ``meta``
tensor's address is 0, as aligned as the caching allocator's blocks). The launch is then compiled
with ``triton.compile(ASTSource(fn, signature, constexprs, attrs))`` for ``cuda:<arch>``. When
the installed Triton lacks those internals the tool says so and compiles without attributes
(``spec`` column: ``fallback``). A launch that fails to compile, or needs more shared memory than
the target has, becomes an error row; the run goes on and exits with status 1 at the end. The
linear launchers run one config of their autotune set ahead of time (``CTAL_LINEAR_CONFIG``);
the report runs them once per config of ``linear_plan.CONFIGS``, as a GPU may keep any.

**Per compiled kernel.** Registers and stack + local memory per thread (``cuobjdump
--dump-resource-usage``; spills land there), the SASS's local-memory stores and loads (STL/LDL),
shared memory, and the main loop's SASS instruction mix
(``cuobjdump -sass``): loops are the backward branches (``BRA`` to a lower address); the innermost
ones contain no other loop; the main loop is the innermost loop with the most tensor-core work per
trip (else the most FMAs). Its tensor-core instructions (HGMMA, HMMA, DMMA) are counted against
all its instructions.

**Utilization estimate** (an upper bound from the instruction mix, not a measurement). Per trip of
the main loop, for one block of ``num_warps`` warps on one H100 SM:

- tensor cycles = the trip's multiply-adds / the SM's dense tensor rate: HGMMA ``m x n x k`` runs
  once per warpgroup (``num_warps / 4``), HMMA ``m16 n8 kK`` and DMMA ``8x8x4`` once per warp; the
  rates are 1024 (TF32), 2048 (bf16/fp16) and 128 (fp64) multiply-adds per clock per SM (H100 SXM,
  132 SMs: 495 / 989 TFLOP/s at 1.83 GHz, fp64 67 TFLOP/s at 1.98 GHz);
- issue cycles = the trip's instructions x ``num_warps`` / 4 (four schedulers, one warp
  instruction per clock each);
- utilization = tensor cycles / max(tensor cycles, issue cycles).

It assumes no stall (memory latency, barriers, dependencies), HMMA (``mma.sync``) at the full
tensor rate (it is slower than HGMMA on Hopper) and blocks that share an SM sharing both resources
alike. For kernels without tensor-core instructions the same ratio is given for the FP32 pipe
(FFMA, four warp instructions per clock) or the FP64 pipe (DFMA, two per clock).

**FLOPs and time.** Per shape and dtype, the FLOPs each backend's launches perform
(``ctal.kernels.linear_plan.flops``, ``ctal.kernels.fused_plan.flops``, and for the CUDA backends
``ctal.ops.cost.cuda_linear_flops`` / ``cuda_fused_flops``) against the algorithm's minimum
(``ctal.ops.cost.flops``), forward and forward + backward, and an H100 SXM roofline time
*estimate*: max(FLOPs / peak, compulsory HBM bytes / 3.35 TB/s) with the peaks TF32 495, bf16
989, FP32 67, FP64 67 TFLOP/s dense, and again with the peak scaled by the backend's mean estimated
main-loop utilization (over its matrix kernels).

**CUDA** (``--cuda``): ``csrc/linear_cuda.cu`` and ``csrc/fused_cuda.cu`` compiled by nvcc to a
cubin for ``sm_<arch>`` with the extension's flags (those of ``make resource-usage``) in a
temporary directory, then the same resource and SASS analysis per kernel instantiation.

Must run in a process where ``TRITON_INTERPRET`` is not set (it compiles for a GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Optional

# Shared memory per block on the targets we care about (opt-in maximum).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# H100 SXM (dense): peak FLOP/s per dtype mode, HBM bandwidth, tensor multiply-adds per clock per SM.
PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0, "fp64": 67.0}
HBM_TBS = 3.35
TC_MACS_PER_CLK = {"tf32": 1024, "bf16": 2048, "fp16": 2048, "fp64": 128}
ISSUE_PER_CLK = 4  # warp instructions per clock per SM (four schedulers)
FMA_WARP_INSTR_PER_CLK = {"FFMA": 4, "DFMA": 2}  # 128 FP32 lanes, 64 FP64 lanes per SM

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp64")
TRITON_BACKENDS = ("triton-linear", "triton-fused", "triton-staged")
DEFAULT_SHAPES = ("nyuv2", "cityscapes", "pascal-swin")
SMALL_SHAPE = (1, 3, 128, 4, 5)
CUDA_SOURCES = ("csrc/linear_cuda.cu", "csrc/fused_cuda.cu")
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


# --- tools ------------------------------------------------------------------------------------------

def _nvidia_tool(name: str) -> Optional[str]:
    """``name`` (cuobjdump, ptxas) from Triton's NVIDIA backend, which ships them, else from PATH."""
    try:
        import triton.backends.nvidia as nv
        tool = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.access(tool, os.X_OK):
            return tool
    except ImportError:
        pass
    return shutil.which(name)


def missing_tools() -> Optional[str]:
    """Why the report cannot run here (None when it can)."""
    try:
        import triton  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton with its NVIDIA backend is not importable ({exc})"
    for tool in ("ptxas", "cuobjdump"):
        if _nvidia_tool(tool) is None:
            return f"{tool} not found (neither in triton/backends/nvidia/bin nor on PATH)"
    return None


def _cuobjdump(args: list[str], path: str) -> str:
    return subprocess.run([_nvidia_tool("cuobjdump"), *args, path], capture_output=True, text=True,
                          check=False).stdout


# --- SASS analysis --------------------------------------------------------------------------------

_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")


def sass_functions(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """``cuobjdump -sass`` output -> {function: [(address, opcode, operands)]}."""
    funcs: dict[str, list] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _SASS.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return funcs


def _mma(opcode: str) -> Optional[tuple[str, int, bool]]:
    """(tensor dtype, multiply-adds of one instruction, per warpgroup?) of a tensor-core opcode."""
    base = opcode.split(".")[0]
    if base not in ("HGMMA", "HMMA", "DMMA"):
        return None
    kind = "tf32" if "TF32" in opcode else "bf16" if "BF16" in opcode else "fp64" if base == "DMMA" \
        else "fp16"
    m = re.search(r"\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        shape = tuple(int(g) for g in m.groups())
    elif base == "HMMA" and (m := re.search(r"\.168(\d+)", opcode)):
        shape = (16, 8, int(m.group(1)))
    elif base == "DMMA":
        shape = (8, 8, 4)
    else:
        return None
    return kind, shape[0] * shape[1] * shape[2], base == "HGMMA"


def _loops(instrs) -> list[tuple[int, int]]:
    """(first, last) addresses of the loop bodies: backward branches ``BRA target`` (a branch to
    itself, the trap after EXIT, is not a loop)."""
    out = set()
    for addr, op, args in instrs:
        if op.split(".")[0] == "BRA":
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < addr:
                out.add((int(m.group(1), 16), addr))
    return sorted(out)


def instruction_mix(instrs, num_warps: int) -> dict:
    """Counts and the utilization estimate (module docstring) of one straight run of instructions,
    taken as one trip executed by each of ``num_warps`` warps of a block."""
    n = len(instrs)
    tc_instr, macs, kinds, fma = 0, 0, {}, {"FFMA": 0, "DFMA": 0}
    tc_cycles = 0.0
    for _, op, _ in instrs:
        base = op.split(".")[0]
        if base in fma:
            fma[base] += 1
        mm = _mma(op)
        if mm is None:
            continue
        kind, per, warpgroup = mm
        tc_instr += 1
        kinds[op.split(".")[0] + "." + kind] = kinds.get(op.split(".")[0] + "." + kind, 0) + 1
        done = per * (max(1, num_warps // 4) if warpgroup else num_warps)
        macs += done
        tc_cycles += done / TC_MACS_PER_CLK[kind]
    issue = n * num_warps / ISSUE_PER_CLK
    out = dict(instructions=n, tc_instructions=tc_instr, tc_kinds=kinds, tc_macs=macs,
               ffma=fma["FFMA"], dfma=fma["DFMA"], issue_cycles=issue, tc_cycles=tc_cycles)
    if tc_instr:
        out.update(pipe="tensor", util=tc_cycles / max(tc_cycles, issue) if issue else 0.0)
    elif fma["FFMA"] or fma["DFMA"]:
        op = "DFMA" if fma["DFMA"] > fma["FFMA"] else "FFMA"
        busy = fma[op] * num_warps / FMA_WARP_INSTR_PER_CLK[op]
        out.update(pipe="fp64" if op == "DFMA" else "fp32", util=busy / max(busy, issue))
    else:
        out.update(pipe=None, util=None)
    return out


def main_loop(instrs, num_warps: int) -> dict:
    """The instruction mix of the whole function and of its main loop (module docstring)."""
    loops = _loops(instrs)
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    whole = instruction_mix(instrs, num_warps)
    local_ops = [op.split(".")[0] for _, op, _ in instrs]
    best, best_key = None, None
    for lo, hi in inner:
        mix = instruction_mix([i for i in instrs if lo <= i[0] <= hi], num_warps)
        key = (mix["tc_cycles"], mix["ffma"] + mix["dfma"], mix["instructions"])
        if best_key is None or key > best_key:
            best, best_key = dict(mix, first=lo, last=hi), key
    return dict(total_instructions=whole["instructions"], total_tc_instructions=whole["tc_instructions"],
                stl=local_ops.count("STL"), ldl=local_ops.count("LDL"),  # local memory stores / loads
                loops=len(loops), innermost_loops=len(inner), main_loop=best)


def cubin_report(cubin: bytes, num_warps_of=None) -> dict[str, dict]:
    """{function: registers, local bytes, shared bytes, SASS mix} of a cubin. ``num_warps_of(name)``
    gives each function's warps per block (for the utilization estimate)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = _cuobjdump(["--dump-resource-usage"], path)
        sass = sass_functions(_cuobjdump(["-sass"], path))
    out: dict[str, dict] = {}
    name = None
    for line in usage.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name is not None:  # stack frame + local memory per thread: spills land there
            out[name] = dict(regs=int(m.group(1)), local=int(m.group(2)) + int(m.group(4)),
                             static_shared=int(m.group(3)))
    for fname, instrs in sass.items():
        warps = num_warps_of(fname) if num_warps_of else 4
        out.setdefault(fname, {}).update(main_loop(instrs, warps))
    return out


# --- Triton: launches compiled as the JIT compiles them ---------------------------------------------

@dataclasses.dataclass
class Spec:
    """What the JIT would compile for one launch."""
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    method: str  # "jit" (Triton's own specialization) or "fallback: <why>"


class JitSpecializer:
    """Triton's own specialization code, bound to one compile target (Triton 3.6 to 3.8 share
    ``create_function_from_signature`` and ``JITFunction._pack_args``)."""

    def __init__(self, target):
        import triton
        from triton.compiler import make_backend
        self.backend = make_backend(target)
        self.binders: dict = {}
        self.knobs = getattr(triton, "knobs", None)
        try:
            from triton.runtime.jit import JITFunction, create_function_from_signature
            self.make_binder = create_function_from_signature
            self.why_not = None if hasattr(JITFunction, "_pack_args") else "no JITFunction._pack_args"
        except ImportError as exc:
            self.make_binder, self.why_not = None, f"no create_function_from_signature ({exc})"

    def __call__(self, fn, args, kwargs) -> Spec:
        kwargs = dict(kwargs)
        if self.why_not is None:
            # As JITFunction.run does before binding.
            if self.knobs is not None:
                kwargs["debug"] = kwargs.get("debug", fn.debug) or self.knobs.runtime.debug
                mode = getattr(self.knobs.compilation, "instrumentation_mode", None)
                if mode is not None:
                    kwargs["instrumentation_mode"] = mode
            if fn not in self.binders:
                self.binders[fn] = self.make_binder(fn.signature, fn.params, self.backend)
            bound, specialization, options = self.binders[fn](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                                 specialization, options)
            return Spec(signature, constexprs, attrs, options.__dict__, "jit")
        return self._fallback(fn, args, kwargs)

    def _fallback(self, fn, args, kwargs) -> Spec:
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(fn.arg_names, args))
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if fn.params[i].is_constexpr:
                constexprs[name] = bound[name]
                signature[name] = "constexpr"
            else:
                signature[name] = _type_of(bound[name])
        return Spec(signature, constexprs, {}, options, f"fallback: {self.why_not}")


def _type_of(value) -> str:
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
                      torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return "constexpr"


def _attr_names(fn, spec: Spec) -> dict:
    """{argument: [attribute, ...]} of the specialization, by argument name; integers the JIT
    specialized to a constant 1 are listed as ``==1``."""
    names = list(fn.arg_names)
    out: dict = {}
    for path, attrs in spec.attrs.items():
        key = path[0] if isinstance(path, tuple) else path
        name = names[key] if isinstance(key, int) else str(key)
        for attr in attrs or []:
            out.setdefault(name, []).append(f"{attr[0].replace('tt.', '')}={attr[1]}")
    for path, value in spec.constexprs.items():
        key = path[0] if isinstance(path, tuple) else path
        name = names[key] if isinstance(key, int) else str(key)
        if not fn.params[names.index(name)].is_constexpr and value == 1:
            out.setdefault(name, []).append("==1")
    return out


def _ttir_divisibility(ttir: str) -> list[str]:
    """Arguments of the kernel's TTIR signature that carry ``tt.divisibility`` (what the compiler
    was really told)."""
    head = ttir[ttir.find("tt.func"):]
    head = head[:head.find("{\n")] if "{\n" in head else head[:4000]
    return re.findall(r"%(\w+): [^{,)]*\{[^}]*tt\.divisibility", head)


def parse_shape(text: str) -> tuple[str, tuple]:
    """A name from benchmarks/shapes.py, ``small``, or ``BxTxCxHxW``."""
    if re.fullmatch(r"\d+x\d+x\d+x\d+x\d+", text):
        return text, tuple(int(s) for s in text.split("x"))
    if text == "small":
        return text, SMALL_SHAPE
    from benchmarks import shapes as bshapes  # the repository's shape registry (not installed)
    every = {k: v for g in bshapes.GROUPS.values() for k, v in g.items()}
    if text not in every:
        raise SystemExit(f"--shapes: unknown shape {text!r}; use BxTxCxHxW, 'small' or one of "
                         f"{sorted(every)}")
    return text, tuple(every[text])


def _linear_configs() -> list:
    """The linear kernels' autotune set (``linear_plan.CONFIGS``), or one unnamed config."""
    from . import linear_plan
    return list(getattr(linear_plan, "CONFIGS", None) or [None])


def _run_backend(name: str, B, T, C, H, W, dtype) -> None:
    """Forward and backward of one Triton backend on meta tensors (launches are intercepted)."""
    import torch

    from . import affinity, diffusion, fused, linear
    N = H * W
    mk = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    x, v, w, b, dy = mk(B, T, C, H, W), mk(B, T, C, H, W), mk(N, T, 3, 3), mk(N), mk(B, T, C, H, W)
    if name == "triton-staged":
        z, nrm = affinity._affinity_forward(x, True)
        affinity._affinity_backward(z, x, nrm, True)
        m = diffusion._diffuse_forward(z, w, b)
        diffusion._diffuse_backward(m, z, w, b)
        diffusion._propagate_forward(m, v)
        diffusion._propagate_backward(dy, m, v)
        return
    mod = {"triton-linear": linear, "triton-fused": fused}[name]
    outs = mod.forward(x, v, w, b)
    saved = list(outs[1:]) if isinstance(outs, tuple) else []
    # The backward takes the output gradient, the forward's inputs by name, then the by-products.
    known = dict(x=x, v=v, weight=w, bias=b)
    params = list(inspect.signature(mod.backward).parameters)
    args = [dy] + [known[p] if p in known else saved.pop(0) for p in params[1:]]
    mod.backward(*args)


def check(arch: int = 90, dtypes=("tf32", "bf16"), shapes=DEFAULT_SHAPES, channels=None,
          backends=TRITON_BACKENDS, verbose: bool = True) -> list[dict]:
    """Compile every Triton launch of ``backends`` at each shape and dtype; one record per launch
    (identical specializations are compiled once). Errors become records with ``error`` set."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (it compiles for a GPU)")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from . import _common

    target = GPUTarget("cuda", arch, 32)
    specialize = JitSpecializer(target)
    records: list[dict] = []
    compiled_cache: dict = {}
    current: dict = {}

    def launch(fn, grid, args, kwargs):
        rec = dict(current, kernel=fn.__name__, grid=list(grid) if not callable(grid) else "callable")
        try:
            spec = specialize(fn, args, kwargs)
        except Exception as exc:
            records.append(dict(rec, error=f"specialization failed: {type(exc).__name__}: {exc}"))
            return
        rec.update(spec=spec.method, attrs=_attr_names(fn, spec),
                   args=[n for i, n in enumerate(fn.arg_names) if not fn.params[i].is_constexpr],
                   options={k: spec.options.get(k) for k in ("num_warps", "num_stages")},
                   constexprs={fn.arg_names[p[0]] if isinstance(p, tuple) else p: str(v)
                               for p, v in spec.constexprs.items()})
        key = (fn.__name__, repr(sorted(spec.signature.items())),
               repr(sorted((str(k), str(v)) for k, v in spec.constexprs.items())),
               repr(sorted((str(k), str(v)) for k, v in spec.attrs.items())),
               repr(sorted((k, str(v)) for k, v in spec.options.items())))
        if key not in compiled_cache:
            t0 = time.perf_counter()
            try:
                kern = triton.compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                                      target=target, options=spec.options)
                warps = spec.options.get("num_warps", 4)
                res = cubin_report(kern.asm["cubin"], lambda _: warps).get(fn.__name__, {})
                res.update(shared=kern.metadata.shared, seconds=time.perf_counter() - t0,
                           ttir_divisibility=_ttir_divisibility(kern.asm.get("ttir", "")))
                limit = SHARED_LIMIT.get(arch)
                if limit is not None and res["shared"] > limit:
                    res["error"] = (f"needs {res['shared']} B of shared memory, more than the "
                                    f"{limit} B of sm_{arch}")
            except Exception as exc:
                msg = str(exc).strip().splitlines()
                res = dict(error=f"compile failed: {type(exc).__name__}: "
                                 f"{msg[-1] if msg else ''}"[:300],
                           seconds=time.perf_counter() - t0)
            compiled_cache[key] = res
        rec.update(compiled_cache[key])
        records.append(rec)
        if verbose:
            ml = rec.get("main_loop") or {}
            util = ml.get("util")
            print(f"  {rec['kernel']:28s} " + (f"ERROR {rec['error']}" if rec.get("error") else
                  f"regs {rec.get('regs')}  local {rec.get('local')}  shared "
                  f"{rec['shared'] / 1024:6.1f} KiB  loop {ml.get('tc_instructions', 0)}/"
                  f"{ml.get('instructions', 0)} tc  util "
                  + (f"{100 * util:4.0f}% {ml.get('pipe')}" if util is not None else "-")
                  + f"  {rec.get('seconds', 0):5.1f} s"), flush=True)

    class _Launcher:
        def __init__(self, fn, grid):
            self.fn, self.grid = fn, grid

        def __call__(self, *args, **kwargs):
            launch(self.fn, self.grid, args, kwargs)

    names = [parse_shape(s) if isinstance(s, str) else (("x".join(map(str, s))), tuple(s))
             for s in shapes]
    old_getitem = JITFunction.__getitem__
    old_config = os.environ.get("CTAL_LINEAR_CONFIG")
    old_reason = _common.device_reason
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    JITFunction.__getitem__ = lambda self, grid: _Launcher(self, grid)
    _common.device_reason = lambda device: None  # meta tensors stand in for CUDA ones
    try:
        for sname, shape in names:
            for C in (channels or [shape[2]]):
                B, T, _, H, W = shape
                for dname in dtypes:
                    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                             "fp64": torch.float64, "fp16": torch.float16}[dname]
                    torch.backends.cuda.matmul.allow_tf32 = dname == "tf32"  # read by input_precision()
                    for bname in backends:
                        # Ahead of time the linear launchers run one config of their autotune set
                        # (CTAL_LINEAR_CONFIG, read per launch); a GPU may pick any, so all compile.
                        configs = range(len(_linear_configs())) if bname == "triton-linear" else [None]
                        for cfg in configs:
                            current.clear()
                            current.update(shape=sname, dims=[B, T, C, H, W], dtype=dname,
                                           backend=bname, config=cfg)
                            if verbose:
                                print(f"{sname} {B}x{T}x{C}x{H}x{W} {dname} {bname}"
                                      + (f" config {cfg}" if cfg is not None else "") + ":", flush=True)
                            if cfg is not None:
                                os.environ["CTAL_LINEAR_CONFIG"] = str(cfg)
                            try:
                                _run_backend(bname, B, T, C, H, W, dtype)
                            except Exception as exc:
                                records.append(dict(current, kernel="(launcher)",
                                                    error=f"{type(exc).__name__}: {exc}"[:300]))
                                if verbose:
                                    print(f"  launcher ERROR {type(exc).__name__}: {exc}", flush=True)
    finally:
        if old_config is None:
            os.environ.pop("CTAL_LINEAR_CONFIG", None)
        else:
            os.environ["CTAL_LINEAR_CONFIG"] = old_config
        JITFunction.__getitem__ = old_getitem
        _common.device_reason = old_reason
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return records


# --- FLOPs and roofline ------------------------------------------------------------------------------

def _hbm_bytes(p, backend: str, backward: bool) -> int:
    """Compulsory HBM traffic: the inputs read once, the outputs written once, and for the linear
    form its (9TC+1) x TC state G (and dG) written once and read once."""
    import torch
    esz = torch.empty((), dtype=p.dtype).element_size()
    feat = p.B * p.T * p.C * p.N * esz
    params = (p.N * p.T * 9 + p.N) * esz
    total = 3 * feat + params  # x, v in; y out
    state = 2 * p.B * (9 * p.T * p.C + 1) * p.T * p.C * 4 if "linear" in backend else 0
    total += state
    if backward:
        total += 5 * feat + 2 * params + state  # dy, x, v in; dx, dv, dw, db out; dG
    return total


def flop_table(shapes, dtypes, records=None) -> list[dict]:
    """Per shape, dtype and backend: FLOPs performed vs the algorithm's minimum and the H100
    estimates (module docstring)."""
    import torch

    from ctal.ops import cost
    from ctal.ops.registry import Problem

    from . import fused_plan, linear_plan
    counts = {"triton-linear": ("linear", linear_plan.flops), "triton-fused": ("quadratic", fused_plan.flops),
              "cuda-linear": ("linear", cost.cuda_linear_flops),
              "cuda-fused": ("quadratic", cost.cuda_fused_flops)}
    rows = []
    for sname, shape in shapes:
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                     "fp64": torch.float64, "fp16": torch.float16}[dname]
            p = Problem(*shape, dtype, torch.device("cuda"))
            for name, (algo, fn) in counts.items():
                row = dict(shape=sname, dims=list(shape), dtype=dname, backend=name, algorithm=algo)
                for bwd in (False, True):
                    done, least = fn(p, backward=bwd), cost.flops(algo, p, backward=bwd)
                    tag = "fwdbwd" if bwd else "fwd"
                    t_compute = done / (PEAK_TFLOPS[dname] * 1e12)
                    t_mem = _hbm_bytes(p, name, bwd) / (HBM_TBS * 1e12)
                    row.update({f"gflop_{tag}": done / 1e9, f"min_gflop_{tag}": least / 1e9,
                                f"ratio_{tag}": done / least,
                                f"roofline_ms_{tag}": 1e3 * max(t_compute, t_mem)})
                utils = [r["main_loop"]["util"] for r in records or []
                         if r.get("shape") == sname and r.get("dtype") == dname
                         and r.get("backend") == name and not r.get("error")
                         and (r.get("main_loop") or {}).get("pipe") in ("tensor", "fp32", "fp64")
                         and (r["main_loop"].get("tc_instructions") or dname in ("fp32", "fp64"))]
                if utils:
                    u = sum(utils) / len(utils)
                    t_est = row["gflop_fwdbwd"] * 1e9 / (PEAK_TFLOPS[dname] * 1e12 * max(u, 1e-3))
                    row.update(est_util=u, est_ms_fwdbwd=1e3 * max(t_est, t_mem))
                if name == "cuda-fused":
                    from ctal.ops.extension import fused_smem_need
                    need = fused_smem_need(*shape[1:], dtype)
                    if need > SHARED_LIMIT[90]:
                        row["refused"] = f"needs {need // 1024} KiB shared memory"
                rows.append(row)
    return rows


# --- CUDA (csrc/) -----------------------------------------------------------------------------------

def nvcc_flags() -> list[str]:
    """The extension's nvcc flags, as the Makefile's ``resource-usage`` target computes them."""
    import torch
    import torch.utils.cpp_extension as cpp_ext
    t = os.path.join(os.path.dirname(torch.__file__), "include")
    std = "c++20" if "-std=c++20" in inspect.getsource(cpp_ext) else "c++17"
    inc = [t, os.path.join(t, "torch/csrc/api/include"), sysconfig.get_paths()["include"],
           os.path.join(ROOT, "csrc")]
    inc += sorted(glob.glob(os.path.join(sys.prefix, "lib/python*/site-packages/nvidia/*/include")))
    return (["-O3", "--expt-relaxed-constexpr", "-DCTAL_WITH_CUDA", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", f"-std={std}"]
            + [f"-I{i}" for i in inc])


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = [re.sub(r"ctal_ext::\(anonymous namespace\)::", "", s) for s in out.splitlines()]
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def check_cuda(arch: int = 90, sources=CUDA_SOURCES, verbose: bool = True) -> list[dict]:
    """Compile the CUDA kernels of csrc/ to cubins for ``sm_<arch>`` (in a temporary directory;
    ``ctal/_C`` is not touched) and analyse each kernel as for Triton."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [dict(source=s, kernel="(nvcc)", error="nvcc not found on PATH") for s in sources]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
            cmd = [nvcc, *nvcc_flags(), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin",
                   "-Xptxas", "-v", "-o", cubin, os.path.join(ROOT, src)]
            t0 = time.perf_counter()
            if verbose:
                print(f"nvcc {src} -> sm_{arch} cubin ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                records.append(dict(source=src, kernel="(nvcc)", error=proc.stderr.strip()[-400:]))
                continue
            with open(cubin, "rb") as f:
                data = f.read()
            # Every kernel of csrc/ runs 128 (fused) or 256 (linear passes) threads per block.
            rep = cubin_report(data, lambda name: 4 if "fused" in name else 8)
            spills, fn = {}, None  # ptxas -v: "N bytes stack frame, S bytes spill stores, L bytes spill loads"
            for line in proc.stderr.splitlines():
                m = re.search(r"Compiling entry function '(\S+)'", line)
                fn = m.group(1) if m else fn
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m and fn is not None:
                    spills[fn] = int(m.group(1)) + int(m.group(2))
            pretty = _demangle(sorted(rep))
            for name, r in sorted(rep.items(), key=lambda kv: pretty[kv[0]]):
                short = re.sub(r"^void ", "", pretty[name])
                short = short[:short.find("(", short.find(">") if ">" in short else 0)]
                records.append(dict(source=src, kernel=short, mangled=name, spill_bytes=spills.get(name),
                                    seconds=time.perf_counter() - t0, **r))
                if verbose:
                    ml = r.get("main_loop") or {}
                    print(f"  {pretty[name][:70]:70s} regs {r.get('regs')} local {r.get('local')} "
                          f"loop {ml.get('tc_instructions', 0)}/{ml.get('instructions', 0)} tc",
                          flush=True)
    return records


# --- output -----------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _attrs_text(attrs: dict) -> str:
    ptrs = sorted(n for n, a in attrs.items() if n.endswith("_ptr") and any("divisibility" in s for s in a))
    ints = sorted(n for n, a in attrs.items() if not n.endswith("_ptr") and any("divisibility" in s for s in a))
    ones = sorted(n for n, a in attrs.items() if "==1" in a)
    parts = []
    if ptrs:
        parts.append(f"{len(ptrs)} ptr /16")
    if ints:
        parts.append(",".join(ints) + " /16")
    if ones:
        parts.append(",".join(ones) + " ==1")
    return "; ".join(parts) or "none"


def _error_cell(r: dict) -> str:
    """A record's compile error on one table cell."""
    return "ERROR: " + " ".join(r["error"].split())[:200].replace("|", "/")


def _tc_kinds(main_loop: dict) -> str:
    """The main loop's tensor-core instructions, e.g. ``HGMMA.tf32 x8``."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(main_loop.get("tc_kinds", {}).items())) or "-"


def markdown(records: list[dict], flops: list[dict], arch: int, cuda: Optional[list[dict]] = None,
             command: str = "") -> str:
    import torch
    import triton
    lines = [f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}` "
             f"(Triton {triton.__version__}, torch {torch.__version__}, sm_{arch}, CPU only: "
             f"compiled, never run).", ""]
    lines += ["### Triton kernels as the JIT compiles them", "",
              "`local B`: stack frame + local memory per thread (register spills land there); "
              "`STL/LDL`: local-memory store / load instructions in the SASS. "
              "Main loop: the innermost SASS loop with the most tensor-core work per trip; "
              "`tc/instr` = tensor-core instructions / all instructions of one trip; `est. util` = "
              "the estimate of the module docstring of `kernels/compile_check.py` (TC: tensor "
              "pipe; fp32/fp64: FMA pipe). Attrs: the JIT's specialization (`ptr /16`: 16-byte "
              "aligned pointers, `N /16`: integer divisible by 16, `==1`: specialized constant).", ""]
    by_shape: dict = {}
    for r in records:
        by_shape.setdefault((r.get("shape"), tuple(r.get("dims") or ())), []).append(r)
    for (sname, dims), rs in by_shape.items():
        lines += [f"#### {sname} (B, T, C, H, W = {', '.join(map(str, dims))})", "",
                  "| backend | kernel | dtype | regs | local B | STL/LDL | shared KiB | warps/stages | main loop "
                  "tc/instr | tensor instr | est. util | attrs |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
        varying: dict = {}  # constexprs that tell a kernel's variants apart (e.g. IS_QUERY)
        for r in rs:
            for k, v in (r.get("constexprs") or {}).items():
                varying.setdefault((r["kernel"], r.get("dtype")), {}).setdefault(k, set()).add(v)
        seen = set()
        for r in rs:
            key = (r.get("backend"), r.get("kernel"), r.get("dtype"), r.get("regs"), r.get("shared"),
                   json.dumps(r.get("attrs"), sort_keys=True), json.dumps(r.get("constexprs"), sort_keys=True),
                   json.dumps(r.get("options"), sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            short = r["kernel"].replace("_kernel", "")
            tags = [f"{k}={v}" for k, v in sorted((r.get("constexprs") or {}).items())
                    if len(varying.get((r["kernel"], r.get("dtype")), {}).get(k, ())) > 1]
            short += f" ({', '.join(tags)})" if tags else ""
            if r.get("error"):
                lines.append(f"| {r['backend']} | {short} | {r['dtype']} | {_error_cell(r)} | | | | | | | | |")
                continue
            ml = r.get("main_loop") or {}
            kinds = _tc_kinds(ml)
            pipe = {"tensor": "TC", None: ""}.get(ml.get("pipe"), ml.get("pipe"))
            lines.append(
                f"| {r['backend']} | {short} | {r['dtype']} | {r.get('regs')} | {r.get('local')} | "
                f"{r.get('stl')}/{r.get('ldl')} | {r['shared'] / 1024:.1f} | "
                f"{r['options'].get('num_warps')}/{r['options'].get('num_stages')} | "
                + (f"{ml['tc_instructions']}/{ml['instructions']}" if ml else "no loop") + f" | {kinds} | "
                f"{_pct(ml.get('util'))} {pipe} | {_attrs_text(r.get('attrs', {}))}"
                + (" (fallback)" if str(r.get("spec", "")).startswith("fallback") else "") + " |")
        lines.append("")
    if flops:
        lines += ["### FLOPs performed and H100 SXM time estimates (not measurements)", "",
                  "GFLOP the launches perform (forward; forward + backward) and the ratio to the "
                  "algorithm's minimum; roofline = max(FLOPs / dense peak, compulsory HBM bytes / "
                  "3.35 TB/s); `ms at est. util` = the same with the peak scaled by the backend's mean "
                  "main-loop utilization estimate (over its matrix kernels and autotune configs).", "",
                  "| shape | dtype | backend | GFLOP fwd | x min | GFLOP fwd+bwd | x min | roofline ms "
                  "fwd+bwd | est. util | ms at est. util |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for f in flops:
            tail = (f"{_pct(f.get('est_util'))} | {f['est_ms_fwdbwd']:.2f}" if "est_util" in f
                    else "- | -")
            name = f["backend"] + (f" (refused: {f['refused']})" if f.get("refused") else "")
            lines.append(f"| {f['shape']} | {f['dtype']} | {name} | {f['gflop_fwd']:.1f} | "
                         f"{f['ratio_fwd']:.2f} | {f['gflop_fwdbwd']:.1f} | {f['ratio_fwdbwd']:.2f} | "
                         f"{f['roofline_ms_fwdbwd']:.2f} | {tail} |")
        lines.append("")
    if cuda:
        lines += ["### CUDA kernels (csrc/, nvcc)", "",
                  "Per kernel instantiation: `stack B` = stack frame + local memory per thread "
                  "(cuobjdump), `spill B` = ptxas's spill stores + loads; the fused kernels' shared "
                  "memory is dynamic (sized per problem), so the static figure is not their need. "
                  "Main loop and estimate as for Triton (128 threads per fused block, 256 for the "
                  "linear passes). cuda-linear's GEMMs run in cuBLAS, not in these cubins: its "
                  "kernels here are the gathers and scatters around them.", "",
                  "| source | kernel | regs | stack B | spill B | STL/LDL | static shared B | main loop tc/instr | "
                  "tensor instr | all tc instr | est. util |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in cuda:
            if r.get("error"):
                lines.append(f"| {r['source']} | {r['kernel']} | {_error_cell(r)} | | | | | | | | |")
                continue
            ml = r.get("main_loop") or {}
            kinds = _tc_kinds(ml)
            loop = f"{ml['tc_instructions']}/{ml['instructions']}" if ml else "no loop"
            lines.append(f"| {r['source']} | `{r['kernel']}` | {r.get('regs')} | {r.get('local')} | "
                         f"{r.get('spill_bytes')} | {r.get('stl')}/{r.get('ldl')} | "
                         f"{r.get('static_shared')} | {loop} | {kinds} | "
                         f"{r.get('total_tc_instructions', 0)}/{r.get('total_instructions', 0)} | "
                         f"{_pct(ml.get('util'))} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["tf32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                    help="names from benchmarks/shapes.py, 'small' (1x3x128x4x5) or BxTxCxHxW")
    ap.add_argument("--channels", nargs="+", type=int, default=None,
                    help="override C of every shape (one run per value)")
    ap.add_argument("--backends", nargs="+", default=list(TRITON_BACKENDS), choices=list(TRITON_BACKENDS))
    ap.add_argument("--cuda", action="store_true", help="also compile csrc/*.cu with nvcc (minutes)")
    ap.add_argument("--markdown", action="store_true", help="print the tables of benchmarks/RESOURCES.md")
    ap.add_argument("--json", default=None, help="write every record to this file")
    args = ap.parse_args(argv)
    why = missing_tools()
    if why is not None:
        print(f"compile_check: {why}", file=sys.stderr)
        return 2
    records = check(args.arch, args.dtypes, args.shapes, args.channels, args.backends,
                    verbose=not args.markdown)
    shapes = []
    for s in args.shapes:
        name, shape = parse_shape(s)
        for C in (args.channels or [shape[2]]):
            shapes.append((name, (shape[0], shape[1], C, shape[3], shape[4])))
    flops = flop_table(shapes, args.dtypes, records)
    cuda = check_cuda(args.arch, verbose=not args.markdown) if args.cuda else None
    if args.markdown:
        cmd = "python -m ctal.kernels.compile_check " + " ".join(argv if argv is not None else sys.argv[1:])
        print(markdown(records, flops, args.arch, cuda, cmd.strip()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=records, flops=flops, cuda=cuda), f, indent=1, default=str)
    errors = [r for r in records + (cuda or []) if r.get("error")]
    spills = sorted({(r["kernel"], r["dtype"]) for r in records if r.get("local")})
    print(f"compiled {len(records) - len(errors)} Triton launches for sm_{args.arch}"
          + (f"; {len(errors)} ERRORS: " + "; ".join(f"{r.get('kernel')}: {r['error'][:120]}"
                                                    for r in errors[:10]) if errors else ": ok")
          + (f"; local memory (spills) in {spills}" if spills else "; no spills"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
