"""Compile every Triton kernel for a GPU target without a GPU (ahead-of-time, through ptxas).

    python -m ctal.kernels.compile_check [--arch 90] [--dtypes fp32 tf32 bf16 fp64] [--channels 128]
    python -m ctal.kernels.compile_check --markdown     # the resource table of benchmarks/RESOURCES.md

Runs each backend's forward and backward on tiny CPU tensors with kernel launches intercepted:
every launch is compiled with ``triton.compile`` for ``cuda:<arch>`` with the launch's real
signature, constexprs, ``num_warps`` and ``num_stages``, and the shared memory each kernel needs
is checked against the device limit. The kernels' outputs are not computed (the intercepted
launches do nothing), so only compilation is checked, not values. This catches what the
interpreter does not: type errors in compiled mode, unsupported ops, dot shape limits and shared
memory overflows. Must run in a process where ``TRITON_INTERPRET`` is not set.

For each specialization it also reports what the GPU will see: registers per thread and local
memory (spills) from ``cuobjdump --dump-resource-usage`` of the cubin, and which matrix
instructions the PTX uses for ``tl.dot`` (``wgmma`` on Hopper, ``mma`` on Ampere, ``fma`` when a
dot runs on the plain FP32/FP64 units). ``tf32`` compiles fp32 with TF32 tensor cores allowed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# Shared memory per block on the targets we care about (opt-in maximum).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _type_of(value) -> str:
    import torch
    import triton.language as tl
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
                      torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tl.dtype):
        return "constexpr"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _cuobjdump() -> str | None:
    """``cuobjdump`` from Triton's NVIDIA backend (it ships one), else from PATH."""
    try:
        import triton.backends.nvidia as nv
        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.access(tool, os.X_OK):
            return tool
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def resources(compiled) -> dict:
    """Registers and local memory (stack + local bytes per thread; > 0 means spills) of a compiled
    kernel, and the matrix instruction its dots use."""
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "fma")
    out = dict(regs=None, local=None, mma=mma)
    tool = _cuobjdump()
    if tool is None or "cubin" not in compiled.asm:
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", text)
    if m:  # register spills land in the stack frame (local memory)
        out.update(regs=int(m.group(1)), local=int(m.group(2)) + int(m.group(3)))
    return out


def markdown(records: list[dict], arch: int) -> str:
    """One row per kernel and dtype: the range over its specializations."""
    import triton
    rows: dict = {}
    for r in records:
        rows.setdefault((r["kernel"], r["dtype"]), []).append(r)
    span = lambda vals: (f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}")  # noqa: E731
    lines = [f"Triton {triton.__version__}, sm_{arch}, C = {sorted({r['C'] for r in records})}:", "",
             "| kernel | dtype | regs | local (spill) B | shared KiB | dot instruction | warps |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for (kernel, dtype), rs in rows.items():
        regs = [r["regs"] for r in rs if r["regs"] is not None] or [0]
        local = [r["local"] for r in rs if r["local"] is not None] or [0]
        shared = [round(r["shared"] / 1024, 1) for r in rs]
        mma = "/".join(sorted({r["mma"] for r in rs}))
        warps = span([r["options"].get("num_warps", 4) for r in rs])
        lines.append(f"| {kernel} | {dtype} | {span(regs)} | {span(local)} | {span(shared)} | "
                     f"{mma} | {warps} |")
    return "\n".join(lines) + "\n"


def check(arch: int = 90, dtypes=("fp32",), channels=(128,), verbose: bool = True) -> list[dict]:
    """Compile every kernel launch of every backend; returns one record per compiled launch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (it compiles for a GPU)")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from . import _common, affinity, diffusion, fused, linear

    target = GPUTarget("cuda", arch, 32)
    records: list[dict] = []
    seen: set = set()
    current: dict = {}  # the dtype and C being compiled, for the records

    def launch(fn, grid, args, kwargs):
        kwargs = dict(kwargs)
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        missing = [n for n in names if n not in bound]
        if missing:
            raise TypeError(f"{fn.__name__}: missing arguments {missing}")
        constexprs, signature = {}, {}
        for i, name in enumerate(names):
            if fn.params[i].is_constexpr:
                constexprs[name] = bound[name]
                signature[name] = "constexpr"
            else:
                signature[name] = _type_of(bound[name])
        key = (fn.__name__, tuple(sorted(signature.items())),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(options.items()))
        if key in seen:
            return
        seen.add(key)
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target,
                                  options=options)
        shared = compiled.metadata.shared
        rec = dict(kernel=fn.__name__, dtype=current["dtype"], C=current["C"], shared=shared,
                   seconds=time.perf_counter() - t0, options=options,
                   constexprs={k: str(v) for k, v in constexprs.items()}, **resources(compiled))
        records.append(rec)
        if verbose:
            print(f"  {fn.__name__:28s} shared {shared / 1024:7.1f} KiB  regs {rec['regs']}  "
                  f"local {rec['local']}  {rec['mma']:5s} {rec['seconds']:5.1f} s  {options}",
                  flush=True)
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and shared > limit:
            raise RuntimeError(f"{fn.__name__} needs {shared} B of shared memory, more than the "
                               f"{limit} B of sm_{arch} ({constexprs})")

    class _Launcher:
        def __init__(self, fn, grid):
            self.fn, self.grid = fn, grid

        def __call__(self, *args, **kwargs):
            launch(self.fn, self.grid, args, kwargs)

    old_getitem = JITFunction.__getitem__
    old_reason = _common.device_reason
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    JITFunction.__getitem__ = lambda self, grid: _Launcher(self, grid)
    _common.device_reason = lambda device: None  # CPU tensors stand in for CUDA ones
    try:
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                     "fp64": torch.float64, "fp16": torch.float16}[dname]
            torch.backends.cuda.matmul.allow_tf32 = dname == "tf32"  # read by input_precision()
            for C in channels:
                current.update(dtype=dname, C=C)
                if verbose:
                    print(f"{dname}, C = {C}:", flush=True)
                B, T, H, W = 1, 3, 4, 5
                N = H * W
                mk = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
                x, v, w, b = mk(B, T, C, H, W), mk(B, T, C, H, W), mk(N, T, 3, 3), mk(N)
                dy = mk(B, T, C, H, W)
                y, nrm = fused.forward(x, v, w, b)
                fused.backward(dy, x, v, w, b, nrm)
                y, g, nrm = linear.forward(x, v, w, b)
                linear.backward(dy, x, v, w, b, g, nrm)
                for interleaved in (False, True):
                    a, nrm = affinity._affinity_forward(x, interleaved)
                    affinity._affinity_backward(torch.zeros_like(a), x, nrm, interleaved)
                a = mk(B, T, N, N)
                z = affinity._align_forward(a, H, W)
                affinity._align_backward(z, H, W)
                m = diffusion._diffuse_forward(z, w, b)
                diffusion._diffuse_backward(m, z, w, b)
                diffusion._propagate_forward(m, v)
                diffusion._propagate_backward(dy, m, v)
    finally:
        JITFunction.__getitem__ = old_getitem
        _common.device_reason = old_reason
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "tf32", "bf16", "fp64"],
                    choices=["fp32", "tf32", "bf16", "fp16", "fp64"])
    ap.add_argument("--channels", nargs="+", type=int, default=[128])
    ap.add_argument("--markdown", action="store_true", help="print the resource table at the end")
    args = ap.parse_args(argv)
    records = check(args.arch, args.dtypes, args.channels, verbose=not args.markdown)
    if args.markdown:
        print(markdown(records, args.arch))
    spills = sorted({(r["kernel"], r["dtype"]) for r in records if r["local"]})
    print(f"compiled {len(records)} kernel specializations for sm_{args.arch}: ok"
          + (f"; local memory (spills) in {spills}" if spills else "; no spills"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
