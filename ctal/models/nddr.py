"""NDDR-CNN (Gao et al., CVPR 2019) on ResNet, as the MTI-Net / "Revisiting MTL" protocol builds it.

One (dilated) ResNet + DeepLab-v3 head per task, fused after every stage (the stem ``conv``,
``layer1_without_conv``, ``layer2``, ``layer3``, ``layer4``) by an NDDR layer: for each task, the
concatenation of all ``T`` task features (``T*C`` channels, in task order) goes through a bias-free
1x1 conv to ``C`` channels, BatchNorm (momentum 0.05, as NDDR-CNN's code) and ReLU. The 1x1 conv
is initialized to ``alpha * I`` on the task's own block and ``beta * I`` on the others (BN weight
1, bias 0), so at initialization the layer is ``ReLU(BN(alpha x_t + beta sum_{s!=t} x_s))``.
Like Cross-Stitch it starts from trained single-task networks and trains the NDDR layers (conv
and BN) with a 100x larger learning rate. Published settings: alpha 0.9 / beta 0.1 (NYUD-MT,
ResNet-50), 0.8 / 0.05 (PASCAL, ResNet-18).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .registry import register_model
from .stitched import StitchedResNets

__all__ = ["NDDRLayer", "NDDRNet"]


class NDDRLayer(nn.Module):
    """Neural discriminative dimensionality reduction across ``tasks`` at one stage."""

    def __init__(self, tasks: Sequence[str], channels: int, alpha: float, beta: float, bn_momentum: float = 0.05):
        super().__init__()
        self.tasks = list(tasks)
        T, C = len(self.tasks), channels
        self.layer = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(T * C, C, 1, bias=False),
                                                     nn.BatchNorm2d(C, momentum=bn_momentum), nn.ReLU())
                                    for t in self.tasks})
        eye = torch.eye(C)
        with torch.no_grad():
            for i, t in enumerate(self.tasks):
                w = torch.cat([eye * (alpha if j == i else beta) for j in range(T)], dim=1)  # [C, T*C]
                self.layer[t][0].weight.copy_(w[:, :, None, None])
                self.layer[t][1].weight.fill_(1.0)
                self.layer[t][1].bias.fill_(0.0)

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cat = torch.cat([x[t] for t in self.tasks], dim=1)  # task order fixed by self.tasks
        return {t: self.layer[t](cat) for t in self.tasks}


@register_model("nddr_cnn", backbones=("resnet",),
                description="NDDR-CNN: single-task ResNets fused by NDDR layers (1x1 conv + BN) after every stage")
class NDDRNet(StitchedResNets):
    """NDDR-CNN. Args as :class:`ctal.models.cross_stitch.CrossStitchNet`, with ``stages`` (all
    stages run; default the protocol's ``conv, layer1_without_conv, layer2, layer3, layer4``) and
    ``nddr_stages`` (where NDDR layers go; default all of them)."""

    mixing_prefix = "nddr"

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "resnet50", pretrained: bool = False,
                 weights=None, dilated: bool = True, alpha: float = 0.9, beta: float = 0.1,
                 stages: Sequence[str] = ("conv", "layer1_without_conv", "layer2", "layer3", "layer4"),
                 nddr_stages: Optional[Sequence[str]] = None, bn_momentum: float = 0.05,
                 single_task_weights: Optional[Mapping] = None, mixing_lr_mult: float = 100.0):
        if "layer1" in stages:
            raise ValueError("NDDR-CNN runs the stem ('conv') and 'layer1_without_conv' separately; "
                             "use those instead of 'layer1'")
        super().__init__(tasks, num_outputs, input_size, backbone, pretrained, weights, dilated, stages,
                         single_task_weights)
        nddr_stages = list(self.stages if nddr_stages is None else nddr_stages)
        bad = [s for s in nddr_stages if s not in self.stages]
        if bad:
            raise ValueError(f"nddr_stages {bad} are not among the stages {self.stages}")
        self.alpha, self.beta, self.mixing_lr_mult = float(alpha), float(beta), float(mixing_lr_mult)
        self.nddr = nn.ModuleDict({s: NDDRLayer(self.tasks, self.stage_channels[s], alpha, beta, bn_momentum)
                                   for s in nddr_stages})

    def fuse(self, stage, x):
        return self.nddr[stage](x) if stage in self.nddr else x
