"""The backend contract, checked for every registered backend and stage implementation.

Each test is parametrized over ``ops.backends()`` (and the stage registry), so a new backend is
tested by registering it. A backend that cannot run here is skipped with its own
``unsupported()`` reason. The ground truth is the literal reference in float64 on the same
values: fp64 backends must agree to 1e-10, fp32 to 1e-5 (relative error over the whole tensor,
forward and every gradient). On a CPU-only machine the Triton kernels run under the interpreter
(conftest.py) at the tiny shapes below, which still span several tiles.
"""
from __future__ import annotations

import pytest
import torch

from ctal import ops
from ctal.ops import reference, registry
from ctal.ops.linear import linear_attention
from tests.helpers import ODD_SHAPES, assert_close, problem, reference64, rel_err, run

CUDA = torch.cuda.is_available()
BACKENDS = sorted(ops.backends())
# The reference is the ground truth: compared with itself only where rounding differs (fp32).
CANDIDATES = [b for b in BACKENDS if b != "reference"]
STAGE_IMPLS = sorted({(stage, name) for stage in registry.STAGES
                      for name in registry._STAGE_IMPLS[stage] if name != "reference"})
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
# Odd shapes, plus two that span several tiles of the interpreted Triton kernels (N = 35 > 32,
# C = 17 > 16); bias alternates so both forms meet every dtype.
SHAPES = ODD_SHAPES + [(1, 3, 5, 5, 7), (1, 1, 17, 4, 3)]
SHAPE_CASES = [(s, i % 2 == 0) for i, s in enumerate(SHAPES)]
GRADS = ("x", "v", "weight", "bias")


def device_for(name: str, dtype=torch.float64, shape=(2, 2, 3, 4, 5)) -> torch.device:
    """Where the backend runs this problem (a GPU first), or skip with its own reasons."""
    backend = ops.backends()[name]
    reasons = []
    for dev in (["cuda"] if CUDA else []) + ["cpu"]:
        why = backend.unsupported(ops.Problem(*shape, dtype, torch.device(dev)))
        if why is None:
            return torch.device(dev)
        reasons.append(f"{dev}: {why}")
    pytest.skip(f"{name} cannot run here ({'; '.join(reasons)})")


def assert_matches(got, want, tol, names, what):
    """Output and every gradient (``names`` of the present inputs, in order) within ``tol``."""
    (y, grads), (ry, rgrads) = got, want
    assert len(grads) == len(rgrads)
    assert_close(y, ry, tol, f"{what}: output")
    for name, g, rg in zip(names, grads, rgrads):
        assert_close(g, rg, tol, f"{what}: d{name}")


def call(name):
    return lambda x, v, w, b: ops.ctal_attention(x, v, w, b, backend=name)


# --- forward and every gradient against the reference -------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape,bias", SHAPE_CASES,
                         ids=["x".join(map(str, s)) + ("-bias" if b else "-nobias") for s, b in SHAPE_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, bias, dtype):
    if backend == "reference" and dtype == torch.float64:
        pytest.skip("the fp64 reference is the ground truth itself")
    dev = device_for(backend, dtype, shape)
    x, v, w, b = problem(*shape, dtype=dtype, bias=bias, device=dev)
    dy = torch.randn_like(x)
    got = run(call(backend), (x, v, w, b), dy)
    assert got[0].dtype == dtype and got[0].shape == x.shape and got[0].device == x.device
    assert all(g.dtype == dtype for g in got[1])
    assert_matches(got, reference64(reference.ctal_attention, (x, v, w, b), dy), TOL[dtype], GRADS, backend)


@pytest.mark.parametrize("backend", CANDIDATES)
def test_non_contiguous_and_expanded_inputs(backend):
    dev = device_for(backend)
    x, v, w, b = problem(2, 3, 4, 5, 7, device=dev)
    # Same values, other storage: transposed grids, a strided batch, a strided bias and dy.
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    vt = torch.stack([v, v], 1).flatten(0, 1)[::2]
    wt = w.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    bt = torch.stack([b, b], 1)[:, 0]
    dy = torch.randn_like(x).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not any(t.is_contiguous() for t in (xt, vt, wt, bt, dy))
    want = reference64(reference.ctal_attention, (x, v, w, b), dy)
    assert_matches(run(call(backend), (xt, vt, wt, bt), dy), want, 1e-10, GRADS, f"{backend} strided")
    # Expanded (stride-0) batch: one item broadcast to two; gradients sum over the copies.
    x1, v1 = x[:1].detach().requires_grad_(), v[:1].detach().requires_grad_()
    y = ops.ctal_attention(x1.expand(2, -1, -1, -1, -1), v1.expand(2, -1, -1, -1, -1), w, b, backend=backend)
    gx, gv = torch.autograd.grad(y, (x1, v1), dy)
    x2, v2 = x[:1].detach().cpu().requires_grad_(), v[:1].detach().cpu().requires_grad_()
    ry = reference.ctal_attention(x2.expand(2, -1, -1, -1, -1), v2.expand(2, -1, -1, -1, -1), w.cpu(), b.cpu())
    rgx, rgv = torch.autograd.grad(ry, (x2, v2), dy.cpu())
    for got, want, what in [(y, ry, "y"), (gx, rgx, "dx"), (gv, rgv, "dv")]:
        assert rel_err(got.detach().cpu(), want.detach()) < 1e-10, f"{backend} expanded {what}"


@pytest.mark.parametrize("backend", CANDIDATES)
def test_zero_norm_pixel(backend):
    """A pixel whose features are exactly zero takes the normalization's eps branch: no NaN,
    the reference's gradients."""
    dev = device_for(backend)
    x, v, w, b = problem(1, 2, 4, 3, 5, device=dev)
    x[0, 1, :, 1, 2] = 0
    dy = torch.randn_like(x)
    assert_matches(run(call(backend), (x, v, w, b), dy),
                   reference64(reference.ctal_attention, (x, v, w, b), dy), 1e-10, GRADS, backend)


@pytest.mark.parametrize("backend", CANDIDATES)
def test_gradcheck(backend):
    dev = device_for(backend)
    inputs = tuple(t.requires_grad_() for t in problem(1, 2, 3, 2, 3, device=dev))
    assert torch.autograd.gradcheck(call(backend), inputs, fast_mode=True)


# --- the custom op: registration, torch.compile, double backward ---------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, bias):
    fn = ops.backends()[backend].fn
    if not hasattr(fn, "forward_op"):
        pytest.skip(f"{backend} has no custom op of its own (plain PyTorch ops, or the stage ops "
                    "composed: test_stage_opcheck)")
    dev = device_for(backend)
    x, v, w, b = (t.requires_grad_() if t is not None else None
                  for t in problem(1, 2, 3, 2, 3, bias=bias, device=dev))
    args = (x, v, w, b) + ((False,) if backend == "cuda-fused" else ())  # its allow_tf32 flag
    torch.library.opcheck(fn.forward_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_changing_sizes(backend):
    """``torch.compile(fullgraph=True)`` through the dispatcher: a second batch size and a second
    grid make it trace dynamic shapes; the output and the gradient stay the reference's."""
    dev = device_for(backend)
    torch._dynamo.reset()  # every backend recompiles the same code: not against one cache limit

    def f(x, v, w, b):
        return ops.ctal_attention(x, v, w, b, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for B, H, W in [(2, 3, 4), (3, 3, 4), (2, 4, 5)]:
        x, v, w, b = problem(B, 2, 3, H, W, device=dev)
        x.requires_grad_()
        got = compiled(x, v, w, b)
        (gx,) = torch.autograd.grad(got, x)
        want = f(x, v, w, b)
        (wx,) = torch.autograd.grad(want, x)
        assert rel_err(got, want) < 1e-10 and rel_err(gx, wx) < 1e-10, (B, H, W)


def _plain_torch_ops(name: str) -> bool:
    """The backend is ordinary differentiable PyTorch ops (no custom op, no explicit backward)."""
    b = ops.backends()[name]
    return b.implementation == "pytorch" and not hasattr(b.fn, "forward_op")


PLAIN = [b for b in BACKENDS if _plain_torch_ops(b)]


@pytest.mark.parametrize("backend", CANDIDATES)
def test_double_backward_is_refused_clearly(backend):
    if _plain_torch_ops(backend):
        pytest.skip(f"{backend} is plain PyTorch ops: twice differentiable (test_plain_ops_are_twice_differentiable)")
    dev = device_for(backend)
    x, v, w, b = (t.requires_grad_() for t in problem(1, 2, 3, 3, 4, device=dev))
    y = ops.ctal_attention(x, v, w, b, backend=backend)
    with pytest.raises(RuntimeError, match="double backward .* is not supported; use backend='reference'"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", PLAIN)
def test_plain_ops_are_twice_differentiable(backend):
    x, v, w, b = (t.requires_grad_() for t in problem(1, 2, 3, 3, 4))
    y = ops.ctal_attention(x, v, w, b, backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert gx.requires_grad
    if backend != "reference":  # the second derivative itself, against the reference's
        (ggx,) = torch.autograd.grad(gx.sum(), w)
        ry = ops.ctal_attention(x, v, w, b, backend="reference")
        (rgx,) = torch.autograd.grad(ry.square().sum(), x, create_graph=True)
        (rggx,) = torch.autograd.grad(rgx.sum(), w)
        assert_close(ggx, rggx, 1e-10, f"{backend}: d/dweight of dx")


# --- the documented errors ------------------------------------------------------------------------

BAD = [
    (dict(x=torch.randn(2, 3, 4, 5)), ValueError, "x must have rank 5"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randint(0, 3, (1, 2, 3, 4, 5))), TypeError, "x must be a floating"),
    (dict(x=torch.randn(0, 2, 3, 4, 5), v=torch.randn(0, 2, 3, 4, 5)), ValueError, "non-empty"),
    (dict(v=torch.randn(1, 2, 4, 4, 5)), ValueError, "v must have the same"),
    (dict(v=torch.randn(1, 3, 3, 4, 5)), ValueError, "v must have the same"),
    (dict(v=torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)), TypeError, "v has dtype"),
    (dict(weight=torch.randn(21, 2, 3, 3)), ValueError, r"weight must have shape \(H\*W, T, 3, 3\)"),
    (dict(weight=torch.randn(20, 3, 3, 3)), ValueError, "weight must have shape"),
    (dict(weight=torch.randn(20, 2, 3)), ValueError, "weight must have rank 4"),
    (dict(weight=torch.randn(20, 2, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(21)), ValueError, r"bias must have shape \(H\*W,\)"),
]


@pytest.mark.parametrize("over,err,match", BAD, ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in enumerate(BAD)])
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_documented_errors(backend, over, err, match):
    """Bad input is a clear error naming the argument, before any backend runs, whichever is named."""
    x, v, w, b = problem(1, 2, 3, 4, 5, dtype=torch.float32)
    args = dict(x=x, v=v, weight=w, bias=b)
    args.update(over)
    with pytest.raises(err, match=match):
        ops.ctal_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_problem_is_refused_with_the_backends_reason(backend):
    """A backend named for a problem it cannot run raises its own ``unsupported()`` reason
    (never a crash inside a kernel)."""
    x, v, w, b = problem(1, 2, 3, 4, 5, dtype=torch.float32)
    why = ops.backends()[backend].unsupported(ops.Problem.of(x))
    if why is None:
        assert ops.explain(x, v, w, b, backend=backend).backend == backend
        return
    with pytest.raises(RuntimeError, match="cannot run this problem") as info:
        ops.ctal_attention(x, v, w, b, backend=backend)
    assert why.split(" (")[0] in str(info.value)


# --- stage implementations --------------------------------------------------------------------

def _stage_case(stage, dtype, dev):
    """Inputs and a reference function of one stage on a 5x7 grid (N = 35: several tiles)."""
    B, T, C, H, W = 2, 2, 5, 5, 7
    N = H * W
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=dev)  # noqa: E731
    if stage == "affinity":
        return (mk(B, T, C, H, W),), {}, (B, T, N, N)
    if stage == "align":
        return (mk(B, T, N, N),), {"size": (H, W)}, (B, N * T, H, W)
    if stage == "diffuse":
        return (mk(B, N * T, H, W), mk(N, T, 3, 3), mk(N)), {}, (B, N, N)
    return (mk(B, N, N), mk(B, T, C, H, W)), {}, (B, T, C, H, W)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("stage,impl", STAGE_IMPLS, ids=[f"{s}-{n}" for s, n in STAGE_IMPLS])
def test_stage_matches_reference(stage, impl, dtype):
    dev = device_for(f"{impl}-staged" if f"{impl}-staged" in ops.backends() else "reference", dtype)
    inputs, kw, shape = _stage_case(stage, dtype, dev)
    dy = torch.randn(shape, dtype=dtype, device=dev)
    fn = getattr(ops, stage)
    got = run(lambda *a: fn(*a, **kw, backend=impl), inputs, dy)
    assert got[0].shape == shape and got[0].dtype == dtype
    want = reference64(lambda *a: getattr(reference, stage)(*a, *kw.values()), inputs, dy)
    assert_matches(got, want, TOL[dtype], [f"input{i}" for i in range(len(inputs))], f"{stage} ({impl})")
    # non-contiguous inputs: the same values through transposed storage
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1
               else torch.stack([t, t], 1)[:, 0] for t in inputs]
    assert not any(t.is_contiguous() for t in strided)
    got = run(lambda *a: fn(*a, **kw, backend=impl), strided, dy)
    assert_matches(got, want, TOL[dtype], [f"input{i}" for i in range(len(inputs))], f"{stage} ({impl}) strided")


@pytest.mark.parametrize("stage,impl", STAGE_IMPLS, ids=[f"{s}-{n}" for s, n in STAGE_IMPLS])
def test_stage_opcheck(stage, impl):
    fn = registry.stage_impl(stage, impl)
    op = getattr(fn, "forward_op", None)
    if op is None:
        pytest.skip(f"{stage} ({impl}) is not a custom op")
    dev = device_for(f"{impl}-staged" if f"{impl}-staged" in ops.backends() else "reference")
    inputs, kw, _ = _stage_case(stage, torch.float64, dev)
    inputs = tuple(t.requires_grad_() for t in inputs)
    extra = {"affinity": (False,), "align": tuple(kw.get("size", ())), "diffuse": (), "propagate": ()}[stage]
    torch.library.opcheck(op, inputs + extra)


@pytest.mark.parametrize("backend", [b for b in CANDIDATES if ops.backends()[b].algorithm == "linear"])
def test_linear_form_fp16_bias_row_stays_in_fp32(backend):
    """The bias term needs sum_j v[:, j]: with |mean(v)| = 100 on the NYUv2 grid (N = 6912) that
    is about 7e5, past fp16's 65504. The output itself is representable (small bias, moderate
    weights), so only an intermediate sum kept in fp16 would turn it into inf."""
    dev = device_for(backend, torch.float16, (1, 1, 8, 72, 96))
    x, v, w, b = problem(1, 1, 8, 72, 96, dtype=torch.float32, device=dev)
    x, v, w, b = x.half(), (v + 100).half(), (w / 9).half(), (b * 1e-3).half()
    # float64 through the linear form (equal to the reference to 1e-10, test_matches_reference):
    # the literal path's N x N grouped conv at N = 6912 takes minutes on a CPU.
    want = linear_attention(*(t.double() for t in (x, v, w, b)))
    assert torch.isfinite(want).all() and want.abs().max() < 6e4  # representable in fp16
    dy = torch.randn_like(x) * 1e-3  # keeps d(bias) = sum dy * sum v representable too
    y, grads = run(call(backend), (x, v, w, b), dy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(y.double(), want, 2e-2, f"{backend} fp16, large mean(v)")
