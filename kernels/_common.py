"""Shared pieces of the Triton kernels: availability, launch policy and small jit helpers.

Layout conventions (same as ``ctal.ops``): features ``x`` and values ``v`` are ``(B, T, C, H, W)``
and are made contiguous by the launchers, so a pixel's channel ``c`` of task ``t`` lives at
``((b * T + t) * C + c) * N + n``. Every kernel casts program ids and base offsets to int64 before
multiplying (``B * T * N * N`` passes 2**31 at realistic sizes).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # importing ctal must never require triton
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

# Triton decides between compiled and interpreted kernels when ``@triton.jit`` runs, i.e. when the
# kernel modules are imported, so the mode is fixed here once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under the interpreter, tiles are capped (its cost is per program and per loop trip, and tiny
# test shapes should still span several tiles); CTAL_GPU_TILES=1 keeps the GPU configuration
# instead (tiles, warps and the branches that depend on them), so the interpreter can check
# exactly what a GPU launches. Read at import, like INTERPRET.
GPU_TILES = os.environ.get("CTAL_GPU_TILES", "0") == "1"

# The fused-quadratic and linear kernels hold all C channels of a pixel in one tile; their tiles
# are sized for, and compiled and checked for register spills on sm_90 at, up to 128 channels
# (python -m ctal.kernels.compile_check --channels ...), so wider problems are refused and ``auto``
# takes another implementation.
MAX_CHANNELS = 128
NORM_EPS = 1e-12  # F.normalize's default eps, as in ctal.ops.reference


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def channel_block(C: int) -> int:
    """A power-of-two tile covering all C channels (>= 16, the smallest tl.dot dimension)."""
    return max(16, next_pow2(C))


def interpreter_reason() -> Optional[str]:
    """Why the Triton interpreter cannot run our kernels here (None when it can); see
    ``_probe_interpreter``."""
    return _INTERPRETER_PROBLEM


def _probe_interpreter() -> Optional[str]:
    """Run a one-program probe kernel: some Triton releases' interpreter (3.6 for one) turns
    runtime scalars into 1-element arrays and calls ``int()`` on them, which NumPy >= 2.4 refuses.
    Run once at import, so that backend checks traced by ``torch.compile`` stay plain Python."""
    try:
        out = torch.empty(16)
        interpreter_probe_fwd_kernel[(1,)](out, 20, BLOCK=16)
        if not bool((out == 2.0).all()):
            return f"the Triton {triton.__version__} interpreter computed a wrong probe result"
        return None
    except Exception as exc:
        import numpy
        return (f"the Triton {triton.__version__} interpreter fails with NumPy {numpy.__version__} "
                f"({type(exc).__name__}: {exc}); use NumPy < 2.4 or a newer Triton (3.8 works)")


def device_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    if device.type == "cpu":
        if not INTERPRET:
            return ("Triton needs a CUDA device (on CPU set TRITON_INTERPRET=1 before triton is "
                    "imported to run the kernels in the slow interpreter)")
        return interpreter_reason()
    if device.type != "cuda":
        return f"Triton kernels run on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "Triton needs a CUDA device and torch.cuda is not available"
    return None


def dtype_reason(dtype: torch.dtype) -> Optional[str]:
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported by the Triton kernels"
    if INTERPRET and dtype in (torch.float16, torch.bfloat16):
        return "the Triton interpreter mishandles half-precision dots; use fp32/fp64 under it"
    return None


def channel_reason(C: int) -> Optional[str]:
    if C > MAX_CHANNELS:
        return (f"C = {C} exceeds the Triton kernel limit of {MAX_CHANNELS} channels per tile "
                f"(use backend 'linear' or 'reference')")
    return None


def item_size_reason(T: int, C: int, N: int) -> Optional[str]:
    """The fused and linear kernels index inside one batch item with int32 tile offsets (int64
    tiles would double their index registers and spill; the batch base offset is int64), so one
    item's features and the linear form's ``(9TC + 1) x TC`` state must stay below 2**31."""
    if T * C * N >= 2 ** 31 or (9 * T * C + 1) * T * C >= 2 ** 31:
        return (f"one batch item is too large for int32 tile offsets (T*C*N = {T * C * N}, "
                f"(9TC+1)*TC = {(9 * T * C + 1) * T * C}; both must be < 2**31)")
    return None


def check_device(t: torch.Tensor, what: str) -> None:
    """Raise a clear error instead of launching a kernel on an unsupported device/dtype."""
    why = device_reason(t.device) or dtype_reason(t.dtype)
    if why is not None:
        raise RuntimeError(f"{what}: {why}")


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact fp32 unless PyTorch allows TF32 matmuls (GPU only)."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def tile(gpu: int, interpret: int = 32) -> int:
    """Tile edge: ``gpu`` on a GPU; under the interpreter (whose cost is per program and per
    loop iteration) at most ``interpret``, small enough that the tiny test shapes still span
    several tiles."""
    return min(gpu, interpret) if INTERPRET and not GPU_TILES else gpu


def warps(gpu: int) -> int:
    return 1 if INTERPRET and not GPU_TILES else gpu


def poisoned(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An output buffer. Kernels must write every element; NaN-filling it under the interpreter
    (where it is cheap and tests run), or when ``CTAL_POISON=1`` (set by the tests; the compiled
    extension reads it too), makes an unwritten element fail loudly."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if INTERPRET or os.environ.get("CTAL_POISON", "0") == "1":
        out.fill_(float("nan"))
    return out


if triton is not None:

    @triton.jit
    def grid_offsets(n_base, BLOCK: tl.constexpr, N, W):
        """Offsets ``n_base + arange(BLOCK)`` of pixels in a flattened H x W grid, their row/col
        and the in-range mask."""
        offs = n_base + tl.arange(0, BLOCK)  # [BLOCK]
        return offs, offs // W, offs % W, offs < N

    @triton.jit
    def shifted_pixels(py, px, valid, dy, dx, H, W):
        """Pixel index of ``(py + dy, px + dx)`` and whether it lies on the H x W grid (zero
        padding outside); ``valid`` masks the unshifted pixel."""
        sy = py + dy
        sx = px + dx
        ok = valid & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
        return sy * W + sx, ok

    @triton.jit
    def index_probe_fwd_kernel(out_ptr, base_ptr, stride_b, stride_t, T):
        """Test helper for the int64 guard: stores the element offset ``b * stride_b + t *
        stride_t`` of program ``(b, t)`` computed exactly as the CTAL kernels do it."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1).to(tl.int64)
        off = pid_b * stride_b + pid_t * stride_t
        tl.store(out_ptr + pid_b * T + pid_t, off)

    @triton.jit
    def interpreter_probe_fwd_kernel(out_ptr, n, BLOCK: tl.constexpr):
        """Counts the trips of a loop whose bound is a runtime scalar, as every kernel has one."""
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(0, n, BLOCK):
            total += 1.0
        tl.store(out_ptr + tl.arange(0, BLOCK), total)

    @triton.jit
    def full_like(x, VALUE: tl.constexpr):
        """``VALUE`` broadcast to ``x``'s shape in ``x``'s dtype. Float scalars passed as kernel
        arguments are fp32, which would round eps = 1e-12 in fp64 kernels; a constexpr turned
        into a constant of the tile's dtype is exact."""
        return tl.full(x.shape, VALUE, x.dtype)

    @triton.jit
    def l2norm_bwd_tile(n, dn, nrm, EPS: tl.constexpr):
        """Normalization backward for one tile: ``n = x / max(||x||, eps)`` over the channel axis 0.
        ``n, dn``: [BC, BN], ``nrm``: [BN] (clamped norms) -> ``dx`` [BC, BN]. Below ``eps`` the
        clamp passes no gradient to the norm."""
        proj = tl.sum(n * dn, 0)  # [BN]
        proj = tl.where(nrm > full_like(nrm, EPS), proj, 0.0)
        return (dn - n * proj[None, :]) / nrm[None, :]


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype of a kernel for inputs of ``dtype`` (fp64 stays fp64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_dtype(dtype: torch.dtype):
    """Operand dtype fed to ``tl.dot`` (the input dtype: bf16/fp16 use tensor cores)."""
    return {torch.float64: tl.float64, torch.float32: tl.float32,
            torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Fixed at import, like INTERPRET.
_INTERPRETER_PROBLEM: Optional[str] = None
if INTERPRET and TRITON_IMPORT_ERROR is None:
    _INTERPRETER_PROBLEM = _probe_interpreter()
