"""The compiled extension (csrc/, ``ctal._C``): what is specific to it. The backend contract
(reference equality, strides, opcheck, compile) is tests/ops/test_conformance.py; here: the build,
poisoned buffers, autocast, the compiled op's own errors, a missing build, the shared-memory
model of cuda-fused, and the CUDA backends at realistic sizes when a GPU is present."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ctal import ops
from ctal.ops import extension, reference, registry
from tests.helpers import assert_close, problem, reference64, rel_err, run

BUILT = extension.is_built()
needs_ext = pytest.mark.skipif(not BUILT, reason=extension.build_error() or "")
HAS_GPU = BUILT and extension.with_cuda() and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and the CUDA build")


def _check(backend, x, v, w, b, tol, dy=None):
    dy = torch.randn_like(x) if dy is None else dy
    y, g = run(lambda *a: ops.ctal_attention(*a, backend=backend), (x, v, w, b), dy)
    ref_y, ref_g = reference64(reference.ctal_attention, (x, v, w, b), dy)
    assert y.dtype == x.dtype and y.device == x.device and y.shape == x.shape
    assert_close(y, ref_y, tol, "y")
    for name, got, want in zip(("x", "v", "weight", "bias"), g, ref_g):
        assert got.shape == want.shape, name
        assert_close(got, want, tol, name)


# --- build ---------------------------------------------------------------------------------------

def test_extension_builds_and_registers():
    if os.environ.get("CTAL_SKIP_EXT") == "1" and not BUILT:
        pytest.skip("built with CTAL_SKIP_EXT=1")
    assert BUILT, extension.build_error()
    from ctal import _C  # noqa: F401
    assert hasattr(torch.ops.ctal_ext, "linear_fwd") and hasattr(torch.ops.ctal_ext, "fused_bwd")
    assert {"cpp", "cuda-linear", "cuda-fused"} <= set(ops.backends())
    assert "cpp" in ops.available_backends("cpu")


def test_extension_has_cuda_when_a_toolkit_is_present():
    """CI compiles the CUDA sources whenever nvcc is there: a CPU-only fallback must not hide a
    CUDA build break."""
    if not BUILT or os.environ.get("CTAL_NO_CUDA") == "1" or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolkit on PATH (or CTAL_NO_CUDA=1): the CPU-only build is expected")
    assert extension.with_cuda(), "nvcc is on PATH but ctal._C was built without CUDA"


@needs_ext
def test_extension_outputs_are_poisoned_in_tests(monkeypatch):
    """conftest.py sets CTAL_POISON=1, so the C++ / CUDA ops NaN-fill their buffers before the
    kernels write them (csrc/ops.cpp output_buffer); the switch is read per call."""
    from ctal import _C
    assert _C.poison_outputs()
    monkeypatch.setenv("CTAL_POISON", "0")
    assert not _C.poison_outputs()


@needs_ext
def test_cpp_under_autocast_follows_the_ops_policy():
    """Under autocast ctal.ops computes in the autocast dtype (tests/ops/test_amp.py): the C++ CPU
    kernels cannot run bf16, so "cpp" refuses, naming the dtype; float64 inputs are not cast and
    run. The raw op itself keeps autocast out of its GEMMs (an fp32 call under bf16 autocast used
    to mix dtypes in one bmm and fail)."""
    x, v, w, b = problem(2, 3, 5, 4, 6, dtype=torch.float32)
    want = reference.ctal_attention(x, v, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="backend 'cpp' cannot run this problem: supports "
                           r"float32 and float64, got torch.bfloat16.*Under torch.autocast\('cpu'\)"):
            ops.ctal_attention(x, v, w, b, backend="cpp")
        _check("cpp", x.double(), v.double(), w.double(), b.double(), tol=1e-10)
        got = torch.ops.ctal_ext.linear_fwd(x, v, w, b)[0]
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


# --- the cpp backend on CPU ------------------------------------------------------------------------

@needs_ext
def test_auto_prefers_cpp_over_pytorch_for_linear_shapes_on_cpu():
    x, v, w, b = problem(1, 1, 3, 8, 8)
    d = ops.explain(x)
    assert ops.backends()[d.backend].algorithm == "linear", str(d)
    rank = registry.IMPLEMENTATION_RANK
    assert rank[ops.backends()[d.backend].implementation] >= rank["cpp"], str(d)


@needs_ext
def test_clear_errors_from_the_compiled_op():
    x, v, w, b = problem(1, 2, 3, 3, 4)
    with pytest.raises(RuntimeError, match=r"weight must be \(H\*W, T, 3, 3\)"):
        torch.ops.ctal_ext.linear_fwd(x, v, w[:-1], b)
    with pytest.raises(RuntimeError, match="v must have the shape of x"):
        torch.ops.ctal_ext.linear_fwd(x, v[:, :1], w, b)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.ctal_ext.linear_fwd(x, v, w, b[:-1])
    h = [t.half() for t in (x, v, w, b)]
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.ctal_ext.linear_fwd(*h)
    with pytest.raises(RuntimeError, match="cannot run this problem"):  # via the dispatcher
        ops.ctal_attention(*h, backend="cpp")
    with pytest.raises(RuntimeError, match="needs CUDA tensors|built without CUDA"):
        ops.ctal_attention(x, v, w, b, backend="cuda-fused")


def test_missing_extension_gives_build_instructions(monkeypatch):
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_IMPORT_ERROR", ImportError("simulated"))
    p = ops.Problem(1, 2, 3, 4, 5, torch.float32, torch.device("cpu"))
    for name in ("cpp", "cuda-linear", "cuda-fused"):
        why = ops.backends()[name].unsupported(p)
        assert why is not None and "pip install --no-build-isolation -e ." in why
    assert "cpp" not in ops.available_backends("cpu")
    x, v, w, b = problem(1, 2, 3, 4, 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not built"):
        ops.ctal_attention(x, v, w, b, backend="cpp")
    with pytest.raises(RuntimeError, match="not built"):
        extension.cpp_attention(x, v, w, b)
    # Everything else still works, and auto picks a backend that can run.
    assert ops.explain(x).backend in ops.available_backends("cpu")
    ops.ctal_attention(x, v, w, b)


@needs_ext
def test_built_without_cuda_says_so(monkeypatch):
    if extension.with_cuda():
        pytest.skip("this build has CUDA")
    p = ops.Problem(1, 2, 3, 4, 5, torch.float32, torch.device("cuda"))
    assert "built without CUDA" in ops.backends()["cuda-linear"].unsupported(p)


@needs_ext
def test_fused_smem_formula_matches_the_kernel_layout():
    if not extension.with_cuda():
        pytest.skip("built without CUDA")
    from ctal import _C
    names = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}
    for (T, C, H, W) in [(3, 128, 16, 16), (5, 3, 5, 7), (2, 200, 33, 1), (3, 128, 72, 96),
                         (2, 128, 32, 64), (4, 17, 1, 40), (2, 64, 3, 500), (1, 1, 1, 1)]:
        for dtype, name in names.items():
            for tf32 in (False, True):
                for bwd in (False, True):
                    assert (extension.fused_smem_bytes(T, C, H, W, dtype, tf32, bwd)
                            == _C.fused_smem_bytes(T, C, H, W, name, tf32, bwd))


# --- CUDA (skipped without a GPU) ------------------------------------------------------------------

GPU_SHAPES = [(1, 1, 3, 5, 7), (2, 3, 16, 4, 9), (1, 5, 8, 1, 17), (2, 2, 33, 13, 1), (1, 3, 128, 16, 16)]


def _cuda_problem(shape, dtype, bias=True):
    return [None if t is None else t.to("cuda", dtype) for t in problem(*shape, bias=bias)]


@pytest.mark.parametrize("backend", ["cuda-linear", "cuda-fused"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,tf32,tol", [(torch.float64, False, 1e-10), (torch.float32, False, 1e-5),
                                            (torch.float32, True, 2e-3), (torch.bfloat16, False, 2e-2),
                                            (torch.float16, False, 2e-2)],
                         ids=["fp64", "fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.gpu
@needs_gpu
def test_cuda_backends_match_reference(backend, shape, dtype, tf32, tol, bias, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    x, v, w, b = _cuda_problem(shape, dtype, bias)  # the reference sees the same (rounded) inputs
    why = ops.backends()[backend].unsupported(ops.Problem.of(x))
    if backend == "cuda-fused":  # refused exactly when the shared-memory model says it cannot fit
        fits = extension.fused_smem_need(*shape[1:], dtype) <= extension.fused_smem_limit(x.device.index)
        assert (why is None) == fits, why
        if not fits:
            assert "shared memory" in why
            pytest.skip(why)
    assert why is None
    _check(backend, x, v, w, b, tol=tol)


@pytest.mark.gpu
@needs_gpu
def test_cuda_fused_refuses_wide_grids_with_a_reason():
    nyuv2 = ops.Problem(1, 3, 128, 72, 96, torch.float32, torch.device("cuda"))
    assert ops.backends()["cuda-fused"].unsupported(nyuv2) is None  # keys are tiled: N is no limit
    p = ops.Problem(1, 3, 128, 4, 2000, torch.float32, torch.device("cuda"))  # a 2000-pixel row halo
    why = ops.backends()["cuda-fused"].unsupported(p)
    assert why is not None and "cuda-linear" in why
    huge_batch = ops.Problem(70000, 1, 8, 4, 5, torch.float32, torch.device("cuda"))
    assert "65535" in ops.backends()["cuda-fused"].unsupported(huge_batch)
