"""Input checks shared by every meter (and :func:`ctal.metrics.delta_m`).

Bad input is a ``ValueError`` (bad values or shapes) or ``TypeError`` (wrong kind of object) that
names the meter, the argument and what was expected, never a silently wrong number (a NaN that
slips into a histogram bin, a 0.5 target truncated to 0, ``True`` read as one class). Numpy
arrays are converted to tensors.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def as_tensor(where: str, arg: str, value) -> Tensor:
    """``value`` as a tensor: tensors as they are, numpy arrays converted (sharing memory where
    possible); anything else is a ``TypeError``."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as err:
            raise TypeError(f"{where}: `{arg}` is a numpy array of dtype {value.dtype}, which has no "
                            f"torch equivalent ({err})") from err
    raise TypeError(f"{where}: `{arg}` must be a torch.Tensor or a numpy array, got {type(value).__name__}")


def check_rank(where: str, arg: str, value: Tensor, ranks: Sequence[int], expected: str) -> None:
    """``value`` must have one of ``ranks`` dimensions; the message says ``expected`` (the shape in
    words) and, one dimension short, that the batch dimension is probably missing."""
    if value.dim() not in ranks:
        hint = (f"; is the batch dimension missing? (`{arg}[None]` adds it)"
                if value.dim() == min(ranks) - 1 else "")
        raise ValueError(f"{where}: `{arg}` must be {expected}, got shape {tuple(value.shape)}{hint}")


def check_class_count(where: str, value) -> int:
    """A class count: an int >= 1 (numpy ints too; bools and floats are not counts)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int (the class count), got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{where} must be >= 1, got {value}")
    return int(value)


def _some(values: Tensor, k: int = 5) -> list:
    """Up to ``k`` distinct offending values, for the message."""
    v = values.detach().flatten().double().cpu()
    nan = torch.isnan(v)
    found = ([float("nan")] if nan.any() else []) + torch.unique(v[~nan]).tolist()
    return [int(x) if x.is_integer() else x for x in found[:k]]


def check_finite(where: str, arg: str, values: Tensor, valid: Optional[Tensor] = None,
                 what: str = "predictions") -> None:
    """``values`` (``what``) must be finite wherever ``valid`` (a mask broadcastable to ``values``)
    is set."""
    bad = ~torch.isfinite(values)
    if valid is not None:
        bad = bad & valid
    if bad.any():
        raise ValueError(f"{where}: `{arg}` has {int(bad.sum())} non-finite value(s) (NaN/Inf) on valid pixels; "
                         f"{what} must be finite")


def check_values_in(where: str, arg: str, values: Tensor, allowed: Iterable[float], expected: str) -> None:
    """Every entry of ``values`` must be one of ``allowed`` (NaN never is)."""
    ok = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    for a in allowed:
        ok |= values == a
    if not ok.all():
        raise ValueError(f"{where}: `{arg}` must hold {expected}; found {_some(values[~ok])} "
                         f"at {int((~ok).sum())} pixel(s)")


def check_integer_valued(where: str, arg: str, values: Tensor, expected: str) -> None:
    """A floating-point ``values`` must hold (finite) integers: class ids are never truncated."""
    if values.is_floating_point():
        bad = ~torch.isfinite(values) | (values != torch.round(values))
        if bad.any():
            raise ValueError(f"{where}: `{arg}` must hold {expected}; found non-integer values "
                             f"{_some(values[bad])} at {int(bad.sum())} pixel(s)")


def finite_number(where: str, name: str, value) -> float:
    """``value`` as a float; a NaN / Inf / non-number is an error naming ``name``."""
    try:
        x = None if isinstance(value, (str, bytes, bool)) else float(value)
    except (TypeError, ValueError):
        x = None
    if x is None or not math.isfinite(x):
        raise ValueError(f"{where}: {name} = {value!r} is not a finite number")
    return x
