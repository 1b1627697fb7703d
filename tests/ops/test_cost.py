"""The cost model behind ``auto`` (ctal/ops/cost.py): the FLOPs the kernel backends really perform,
forward and forward + backward, and what ``decide`` does with them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import ctal.ops as ops
from ctal.kernels import fused_plan, linear_plan
from ctal.ops import cost, registry

CUDA = torch.device("cuda")
NYUV2, CITYSCAPES, PASCAL = (8, 3, 128, 72, 96), (8, 2, 128, 32, 64), (8, 5, 128, 16, 16)


def _problem(shape, dtype=torch.float32, device=CUDA):
    return ops.Problem(*shape, dtype, device)


def test_cuda_linear_counts_the_padded_key_axis():
    # W a whole number of 16-byte vectors: no padding, the algorithm's minimum plus the bias terms
    # (R N multiply-adds forward, 2 R N backward).
    for shape in (NYUV2, CITYSCAPES, PASCAL):
        p = _problem(shape)
        B, R, N = p.B, p.T * p.C, p.N
        assert cost.cuda_linear_flops(p) == ops.flops("linear", p) + 2 * B * R * N
        assert cost.cuda_linear_flops(p, backward=True) == ops.flops("linear", p, True) + 2 * B * 3 * R * N
    # W = 11: rows padded to 12 (fp32, 4 per 16 bytes) and 16 (bf16, 8 per 16 bytes) on the key side.
    odd = _problem((2, 3, 16, 9, 11))
    R, N = 48, 99
    for dtype, Wp in ((torch.float32, 12), (torch.bfloat16, 16)):
        p = dataclasses.replace(odd, dtype=dtype)
        extra = 2 * p.B * 9 * R * R * (9 * Wp - N)
        assert cost.cuda_linear_flops(p) == ops.flops("linear", p) + 2 * p.B * R * N + extra
        assert cost.cuda_linear_flops(p, backward=True) - ops.flops("linear", p, True) == \
            2 * p.B * 3 * R * N + 2 * extra


def test_cuda_fused_counts_padded_tiles_and_the_recomputing_backward():
    # C a multiple of 16 and N of 32: the forward is exactly the quadratic minimum; the one-pass
    # backward recomputes S and M (5 tile GEMMs and 3 stencils per task and key chunk), so forward
    # + backward is 7 GEMMs and 4 stencils per (query, key) pair, not the minimum's 6 and 3.
    p = _problem(PASCAL)
    B, T, C, N = p.B, p.T, p.C, p.N
    assert cost.cuda_fused_flops(p) == ops.flops("quadratic", p)
    assert cost.cuda_fused_flops(p, backward=True) == 2 * B * T * N * N * (7 * C + 4 * 9)
    assert cost.cuda_fused_flops(p, backward=True) > ops.flops("quadratic", p, True)
    # Odd sizes: channels padded to 16, keys to 32 and query rows to 16 per block.
    q = _problem((1, 2, 20, 5, 7))
    Cp, Nk, rows = 32, 64, 48
    gemm, stencil = Nk * Cp, 9 * Nk
    assert cost.cuda_fused_flops(q) == 2 * rows * 2 * (2 * gemm + stencil)
    assert cost.cuda_fused_flops(q, backward=True) == 2 * rows * 2 * (7 * gemm + 4 * stencil)
    assert cost.cuda_fused_flops(q) > ops.flops("quadratic", q)


def test_registered_costs_are_the_launch_counts():
    table = ops.backends()
    p = _problem(NYUV2)
    for name, fn in [("triton-linear", linear_plan.flops), ("triton-fused", fused_plan.flops),
                     ("cuda-linear", cost.cuda_linear_flops), ("cuda-fused", cost.cuda_fused_flops)]:
        for backward in (False, True):
            assert ops.backend_flops(table[name], p, backward) == fn(p, backward=backward), name
    # Backends without their own count: the algorithm's minimum, forward or forward + backward.
    assert ops.backend_flops(table["linear"], p, True) == ops.flops("linear", p, True)


def _only(monkeypatch, backends: dict):
    """Make ``auto`` choose among ``backends`` alone ({name: Backend}), all verified on a GPU."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(backends))
    monkeypatch.setattr(registry, "UNVERIFIED_ON_GPU", set())


def _runnable(name):
    return dataclasses.replace(ops.backends()[name], unsupported=lambda p: None)


def _fake(name, algorithm, implementation, fwd, fwdbwd):
    return ops.Backend(name, algorithm, implementation, lambda *a: None,
                       cost=lambda p, backward=False: fwdbwd if backward else fwd)


def test_decide_compares_forward_plus_backward_when_asked(monkeypatch):
    # A: cheaper forward, far more expensive backward (like a kernel that recomputes a lot).
    _only(monkeypatch, {"a": _fake("a", "quadratic", "triton", 10e9, 50e9),
                        "b": _fake("b", "linear", "triton", 12e9, 36e9)})
    p = _problem(PASCAL)
    inference, training = ops.decide(p), ops.decide(p, backward=True)
    assert inference.backend == "a" and training.backend == "b"
    assert "forward + backward" in training.reason and "forward + backward" not in inference.reason
    assert [c["gflops"] for c in training.candidates] == [50.0, 36.0]
    text = str(training)
    assert "GFLOP fwd+bwd" in text and "36.000" in text and "GFLOP fwd+bwd" not in str(inference)


def test_decide_ties_within_padding_go_to_the_better_implementation(monkeypatch):
    p = _problem(PASCAL)

    def pair(cuda_gflop):
        _only(monkeypatch, {"t": _fake("t", "linear", "triton", 100e9, 300e9),
                            "c": _fake("c", "linear", "cuda", cuda_gflop * 1e9, 300e9)})
        return ops.decide(p)

    d = pair(99)
    assert d.backend == "c" and "ranks higher" not in d.reason  # the fewest FLOPs, and the best rank
    d = pair(100 * cost.TIE_RATIO - 1)
    assert d.backend == "c" and "ranks higher" in d.reason  # a few percent more: still a tie
    assert pair(100 * cost.TIE_RATIO + 1).backend == "t"  # beyond the tie ratio the count decides
    # A tie never crosses algorithms: the other algorithm's implementation rank does not count.
    _only(monkeypatch, {"t": _fake("t", "linear", "triton", 100e9, 300e9),
                        "c": _fake("c", "quadratic", "cuda", 101e9, 303e9)})
    assert ops.decide(p).backend == "t"


@pytest.mark.parametrize("shape", [NYUV2, CITYSCAPES, PASCAL], ids=["nyuv2", "cityscapes", "pascal"])
@pytest.mark.parametrize("backward", [False, True])
def test_auto_ranks_triton_fused_and_linear_by_what_their_launches_do(monkeypatch, shape, backward):
    """Where the fused kernels' launches (re-formed M and dM tiles, halos, recomputation in the
    backward) cost more than the linear form, auto must not pick them, whatever the quadratic
    minimum says; where they cost less, it picks them."""
    p = _problem(shape)
    table = ops.backends()
    fused_cost = ops.backend_flops(table["triton-fused"], p, backward)
    linear_cost = ops.backend_flops(table["triton-linear"], p, backward)
    _only(monkeypatch, {n: _runnable(n) for n in ("triton-fused", "triton-linear")})
    want = "triton-fused" if fused_cost < linear_cost else "triton-linear"
    assert ops.decide(p, backward=backward).backend == want
    if shape == NYUV2:  # N = 6912 >> 9 T C: the linear form, by any count
        assert want == "triton-linear"


def test_auto_with_every_gpu_kernel_available(monkeypatch):
    names = ("triton-fused", "triton-linear", "cuda-linear", "cuda-fused", "linear", "quadratic")
    _only(monkeypatch, {n: _runnable(n) for n in names})
    # NYUv2: linear; cuda-linear and triton-linear do the same GEMMs (no padding at W = 96): CUDA.
    assert ops.decide(_problem(NYUV2), backward=True).backend == "cuda-linear"
    # PASCAL: cuda-fused does the quadratic minimum forward and little more with its backward.
    for backward in (False, True):
        assert ops.decide(_problem(PASCAL), backward=backward).backend == "cuda-fused"
    # Cityscapes (T = 2): quadratic is cheaper forward; for training, cuda-fused's recomputing
    # backward decides which form is cheaper.
    city = _problem(CITYSCAPES)
    assert ops.decide(city).backend == "cuda-fused"
    fused, linear = cost.cuda_fused_flops(city, True), cost.cuda_linear_flops(city, True)
    assert ops.decide(city, backward=True).backend == ("cuda-fused" if fused < linear else "cuda-linear")


def test_ctal_attention_compares_backward_flops_only_when_it_will_be_differentiated(monkeypatch):
    """``ctal_attention`` and ``explain`` ask the cost model for forward + backward FLOPs exactly
    when an input requires grad and grad mode is on."""
    seen = []
    real = ops.decide

    def spy(p, backend="auto", **kwargs):
        seen.append(kwargs.get("backward"))
        return real(p, backend, **kwargs)

    monkeypatch.setattr(ops, "decide", spy)
    x, v = torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5)
    w = torch.randn(20, 2, 3, 3)
    ops.ctal_attention(x, v, w)
    ops.ctal_attention(x, v, w.requires_grad_())
    with torch.no_grad():
        ops.ctal_attention(x, v, w)
    assert ops.explain(x, v, w).backward is True
    assert seen == [False, True, False, True]


def test_deterministic_mode_keeps_atomic_backwards_out_of_differentiated_calls(monkeypatch):
    """The fused kernels' backward accumulates with atomic adds: under
    ``torch.use_deterministic_algorithms`` a differentiated call gets another backend, an
    inference call may still take them."""
    names = ("triton-fused", "cuda-fused", "linear", "quadratic")
    _only(monkeypatch, {n: _runnable(n) for n in names})
    p = _problem(PASCAL)
    assert ops.decide(p, backward=True).backend == "cuda-fused"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    chosen = ops.decide(p, backward=True).backend
    assert ops.backends()[chosen].deterministic_backward, chosen
    assert ops.decide(p, backward=False).backend == "cuda-fused"
