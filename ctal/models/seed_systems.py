"""The pieces of the other seed systems' training recipes that are not plain layers (the models
themselves, Cross-Stitch, NDDR-CNN, MTAN on ResNet and SCA on HRNet, are in the registry:
``ctal.models.build_model("cross_stitch", ...)``).

- :func:`init_from_single_task`: Cross-Stitch and NDDR-CNN start from trained single-task networks;
  this copies each task's backbone + head from a single-task checkpoint (or state dict) into the
  task's column of the multitask model, checking that every tensor is covered and fits.
- :func:`param_groups`: optimizer groups with the method's learning-rate scheme: the mixing
  parameters (cross-stitch units; NDDR layers including their BN) at ``mixing_lr_mult`` (100) x the
  base rate, everything else at the base rate (what those models' ``optimizer_param_groups``
  return, and the trainer uses). Per-group rates survive the engine's schedulers
  (they scale each group's initial rate). Note: the protocol's published code builds these two
  groups but its per-epoch ``adjust_learning_rate`` then sets *every* group to the base rate from
  the first epoch on, so the 100x never takes effect there; ``mixing_lr_mult: 1.0`` reproduces
  that behaviour.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .._checks import TASK_ORDER_KEY
from .cross_stitch import StitchedResNets

__all__ = ["init_from_single_task", "param_groups", "load_model_state"]


# ------------------------------------------------------------------------------------------------
def load_model_state(source: Union[str, os.PathLike, Mapping]) -> dict:
    """A model state dict from a trainer checkpoint (``{"model": ...}``), a file holding a plain
    state dict, or a dict; a ``module.`` (DDP) prefix is stripped."""
    if isinstance(source, (str, os.PathLike)):
        from ..engine import checkpoint
        source = checkpoint.load(source, map_location="cpu")
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")
    for key in ("model", "state_dict"):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    if not all(torch.is_tensor(v) for v in source.values()):
        raise ValueError("the source is not a state dict (non-tensor values; pass the model's state or a "
                         "trainer checkpoint)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}


def _task_tensors(sd: Mapping, task: str) -> dict:
    """The task's backbone and head tensors of a single-task state dict, renamed to
    ``backbone.*`` / ``head.*``. Accepted layouts: ``SingleTaskNet`` (``backbones.<task>.*``,
    ``heads.<task>.*``, any set of tasks) and a one-task hard-sharing net (``backbone.*``,
    ``heads.<task>.*``).

    Multitask networks have the same names and shapes in their task columns (Cross-Stitch,
    NDDR-CNN: ``backbones.<task>``; HPS, MTAN: a shared ``backbone``) but were trained jointly;
    they are refused, since copying them would silently change the method."""
    other = [k for k in sd if not k.startswith(("backbones.", "backbone.", "heads.")) and k != TASK_ORDER_KEY]
    if other:
        raise ValueError(f"the source for {task!r} is not a single-task network: it holds tensors a "
                         f"single-task network does not have, e.g. {other[:3]} ({len(other)} in all); pass the "
                         f"state of a single-task model (model 'stl' / 'stl_resnet')")
    head = {k[len(f"heads.{task}."):]: v for k, v in sd.items() if k.startswith(f"heads.{task}.")}
    bb = {k[len(f"backbones.{task}."):]: v for k, v in sd.items() if k.startswith(f"backbones.{task}.")}
    if not bb:
        bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head_tasks = list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("heads.")))
        if bb and len(head_tasks) > 1:
            raise ValueError(f"the source for {task!r} has a shared 'backbone.*' trained with the heads of "
                             f"{len(head_tasks)} tasks {head_tasks} (a hard-sharing multitask network), not "
                             f"a single-task network; pass a single-task model's state (model 'stl' / "
                             f"'stl_resnet', or a one-task 'hps' / 'hps_resnet')")
    if not bb or not head:
        tasks_seen = sorted({k.split(".")[1] for k in sd if k.startswith(("heads.", "backbones."))})
        raise KeyError(f"no single-task network for {task!r} in the source (expected keys "
                       f"'backbones.{task}.*' or 'backbone.*', and 'heads.{task}.*'; tasks present: {tasks_seen})")
    return {**{f"backbone.{k}": v for k, v in bb.items()}, **{f"head.{k}": v for k, v in head.items()}}


@torch.no_grad()
def init_from_single_task(model: nn.Module, sources: Mapping[str, Union[str, os.PathLike, Mapping]]) -> dict:
    """Copy trained single-task networks into a Cross-Stitch / NDDR-CNN model.

    ``sources`` maps each task of ``model`` to a trainer checkpoint path, a state-dict file or a
    state dict of a single-task model (:class:`ctal.models.baselines.SingleTaskNet`, e.g. the
    ``stl_resnet`` run of the protocol; one run may hold all tasks, then give the same path for
    every task). Every tensor of ``backbones.<task>`` and ``heads.<task>`` (BN statistics included)
    is overwritten; a missing tensor, an extra one or a shape mismatch is an error, since a partly
    initialized column would silently train from scratch. The mixing modules keep their
    ``alpha``/``beta`` initialization. Returns ``{task: number of tensors copied}``.
    """
    if not isinstance(model, StitchedResNets):
        raise TypeError(f"single-task initialization applies to Cross-Stitch / NDDR-CNN models "
                        f"(task-specific ResNets), not {type(model).__name__}")
    missing_tasks = [t for t in model.tasks if t not in sources]
    if missing_tasks:
        raise ValueError(f"init_from_single_task: no source for tasks {missing_tasks} "
                         f"(model tasks {model.tasks}, got {sorted(sources)})")
    unknown = [t for t in sources if t not in model.tasks]
    if unknown:
        raise ValueError(f"init_from_single_task: sources for tasks {unknown} the model does not have")
    cache: dict = {}
    report = {}
    for task in model.tasks:
        src = sources[task]
        key = os.fspath(src) if isinstance(src, (str, os.PathLike)) else id(src)
        if key not in cache:
            cache[key] = load_model_state(src)
        tensors = _task_tensors(cache[key], task)
        targets = {**{f"backbone.{k}": v for k, v in model.backbones[task].state_dict().items()},
                   **{f"head.{k}": v for k, v in model.heads[task].state_dict().items()}}
        missing = sorted(set(targets) - set(tensors))
        extra = sorted(set(tensors) - set(targets))
        if missing or extra:
            raise ValueError(f"single-task weights for {task!r} do not fit: missing {missing[:5]}, "
                             f"unexpected {extra[:5]} (same backbone, dilation and number of outputs?)")
        bad = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in targets.items()
               if tuple(tensors[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"single-task weights for {task!r} have other shapes: {bad[:5]}")
        for k, v in targets.items():  # state_dict() tensors share storage with the parameters
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))
        report[task] = len(targets)
    return report


def param_groups(model: nn.Module, base_lr: float, extra_params: Iterable[nn.Parameter] = (),
                 mixing_lr_mult: Optional[float] = None) -> list[dict]:
    """Optimizer parameter groups with the method's learning-rate scheme.

    Models with mixing modules (``mixing_parameters()``: Cross-Stitch units, NDDR layers) get two
    groups: ``{"name": "mixing", "lr": mult * base_lr}`` and ``{"name": "base", "lr": base_lr}``
    (``mult`` = ``mixing_lr_mult`` or the model's own, 100 by default). Other models get one
    ``base`` group. ``extra_params`` (e.g. the loss's uncertainty weights) join the base group.
    Pass the result to any ``torch.optim`` optimizer."""
    extra = list(extra_params)
    if not hasattr(model, "mixing_parameters"):
        return [{"name": "base", "params": list(model.parameters()) + extra, "lr": float(base_lr)}]
    mult = float(mixing_lr_mult if mixing_lr_mult is not None else getattr(model, "mixing_lr_mult", 100.0))
    mixing = list(model.mixing_parameters())
    ids = {id(p) for p in mixing}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"name": "mixing", "params": mixing, "lr": float(base_lr) * mult},
            {"name": "base", "params": rest + extra, "lr": float(base_lr)}]
