"""The input checks of the whole package, in one place: the CTAL op's tensors (``ctal.ops``),
task names, ``(H, W)`` sizes and state dicts (modules, models, losses, meters, datasets), and the
task order recorded in a module's state dict. Each failure is a ``ValueError`` / ``TypeError``
naming the argument and what was expected."""
from __future__ import annotations

import argparse
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["check_task_names", "check_grid", "state_dict_in", "TaskOrderState", "TASK_ORDER_KEY",
           "check_finite", "checking_finite", "values", "features", "same_kind", "fusion_params",
           "attention_inputs"]

# Task names become attribute-like keys of nn.ModuleDict / nn.ParameterDict and parts of
# state-dict keys: a name that is already an attribute there ("keys", "type", "training", ...)
# cannot be registered.
_RESERVED = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))


def _name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if not (name.isidentifier() or (name.isascii() and name.isdigit())):
        why = "'.' separates state-dict keys" if "." in name else "it is not an identifier"
        return why
    if name in _RESERVED:
        return f"it is an attribute of nn.ModuleDict / nn.ParameterDict (ModuleDict.{name})"
    return None


def check_task_names(tasks, name: str = "tasks") -> list[str]:
    """``tasks`` as a list of task names, or a clear error: a non-empty sequence (not a string) of
    distinct names, each a Python identifier or a plain number (``"0"``, ``"1"``: the names of
    ``CrossTaskAffinity(3, ...)``) that is not an attribute of ``nn.ModuleDict`` /
    ``nn.ParameterDict`` (``keys``, ``items``, ``values``, ``type``, ``training``, ...), since
    per-task layers are stored under these names."""
    if isinstance(tasks, (set, frozenset)):
        raise ValueError(f"{name} must be an ordered list of task names (tensors are indexed by task "
                         f"position; a set has no fixed order), got {tasks!r}")
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise ValueError(f"{name} must be a non-empty list of distinct task names, got {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"{name} must be a non-empty list of distinct task names, got {tasks!r}")
    for i, t in enumerate(tasks):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a task name (a str), got {type(t).__name__} {t!r}")
        problem = _name_problem(t)
        if problem:
            raise ValueError(
                f"{name}[{i}] = {t!r} is not a valid task name: {problem}. Task names must be Python "
                f"identifiers (letters, digits, '_') or plain numbers, and not attributes of "
                f"nn.Module / nn.ModuleDict such as 'keys', 'items', 'values', 'type', 'training'")
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise ValueError(f"{name} must be distinct task names; {dup} appear more than once in {tasks}")
    return tasks


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_grid(size, name: str = "size") -> tuple[int, int]:
    """``size`` as an ``(H, W)`` tuple of ints: a pair (tuple, list, ``torch.Size``, 1-D array) of
    positive integers. A single int is refused rather than guessed (square? shorter side, as in
    torchvision?): the error suggests ``(n, n)``."""
    if _is_int(size):
        raise ValueError(f"{name} must be an (H, W) pair of positive integers, got the single int {size!r}; "
                         f"for a square size pass {name}=({size}, {size})")
    if (isinstance(size, (str, bytes)) or not isinstance(size, (Sequence, np.ndarray))
            or len(size) != 2 or not all(_is_int(s) and s > 0 for s in size)):
        raise ValueError(f"{name} must be an (H, W) pair of positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def positive_int_arg(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (the command lines' counts and batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def state_dict_in(source, name: str) -> dict:
    """The model state dict in ``source`` (a state dict, or a trainer checkpoint / ``{"state_dict":
    ...}`` dict holding one) without a DDP ``module.`` prefix; ``name`` says what ``source`` is in
    the errors."""
    if not isinstance(source, Mapping):
        raise TypeError(f"{name} must be a state dict (a mapping of tensors) or a trainer checkpoint "
                        f"dict, got {type(source).__name__}")
    for key in ("model", "state_dict"):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    if not all(torch.is_tensor(v) for v in source.values()):
        raise ValueError(f"{name} is not a state dict (non-tensor values; pass a model's state_dict() "
                         f"or a trainer checkpoint)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}


# ------------------------------------------------------------------------ task order in the state
TASK_ORDER_KEY = "task_order"
_SEP = "\n"  # never part of a valid task name


def _encode(tasks: Sequence[str]) -> Tensor:
    # A uint8 tensor rather than extra state: state dicts stay tensor-only, which tools
    # (weights_only loading, clone loops, safetensors) rely on.
    return torch.tensor(list(_SEP.join(tasks).encode("utf-8")), dtype=torch.uint8, device="cpu")


def _decode(value, key: str) -> list[str]:
    if not (torch.is_tensor(value) and value.dtype == torch.uint8 and value.dim() == 1):
        raise ValueError(f"{key}: expected the task order as a 1-D uint8 tensor, got "
                         f"{type(value).__name__ if not torch.is_tensor(value) else (value.dtype, tuple(value.shape))}")
    try:
        return bytes(value.tolist()).decode("utf-8").split(_SEP)
    except UnicodeDecodeError as err:
        raise ValueError(f"{key}: the recorded task order is not UTF-8 text ({err})") from err


class TaskOrderState:
    """Mixin for an ``nn.Module`` with a ``tasks`` list: its state dict records the task order
    under ``task_order`` (the UTF-8 names as a uint8 tensor, not a buffer: it follows
    ``self.tasks``), and loading checks it.

    With ``task_order_sensitive`` (the default), tensors are indexed by task position, so a state
    of the same tasks in another order, which matches every key and shape, is refused with a
    ``ValueError`` naming both orders, strict or not. A state of other tasks is left to the
    missing / unexpected keys of its per-task tensors (``strict=False`` allows such partial
    transfers). A state without a record (saved before the order was recorded) loads, with a
    warning when the order matters. Subclasses list the mixin before ``nn.Module``."""

    task_order_sensitive = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + TASK_ORDER_KEY] = _encode(self.tasks)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + TASK_ORDER_KEY
        own = list(self.tasks)
        record = state_dict.get(key)
        if record is None:
            if self.task_order_sensitive and len(own) > 1 and any(k.startswith(prefix) for k in state_dict):
                warnings.warn(f"the state dict has no task-order record (saved by an older ctal); its "
                              f"tensors indexed by task position are taken to be in the order {own}",
                              UserWarning, stacklevel=2)
        elif not (torch.is_tensor(record) and record.is_meta):  # a meta tensor has no values to read
            saved = _decode(record, key)
            where = prefix[:-1] or "state_dict"
            if saved != own and sorted(saved) == sorted(own):
                if self.task_order_sensitive:
                    raise ValueError(
                        f"{where}: saved for the tasks {saved} (in this order), this "
                        f"{type(self).__name__} has {own}; its tensors are indexed by task "
                        f"position, so loading would give each task another task's weights. "
                        f"Build it with tasks={saved}.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:  # the record is not a parameter or buffer
            unexpected_keys.remove(key)


# ------------------------------------------------------------------------ the CTAL op's tensors
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
