"""Triton kernels (``ctal.kernels``) against the literal reference.

On CPU these run under ``TRITON_INTERPRET=1`` (set by conftest.py): tiny odd shapes, fp32 and
fp64, and every launcher fills its outputs with NaN first under the interpreter, so an element a
kernel forgets to write fails the comparison. GPU tests (marked ``gpu``) repeat the checks at
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
from ctal.ops import dispatch, reference
from tests.helpers import rel_err

triton = pytest.importorskip("triton")

import ctal.kernels as K  # noqa: E402
from ctal.kernels import _common, affinity, diffusion, fused, linear  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not K.INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)
if not CUDA and _common.interpreter_reason():
    pytest.skip(_common.interpreter_reason(), allow_module_level=True)

BACKENDS = ["triton-fused", "triton-linear", "triton-staged"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# Tiny odd shapes (B, T, C, H, W): several tiles in N (35 > 16) and in channels/rows where cheap;
# single-row and single-column grids, where every stencil tap but one row/column is off the grid.
SHAPES = [(2, 2, 3, 3, 5), (1, 3, 5, 5, 7), (1, 1, 17, 4, 3), (1, 2, 3, 1, 9), (2, 1, 5, 6, 1)]


def _problem(B, T, C, H, W, dtype, bias=True, device=DEV):
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return mk(B, T, C, H, W), mk(B, T, C, H, W), mk(H * W, T, 3, 3), (mk(H * W) if bias else None)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _run(fn, inputs, dy):
    """Output and gradients of every non-None input."""
    leaves = _leaves(*inputs)
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), list(grads)


def _ref64(fn, inputs, dy):
    """The reference in float64 on the same values (the ground truth for fp32 too)."""
    up = [None if t is None else t.double() for t in inputs]
    return _run(fn, up, dy.double())


def _assert_close(got, want, tol, what):
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


# --- stages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:], ids=str)
def test_affinity_stage(shape, dtype):
    x = torch.randn(*shape, dtype=dtype, device=DEV)
    B, T, C, H, W = shape
    N = H * W
    dy = torch.randn(B, T, N, N, dtype=dtype, device=DEV)
    y, (gx,) = _run(lambda a: ops.affinity(a, backend="triton"), [x], dy)
    ry, (rgx,) = _ref64(reference.affinity, [x], dy)
    assert y.dtype == dtype and y.shape == (B, T, N, N)
    _assert_close(y, ry, TOL[dtype], "affinity")
    _assert_close(gx, rgx, TOL[dtype], "affinity dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_affinity_interleaved_equals_aligned(dtype):
    B, T, C, H, W = 2, 3, 4, 3, 5
    x = torch.randn(B, T, C, H, W, dtype=dtype, device=DEV)
    dz = torch.randn(B, H * W * T, H, W, dtype=dtype, device=DEV)
    z, (gx,) = _run(lambda a: affinity.affinity(a, interleaved=True), [x], dz)
    rz, (rgx,) = _ref64(lambda a: reference.align(reference.affinity(a), (H, W)), [x], dz)
    assert z.shape == (B, H * W * T, H, W)
    _assert_close(z, rz, TOL[dtype], "interleaved affinity")
    _assert_close(gx, rgx, TOL[dtype], "interleaved affinity dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_align_stage(dtype):
    B, T, H, W = 2, 3, 3, 5
    N = H * W
    a = torch.randn(B, T, N, N, dtype=dtype, device=DEV)
    dz = torch.randn(B, N * T, H, W, dtype=dtype, device=DEV)
    z, (ga,) = _run(lambda t: ops.align(t, (H, W), backend="triton"), [a], dz)
    rz, (rga,) = _run(lambda t: reference.align(t, (H, W)), [a], dz)
    assert torch.equal(z, rz) and torch.equal(ga, rga)  # a permutation: bit exact


@pytest.mark.parametrize("grid", [(2, 2, 5, 7), (1, 1, 1, 9), (2, 3, 6, 1)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_diffuse_stage(dtype, bias, grid):
    B, T, H, W = grid  # 5x7: N = 35, three query and key tiles under the interpreter
    N = H * W
    z = torch.randn(B, N * T, H, W, dtype=dtype, device=DEV)
    w = torch.randn(N, T, 3, 3, dtype=dtype, device=DEV)
    b = torch.randn(N, dtype=dtype, device=DEV) if bias else None
    dy = torch.randn(B, N, N, dtype=dtype, device=DEV)
    fn = lambda z_, w_, b_: ops.diffuse(z_, w_, b_, backend="triton")  # noqa: E731
    y, g = _run(fn, [z, w, b], dy)
    ry, rg = _ref64(reference.diffuse, [z, w, b], dy)
    _assert_close(y, ry, TOL[dtype], "diffuse")
    for name, got, want in zip(["dz", "dw", "db"], g, rg):
        _assert_close(got, want, TOL[dtype], f"diffuse {name}")


@pytest.mark.parametrize("shape", [(2, 3, 7, 3, 7), (1, 1, 3, 1, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_propagate_stage(dtype, shape):
    B, T, C, H, W = shape  # first shape: R = 21 rows, two row tiles under the interpreter
    N = H * W
    m = torch.randn(B, N, N, dtype=dtype, device=DEV)
    v = torch.randn(B, T, C, H, W, dtype=dtype, device=DEV)
    dy = torch.randn_like(v)
    y, g = _run(lambda m_, v_: ops.propagate(m_, v_, backend="triton"), [m, v], dy)
    ry, rg = _ref64(reference.propagate, [m, v], dy)
    _assert_close(y, ry, TOL[dtype], "propagate")
    for name, got, want in zip(["dm", "dv"], g, rg):
        _assert_close(got, want, TOL[dtype], f"propagate {name}")


# --- whole-op backends ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,bias", list(zip(SHAPES, [True, False, True, True, False])),
                         ids=["2x2x3x3x5-bias", "1x3x5x5x7-nobias", "1x1x17x4x3-bias",
                              "1x2x3x1x9-bias", "2x1x5x6x1-nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, shape, bias, dtype):
    x, v, w, b = _problem(*shape, dtype, bias)
    dy = torch.randn_like(x)
    fn = lambda *a: ops.ctal_attention(*a, backend=backend)  # noqa: E731
    y, g = _run(fn, [x, v, w, b], dy)
    ry, rg = _ref64(reference.ctal_attention, [x, v, w, b], dy)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_close(y, ry, TOL[dtype], f"{backend} y")
    for name, got, want in zip(["dx", "dv", "dweight", "dbias"], g, rg):
        assert got.dtype == dtype
        _assert_close(got, want, TOL[dtype], f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    B, T, C, H, W = 2, 2, 3, 5, 3
    x, v, w, b = _problem(B, T, C, H, W, torch.float64)
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # transposed grid storage
    vt = torch.stack([v, v], 1).flatten(0, 1)[::2]  # strided batch
    wt = w.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    bt = torch.stack([b, b], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (xt, vt, wt, bt))
    dy = torch.randn_like(x).transpose(-1, -2).contiguous().transpose(-1, -2)
    fn = lambda *a: ops.ctal_attention(*a, backend=backend)  # noqa: E731
    y, g = _run(fn, [xt, vt, wt, bt], dy)
    ry, rg = _run(reference.ctal_attention, [x, v, w, b], dy)
    _assert_close(y, ry, 1e-10, backend)
    for got, want in zip(g, rg):
        _assert_close(got, want, 1e-10, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_pixel_uses_eps_branch(backend):
    x, v, w, b = _problem(1, 2, 4, 3, 5, torch.float64)
    x[0, 1, :, 1, 2] = 0  # normalize's clamp: no NaN, zero gradient through the norm
    dy = torch.randn_like(x)
    fn = lambda *a: ops.ctal_attention(*a, backend=backend)  # noqa: E731
    y, g = _run(fn, [x, v, w, b], dy)
    ry, rg = _run(reference.ctal_attention, [x, v, w, b], dy)
    _assert_close(y, ry, 1e-10, backend)
    for got, want in zip(g, rg):
        _assert_close(got, want, 1e-10, backend)


def test_gradcheck_linear_fp64():
    inputs = [t.requires_grad_() for t in _problem(1, 2, 3, 2, 3, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: ops.ctal_attention(*a, backend="triton-linear"),
                                    inputs, fast_mode=True)


def test_compile_fullgraph_sees_custom_ops():
    ops.backends()  # load the optional backends eagerly, not inside dynamo's trace
    x, v, w, b = _problem(1, 2, 3, 3, 3, torch.float64)
    x.requires_grad_()

    def f(x, v, w, b):
        # the backend functions themselves (dispatch's decide is not part of this check)
        return (linear.linear_attention(x, v, w, b).square().sum()
                + fused.fused_attention(x, v, w, b).sum() + K.staged_attention(x, v, w, b).sum())

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, v, w, b)
    want = (reference.ctal_attention(x, v, w, b).square().sum()
            + 2 * reference.ctal_attention(x, v, w, b).sum())
    _assert_close(got, want, 1e-10, "compiled")
    (gx,) = torch.autograd.grad(got, x)
    (wx,) = torch.autograd.grad(want, x)
    _assert_close(gx, wx, 1e-10, "compiled dx")


# --- custom-op registration -------------------------------------------------------------------

def _opcheck_cases():
    x, v, w, b = _problem(1, 2, 3, 2, 3, torch.float64)
    for t in (x, v, w, b):
        t.requires_grad_()
    N, T = 6, 2
    a = torch.randn(1, T, N, N, dtype=torch.float64, device=DEV, requires_grad=True)
    z = torch.randn(1, N * T, 2, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    m = torch.randn(1, N, N, dtype=torch.float64, device=DEV, requires_grad=True)
    return [
        ("affinity", affinity.affinity_fwd, (x, False)),
        ("affinity-interleaved", affinity.affinity_fwd, (x, True)),
        ("align", affinity.align_fwd, (a, 2, 3)),
        ("diffuse", diffusion.diffuse_fwd, (z, w, b)),
        ("diffuse-nobias", diffusion.diffuse_fwd, (z, w, None)),
        ("propagate", diffusion.propagate_fwd, (m, v)),
        ("fused", fused.fused_fwd, (x, v, w, b)),
        ("linear", linear.linear_fwd, (x, v, w, b)),
        ("linear-nobias", linear.linear_fwd, (x, v, w, None)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def test_backward_ops_opcheck():
    x, v, w, b = _problem(1, 2, 3, 2, 3, torch.float64)
    dy = torch.randn_like(x)
    y, g, nrm = linear.linear_fwd(x, v, w, b)
    torch.library.opcheck(linear.linear_bwd, (dy, x, v, w, b, g, nrm),
                          test_utils=("test_schema", "test_faketensor"))
    y, nrm = fused.fused_fwd(x, v, w, b)
    torch.library.opcheck(fused.fused_bwd, (dy, x, v, w, b, nrm),
                          test_utils=("test_schema", "test_faketensor"))


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
        assert ops.decide(p).backend not in dispatch.UNVERIFIED_ON_GPU
    # ...and once validated, auto ranks them by cost.
    monkeypatch.setattr(dispatch, "UNVERIFIED_ON_GPU", set())
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
    """``auto`` compares the fused backend by ``fused_flops``: it must count M once per BLOCK_R
    block of value rows, with the BLOCK_R the forward kernel is really launched with."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(grid=grid, **kwargs)

    monkeypatch.setattr(fused, "fused_fwd_kernel", Recorder())
    B, T, C, H, W = 2, 3, 40, 5, 7
    x, v, w, b = _problem(B, T, C, H, W, torch.float32)
    fused.forward(x, v, w, b)
    R, N = T * C, H * W
    assert seen["BLOCK_R"] == _common.fused_tiles(C)["BLOCK_R"]
    assert seen["grid"][1] == -(-R // seen["BLOCK_R"])
    p = ops.Problem(B, T, C, H, W, torch.float32, torch.device(DEV))
    assert K.fused_flops(p) == 2 * B * N * N * (seen["grid"][1] * 9 * R + R)
    assert ops.backends()["triton-fused"].flops(p) == K.fused_flops(p)


def test_batch_items_too_large_for_int32_tiles_are_refused():
    big = ops.Problem(1, 5, 256, 1500, 1500, torch.float32, torch.device(DEV))  # T*C*N > 2**31
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
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        torch.manual_seed(0)
        x, v, w, b = _problem(*shape, torch.float32, bias, "cuda")
        w = w / 9  # the init's scale: M stays moderate, so rounding is the error measured
        dy = torch.randn_like(x)
        ins = [None if t is None else t.to(dtype) for t in (x, v, w, b)]
        y, g = _run(lambda *a: ops.ctal_attention(*a, backend=backend), ins, dy.to(dtype))
        # ground truth: the literal reference in fp64 on the same rounded values
        ry, rg = _ref64(reference.ctal_attention, ins, dy.to(dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert y.dtype == dtype
    _assert_close(y, ry, tol, f"{backend} {mode} y")
    for name, got, want in zip(["dx", "dv", "dweight", "dbias"], g, rg):
        assert got.dtype == dtype
        _assert_close(got, want, tol, f"{backend} {mode} {name}")
