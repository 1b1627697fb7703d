"""cuda-fused (csrc/fused_cuda.cu): the shared-memory model of its key-tiled kernels, the refusal
reasons, and on a GPU the paths the tiling adds (ring buffers that wrap, wide rows, the cp.async
and plain-load staging) against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from ctal import ops
from ctal.ops import extension, reference
from tests.helpers import assert_close, problem, reference64, run

KIB = 1024
SM80, SM90 = 163 * KIB, 227 * KIB  # opt-in shared memory per block
PAPER = {"pascal": (5, 128, 16, 16), "cityscapes": (2, 128, 32, 64), "nyuv2": (3, 128, 72, 96)}
MODES = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)]


@pytest.mark.parametrize("shape", list(PAPER.values()), ids=list(PAPER))
def test_paper_shapes_fit_sm80_in_every_tensor_core_and_fp32_mode(shape):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        need = extension.fused_smem_need(*shape, dtype)
        assert 0 < need <= SM80, (shape, dtype, need)
        assert need == max(extension.fused_smem_bytes(*shape, dtype, tf32, bwd)
                           for tf32 in (False, True) for bwd in (False, True))


def test_shared_memory_grows_with_the_grid_width_not_with_N():
    # Taller grids of one width need the same (once the rings are full), wider ones more.
    for dtype, tf32 in MODES + [(torch.float64, False)]:
        for bwd in (False, True):
            same = {extension.fused_smem_bytes(3, 64, H, 48, dtype, tf32, bwd) for H in (8, 40, 400, 4000)}
            assert len(same) == 1, (dtype, tf32, bwd, same)
            wide = [extension.fused_smem_bytes(3, 64, 64, W, dtype, tf32, bwd) for W in (32, 64, 128, 256)]
            assert wide == sorted(wide) and wide[0] < wide[-1], (dtype, tf32, bwd, wide)


def test_shared_memory_of_small_grids_is_capped_by_the_grid():
    # A grid with fewer key chunks than the halo spans keeps one ring slot per chunk.
    assert (extension.fused_smem_bytes(2, 8, 1, 1, torch.float32, False, True)
            < extension.fused_smem_bytes(2, 8, 1, 200, torch.float32, False, True))
    assert extension.fused_smem_bytes(0, 8, 4, 4, torch.float32, False, True) == -1
    assert extension.fused_smem_bytes(2, 8, 1 << 13, 1 << 12, torch.float32, False, True) == -1


def _unsupported(monkeypatch, limit):
    """cuda-fused's check as a GPU with `limit` bytes per block would see it."""
    monkeypatch.setattr(extension, "cuda_linear_unsupported", lambda p: None)
    monkeypatch.setattr(extension, "fused_smem_limit", lambda index: limit)
    return lambda *shape, dtype=torch.float32: extension.cuda_fused_unsupported(
        ops.Problem(*shape, dtype, torch.device("cuda", 0)))


def test_refusals_name_the_limit_and_the_alternative(monkeypatch):
    why = _unsupported(monkeypatch, SM90)
    assert why(8, *PAPER["nyuv2"]) is None and why(8, *PAPER["cityscapes"]) is None
    assert why(8, 3, 128, 120, 160) is None  # N = 19200
    wide = why(1, 3, 128, 4, 2000)  # the key halo of a 2000-pixel row
    assert wide is not None and "shared memory" in wide and "width W" in wide and "cuda-linear" in wide
    many = why(1, 64, 128, 16, 16)
    assert many is not None and "T=64" in many and "cuda-linear" in many
    assert "65535" in why(70000, 1, 8, 4, 5)
    assert "index limits" in why(1, 1, 8, 1 << 13, 1 << 12)
    # float64 at C=128: PASCAL's five tasks do not fit, Cityscapes' two do.
    assert "shared memory" in why(8, *PAPER["pascal"], dtype=torch.float64)
    assert why(8, *PAPER["cityscapes"], dtype=torch.float64) is None


def test_refusal_follows_the_device_limit(monkeypatch):
    need = extension.fused_smem_need(*PAPER["nyuv2"], torch.float32)
    assert _unsupported(monkeypatch, need)(8, *PAPER["nyuv2"]) is None
    assert "shared memory" in _unsupported(monkeypatch, need - 1)(8, *PAPER["nyuv2"])


# --- CUDA (skipped without a GPU) ------------------------------------------------------------------

HAS_GPU = extension.with_cuda() and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and the CUDA build")

# (B, T, C, H, W): M and dM rings that wrap (12x40: 15 chunks in 5 slots; 9x33), a single chunk
# with a halo wider than the grid (1x50), odd N (plain-load staging), Cityscapes' width.
TILING_SHAPES = [(1, 2, 16, 12, 40), (2, 3, 8, 9, 33), (1, 2, 8, 1, 50), (1, 2, 24, 7, 13), (1, 2, 32, 6, 64)]
GPU_MODES = [(torch.float64, False, 1e-10), (torch.float32, False, 1e-5), (torch.float32, True, 2e-3),
             (torch.bfloat16, False, 2e-2)]


def _check_fused(x, v, w, b, tol):
    why = ops.backends()["cuda-fused"].unsupported(ops.Problem.of(x))
    assert why is None, why
    dy = torch.randn_like(x)
    y, g = run(lambda *a: ops.ctal_attention(*a, backend="cuda-fused"), (x, v, w, b), dy)
    ref_y, ref_g = reference64(reference.ctal_attention, (x, v, w, b), dy)
    assert_close(y, ref_y, tol, "y")
    for name, got, want in zip(("x", "v", "weight", "bias"), g, ref_g):
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("shape", TILING_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,tf32,tol", GPU_MODES, ids=["fp64", "fp32", "tf32", "bf16"])
@pytest.mark.gpu
@needs_gpu
def test_cuda_fused_key_tiling_matches_reference(shape, dtype, tf32, tol, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    x, v, w, b = [t.to("cuda", dtype) for t in problem(*shape, seed=7)]
    _check_fused(x, v, w, b, tol)


@pytest.mark.gpu
@needs_gpu
def test_cuda_fused_misaligned_inputs_take_plain_loads(monkeypatch):
    """N * 4 bytes is a multiple of 16 here, but x starts 4 bytes past an aligned address: the key
    tiles must come through plain loads, with the same results."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    shape = (1, 2, 16, 8, 12)
    x, v, w, b = [t.to("cuda", torch.float32) for t in problem(*shape, seed=3)]
    x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(shape)
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    _check_fused(x, v, w, b, 1e-5)


@pytest.mark.parametrize("name", ["cityscapes", "nyuv2"])
@pytest.mark.gpu
@needs_gpu
def test_cuda_fused_serves_the_large_paper_grids(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    T, C, H, W = PAPER[name]
    x, v, w, b = [t.to("cuda", torch.float32) for t in problem(1, T, C, H, W, dtype=torch.float32, seed=5)]
    _check_fused(x, v, w, b, 2e-3)


@pytest.mark.gpu
@needs_gpu
def test_cuda_fused_forward_is_deterministic():
    """The forward has no atomics: two runs agree bit for bit (the backward's dn / dV do not)."""
    x, v, w, b = [t.to("cuda", torch.float32) for t in problem(2, 3, 16, 12, 40, dtype=torch.float32, seed=1)]
    y1 = torch.ops.ctal_ext.fused_fwd(x, v, w, b, False)
    y2 = torch.ops.ctal_ext.fused_fwd(x, v, w, b, False)
    assert torch.equal(y1, y2)
