"""Checks shared by the modules, models, losses, meters and datasets: task names, (H, W) grids,
and the task order recorded in a module's state dict."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["check_task_names", "check_grid", "TaskOrderState", "TASK_ORDER_KEY"]

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


def check_grid(size, name: str = "size") -> tuple[int, int]:
    """``size`` as an ``(H, W)`` pair of positive ints (bools are not sizes)."""
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


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
