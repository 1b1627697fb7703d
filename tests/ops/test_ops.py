"""Foundation op tests: every stage and backend against the literal reference."""
from __future__ import annotations

import pytest
import torch

import ctal
from ctal import ops
from ctal.ops import reference
from tests.helpers import fast_cpu_backends, problem, reference64, rel_err, run

CPU_BACKENDS = fast_cpu_backends()


def _grads(fn, x, v, w, b, dy):
    return run(fn, (x, v, w, b), dy)


def _ref64(x, v, w, b, dy):
    return reference64(reference.ctal_attention, (x, v, w, b), dy)


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False])
def test_half_precision_matches_reference(backend, dtype, bias):
    # bf16/fp16 below 2e-2 against float64 on the same rounded values. Fusion weights
    # of the init's scale (1/9) keep M moderate, so rounding is the error being measured.
    if ops.backends()[backend].unsupported(ops.Problem(2, 3, 16, 5, 7, dtype, torch.device("cpu"))):
        assert backend == "cpp"  # says "use linear for 16-bit" (test_extension.py)
        pytest.skip("cpp is float32/float64 only")
    x, v, w, b = problem(2, 3, 16, 5, 7, dtype=torch.float32, bias=bias)
    x, v, w = x.to(dtype), v.to(dtype), (w / 9).to(dtype)
    b = b.to(dtype) if bias else None
    dy = torch.randn_like(x)
    ref_y, ref_g = _ref64(x, v, w, b, dy)
    y, g = _grads(lambda *a: ops.ctal_attention(*a, backend=backend), x, v, w, b, dy)
    assert y.dtype == dtype
    assert rel_err(y, ref_y) < 2e-2
    for name, got, want in zip(("x", "v", "weight", "bias"), g, ref_g):
        assert got.dtype == dtype and rel_err(got, want) < 2e-2, name


STAGE_BACKENDS = ["reference"] + (["triton"] if "triton-staged" in ops.available_backends("cpu")
                                   else [])


@pytest.mark.parametrize("stage_backend", STAGE_BACKENDS)
def test_stages_compose_to_reference(stage_backend):
    """The four stage functions chained (with ``backend=stage_backend``) equal the whole op, and
    so do their gradients; the reference stages themselves are checked by hand below."""
    x, v, w, b = problem(2, 3, 4, 5, 7)
    dy = torch.randn_like(x)

    def staged(x, v, w, b):
        a = ops.affinity(x, backend=stage_backend)
        assert a.shape == (2, 3, 35, 35)
        z = ops.align(a, (5, 7), backend=stage_backend)
        assert z.shape == (2, 35 * 3, 5, 7)
        # Interleaving: channel i*T + t is task t's affinity row of query i on the key grid.
        assert torch.equal(z[1, 4 * 3 + 2], a[1, 2, 4].view(5, 7))
        m = ops.diffuse(z, w, b, backend=stage_backend)
        assert m.shape == (2, 35, 35)
        return ops.propagate(m, v, backend=stage_backend)

    got, got_g = _grads(staged, x, v, w, b, dy)
    want, want_g = _grads(reference.ctal_attention, x, v, w, b, dy)
    assert rel_err(got, want) < 1e-10
    for name, g, wg in zip(("x", "v", "weight", "bias"), got_g, want_g):
        assert rel_err(g, wg) < 1e-10, name


def test_stage_math_by_hand():
    """The stages against loops written straight from the math of docs/design.md section 1 (no conv, no matmul)."""
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
    d = ops.decide(p)
    assert ops.backends()[d.backend].algorithm == "linear" and "GiB" in d.reason


def test_auto_weighs_unfused_quadratic_flops():
    # Cityscapes (T=2, 32x64): the unfused quadratic path has ~1.09x fewer FLOPs than linear but
    # streams N x N buffers; measured slower than the linear form, so auto takes linear there.
    city = ops.Problem(2, 2, 128, 32, 64, torch.float32, torch.device("cpu"))
    ratio = ops.flops("linear", city) / ops.flops("quadratic", city)
    assert 1.0 < ratio < ops.cost.NXN_FLOP_WEIGHT
    d = ops.decide(city)
    assert ops.backends()[d.backend].algorithm == "linear" and "x2" in d.reason
    # Where quadratic is far cheaper (PASCAL-Swin, ~22x), it still wins.
    pascal = ops.Problem(2, 5, 128, 16, 16, torch.float32, torch.device("cpu"))
    assert ops.flops("linear", pascal) / ops.flops("quadratic", pascal) > 10
    assert ops.backends()[ops.decide(pascal).backend].algorithm == "quadratic"


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


NON_FINITE = [
    (dict(x=torch.full((1, 2, 3, 4, 5), float("nan"))), "x contains NaN or Inf"),
    (dict(v=torch.full((1, 2, 3, 4, 5), float("inf"))), "v contains NaN or Inf"),
    (dict(weight=torch.full((20, 2, 3, 3), float("nan"))), "weight contains NaN or Inf"),
    (dict(bias=torch.full((20,), float("-inf"))), "bias contains NaN or Inf"),
]


@pytest.mark.parametrize("over, match", NON_FINITE)
@pytest.mark.parametrize("backend", ["auto", "reference", "quadratic", "linear"])
def test_non_finite_inputs_raise_when_the_check_is_on(over, match, backend):
    with ops.check_finite(True):
        with pytest.raises(ValueError, match=match):
            ops.ctal_attention(**_bad(**over), backend=backend)


@pytest.mark.parametrize("over, match", NON_FINITE)
@pytest.mark.parametrize("backend", ["auto"] + ["reference"] + CPU_BACKENDS)
def test_non_finite_inputs_pass_through_by_default(over, match, backend, monkeypatch):
    """The value check is off by default: no error, the NaN/Inf reaches the output."""
    monkeypatch.delenv("CTAL_CHECK_FINITE", raising=False)
    assert not ops.checking_finite()
    y = ops.ctal_attention(**_bad(**over), backend=backend)
    assert not torch.isfinite(y).all()


def test_default_call_reads_no_values(monkeypatch):
    """With the check off, validation looks at shapes, dtypes and devices only: nothing calls
    torch.isfinite (on CUDA that is a device-to-host sync per tensor per call)."""
    monkeypatch.delenv("CTAL_CHECK_FINITE", raising=False)
    args = _bad()
    want = reference.ctal_attention(**args)

    def no_value_reads(*a, **k):
        raise AssertionError("ctal.ops read input values (torch.isfinite) with the check off")

    monkeypatch.setattr(torch, "isfinite", no_value_reads)
    for backend in ["auto", "reference"] + CPU_BACKENDS:
        assert torch.allclose(ops.ctal_attention(**args, backend=backend), want, atol=1e-5)
    a = ops.affinity(args["x"])
    ops.propagate(ops.diffuse(ops.align(a, (4, 5)), args["weight"], args["bias"]), args["v"])


def test_check_finite_switch(monkeypatch):
    """One switch: CTAL_CHECK_FINITE=1 (read at call time) or ops.check_finite, as a call or as a
    context manager restoring the previous setting; an explicit setting wins over the variable."""
    nan_x = _bad(x=torch.full((1, 2, 3, 4, 5), float("nan")))
    monkeypatch.delenv("CTAL_CHECK_FINITE", raising=False)
    ops.ctal_attention(**nan_x)  # off by default
    monkeypatch.setenv("CTAL_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ops.ctal_attention(**nan_x)
    with ops.check_finite(False):  # explicit off beats the variable
        assert not ops.checking_finite()
        ops.ctal_attention(**nan_x)
    assert ops.checking_finite()  # restored: the variable decides again
    monkeypatch.setenv("CTAL_CHECK_FINITE", "0")
    with ops.check_finite(True):
        with ops.check_finite(False):
            ops.ctal_attention(**nan_x)
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            ops.ctal_attention(**nan_x)
    assert not ops.checking_finite()
    try:
        ops.check_finite(True)  # a plain call sets it until changed again
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            ops.ctal_attention(**nan_x)
    finally:
        ops.check_finite(None)
    assert not ops.checking_finite()
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        ops.check_finite("yes")


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.ctal_attention(**_bad(), backend="fast")


def test_stage_bad_inputs():
    x, v, w, b = problem(1, 2, 3, 4, 5)
    a = ops.affinity(x)
    with pytest.raises(ValueError, match="size 5x5 does not match N = 20"):
        ops.align(a, (5, 5))
    with pytest.raises(ValueError, match=r"size must be an \(H, W\) pair"):
        ops.align(a, 20)
    z = ops.align(a, (4, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.diffuse(z, w[:, :1], b)
    with pytest.raises(ValueError, match=r"m must have shape \(B, N, N\)"):
        ops.propagate(a[:, 0, :5], v)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.affinity(x, backend="nope")


def test_stage_inputs_are_checked_like_the_op():
    x, v, w, b = problem(1, 2, 3, 4, 5)
    a = ops.affinity(x)
    z = ops.align(a, (4, 5))
    m = ops.diffuse(z, w, b)
    nan = lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("nan"))  # noqa: E731
    for call, match in [
        (lambda: ops.align(a.long(), (4, 5)), "a must be a floating tensor"),
        (lambda: ops.align(nan(a), (4, 5)), "a contains NaN"),
        (lambda: ops.align(a[:0], (4, 5)), "a must be non-empty"),
        (lambda: ops.diffuse(z.long(), w, b), "z must be a floating tensor"),
        (lambda: ops.diffuse(z.float(), w, b), "weight has dtype torch.float64 but z has torch.float32"),
        (lambda: ops.diffuse(nan(z), w, b), "z contains NaN"),
        (lambda: ops.diffuse(z[:0], w, b), "z must be non-empty"),
        (lambda: ops.diffuse(z, w, nan(b)), "bias contains NaN"),
        (lambda: ops.diffuse(z, w, b.float()), "bias has dtype"),
        (lambda: ops.propagate(nan(m), v), "m contains NaN"),
        (lambda: ops.propagate(m.float(), v), "m has dtype torch.float32 but v has torch.float64"),
        (lambda: ops.propagate(m[:0], v[:0]), "v must be non-empty"),
    ]:
        with ops.check_finite(True), pytest.raises((ValueError, TypeError), match=match):
            call()


def test_explain_checks_the_inputs_it_is_given():
    x, v, w, b = problem(1, 2, 3, 4, 5)
    assert ops.explain(x, v, w, b).backend == ops.explain(x).backend
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.explain(x, v, w[:, :1], b)
    with pytest.raises(ValueError, match="give v and weight together"):
        ops.explain(x, v)


def test_meta_tensors_run_shape_only():
    """Meta tensors carry no values: the finiteness check is skipped even when it is on, shapes
    still propagate."""
    x, v, w, b = (t.to("meta") for t in problem(1, 2, 3, 4, 5, dtype=torch.float32))
    with ops.check_finite(True):
        for name in ("reference", "quadratic", "linear"):
            assert ops.ctal_attention(x, v, w, b, backend=name).shape == x.shape


def test_available_backends_on_a_missing_device_is_a_list():
    names = ops.available_backends("cuda")  # no crash when this machine has no GPU
    if not torch.cuda.is_available():
        assert names == []


def test_compile_fullgraph_auto_across_sizes():
    """A second batch size makes torch.compile trace dynamic shapes; auto's choice must still
    trace (its comparisons become guards) and give the reference's answer."""
    def f(x, v, w, b):
        return ops.ctal_attention(x, v, w, b)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for B in (4, 3, 2):
        x, v, w, b = problem(B, 2, 3, 4, 5, dtype=torch.float32)
        assert rel_err(compiled(x, v, w, b), reference.ctal_attention(x, v, w, b)) < 1e-5


def test_compile_reference_backward_across_grid_sizes():
    """The literal reference under torch.compile (Inductor, fullgraph) with gradients, on one
    grid and then another: the second size traces dynamic H and W. Inductor lays out the CPU
    grouped conv's input channels-last and could not order the symbolic strides of that input
    when it was a view saved for backward."""
    def f(x, v, w, b):
        return ops.ctal_attention(x, v, w, b, backend="reference")

    compiled = torch.compile(f, fullgraph=True)
    for H, W in [(3, 4), (4, 5)]:
        x, v, w, b = problem(1, 2, 3, H, W, dtype=torch.float32)
        dy = torch.randn_like(x)
        got, got_g = _grads(compiled, x, v, w, b, dy)
        want, want_g = _grads(f, x, v, w, b, dy)
        assert rel_err(got, want) < 1e-5
        for name, g, wg in zip(("x", "v", "weight", "bias"), got_g, want_g):
            assert rel_err(g, wg) < 1e-5, (H, W, name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "linear", "quadratic"])
def test_default_call_has_no_host_sync_and_graph_captures_gpu(backend):
    """With the value check off (the default) a call on CUDA makes no device-to-host sync, so it
    can be captured in a CUDA graph."""
    x, v, w, b = problem(2, 3, 8, 5, 7, dtype=torch.float32, device="cuda")
    want = reference.ctal_attention(x.double(), v.double(), w.double(), b.double())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as CUDA graphs require
        for _ in range(2):
            ops.ctal_attention(x, v, w, b, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.ctal_attention(x, v, w, b, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.ctal_attention(x, v, w, b, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, want) < 1e-4
