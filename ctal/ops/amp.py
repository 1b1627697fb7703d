"""The autocast policy of ``ctal.ops``, applied by every entry point (``ctal_attention`` and the
four stage functions) before any backend runs, so that it holds for all backends alike.

Under ``torch.autocast`` for the inputs' device type, the floating inputs are cast to the autocast
dtype (float64 ones are left alone, as autocast leaves them for matmul-like ops) and the backend
runs with autocast disabled: the forward computes in that one dtype and returns it, and the
backward computes in it too (its saved tensors and incoming gradient have it; run outside
autocast, as PyTorch recommends, nothing re-casts inside it). The casts are ordinary autograd ops
outside the backends, so the gradients come back in each input's own dtype. A backend that cannot
compute in the autocast dtype refuses the call.

``torch.library.register_autocast`` cannot express this: it casts to one dtype fixed when it is
registered (not the dtype the surrounding autocast asks for), it is missing before torch 2.7,
and the literal ``reference`` backend and the reference stages are plain PyTorch, not custom ops.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The autocast dtype for tensors on ``t``'s device type, or None where autocast is off."""
    if not isinstance(t, Tensor):
        return None
    device_type = t.device.type
    # is_autocast_enabled raises for device types autocast does not know (e.g. meta).
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(dtype: Optional[torch.dtype], t):
    """``t`` in ``dtype`` when the policy casts it (a floating tensor, not float64), else ``t``."""
    if (dtype is None or not isinstance(t, Tensor) or not t.is_floating_point()
            or t.dtype in (dtype, torch.float64)):
        return t
    return t.to(dtype)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the op computes in for an input like ``t`` under the current autocast state."""
    dtype = autocast_dtype(t)
    return t.dtype if dtype is None or t.dtype == torch.float64 else dtype


def disabled(dtype: Optional[torch.dtype], t: Tensor):
    """Autocast off for ``t``'s device type while a backend runs (a no-op context when it was off)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def refusal_note(dtype: Optional[torch.dtype], t) -> str:
    """Appended to a backend's refusal under autocast: the dtype comes from the policy."""
    if dtype is None or not isinstance(t, Tensor) or t.dtype == torch.float64:
        return ""
    return (f". Under torch.autocast({t.device.type!r}) ctal.ops computes in {dtype}: pick "
            f"another backend, or call this one outside autocast")
