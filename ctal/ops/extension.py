"""The compiled extension (csrc/) as ctal.ops backends; importing ctal never requires it.

``ctal._C`` registers the ops ``torch.ops.ctal_ext.{linear_fwd, linear_bwd, fused_fwd, fused_bwd}``
(CPU and CUDA bodies). This module makes them differentiable custom ops with ``define_op`` and
says when each can run; ``ctal.ops.backends`` registers them as three backends:

============  =========  ===============================================================
name          algorithm  implementation
============  =========  ===============================================================
cpp           linear     C++ gathers/scatters with at::parallel_for around BLAS GEMMs (CPU)
cuda-linear   linear     CUDA gathers/scatters around cuBLAS GEMMs
cuda-fused    quadratic  tiled CUDA kernel: similarity tiles, 3x3 stencil, value tile; N x N
                         is never written (forward and backward by recomputation); shared
                         memory grows with the grid width, not with N
============  =========  ===============================================================

When the extension is missing, or was built without CUDA, the backends stay registered and their
``unsupported`` reason says how to build it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .custom_op import define_op

try:  # the compiled module; its import registers torch.ops.ctal_ext
    from ctal import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[BaseException] = None
    # Plain Python values, so that backend checks stay traceable by torch.compile.
    _WITH_CUDA = bool(_C.with_cuda())
except ImportError as e:  # not built (or built for another torch): ctal still works without it
    _C = None
    _IMPORT_ERROR = e
    _WITH_CUDA = False

BUILD_HINT = ("the compiled extension is not built: run `pip install --no-build-isolation -e .` "
              "in the ctal checkout (needs a C++ compiler and ninja; CUDA kernels need nvcc)")
NO_CUDA_HINT = ("the extension was built without CUDA (no CUDA toolkit was found at build time): "
                "rebuild with nvcc available, or set CTAL_FORCE_CUDA=1 to make the build fail loudly")



def is_built() -> bool:
    """Whether ``ctal._C`` is importable."""
    return _C is not None


def with_cuda() -> bool:
    """Whether the extension is built and contains the CUDA kernels."""
    return _C is not None and _WITH_CUDA


def build_error() -> Optional[str]:
    """Why the extension is unavailable (None when it is built)."""
    if _C is not None:
        return None
    detail = f" ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})" if _IMPORT_ERROR else ""
    return BUILD_HINT + detail


# --- backends ------------------------------------------------------------------------------------

def cpp_unsupported(p) -> Optional[str]:
    if _C is None:
        return BUILD_HINT
    if p.device.type != "cpu":
        return f"runs on CPU tensors only, got {p.device.type} (use cuda-linear on a GPU)"
    if p.dtype not in (torch.float32, torch.float64):
        return f"supports float32 and float64, got {p.dtype} (use 'linear' for 16-bit on CPU)"
    return None


def cuda_linear_unsupported(p) -> Optional[str]:
    if _C is None:
        return BUILD_HINT
    if not _WITH_CUDA:
        return NO_CUDA_HINT
    if p.device.type != "cuda":
        return f"needs CUDA tensors, got {p.device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available here (torch.cuda.is_available() is False)"
    return None


# Shared memory of one cuda-fused block, mirroring make_layout() in csrc/fused_cuda.cu (pure Python
# so that backend checks stay traceable; tests check it against ctal._C.fused_smem_bytes). Keys are
# tiled in chunks of _FUSED_KC, so the need does not grow with N: it grows with the grid width W
# (the stencil's halo of W + 1 keys on either side of a chunk is kept in rings of M and dM rows)
# and with T and C (the block's query tiles of every task stay resident).
_FUSED_BM, _FUSED_KC = 16, 32


def fused_smem_bytes(T: int, C: int, H: int, W: int, dtype: torch.dtype, allow_tf32: bool,
                     backward: bool) -> int:
    if T <= 0 or C <= 0 or H <= 0 or W <= 0 or H * W > 1 << 24:
        return -1
    bm, kc = _FUSED_BM, _FUSED_KC
    acc = 8 if dtype == torch.float64 else 4
    half = dtype in (torch.float16, torch.bfloat16)
    op, skew = (2, 8) if half else ((8, 2) if dtype == torch.float64 else (4, 4))
    tensor_cores = half or (dtype == torch.float32 and allow_tf32)
    cp = -(-C // 16) * 16
    chunks = -(-(H * W) // kc)
    halo = -(-(W + 1) // kc)
    ring = bm * (min(2 * halo + 1, chunks) * kc + 4) * acc   # M (and dM) rows of the ring's chunks
    query = T * cp * bm * op                                 # n_t (and dY_t) of the block's queries
    sizes = [ring] + ([ring] if backward else []) + [bm * (kc + 4) * acc]  # + S of one chunk
    sizes += [query] + ([query] if backward else [])
    sizes += [2 * cp * (kc + skew) * op, bm * (kc + skew) * op]  # two key tiles, As
    if not backward:
        sizes.append(T * bm * (cp + 4) * acc)                   # output accumulators
    if backward and tensor_cores:
        sizes.append(4 * 256 * acc)                             # per-warp staging of the atomics
    sizes.append(bm * T * 9 * acc)                              # weights
    if backward:
        sizes.append((bm * T * 9 + bm) * acc)                   # dw, db partials
    return sum(-(-s // 128) * 128 for s in sizes)


def fused_smem_need(T: int, C: int, H: int, W: int, dtype: torch.dtype) -> int:
    """The most shared memory a cuda-fused block takes for this problem: forward or backward, with
    or without TF32 (sized for all, so that training and inference and both TF32 settings are
    served at the same sizes)."""
    return max(fused_smem_bytes(T, C, H, W, dtype, tf32, bwd)
               for tf32 in (False, True) for bwd in (False, True))


_SMEM_LIMIT: dict[int, int] = {}


def fused_smem_limit(index: int) -> int:
    """Shared memory one block may use on CUDA device ``index`` (opt-in maximum)."""
    if index not in _SMEM_LIMIT:
        props = torch.cuda.get_device_properties(index)
        _SMEM_LIMIT[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return _SMEM_LIMIT[index]


def cuda_fused_unsupported(p) -> Optional[str]:
    why = cuda_linear_unsupported(p)
    if why is not None:
        return why
    if p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"unsupported dtype {p.dtype}"
    if p.B > 65535:  # one grid row per batch item (check_fused in csrc/fused_cuda.cu)
        return f"batch {p.B} exceeds the CUDA grid limit of 65535 (use cuda-linear)"
    if p.H * p.W > 1 << 24 or p.C > 4096 or p.T > 4096:  # 32-bit indices inside the kernels
        return (f"a {p.H}x{p.W} grid with T={p.T}, C={p.C} is past the kernel's index limits "
                f"(H*W <= 2^24, C <= 4096, T <= 4096; use cuda-linear)")
    need = fused_smem_need(p.T, p.C, p.H, p.W, p.dtype)
    have = fused_smem_limit(p.device.index if p.device.index is not None else torch.cuda.current_device())
    if need > have:
        return (f"a {p.H}x{p.W} grid with T={p.T}, C={p.C} needs {need // 1024} KiB of shared memory "
                f"per block (the key halo grows with the grid width W, the query tiles with T and C), "
                f"the device allows {have // 1024} KiB (use cuda-linear)")
    return None


def _allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _require() -> None:
    if _C is None:
        raise RuntimeError(build_error())


# --- the compiled bodies as custom ops (ctal.ops.custom_op) -------------------------------------

def _linear_forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``y`` and the small ``G (B, 9TC, TC)`` the backward reuses."""
    _require()
    return torch.ops.ctal_ext.linear_fwd(x, v, weight, bias)


def _linear_backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
                     g: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    dx, dv, dw, db = torch.ops.ctal_ext.linear_bwd(dy, x, v, weight, bias, g)
    return dx, dv, dw, (db if bias is not None else None)


def _linear_fake(x, v, weight, bias):
    B, T, C = x.shape[:3]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(B, 9 * T * C, T * C)


def _fused_forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor], allow_tf32: bool) -> Tensor:
    _require()
    return torch.ops.ctal_ext.fused_fwd(x, v, weight, bias, allow_tf32)


def _fused_backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
                    allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    dx, dv, dw, db = torch.ops.ctal_ext.fused_bwd(dy, x, v, weight, bias, allow_tf32)
    return dx, dv, dw, (db if bias is not None else None)


def _fused_fake(x, v, weight, bias, allow_tf32):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_linear_op = define_op("ext_linear", _linear_forward, _linear_backward, fake=_linear_fake, saved=("g",))
_fused_op = define_op("ext_fused", _fused_forward, _fused_backward, fake=_fused_fake)


def cpp_attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """CTAL through the compiled linear form (CPU or CUDA tensors alike)."""
    return _linear_op(x, v, weight, bias)


def fused_attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """CTAL through the fused quadratic CUDA kernel. float32 inputs use TF32 tensor cores when
    ``torch.backends.cuda.matmul.allow_tf32`` is set, exact FMA otherwise."""
    return _fused_op(x, v, weight, bias, _allow_tf32())


cpp_attention.forward_op = _linear_op.forward_op
fused_attention.forward_op = _fused_op.forward_op


def read_device_limits() -> None:
    """Read every CUDA device's shared-memory limit now: ``cuda-fused``'s ``unsupported`` runs
    inside ``torch.compile`` traces, where querying the device is not traceable."""
    if _C is not None and _WITH_CUDA and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            fused_smem_limit(i)

