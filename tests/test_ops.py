"""Foundation op tests: every stage and backend against the literal reference."""
from __future__ import annotations

import pytest
import torch

import ctal
from ctal import ops
from ctal.ops import reference
from helpers import ODD_SHAPES, fast_cpu_backends, problem, rel_err

CPU_BACKENDS = fast_cpu_backends()


def _grads(fn, x, v, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, v, w) + ((b,) if b is not None else ())]
    y = fn(*leaves[:3], leaves[3] if b is not None else None)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_backend_matches_reference_fp64(backend, shape, bias):
    x, v, w, b = problem(*shape, bias=bias)
    dy = torch.randn_like(x)
    ref_y, ref_g = _grads(reference.ctal_attention, x, v, w, b, dy)
    y, g = _grads(lambda *a: ops.ctal_attention(*a, backend=backend), x, v, w, b, dy)
    assert rel_err(y, ref_y) < 1e-10
    for name, got, want in zip(("x", "v", "weight", "bias"), g, ref_g):
        assert rel_err(got, want) < 1e-10, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_reference_fp32(backend):
    x, v, w, b = problem(2, 3, 8, 5, 7, dtype=torch.float32)
    dy = torch.randn_like(x)
    ref_y, ref_g = _grads(reference.ctal_attention, x.double(), v.double(), w.double(), b.double(), dy.double())
    y, g = _grads(lambda *a: ops.ctal_attention(*a, backend=backend), x, v, w, b, dy)
    assert y.dtype == torch.float32
    assert rel_err(y, ref_y) < 1e-5
    for got, want in zip(g, ref_g):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_feature_pixel_uses_eps_branch(backend):
    # A pixel whose features are exactly zero exercises normalize's clamp (no NaN, same grads).
    x, v, w, b = problem(1, 2, 4, 3, 5)
    x[0, 1, :, 1, 2] = 0
    dy = torch.randn_like(x)
    ref_y, ref_g = _grads(reference.ctal_attention, x, v, w, b, dy)
    y, g = _grads(lambda *a: ops.ctal_attention(*a, backend=backend), x, v, w, b, dy)
    assert rel_err(y, ref_y) < 1e-10
    for got, want in zip(g, ref_g):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    x, v, w, b = problem(2, 3, 4, 7, 5)
    # Same values, permuted storage: transposed grids and a strided batch.
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    vt = torch.stack([v, v], 1).flatten(0, 1)[::2]
    wt = w.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not (xt.is_contiguous() or vt.is_contiguous() or wt.is_contiguous())
    want = reference.ctal_attention(x, v, w, b)
    assert rel_err(ops.ctal_attention(xt, vt, wt, b, backend=backend), want) < 1e-10


def test_stages_compose_to_reference():
    x, v, w, b = problem(2, 3, 4, 5, 7)
    a = ops.affinity(x)
    assert a.shape == (2, 3, 35, 35)
    z = ops.align(a, (5, 7))
    assert z.shape == (2, 35 * 3, 5, 7)
    # Interleaving: channel i*T + t is task t's affinity row of query i on the key grid.
    assert torch.equal(z[1, 4 * 3 + 2], a[1, 2, 4].view(5, 7))
    m = ops.diffuse(z, w, b)
    assert m.shape == (2, 35, 35)
    y = ops.propagate(m, v)
    assert torch.allclose(y, reference.ctal_attention(x, v, w, b), rtol=0, atol=1e-12)


def test_stage_math_by_hand():
    """The stages against loops written straight from DESIGN.md 1 (no conv, no matmul)."""
    B, T, C, H, W = 1, 2, 3, 3, 4
    x, v, w, b = problem(B, T, C, H, W)
    N = H * W
    n = x / x.norm(dim=2, keepdim=True)
    m = torch.zeros(N, N, dtype=x.dtype)
    for i in range(N):
        for j in range(N):
            jy, jx = divmod(j, W)
            acc = b[i].clone()
            for t in range(T):
                for dy in range(3):
                    for dx in range(3):
                        ky, kx = jy + dy - 1, jx + dx - 1
                        if 0 <= ky < H and 0 <= kx < W:
                            ni = n[0, t, :, i // W, i % W]
                            acc += w[i, t, dy, dx] * (ni @ n[0, t, :, ky, kx])
            m[i, j] = acc
    got_m = ops.diffuse(ops.align(ops.affinity(x), (H, W)), w, b)[0]
    assert torch.allclose(got_m, m, atol=1e-12)
    y = torch.einsum("ij,tcj->tci", m, v[0].flatten(2)).reshape(T, C, H, W)
    for backend in ["reference"] + CPU_BACKENDS:
        assert torch.allclose(ops.ctal_attention(x, v, w, b, backend=backend)[0], y, atol=1e-12), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    x, v, w, b = problem(1, 2, 3, 3, 4)
    inputs = tuple(t.requires_grad_() for t in (x, v, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.ctal_attention(*a, backend=backend), inputs)


@pytest.mark.parametrize("op", ["linear", "quadratic"])
def test_opcheck_custom_ops(op):
    x, v, w, b = problem(1, 2, 3, 3, 4)
    for args in [(x, v, w, b), (x, v, w, None)]:
        args = tuple(t.requires_grad_() if t is not None else None for t in args)
        torch.library.opcheck(getattr(torch.ops.ctal, f"{op}_fwd").default, args)


def test_compile_fullgraph():
    x, v, w, b = problem(1, 2, 3, 4, 5, dtype=torch.float32)
    x.requires_grad_()

    def f(x, v, w, b):
        return ops.ctal_attention(x, v, w, b, backend="linear").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, v, w, b)
    (gx,) = torch.autograd.grad(got, x)
    want = f(x, v, w, b)
    (wx,) = torch.autograd.grad(want, x)
    assert rel_err(got, want) < 1e-5 and rel_err(gx, wx) < 1e-5


def test_compile_fullgraph_module():
    mod = ctal.CrossTaskAffinity(["a", "b"], 4, (3, 5), backend="linear")
    x = torch.randn(2, 2, 4, 3, 5)
    got = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(got, mod(x)) < 1e-6


# --- auto / explain ----------------------------------------------------------------------------

def test_auto_picks_by_cost_and_explains():
    small = ops.explain(torch.zeros(1, 5, 128, 16, 16))  # PASCAL-Swin: quadratic is cheaper
    assert ops.backends()[small.backend].algorithm == "quadratic"
    large = ops.explain(torch.zeros(1, 3, 128, 72, 96))  # NYUv2: linear is cheaper
    assert ops.backends()[large.backend].algorithm == "linear"
    assert "FLOP" in large.reason and "linear" in str(large)
    assert {c["name"] for c in large.candidates} >= {"reference", "linear"}
    assert ops.explain(torch.zeros(1, 3, 128, 72, 96), backend="reference").backend == "reference"
    # The literal path is the ground truth, never an automatic choice while another backend runs.
    assert all(ops.explain(torch.zeros(1, 2, c, h, h)).backend != "reference" for c in (1, 64) for h in (2, 40))


def test_auto_avoids_huge_literal_matrices():
    # Quadratic has fewer FLOPs at this N (< 9TC) but B x N x N buffers would take ~3.4 GiB.
    p = ops.Problem(32, 3, 128, 48, 64, torch.float32, torch.device("cpu"))
    assert ops.flops("quadratic", p) < ops.flops("linear", p)
    d = ops.dispatch.decide(p)
    assert ops.backends()[d.backend].algorithm == "linear" and "GiB" in d.reason


def test_auto_weighs_unfused_quadratic_flops():
    # Cityscapes (T=2, 32x64): the unfused quadratic path has ~1.09x fewer FLOPs than linear but
    # streams N x N buffers; measured slower than the linear form, so auto takes linear there.
    city = ops.Problem(2, 2, 128, 32, 64, torch.float32, torch.device("cpu"))
    ratio = ops.flops("linear", city) / ops.flops("quadratic", city)
    assert 1.0 < ratio < ops.dispatch.NXN_FLOP_WEIGHT
    d = ops.dispatch.decide(city)
    assert ops.backends()[d.backend].algorithm == "linear" and "x2" in d.reason
    # Where quadratic is far cheaper (PASCAL-Swin, ~22x), it still wins.
    pascal = ops.Problem(2, 5, 128, 16, 16, torch.float32, torch.device("cpu"))
    assert ops.flops("linear", pascal) / ops.flops("quadratic", pascal) > 10
    assert ops.backends()[ops.dispatch.decide(pascal).backend].algorithm == "quadratic"


def test_flops_formulas():
    p = ops.Problem(2, 3, 4, 5, 6, torch.float32, torch.device("cpu"))
    N = 30
    assert ops.flops("quadratic", p) == 2 * 2 * (3 * N * N * 4 * 2 + 27 * N * N)
    assert ops.flops("linear", p) == 2 * 2 * 2 * 108 * 12 * N
    with pytest.raises(ValueError, match="algorithm"):
        ops.flops("cubic", p)


def test_auto_result_equals_reference():
    x, v, w, b = problem(2, 3, 4, 5, 7)
    assert rel_err(ops.ctal_attention(x, v, w, b), reference.ctal_attention(x, v, w, b)) < 1e-10


# --- bad input ----------------------------------------------------------------------------------

def _bad(**over):
    x, v, w, b = problem(1, 2, 3, 4, 5, dtype=torch.float32)
    args = dict(x=x, v=v, weight=w, bias=b)
    args.update(over)
    return args


@pytest.mark.parametrize("over, err, match", [
    (dict(x=torch.randn(2, 3, 4, 5)), ValueError, "x must have rank 5"),
    (dict(v=torch.randn(1, 2, 4, 4, 5)), ValueError, "v must have the same"),
    (dict(v=torch.randn(1, 3, 3, 4, 5)), ValueError, "v must have the same"),
    (dict(weight=torch.randn(21, 2, 3, 3)), ValueError, r"weight must have shape \(H\*W, T, 3, 3\)"),
    (dict(weight=torch.randn(20, 3, 3, 3)), ValueError, "weight must have shape"),
    (dict(weight=torch.randn(20, 2, 3)), ValueError, "weight must have rank 4"),
    (dict(bias=torch.randn(21)), ValueError, r"bias must have shape \(H\*W,\)"),
    (dict(v=torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)), TypeError, "v has dtype"),
    (dict(weight=torch.randn(20, 2, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(x=torch.randint(0, 3, (1, 2, 3, 4, 5))), TypeError, "x must be a floating"),
    (dict(x=torch.randn(0, 2, 3, 4, 5), v=torch.randn(0, 2, 3, 4, 5)), ValueError, "non-empty"),
    (dict(x=torch.full((1, 2, 3, 4, 5), float("nan"))), ValueError, "x contains NaN"),
    (dict(v=torch.full((1, 2, 3, 4, 5), float("inf"))), ValueError, "v contains NaN or Inf"),
    (dict(weight=torch.full((20, 2, 3, 3), float("nan"))), ValueError, "weight contains NaN"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "reference", "quadratic", "linear"])
def test_bad_input_errors(over, err, match, backend):
    with pytest.raises(err, match=match):
        ops.ctal_attention(**_bad(**over), backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.ctal_attention(**_bad(), backend="fast")


def test_stage_bad_inputs():
    x, v, w, b = problem(1, 2, 3, 4, 5)
    a = ops.affinity(x)
    with pytest.raises(ValueError, match="size 5x5 does not match N = 20"):
        ops.align(a, (5, 5))
    with pytest.raises(ValueError, match="size must be a pair"):
        ops.align(a, 20)
    z = ops.align(a, (4, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.diffuse(z, w[:, :1], b)
    with pytest.raises(ValueError, match=r"m must have shape \(B, N, N\)"):
        ops.propagate(a[:, 0, :5], v)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.affinity(x, backend="nope")
