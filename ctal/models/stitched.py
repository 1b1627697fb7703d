"""Stitched single-task ResNets: the shared skeleton of Cross-Stitch and NDDR-CNN, and the parts of
their training recipe that are not plain layers.

- :class:`StitchedResNets`: one (dilated) ResNet + DeepLab-v3 head per task, run stage by stage
  with a fusion module between the task columns (``ctal.models.cross_stitch``,
  ``ctal.models.nddr``).
- :func:`init_from_single_task`: both methods start from trained single-task networks; this
  copies each task's backbone + head from a single-task model's state dict into the task's
  column, checking that every tensor is covered and fits. The models take state dicts, never
  paths: a checkpoint file is read by ``ctal.engine.checkpoint.load_model_state`` (the trainer
  does this for ``model.single_task_weights``).
- :func:`param_groups`: optimizer groups with the methods' learning-rate scheme: the mixing
  parameters (cross-stitch units; NDDR layers including their BN) at ``mixing_lr_mult`` (100) x
  the base rate, everything else at the base rate (what the models' ``optimizer_param_groups``
  return, and the trainer uses). Per-group rates survive the engine's schedulers (they scale each
  group's initial rate). Note: the protocol's published code builds these two groups but its
  per-epoch ``adjust_learning_rate`` then sets *every* group to the base rate from the first
  epoch on, so the 100x never takes effect there; ``mixing_lr_mult: 1.0`` reproduces that
  behaviour.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import TASK_ORDER_KEY, state_dict_in
from .backbones import RESNET_STAGES, ResNetBackbone
from .base import MultiTaskModel
from .heads import DeepLabHead

__all__ = ["StitchedResNets", "init_from_single_task", "param_groups"]


class StitchedResNets(MultiTaskModel):
    """Task-specific ResNets + DeepLab heads, run stage by stage through ``stages``, with the
    subclass's :meth:`fuse` after each stage. Parameter names ``backbones.<task>.*`` /
    ``heads.<task>.*`` are those of :class:`ctal.models.baselines.SingleTaskNet` on the same
    ResNet (``stl_resnet``), so trained single-task weights copy 1:1; ``single_task_weights``
    ({task: state dict}) copies them in (:func:`init_from_single_task`)."""

    mixing_prefix = ""  # subclasses: the attribute holding the fusion modules

    def __init__(self, tasks, num_outputs, input_size, backbone: str, pretrained: bool, weights,
                 dilated: bool, stages: Sequence[str], single_task_weights: Optional[Mapping] = None):
        super().__init__(tasks, num_outputs, input_size)
        if len(self.tasks) < 2:
            raise ValueError(f"{type(self).__name__} mixes features between tasks and needs >= 2 tasks, "
                             f"got {self.tasks}")
        self.stages = list(stages)
        bad = [s for s in self.stages if s not in RESNET_STAGES]
        if bad:
            raise ValueError(f"unknown stages {bad}; expected names from {RESNET_STAGES}")
        if self.stages[-1] != "layer4":
            raise ValueError(f"stages must run the whole ResNet (end with 'layer4'), got {self.stages}")
        # Checked before the networks are built, so that a bad source fails fast.
        states = _single_task_states(single_task_weights, self.tasks) if single_task_weights else None
        self.backbones = nn.ModuleDict({t: ResNetBackbone(backbone, dilated=dilated, pretrained=pretrained,
                                                          weights=weights) for t in self.tasks})
        first = self.backbones[self.tasks[0]]
        self.stage_channels = first.stage_channels
        self.heads = nn.ModuleDict({t: DeepLabHead(first.channels, self.num_outputs[t]) for t in self.tasks})
        if states:  # the fusion modules the subclass adds next keep their alpha / beta initialization
            _copy_single_task(self, states)

    def fuse(self, stage: str, x: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> dict:
        size = self.check_input(images)
        x = {t: images for t in self.tasks}
        for stage in self.stages:
            x = {t: self.backbones[t].forward_stage(x[t], stage) for t in self.tasks}
            x = self.fuse(stage, x)
        final = {t: self.heads[t](x[t]) for t in self.tasks}
        return {"final": self.upsample(final, size), "aux": {}}

    def mixing_parameters(self):
        """The parameters the method trains with its larger learning rate."""
        return list(getattr(self, self.mixing_prefix).parameters())

    def optimizer_param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer groups of the method's learning-rate scheme: ``mixing`` (the fusion modules,
        ``mixing_lr_mult`` x ``base_lr``) and ``base`` (everything else, ``base_lr``); see
        :func:`param_groups`. The trainer builds its optimizer from these when a model has this
        method."""
        return param_groups(self, base_lr)


# ------------------------------------------------------------------------------------------------
def _model_state(source, task: str) -> dict:
    """The state dict in ``source`` (a state dict, or a trainer-checkpoint dict holding it under
    ``"model"``), without a ``module.`` (DDP) prefix."""
    if isinstance(source, (str, bytes, os.PathLike)):
        raise TypeError(
            f"single_task_weights[{task!r}] is a path ({os.fsdecode(source)!r}); the models take state "
            f"dicts, not files. Load it with ctal.engine.checkpoint.load_model_state(path) and pass the "
            f"result, or set model.single_task_weights in the training config, where the trainer loads it")
    return state_dict_in(source, f"single_task_weights[{task!r}]")


def _single_task_states(sources, tasks: Sequence[str]) -> dict[str, dict]:
    """``{task: state dict}`` for every task of the model, from ``sources`` (see
    :func:`init_from_single_task`), or a clear error."""
    if not isinstance(sources, Mapping) or isinstance(sources, (str, bytes, os.PathLike)):
        hint = (" (one file per task: read each with ctal.engine.checkpoint.load_model_state)"
                if isinstance(sources, (str, bytes, os.PathLike)) else "")
        raise TypeError(f"single_task_weights must map each task to a single-task model's state dict, "
                        f"got {type(sources).__name__}{hint}")
    missing_tasks = [t for t in tasks if t not in sources]
    if missing_tasks:
        raise ValueError(f"single_task_weights: no source for tasks {missing_tasks} "
                         f"(model tasks {list(tasks)}, got {sorted(sources)})")
    unknown = [t for t in sources if t not in tasks]
    if unknown:
        raise ValueError(f"single_task_weights: sources for tasks {unknown} the model does not have")
    states: dict = {}
    by_source: dict = {}  # one model's state may serve several tasks: normalize it once
    for task in tasks:
        src = sources[task]
        if id(src) not in by_source:
            by_source[id(src)] = _model_state(src, task)
        states[task] = by_source[id(src)]
    return states


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
def _copy_single_task(model: StitchedResNets, states: Mapping[str, Mapping]) -> dict:
    report = {}
    for task in model.tasks:
        tensors = _task_tensors(states[task], task)
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


def init_from_single_task(model: nn.Module, sources: Mapping[str, Mapping]) -> dict:
    """Copy trained single-task networks into a Cross-Stitch / NDDR-CNN model (what their
    ``single_task_weights`` argument does).

    ``sources`` maps each task of ``model`` to the state dict of a single-task model
    (:class:`ctal.models.baselines.SingleTaskNet`, e.g. the ``stl_resnet`` run of the protocol),
    or to a trainer checkpoint dict holding it under ``"model"``; one model may hold all tasks,
    then give the same state for every task. A path is a TypeError: read the file with
    ``ctal.engine.checkpoint.load_model_state``. Every tensor of ``backbones.<task>`` and
    ``heads.<task>`` (BN statistics included) is overwritten; a missing tensor, an extra one or a
    shape mismatch is an error, since a partly initialized column would silently train from
    scratch. The mixing modules keep their ``alpha``/``beta`` initialization. Returns
    ``{task: number of tensors copied}``.
    """
    if not isinstance(model, StitchedResNets):
        raise TypeError(f"single-task initialization applies to Cross-Stitch / NDDR-CNN models "
                        f"(task-specific ResNets), not {type(model).__name__}")
    return _copy_single_task(model, _single_task_states(sources, model.tasks))


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
