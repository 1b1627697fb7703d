"""What is specific to the Triton kernels (``ctal.kernels``); the backend contract is
tests/ops/test_conformance.py.

On CPU these run under ``TRITON_INTERPRET=1`` (set by conftest.py), where every launcher fills its
outputs with NaN first, so an element a kernel forgets to write fails the comparison. Here: the
interleaved Gram store, registration and auto's view of the kernels, limits and their errors,
int64 offsets, the fused cost model, sm_90 compilation, and (marked ``gpu``) the checks at
realistic sizes in fp32, TF32 and bf16 with the tolerances of docs/design.md.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctal import ops
from ctal.ops import reference, registry
from tests.helpers import assert_close, reference64, rel_err, run, triton_device

DEV = triton_device()
CUDA = DEV == "cuda"

import ctal.kernels as K  # noqa: E402
from ctal.kernels import _common, affinity, diffusion, fused, fused_plan, linear  # noqa: E402


BACKENDS = ["triton-fused", "triton-linear", "triton-staged"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# Tiny odd shapes (B, T, C, H, W): several tiles in N (35 > 16) and in channels/rows where cheap;
# single-row and single-column grids, where every stencil tap but one row/column is off the grid.
SHAPES = [(2, 2, 3, 3, 5), (1, 3, 5, 5, 7), (1, 1, 17, 4, 3), (1, 2, 3, 1, 9), (2, 1, 5, 6, 1)]


def _problem(B, T, C, H, W, dtype, bias=True, device=DEV):
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return mk(B, T, C, H, W), mk(B, T, C, H, W), mk(H * W, T, 3, 3), (mk(H * W) if bias else None)


# --- stages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_affinity_interleaved_equals_aligned(dtype):
    B, T, C, H, W = 2, 3, 4, 3, 5
    x = torch.randn(B, T, C, H, W, dtype=dtype, device=DEV)
    dz = torch.randn(B, H * W * T, H, W, dtype=dtype, device=DEV)
    z, (gx,) = run(lambda a: affinity.affinity(a, interleaved=True), [x], dz)
    rz, (rgx,) = reference64(lambda a: reference.align(reference.affinity(a), (H, W)), [x], dz)
    assert z.shape == (B, H * W * T, H, W)
    assert_close(z, rz, TOL[dtype], "interleaved affinity")
    assert_close(gx, rgx, TOL[dtype], "interleaved affinity dx")


# --- whole-op backends ------------------------------------------------------------------------

# --- custom-op registration -------------------------------------------------------------------

# --- registration, limits, errors -------------------------------------------------------------

def test_backends_registered():
    table = ops.backends()
    for name, algo in [("triton-fused", "quadratic"), ("triton-linear", "linear"),
                       ("triton-staged", "quadratic")]:
        assert table[name].algorithm == algo and table[name].implementation == "triton"
    assert table["triton-staged"].materializes_nxn and not table["triton-staged"].auto_eligible
    x = torch.randn(1, 2, 3, 3, 5, device=DEV)
    for name in BACKENDS:
        assert ops.explain(x, backend=name).backend == name


@pytest.mark.skipif(not CUDA, reason="auto never picks interpreted Triton on CPU")
def test_auto_on_cuda_picks_triton_by_cost(monkeypatch):
    table = ops.backends()
    small = ops.Problem(8, 5, 128, 16, 16, torch.float32, torch.device("cuda"))
    large = ops.Problem(8, 3, 128, 72, 96, torch.float32, torch.device("cuda"))
    # Kernels not yet validated on a GPU are kept out of auto...
    for p in (small, large):
        assert ops.decide(p).backend not in registry.UNVERIFIED_ON_GPU
    # ...and once validated, auto ranks them by cost.
    monkeypatch.setattr(registry, "UNVERIFIED_ON_GPU", set())
    assert table[ops.decide(small).backend].algorithm == "quadratic"
    assert table[ops.decide(large).backend].algorithm == "linear"
    for p in (small, large):  # a CUDA extension may rank higher; otherwise Triton is chosen
        impl = table[ops.decide(p).backend].implementation
        assert impl in ("triton", "cuda") and ops.decide(p).backend != "triton-staged"


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_inputs_device_not_the_current_one():
    x, v, w, b = _problem(1, 2, 3, 4, 5, torch.float32, device="cuda:1")
    want = ops.ctal_attention(*(t.double() for t in (x, v, w, b)), backend="reference")
    with torch.cuda.device(0):
        for name in BACKENDS:
            got = ops.ctal_attention(x, v, w, b, backend=name)
            assert got.device == x.device and rel_err(got.double(), want) < 2e-3, name


def test_auto_never_picks_interpreted_triton_on_cpu():
    p = ops.Problem(1, 2, 3, 3, 5, torch.float32, torch.device("cpu"))
    assert ops.backends()[ops.decide(p).backend].implementation != "triton"


def test_channel_limit_is_reported_not_silent():
    p = ops.Problem(1, 2, _common.MAX_CHANNELS + 1, 4, 4, torch.float32, torch.device(DEV))
    table = ops.backends()
    for name in ("triton-fused", "triton-linear"):
        why = table[name].unsupported(p)
        assert why is not None and "channel" in why
    assert table["triton-staged"].unsupported(p) is None  # the stage kernels loop over C
    x = torch.zeros(1, 2, _common.MAX_CHANNELS + 1, 2, 2, device=DEV)
    with pytest.raises(RuntimeError, match="cannot run this problem"):
        ops.ctal_attention(x, x, torch.zeros(4, 2, 3, 3, device=DEV), backend="triton-fused")


def test_cpu_without_interpreter_reason(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    why = _common.device_reason(torch.device("cpu"))
    assert why is not None and "Triton needs a CUDA device" in why
    p = ops.Problem(1, 1, 3, 2, 2, torch.float32, torch.device("cpu"))
    for name in BACKENDS:
        assert "CUDA" in ops.backends()[name].unsupported(p)
    with pytest.raises(RuntimeError, match="Triton needs a CUDA device"):
        affinity.affinity(torch.randn(1, 1, 3, 2, 2))


@pytest.mark.skipif(CUDA, reason="interpreter-only check")
def test_interpreter_rejects_half_precision_clearly():
    p = ops.Problem(1, 1, 3, 2, 2, torch.bfloat16, torch.device("cpu"))
    assert "interpreter" in ops.backends()["triton-linear"].unsupported(p)


def test_outputs_are_poisoned_before_kernels_write():
    """conftest.py sets CTAL_POISON=1: launchers NaN-fill outputs (on a GPU too), so an element a
    kernel forgets to write fails the comparison."""
    assert os.environ.get("CTAL_POISON") == "1"
    buf = _common.poisoned((3, 4), torch.zeros(1, device=DEV))
    assert torch.isnan(buf).all()


# --- int64-safe indexing ----------------------------------------------------------------------

def test_program_offsets_are_int64():
    """Program ``(b, t)`` computes ``b * stride_b + t * stride_t`` exactly like the kernels do.
    The strides fit in int32 but the products pass 2**31; without ``.to(tl.int64)`` on the
    program ids the offsets wrap around."""
    B, T = 5, 3
    stride_b, stride_t = 2 ** 30 + 7, 2 ** 29 + 3
    out = torch.full((B * T,), -1, dtype=torch.int64, device=DEV)
    _common.index_probe_fwd_kernel[(B, T)](out, out, stride_b, stride_t, T)
    want = torch.tensor([b * stride_b + t * stride_t for b in range(B) for t in range(T)])
    assert want.max() > 2 ** 31
    assert torch.equal(out.cpu(), want)


def test_every_kernel_casts_program_ids_to_int64():
    """Source check over every kernel module: each ``tl.program_id(...)`` is immediately cast."""
    root = Path(K.__file__).parent
    found = 0
    for path in sorted(root.glob("*.py")):
        src = path.read_text()
        for m in re.finditer(r"tl\.program_id\(\d\)([^\n]*)", src):
            found += 1
            assert m.group(1).startswith(".to(tl.int64)"), f"{path.name}: {m.group(0)}"
    assert found >= 20
    for mod in (affinity, diffusion, fused, linear):
        names = [n for n, _ in inspect.getmembers(mod) if n.endswith("_kernel")]
        assert names and all(re.search(r"_(fwd|bwd)_kernel$", n) for n in names), names


def test_fused_cost_counts_the_m_tiles_the_launch_forms(monkeypatch):
    """``auto`` compares the fused backend by ``fused_plan.flops``: the forward is launched with
    ``fused_tiles`` and one program per query block holds every value row (M formed once per
    tile), so its count is the quadratic minimum. Every launch, forward and backward, is counted in
    tests/ops/test_triton_fused.py."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(grid=grid, **kwargs)

    monkeypatch.setattr(fused, "fused_fwd_kernel", Recorder())
    B, T, C, H, W = 2, 3, 40, 5, 7
    x, v, w, b = _problem(B, T, C, H, W, torch.float32)
    fused.forward(x, v, w, b)
    tiles = fused._tiles(x)
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_H", "BLOCK_R", "LEAD", "RING"):
        assert seen[name] == tiles[name], name
    assert seen["grid"] == (-(-H * W // tiles["BLOCK_M"]), B)  # no value-row axis
    p = ops.Problem(B, T, C, H, W, torch.float32, torch.device(DEV))
    assert fused_plan.flops(p) == ops.flops("quadratic", p)
    assert ops.backend_flops(ops.backends()["triton-fused"], p) == fused_plan.flops(p)


def test_batch_items_too_large_for_int32_tiles_are_refused():
    big = ops.Problem(1, 10, 128, 1500, 1500, torch.float32, torch.device(DEV))  # T*C*N > 2**31
    for name in ("triton-fused", "triton-linear"):
        assert "int32 tile offsets" in ops.backends()[name].unsupported(big)


# --- ahead-of-time compilation for sm_90 (no GPU needed; up to a minute of ptxas) -------------

def test_kernels_compile_for_sm90():
    """What the interpreter cannot check: every launch compiles with this Triton for an H100 with
    its real constexprs / warps / stages and fits in shared memory (kernels/compile_check.py)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ctal.kernels.compile_check", "--arch", "90",
           "--dtypes", "fp32", "bf16", "--channels", "128"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ok" in proc.stdout


# --- GPU: realistic and partly filled tiles, fp32 / TF32 / bf16 / fp16 / fp64 ------------------

# (backend, (B, T, C, H, W), bias). The odd shapes leave every tile partly filled (N, C and the
# value rows T*C) and give T*C > BLOCK_R, so the value-row loops run over several tiles.
GPU_CASES = ([("triton-linear", (2, 3, 128, 36, 48), True), ("triton-fused", (2, 5, 128, 16, 16), True),
              ("triton-staged", (1, 3, 64, 24, 32), False), ("triton-linear", (1, 2, 128, 32, 64), False)]
             + [(name, shape, bias) for name in BACKENDS
                for shape, bias in [((2, 3, 37, 9, 11), True), ((1, 1, 130, 1, 67), False),
                                    ((2, 5, 129, 13, 7), True)]])
GPU_MODES = {"fp32": (torch.float32, 1e-5), "tf32": (torch.float32, 2e-3),
             "bf16": (torch.bfloat16, 2e-2), "fp16": (torch.float16, 2e-2),
             "fp64": (torch.float64, 1e-10)}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(GPU_MODES))
@pytest.mark.parametrize("backend,shape,bias", GPU_CASES,
                         ids=[f"{n}-{'x'.join(map(str, s))}-{'bias' if b else 'nobias'}"
                              for n, s, b in GPU_CASES])
def test_gpu_matches_reference(backend, shape, bias, mode):
    dtype, tol = GPU_MODES[mode]
    why = ops.backends()[backend].unsupported(ops.Problem(*shape, dtype, torch.device("cuda")))
    if why is not None:  # e.g. C above the fused / linear kernels' channel limit
        pytest.skip(why)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        torch.manual_seed(0)
        x, v, w, b = _problem(*shape, torch.float32, bias, "cuda")
        w = w / 9  # the init's scale: M stays moderate, so rounding is the error measured
        dy = torch.randn_like(x)
        ins = [None if t is None else t.to(dtype) for t in (x, v, w, b)]
        y, g = run(lambda *a: ops.ctal_attention(*a, backend=backend), ins, dy.to(dtype))
        # ground truth: the literal reference in fp64 on the same rounded values
        ry, rg = reference64(reference.ctal_attention, ins, dy.to(dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert y.dtype == dtype
    assert_close(y, ry, tol, f"{backend} {mode} y")
    for name, got, want in zip(["dx", "dv", "dweight", "dbias"], g, rg):
        assert got.dtype == dtype
        assert_close(got, want, tol, f"{backend} {mode} {name}")
