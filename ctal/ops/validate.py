"""Input checks shared by every CTAL entry point: clear errors instead of kernel crashes."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Set by check_finite; None leaves the decision to the CTAL_CHECK_FINITE environment variable.
_CHECK_FINITE: Optional[bool] = None


class check_finite:
    """The switch for the NaN/Inf check of ``ctal.ops`` inputs; off by default.

    The check reads the values (on CUDA a device-to-host sync per tensor per call, which also
    breaks CUDA-graph capture), so it is opt-in, for debugging. ``check_finite(True)`` turns it on
    for the process, ``check_finite(False)`` off, ``check_finite(None)`` hands the decision back
    to the environment variable ``CTAL_CHECK_FINITE`` (``1`` = on, read at each call), which also
    decides while ``check_finite`` was never called. As a context manager,
    ``with check_finite(True): ...`` sets it for the block and restores the previous setting on
    exit. With the check on, a NaN/Inf input is a ``ValueError`` naming the argument. It is
    skipped while ``torch.compile`` traces and for meta / fake tensors, which carry no values.
    """

    def __init__(self, enabled: Optional[bool] = True):
        global _CHECK_FINITE
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"check_finite: enabled must be True, False or None, got {enabled!r}")
        self._previous = _CHECK_FINITE
        _CHECK_FINITE = enabled

    def __enter__(self) -> "check_finite":
        return self

    def __exit__(self, *exc) -> None:
        global _CHECK_FINITE
        _CHECK_FINITE = self._previous


def checking_finite() -> bool:
    """Whether ``ctal.ops`` checks its inputs for NaN/Inf now (see :class:`check_finite`)."""
    if _CHECK_FINITE is not None:
        return _CHECK_FINITE
    return os.environ.get("CTAL_CHECK_FINITE", "0") == "1"


def _tensor(name: str, t, rank: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t


def _finite(name: str, t: torch.Tensor) -> None:
    # Data-dependent: skipped while torch.compile traces (it would break fullgraph capture) and on
    # meta / fake tensors, which carry no values; off unless check_finite turned it on.
    if torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, FakeTensor):
        return
    if checking_finite() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def same_kind(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """``t`` has the dtype and device of ``ref``."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; use one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def values(name: str, t, rank: int, layout: str) -> torch.Tensor:
    """A non-empty floating tensor of ``rank`` dims, laid out as ``layout`` (for the message,
    e.g. ``"(B, T, N, N)"``); finite too when :class:`check_finite` is on."""
    _tensor(name, t, rank)
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty {layout}, got shape {tuple(t.shape)}")
    _finite(name, t)
    return t


def features(x, name: str = "x") -> tuple[int, int, int, int, int]:
    """Check a ``(B, T, C, H, W)`` feature tensor; returns its shape."""
    values(name, x, 5, "(B, T, C, H, W)")
    return tuple(x.shape)


def fusion_params(weight, bias, T: int, H: int, W: int, like: torch.Tensor,
                  like_name: str = "x") -> None:
    """Check the grouped-conv fusion weight ``(H*W, T, 3, 3)`` and bias ``(H*W,)``."""
    _tensor("weight", weight, 4)
    if tuple(weight.shape) != (H * W, T, 3, 3):
        raise ValueError(
            f"weight must have shape (H*W, T, 3, 3) = ({H * W}, {T}, 3, 3) for a {H}x{W} grid "
            f"and {T} tasks, got {tuple(weight.shape)}")
    same_kind(like_name, like, "weight", weight)
    _finite("weight", weight)
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != H * W:
            raise ValueError(f"bias must have shape (H*W,) = ({H * W},), got {tuple(bias.shape)}")
        same_kind(like_name, like, "bias", bias)
        _finite("bias", bias)


def attention_inputs(x, v, weight, bias) -> tuple[int, int, int, int, int]:
    """Check all inputs of ``ctal_attention``; returns ``(B, T, C, H, W)``."""
    B, T, C, H, W = features(x, "x")
    _tensor("v", v, 5)
    if tuple(v.shape) != tuple(x.shape):
        raise ValueError(f"v must have the same (B, T, C, H, W) as x {tuple(x.shape)}, got {tuple(v.shape)}")
    same_kind("x", x, "v", v)
    _finite("v", v)
    fusion_params(weight, bias, T, H, W, x)
    return B, T, C, H, W
