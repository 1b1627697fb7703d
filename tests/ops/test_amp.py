"""The autocast policy of ``ctal.ops`` (``ctal/ops/amp.py``), for every backend and the stages.

Under ``torch.autocast`` the floating inputs (float64 ones excepted) are cast to the autocast
dtype and the op computes in it: the output has that dtype, a backward run after the autocast
region (the usual AMP pattern) works, and the gradients come back in each input's own dtype.
Errors are measured against the float64 reference on the same rounded values (below 2e-2). A
backend that cannot compute in the autocast dtype must refuse with a clear error: ``cpp`` (16-bit)
and the Triton backends under the CPU interpreter (16-bit dots). GPU tests (marked ``gpu``)
repeat the checks on CUDA.
"""
from __future__ import annotations

import pytest
import torch

import ctal
from ctal import ops
from ctal.ops import reference
from tests.helpers import fast_cpu_backends, problem, rel_err

AMP = [torch.bfloat16, torch.float16]
AMP_IDS = ["bf16", "fp16"]
IN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IN_IDS = ["in-fp32", "in-bf16", "in-fp16"]
SHAPE = (2, 3, 8, 4, 5)
CPU_BACKENDS = ["reference"] + fast_cpu_backends() + ["auto"]
GPU_BACKENDS = ["reference", "quadratic", "linear", "cuda-linear", "cuda-fused", "triton-fused",
                "triton-linear", "triton-staged", "auto"]
NAMES = ("x", "v", "weight", "bias")
REFUSAL = r"cannot run this problem: .*Under torch\.autocast\('(cpu|cuda)'\) ctal\.ops computes in"


def _inputs(in_dtype, device="cpu", shape=SHAPE, seed=0):
    # Fusion weights of the init's scale (1/9) keep M moderate, so rounding is what is measured.
    x, v, w, b = problem(*shape, dtype=torch.float32, seed=seed, device=device)
    return [t.to(in_dtype) for t in (x, v, w / 9, b)]


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


def _rounded_ref64(inputs, amp, dy):
    """The float64 reference on the values the op computes with (inputs rounded to ``amp``)."""
    up = [(t if t.dtype == torch.float64 else t.to(amp)).double().requires_grad_() for t in inputs]
    y = reference.ctal_attention(*up)
    y.backward(dy.double())
    return y.detach(), [t.grad for t in up]


def _refuses(backend, amp, device):
    """Whether ``backend`` cannot compute in ``amp`` on ``device`` (it must then refuse)."""
    if backend == "auto":
        return False
    B, T, C, H, W = SHAPE
    p = ops.Problem(B, T, C, H, W, amp, torch.device(device))
    return ops.backends()[backend].unsupported(p) is not None


def _check_policy(backend, amp, in_dtype, device, *, backward_inside=False):
    inputs = _inputs(in_dtype, device)
    leaves = _leaves(inputs)
    dy = torch.randn(SHAPE, device=device).to(amp)
    with torch.autocast(device, dtype=amp):
        y = ops.ctal_attention(*leaves, backend=backend)
        if backward_inside:
            y.backward(dy)
    assert y.dtype == amp
    if not backward_inside:
        y.backward(dy)  # after the autocast region, as AMP training does
    want_y, want_g = _rounded_ref64(inputs, amp, dy)
    assert rel_err(y, want_y) < 2e-2
    for name, leaf, want in zip(NAMES, leaves, want_g):
        assert leaf.grad.dtype == leaf.dtype, name
        assert rel_err(leaf.grad, want) < 2e-2, name


# --- the whole op on CPU ----------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_policy_cpu(backend, amp, in_dtype):
    if _refuses(backend, amp, "cpu"):
        with torch.autocast("cpu", dtype=amp), pytest.raises(RuntimeError, match=REFUSAL):
            ops.ctal_attention(*_inputs(in_dtype), backend=backend)
        return
    _check_policy(backend, amp, in_dtype, "cpu")


def test_cpp_refuses_16_bit_under_autocast():
    """The refusal branch above is real: the C++ CPU kernels are fp32/fp64 only."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("the compiled extension is not built")
    x, v, w, b = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as err:
            ops.ctal_attention(x, v, w, b, backend="cpp")
        assert ("backend 'cpp' cannot run this problem: supports float32 and float64, got "
                "torch.bfloat16") in str(err.value)
        assert "Under torch.autocast('cpu') ctal.ops computes in torch.bfloat16" in str(err.value)
        # auto picks among the backends that can run the autocast dtype
        assert ops.explain(x, v, w, b).backend in ("linear", "quadratic")


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "cpp"])
def test_backward_inside_autocast_cpu(backend, amp):
    _check_policy(backend, amp, torch.float32, "cpu", backward_inside=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_inputs_are_not_cast(backend):
    """As for matmul-like ops, autocast leaves float64 alone: the op computes in float64."""
    _check_float64_not_cast(backend, "cpu", torch.bfloat16)


def _check_float64_not_cast(backend, device, amp):
    x, v, w, b = problem(1, 2, 3, 4, 5, seed=1, device=device)
    dy = torch.randn_like(x)
    leaves = _leaves([x, v, w, b])
    with torch.autocast(device, dtype=amp):
        y = ops.ctal_attention(*leaves, backend=backend)
    y.backward(dy)
    want = _leaves([x, v, w, b])
    reference.ctal_attention(*want).backward(dy)
    assert y.dtype == torch.float64
    for name, got, ref in zip(NAMES, leaves, want):
        assert got.grad.dtype == torch.float64 and rel_err(got.grad, ref.grad) < 1e-10, name


def test_mixed_input_dtypes_are_accepted_under_autocast():
    """Outside autocast the inputs need one dtype; under it they are all cast to the autocast
    dtype first, as matmul accepts fp32 and bf16 operands there. Each gradient keeps its input's
    dtype."""
    inputs = _inputs(torch.float32)
    inputs = [inputs[0], inputs[1].bfloat16(), inputs[2].half(), inputs[3]]
    leaves = _leaves(inputs)
    with pytest.raises(TypeError, match="v has dtype torch.bfloat16 but x has torch.float32"):
        ops.ctal_attention(*inputs, backend="linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.ctal_attention(*leaves, backend="linear")
    dy = torch.randn(SHAPE).bfloat16()
    y.backward(dy)
    _, want_g = _rounded_ref64(inputs, torch.bfloat16, dy)
    assert y.dtype == torch.bfloat16
    for name, leaf, t, want in zip(NAMES, leaves, inputs, want_g):
        assert leaf.grad.dtype == t.dtype and rel_err(leaf.grad, want) < 2e-2, name


def test_autocast_policy_under_torch_compile():
    def f(x, v, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.ctal_attention(x, v, w, b)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = _inputs(torch.float32)
    leaves = _leaves(inputs)
    y = compiled(*leaves)
    dy = torch.randn(SHAPE).bfloat16()
    y.backward(dy)
    want_y, want_g = _rounded_ref64(inputs, torch.bfloat16, dy)
    assert y.dtype == torch.bfloat16 and rel_err(y, want_y) < 2e-2
    for name, leaf, want in zip(NAMES, leaves, want_g):
        assert leaf.grad.dtype == torch.float32 and rel_err(leaf.grad, want) < 2e-2, name


# --- the stages on CPU ------------------------------------------------------------------------

def _check_stages(backend, amp, device):
    B, T, C, H, W = SHAPE
    inputs = _inputs(torch.float32, device)
    x, v, w, b = leaves = _leaves(inputs)
    with torch.autocast(device, dtype=amp):
        a = ops.affinity(x, backend=backend)
        z = ops.align(a, (H, W), backend=backend)
        m = ops.diffuse(z, w, b, backend=backend)
        y = ops.propagate(m, v, backend=backend)
        # each stage casts its own floating inputs too
        singles = [ops.align(a.float(), (H, W), backend=backend),
                   ops.diffuse(z.float(), w, b, backend=backend),
                   ops.propagate(m.float(), v, backend=backend)]
    assert all(t.dtype == amp for t in [a, z, m, y] + singles)
    dy = torch.randn(SHAPE, device=device).to(amp)
    y.backward(dy)
    want_y, want_g = _rounded_ref64(inputs, amp, dy)
    assert rel_err(y, want_y) < 2e-2
    for name, leaf, want in zip(NAMES, leaves, want_g):
        assert leaf.grad.dtype == torch.float32 and rel_err(leaf.grad, want) < 2e-2, name


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
def test_autocast_policy_reference_stages_cpu(amp):
    _check_stages("reference", amp, "cpu")


# --- Triton under the CPU interpreter: no 16-bit dots, so 16-bit autocast is refused ----------

def _interpreted_triton():
    names = [n for n, b in ops.backends().items() if b.implementation == "triton"]
    if not names or ops.backends()[names[0]].unsupported(
            ops.Problem(1, 1, 1, 1, 1, torch.float32, torch.device("cpu"))) is not None:
        pytest.skip("the Triton backends do not run on this CPU (no interpreter)")
    return names


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
def test_interpreted_triton_refuses_16_bit_autocast(amp, in_dtype):
    names = _interpreted_triton()
    x, v, w, b = _inputs(in_dtype, shape=(1, 2, 3, 3, 4))
    with torch.autocast("cpu", dtype=amp):
        for name in names:
            with pytest.raises(RuntimeError, match="interpreter mishandles half-precision dots"):
                ops.ctal_attention(x, v, w, b, backend=name)
        with pytest.raises(RuntimeError, match="interpreter mishandles half-precision dots"):
            ops.affinity(x, backend="triton")
        a = reference.affinity(x)
        with pytest.raises(RuntimeError, match="interpreter mishandles half-precision dots"):
            ops.align(a, (3, 4), backend="triton")
        z = reference.align(a, (3, 4))
        with pytest.raises(RuntimeError, match="interpreter mishandles half-precision dots"):
            ops.diffuse(z, w, b, backend="triton")
        with pytest.raises(RuntimeError, match="interpreter mishandles half-precision dots"):
            ops.propagate(reference.diffuse(z, w, b), v, backend="triton")


def test_interpreted_triton_float64_under_autocast():
    """float64 inputs are not cast, so the interpreted kernels run under autocast as without."""
    names = _interpreted_triton()
    x, v, w, b = problem(1, 2, 3, 3, 4, seed=2)
    dy = torch.randn_like(x)
    want = _leaves([x, v, w, b])
    reference.ctal_attention(*want).backward(dy)
    for name in names:
        leaves = _leaves([x, v, w, b])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ops.ctal_attention(*leaves, backend=name)
        y.backward(dy)
        assert y.dtype == torch.float64, name
        for arg, got, ref in zip(NAMES, leaves, want):
            assert got.grad.dtype == torch.float64 and rel_err(got.grad, ref.grad) < 1e-10, (name, arg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ops.affinity(x, backend="triton")
        m = ops.diffuse(ops.align(a, (3, 4), backend="triton"), w, b, backend="triton")
        y = ops.propagate(m, v, backend="triton")
    assert y.dtype == torch.float64 and rel_err(y, reference.ctal_attention(x, v, w, b)) < 1e-10


# --- the module ---------------------------------------------------------------------------------

def _module_case(device, amp, size, algorithm):
    torch.manual_seed(0)
    block = ctal.CrossTaskAffinity(["a", "b"], 16, size, gamma=0.5, backend="auto").to(device)
    feats = torch.randn(2, 2, 16, *size, device=device)
    with torch.autocast(device, dtype=amp):
        # the case this checks: which algorithm auto runs in the autocast dtype
        picked = ops.explain(feats).backend
        assert ops.backends()[picked].algorithm == algorithm
        out = block(feats)
    loss = out.float().square().mean()
    loss.backward()  # after the autocast region
    grads = {n: p.grad for n, p in block.named_parameters()}
    block.zero_grad()
    block(feats).square().mean().backward()  # fp32, no autocast
    for n, p in block.named_parameters():
        assert grads[n].dtype == p.dtype == torch.float32, n
        # bf16/fp16 rounding of the projections and of CTAL, against the fp32 run
        assert rel_err(grads[n], p.grad) < 2e-2, n


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("size, algorithm", [((4, 5), "quadratic"), ((24, 24), "linear")],
                         ids=["quadratic", "linear"])
def test_module_auto_under_autocast_cpu(amp, size, algorithm):
    _module_case("cpu", amp, size, algorithm)


# --- the same on CUDA -------------------------------------------------------------------------

def _gpu_backend(backend):
    if backend != "auto" and backend not in ops.available_backends("cuda"):
        p = ops.Problem(*SHAPE, torch.float32, torch.device("cuda"))
        pytest.skip(f"{backend} does not run on this GPU: {ops.backends()[backend].unsupported(p)}")


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=IN_IDS)
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_policy_gpu(backend, amp, in_dtype):
    _gpu_backend(backend)
    if _refuses(backend, amp, "cuda"):
        with torch.autocast("cuda", dtype=amp), pytest.raises(RuntimeError, match=REFUSAL):
            ops.ctal_attention(*_inputs(in_dtype, "cuda"), backend=backend)
        return
    _check_policy(backend, amp, in_dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_float64_inputs_are_not_cast_gpu(backend, amp):
    _gpu_backend(backend)
    _check_float64_not_cast(backend, "cuda", amp)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_policy_stages_gpu(backend, amp):
    if backend == "triton" and "triton-staged" not in ops.available_backends("cuda"):
        pytest.skip("the Triton stage kernels do not run on this GPU")
    _check_stages(backend, amp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
def test_module_auto_under_autocast_gpu(amp):
    # On CUDA auto may pick any verified backend; the size only has to run.
    size = (4, 5)
    B, T, C = 2, 2, 16
    algorithm = ops.backends()[ops.decide(
        ops.Problem(B, T, C, *size, amp, torch.device("cuda"))).backend].algorithm
    _module_case("cuda", amp, size, algorithm)
