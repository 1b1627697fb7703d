"""What is specific to ``triton-fused`` (kernels/fused.py): the row-halo Gram rings on grids where
the halo is wide against the key tiles, the launch plan and its FLOP count, and the
deterministic-algorithms refusal of its atomic backward. Forward and gradients on the odd shapes
of the correctness policy are tests/ops/test_conformance.py.

On CPU the kernels run in the interpreter with NaN-filled outputs and scratch buffers, so a
stencil tap that reads a Gram ring slot no chunk wrote fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from ctal import ops
from ctal.ops import reference
from tests.helpers import assert_close, problem, reference64, run, triton_device

DEV = triton_device()
CUDA = DEV == "cuda"

import triton  # noqa: E402

from ctal.kernels import _common, fused, fused_plan  # noqa: E402
from ctal.kernels._common import cdiv, tl  # noqa: E402



def _tiles(C, H, W):
    return fused._tiles(torch.empty(1, 1, C, H, W, device="meta"))


# (B, T, C, H, W) against the interpreter tiles (BLOCK_N = 32 keys per step, BLOCK_N_VALUE = 32,
# BLOCK_H = LEAD granularity = 16); the comments give what each grid exercises there.
GRIDS = {
    # W = 2: the halo (3 keys) is far inside one chunk; 18 keys, one key tile
    "narrow-w2": (1, 2, 5, 9, 2),
    # W = 13, N = 91: three key tiles, every halo crosses rows, the Gram ring (64 columns) wraps
    "rows-cross-ring-wraps": (2, 2, 3, 7, 13),
    # W = 40 > BLOCK_N: the halo is wider than a key tile; N = 200 > RING = 128, so it wraps
    "halo-wider-than-tile": (1, 1, 3, 5, 40),
}


def test_grids_cover_what_they_claim():
    """The claims of GRIDS hold for the tiles the interpreter launches (else the names lie)."""
    if CUDA or _common.GPU_TILES:
        pytest.skip("the claims are about the interpreter's tiles")
    for name, (B, T, C, H, W) in GRIDS.items():
        t, N = _tiles(C, H, W), H * W
        assert (t["BLOCK_N"], t["BLOCK_N_VALUE"], t["BLOCK_H"]) == (32, 32, 16)
        if name == "narrow-w2":
            assert N <= t["BLOCK_N"] and W + 1 < t["BLOCK_H"]
        else:
            assert cdiv(N, t["BLOCK_N"]) >= 3 and t["RING"] < N  # several tiles; the ring wraps
        if name == "halo-wider-than-tile":
            assert W + 1 > t["BLOCK_N"]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_row_halo_matches_reference(grid, bias):
    shape = GRIDS[grid]
    dtype = torch.float64
    x, v, w, b = problem(*shape, dtype=dtype, bias=bias, device=DEV)
    dy = torch.randn_like(x)
    y, g = run(lambda *a: ops.ctal_attention(*a, backend="triton-fused"), (x, v, w, b), dy)
    ry, rg = reference64(reference.ctal_attention, (x, v, w, b), dy)
    assert_close(y, ry, 1e-10, f"{grid} y")
    for name, got, want in zip(["dx", "dv", "dweight", "dbias"], g, rg):
        assert_close(got, want, 1e-10, f"{grid} {name}")


@pytest.mark.parametrize("W", [1, 2, 7, 15, 16, 17, 31, 33, 64, 96, 200])
@pytest.mark.parametrize("dots", ["tensor", "fp32", "fp64"])
def test_tile_invariants(W, dots):
    """What the kernels' ring logic relies on: LEAD covers the stencil reach and is whole chunks,
    the key tiles are whole chunks, the forward / query-backward ring holds the key tile, its lead
    and the W + 1 keys behind it (or the whole grid), and the value-backward scratch holds its
    tile with LEAD keys on both sides."""
    for H in (1, 3, 50):
        t = fused_plan.fused_tiles(128, H, W, dots)
        N = H * W
        bh = t["BLOCK_H"]
        assert t["LEAD"] >= W + 1 and t["LEAD"] % bh == 0
        assert t["BLOCK_N"] % bh == 0 and t["BLOCK_N_VALUE"] % bh == 0
        assert t["RING"] >= min(N, t["BLOCK_N"] + t["LEAD"] + W + 1)
        assert t["RING"] & (t["RING"] - 1) == 0 and t["VALUE_RING"] & (t["VALUE_RING"] - 1) == 0
        assert t["VALUE_RING"] >= t["BLOCK_N_VALUE"] + 2 * t["LEAD"]
    with pytest.raises(ValueError, match="dots"):
        fused_plan.fused_tiles(128, 4, 4, "tf32")


# --- the FLOP count against the launches --------------------------------------------------

def _launched_macs(name, grid, args, kw, T, C, N):
    """Multiply-adds over real elements that a launch performs, from its grid and constexprs,
    walking the kernels' loops (docs of kernels/fused.py): Gram chunks, stencil taps, dots."""
    R = T * C
    bm, bn, lead = kw["BLOCK_M"], kw["BLOCK_N"], kw["LEAD"]
    macs = 0
    if name in ("fused_fwd_kernel", "fused_query_bwd_kernel"):
        assert grid == (cdiv(N, bm), args[0].shape[0])
        for pid_m in range(grid[0]):
            rows = min(bm, N - pid_m * bm)
            for j0 in range(0, N, bn):
                lo = j0 + lead if j0 > 0 else 0
                hi = min(j0 + bn + lead, N)
                new = max(hi - lo, 0)  # keys entering the rings
                keys = min(bn, N - j0)
                if name == "fused_fwd_kernel":  # Gram, stencil, M . V
                    macs += rows * (new * T * C + keys * 9 * T + keys * R)
                else:  # dM, Gram, dw and dS stencils, dn of queries and keys
                    macs += rows * (new * R + new * T * C + keys * 18 * T + keys * 2 * T * C)
    elif name == "fused_value_bwd_kernel":
        assert grid == (cdiv(N, bn), args[0].shape[0])
        for pid_n in range(grid[0]):
            j0 = pid_n * bn
            halo = min(j0 + bn + lead, N) - max(j0 - lead, 0)
            keys = min(bn, N - j0)
            macs += N * (halo * T * C + keys * 9 * T + keys * R)  # Gram, stencil, dV
    else:
        raise AssertionError(f"unexpected launch {name}")
    return macs * grid[1]


@pytest.mark.parametrize("shape", [(2, 3, 40, 5, 7), (1, 2, 8, 9, 11), (2, 5, 128, 16, 16),
                                   (1, 2, 16, 3, 70), (1, 3, 128, 36, 48)],
                         ids=lambda s: "x".join(map(str, s)))
def test_flops_equal_what_every_launch_performs(monkeypatch, shape):
    """``fused_plan.flops`` (``auto``'s cost of triton-fused) equals the multiply-adds of the
    launches the forward and the backward really make, with their tiles (``fused_tiles``)."""
    B, T, C, H, W = shape
    N = H * W
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, grid, args, kw))

    for name in ("fused_fwd_kernel", "fused_query_bwd_kernel", "fused_value_bwd_kernel"):
        monkeypatch.setattr(fused, name, Recorder(name))
    # meta tensors: nothing is computed, only the launches are recorded
    monkeypatch.setattr(fused, "check_device", lambda t, what: None)
    monkeypatch.setattr(fused, "l2norm", lambda x: x.new_empty(B, T, N, dtype=torch.float32))
    monkeypatch.setattr(fused, "l2norm_backward", lambda dn, x, nrm: torch.empty_like(x))
    x, v = torch.empty(B, T, C, H, W, device="meta"), torch.empty(B, T, C, H, W, device="meta")
    w, b = torch.empty(N, T, 3, 3, device="meta"), torch.empty(N, device="meta")
    y, nrm = fused.forward(x, v, w, b)
    fwd = list(launches)
    fused.backward(torch.empty_like(x), x, v, w, b, nrm)
    assert [n for n, *_ in launches] == ["fused_fwd_kernel", "fused_query_bwd_kernel",
                                         "fused_value_bwd_kernel"]
    tiles = fused._tiles(x)
    for name, grid, args, kw in launches:
        for key in ("BLOCK_H", "BLOCK_R", "LEAD"):
            assert kw[key] == tiles[key], (name, key)
        query = name == "fused_query_bwd_kernel"
        assert kw["BLOCK_M"] == tiles["BLOCK_M_QUERY" if query else "BLOCK_M"], name
        value = name == "fused_value_bwd_kernel"
        assert kw["BLOCK_N"] == tiles["BLOCK_N_VALUE" if value else "BLOCK_N"], name
        assert kw["RING"] == tiles["VALUE_RING" if value else "RING"], name

    def total(ls):
        return 2 * sum(_launched_macs(n, g, a, kw, T, C, N) for n, g, a, kw in ls)

    p = ops.Problem(B, T, C, H, W, torch.float32, torch.device(DEV))
    assert fused_plan.flops(p) == total(fwd)
    assert fused_plan.flops(p, backward=True) == total(launches)
    assert ops.backend_flops(ops.backends()["triton-fused"], p) == fused_plan.flops(p)


@pytest.mark.parametrize("shape", [(8, 5, 128, 16, 16), (8, 2, 128, 32, 64), (8, 3, 128, 32, 64)],
                         ids=["pascal", "cityscapes", "cityscapes-t3"])
def test_flops_near_the_quadratic_minimum_at_paper_grids(shape, monkeypatch):
    """The forward is the quadratic minimum (each Gram entry formed once, M once for all value
    rows); forward + backward stays within 1.5x of it at the paper's PASCAL and Cityscapes grids
    with the GPU tiles."""
    monkeypatch.setattr(_common, "INTERPRET", False)  # tile() -> the GPU tiles
    p = ops.Problem(*shape, torch.float32, torch.device(DEV))
    assert fused_plan.flops(p) == ops.flops("quadratic", p)
    assert fused_plan.flops(p, backward=True) <= 1.5 * ops.flops("quadratic", p, backward=True)


# --- determinism --------------------------------------------------------------------------

def test_backward_follows_deterministic_algorithms():
    """The backward adds dn with atomics: refused under torch.use_deterministic_algorithms,
    a warning in its warn_only mode."""
    x, v, w, b = problem(1, 1, 3, 2, 3, dtype=torch.float64, device=DEV)
    y, nrm = fused.forward(x, v, w, b)
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="atomic"):
            fused.backward(torch.ones_like(y), x, v, w, b, nrm)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="atomic"):
            fused.backward(torch.ones_like(y), x, v, w, b, nrm)
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])


# --- the tensor-core tile configuration -----------------------------------------------------

TENSOR_TILES_WORKER = r"""
import json, sys, torch
from ctal import ops
from ctal.kernels import _common, fused, fused_plan
from ctal.ops import reference
from tests.helpers import problem, reference64, rel_err, run
gpu = _common.GPU_TILES
B, T, C, H, W = (int(s) for s in sys.argv[1].split("x"))
tiles = fused_plan.fused_tiles(C, H, W, "tensor")
# the interpreter computes in fp64 / exact fp32, so the dots select the FMA tiles; force the
# tensor-core ones (sizes only: the values must not change)
fused._tiles = lambda x: tiles
torch.manual_seed(0)
x, v, w, b = problem(B, T, C, H, W, dtype=torch.float64)
dy = torch.randn_like(x)
y, g = run(lambda *a: ops.ctal_attention(*a, backend="triton-fused"), (x, v, w, b), dy)
ry, rg = reference64(reference.ctal_attention, (x, v, w, b), dy)
errs = dict(y=rel_err(y, ry), **{f"d{n}": rel_err(a, c) for n, a, c in zip(("x", "v", "weight", "bias"), g, rg)})
print(json.dumps(dict(errs=errs, tiles=tiles, gpu=gpu)))
"""


@pytest.mark.skipif(CUDA, reason="a GPU runs these tiles natively (test_triton.py)")
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
def test_tensor_core_tiles_match_reference(gpu_tiles):
    """The tiles of the TF32 / bf16 path (``fused_tiles(..., "tensor")``), which the interpreter
    (exact dots) would not select, at the interpreter's caps and at the GPU sizes (CTAL_GPU_TILES,
    read at import, hence a separate process). The GPU-size grid spans 5 key tiles of 128 with a
    256-column ring that wraps, 3 value-backward key tiles, and 64-query backward blocks."""
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT
    shape = (1, 2, 16, 20, 30) if gpu_tiles else (1, 2, 5, 7, 13)
    env = dict(os.environ, TRITON_INTERPRET="1", CTAL_POISON="1",
               CTAL_GPU_TILES="1" if gpu_tiles else "0")
    proc = subprocess.run([sys.executable, "-c", TENSOR_TILES_WORKER, "x".join(map(str, shape))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if gpu_tiles:
        t = out["tiles"]
        assert out["gpu"] and (t["BLOCK_M"], t["BLOCK_M_QUERY"], t["BLOCK_N"]) == (32, 64, 128)
        assert t["RING"] < 20 * 30 and -(-20 * 30 // t["BLOCK_N_VALUE"]) == 3
    bad = {k: e for k, e in out["errs"].items() if not e < 1e-10}
    assert set(out["errs"]) == {"y", "dx", "dv", "dweight", "dbias"} and not bad, bad


# --- TF32 operand rounding ---------------------------------------------------------------------

@triton.jit
def _operand_probe_fwd_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, fused._operand(tl.load(x_ptr + offs), tl.float32, "tf32"))


@pytest.mark.skipif(CUDA, reason="checked through the kernels' TF32 results on a GPU")
def test_tf32_operands_round_to_nearest():
    """``_operand`` keeps 10 mantissa bits rounded to nearest, ties away from zero (the tensor
    cores would truncate): every result is a TF32 value within half an ulp of its input."""
    torch.manual_seed(0)
    x = torch.randn(1024) * torch.logspace(-20, 20, 1024)
    ties = torch.tensor([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 3 * 2 ** -11, 2 ** -126])
    x = torch.cat([x[:-4], ties])
    y = torch.empty_like(x)
    _operand_probe_fwd_kernel[(1,)](x, y, BLOCK=1024)
    bits = y.view(torch.int32)
    assert bool(((bits & 0x1FFF) == 0).all())  # a TF32 value
    ulp = 2.0 ** (torch.floor(torch.log2(x.abs())) - 10)
    assert bool(((y - x).abs() <= ulp / 2).all())  # nearest
    assert y[-4:].tolist() == [1 + 2 ** -10, -(1 + 2 ** -10), 1 + 2 ** -9, 2 ** -126]  # ties away
