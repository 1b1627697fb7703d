"""Compile every Triton kernel for a GPU target without a GPU (ahead-of-time, through ptxas).

    python -m ctal.kernels.compile_check [--arch 90] [--dtypes fp32 bf16 fp64] [--channels 128]

Runs each backend's forward and backward on tiny CPU tensors with kernel launches intercepted:
every launch is compiled with ``triton.compile`` for ``cuda:<arch>`` with the launch's real
signature, constexprs, ``num_warps`` and ``num_stages``, and the shared memory each kernel needs
is checked against the device limit. The kernels' outputs are not computed (the intercepted
launches do nothing), so only compilation is checked, not values. This catches what the
interpreter does not: type errors in compiled mode, unsupported ops, dot shape limits and shared
memory overflows. Must run in a process where ``TRITON_INTERPRET`` is not set.
"""
from __future__ import annotations

import argparse
import os
import sys
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
        rec = dict(kernel=fn.__name__, shared=shared, seconds=time.perf_counter() - t0,
                   options=options, constexprs={k: str(v) for k, v in constexprs.items()})
        records.append(rec)
        if verbose:
            print(f"  {fn.__name__:28s} shared {shared / 1024:7.1f} KiB  "
                  f"{rec['seconds']:5.1f} s  {options}", flush=True)
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
    JITFunction.__getitem__ = lambda self, grid: _Launcher(self, grid)
    _common.device_reason = lambda device: None  # CPU tensors stand in for CUDA ones
    try:
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64,
                     "fp16": torch.float16}[dname]
            for C in channels:
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
                z = affinity.align_fwd(a, H, W)
                affinity.align_bwd(z, T)
                m = diffusion._diffuse_forward(z, w, b)
                diffusion._diffuse_backward(m, z, w, True)
                diffusion.propagate_fwd(m, v)
                diffusion.propagate_bwd(dy, m, v)
    finally:
        JITFunction.__getitem__ = old_getitem
        _common.device_reason = old_reason
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp64"])
    ap.add_argument("--channels", nargs="+", type=int, default=[128])
    args = ap.parse_args(argv)
    records = check(args.arch, args.dtypes, args.channels)
    print(f"compiled {len(records)} kernel specializations for sm_{args.arch}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
