"""Cross-Stitch networks (Misra et al., CVPR 2016) on ResNet, as the MTI-Net / "Revisiting MTL"
protocol builds them.

One (dilated) ResNet + DeepLab-v3 head per task, i.e. the single-task networks, "stitched" after
every stage (layer1..layer4, layer1 including the stem) by a cross-stitch unit:

    x_i <- sum_j  a_ij * x_j          (a_ij a per-channel vector, i.e. C numbers per task pair)

initialized to ``a_ii = alpha`` and ``a_ij = beta`` (i != j). The method starts from *trained*
single-task networks (``single_task_weights``, see :mod:`ctal.models.seed_systems`) and trains
the stitch units with a 100x larger learning rate (:meth:`StitchedResNets.optimizer_param_groups`,
which the trainer uses).
Published settings: NYUD-MT / ResNet-50: alpha 0.9, beta 0.1; PASCAL / ResNet-18: alpha 0.8,
beta 0.05.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .heads import DeepLabHead
from .backbones import RESNET_STAGES, ResNetBackbone

__all__ = ["CrossStitchUnit", "CrossStitchNet", "StitchedResNets"]


class CrossStitchUnit(nn.Module):
    """Per-channel linear mixing of ``T`` task features: ``weight`` has shape ``(T, T, C)`` and
    ``out_i[:, c] = sum_j weight[i, j, c] * x_j[:, c]`` (``T*T*C`` parameters, as in the
    original: one channel-wise multiplier per ordered task pair)."""

    def __init__(self, tasks: Sequence[str], channels: int, alpha: float, beta: float):
        super().__init__()
        self.tasks = list(tasks)
        T = len(self.tasks)
        init = torch.full((T, T, channels), float(beta))
        init[torch.arange(T), torch.arange(T)] = float(alpha)
        self.weight = nn.Parameter(init)

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        stacked = torch.stack([x[t] for t in self.tasks], dim=0)  # [T, B, C, H, W]
        mixed = torch.einsum("ijc,jbchw->ibchw", self.weight, stacked)
        return {t: mixed[i] for i, t in enumerate(self.tasks)}


class StitchedResNets(MultiTaskModel):
    """Task-specific ResNets + DeepLab heads, run stage by stage with a fusion module after the
    stages in ``fuse_stages`` (the shared skeleton of Cross-Stitch and NDDR-CNN). Parameter names
    ``backbones.<task>.*`` / ``heads.<task>.*`` are those of
    :class:`ctal.models.baselines.SingleTaskNet` on the same ResNet (``stl_resnet``), so trained
    single-task weights copy 1:1."""

    mixing_prefix = ""  # subclasses: the attribute holding the fusion modules

    def __init__(self, tasks, num_outputs, input_size, backbone: str, pretrained: bool, weights,
                 dilated: bool, stages: Sequence[str]):
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
        self.backbones = nn.ModuleDict({t: ResNetBackbone(backbone, dilated=dilated, pretrained=pretrained,
                                                          weights=weights) for t in self.tasks})
        first = self.backbones[self.tasks[0]]
        self.stage_channels = first.stage_channels
        self.heads = nn.ModuleDict({t: DeepLabHead(first.channels, self.num_outputs[t]) for t in self.tasks})

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
        :func:`ctal.models.seed_systems.param_groups`. The trainer builds its optimizer from these
        when a model has this method."""
        from .seed_systems import param_groups
        return param_groups(self, base_lr)


class CrossStitchNet(StitchedResNets):
    """Cross-Stitch network. Args: ``backbone`` (``resnet18`` / ``resnet50``), ``dilated``,
    ``alpha`` / ``beta`` (unit initialization), ``stages`` (where the units go; the protocol's
    ``layer1..layer4``), ``single_task_weights`` ({task: STL checkpoint / state dict}: copy trained
    single-task networks in, as the method prescribes), ``mixing_lr_mult`` (100: the learning-rate
    multiplier of the units, used by :meth:`optimizer_param_groups`)."""

    mixing_prefix = "cross_stitch"

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "resnet50", pretrained: bool = False,
                 weights=None, dilated: bool = True, alpha: float = 0.9, beta: float = 0.1,
                 stages: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
                 single_task_weights: Optional[Mapping] = None, mixing_lr_mult: float = 100.0):
        if "conv" in stages or "layer1_without_conv" in stages:
            raise ValueError("cross-stitch stages are layer1..layer4 (layer1 includes the stem)")
        super().__init__(tasks, num_outputs, input_size, backbone, pretrained, weights, dilated, stages)
        self.alpha, self.beta, self.mixing_lr_mult = float(alpha), float(beta), float(mixing_lr_mult)
        self.cross_stitch = nn.ModuleDict({s: CrossStitchUnit(self.tasks, self.stage_channels[s], alpha, beta)
                                           for s in self.stages})
        if single_task_weights:
            from .seed_systems import init_from_single_task
            init_from_single_task(self, single_task_weights)

    def fuse(self, stage, x):
        return self.cross_stitch[stage](x)
