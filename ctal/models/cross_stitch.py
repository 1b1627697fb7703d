"""Cross-Stitch networks (Misra et al., CVPR 2016) on ResNet, as the MTI-Net / "Revisiting MTL"
protocol builds them.

One (dilated) ResNet + DeepLab-v3 head per task, i.e. the single-task networks, "stitched" after
every stage (layer1..layer4, layer1 including the stem) by a cross-stitch unit:

    x_i <- sum_j  a_ij * x_j          (a_ij a per-channel vector, i.e. C numbers per task pair)

initialized to ``a_ii = alpha`` and ``a_ij = beta`` (i != j). The method starts from *trained*
single-task networks (``single_task_weights``, see :mod:`ctal.models.stitched`) and trains
the stitch units with a 100x larger learning rate (:meth:`StitchedResNets.optimizer_param_groups`,
which the trainer uses).
Published settings: NYUD-MT / ResNet-50: alpha 0.9, beta 0.1; PASCAL / ResNet-18: alpha 0.8,
beta 0.05.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .registry import register_model
from .stitched import StitchedResNets

__all__ = ["CrossStitchUnit", "CrossStitchNet"]


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


@register_model("cross_stitch", backbones=("resnet",),
                description="Cross-Stitch: single-task ResNets mixed by cross-stitch units after every stage")
class CrossStitchNet(StitchedResNets):
    """Cross-Stitch network. Args: ``backbone`` (``resnet18`` / ``resnet50``), ``dilated``,
    ``alpha`` / ``beta`` (unit initialization), ``stages`` (where the units go; the protocol's
    ``layer1..layer4``), ``single_task_weights`` ({task: a single-task model's state dict}: copy
    trained single-task networks in, as the method prescribes; see
    :func:`ctal.models.stitched.init_from_single_task`), ``mixing_lr_mult`` (100: the
    learning-rate multiplier of the units, used by :meth:`optimizer_param_groups`)."""

    mixing_prefix = "cross_stitch"

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "resnet50", pretrained: bool = False,
                 weights=None, dilated: bool = True, alpha: float = 0.9, beta: float = 0.1,
                 stages: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
                 single_task_weights: Optional[Mapping] = None, mixing_lr_mult: float = 100.0):
        if "conv" in stages or "layer1_without_conv" in stages:
            raise ValueError("cross-stitch stages are layer1..layer4 (layer1 includes the stem)")
        super().__init__(tasks, num_outputs, input_size, backbone, pretrained, weights, dilated, stages,
                         single_task_weights)
        self.alpha, self.beta, self.mixing_lr_mult = float(alpha), float(beta), float(mixing_lr_mult)
        self.cross_stitch = nn.ModuleDict({s: CrossStitchUnit(self.tasks, self.stage_channels[s], alpha, beta)
                                           for s in self.stages})

    def fuse(self, stage, x):
        return self.cross_stitch[stage](x)
