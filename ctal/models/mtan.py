"""MTAN, the multi-task attention network (Liu et al., CVPR 2019), on a shared ResNet as the
MTI-Net / "Revisiting MTL" protocol builds it.

A shared (dilated) ResNet; for every stage ``k`` (layer1..layer4) let ``u_k^b`` be the features
before the stage's last residual block and ``u_k^t`` after it. Each task ``t`` has an attention
branch:

    mask_k   = sigmoid(BN(conv1x1(ReLU(BN(conv1x1(in_k))))))       (C_k/4 hidden channels)
    a_k      = mask_k * u_k^t
    in_1     = u_1^b,   in_k = [u_k^b, down(refine_{k-1}(a_{k-1}))]   (k > 1)

where ``refine_k`` is one Bottleneck ``C_k -> C_{k+1}`` (projection shortcut) shared by the tasks,
and ``down`` a 2x2 max-pool where the next stage has half the resolution (only after layer1 for
a dilated ResNet; after layer1..3 for an undilated one). ``a_4`` goes to the task's DeepLab-v3
head. MTAN trains from ImageNet weights (no single-task initialization) with one learning rate.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .blocks import Bottleneck, projection
from .heads import DeepLabHead
from .backbones import ResNetBackbone
from .registry import register_model

__all__ = ["AttentionLayer", "RefinementBlock", "MTAN"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class AttentionLayer(nn.Sequential):
    """Task attention mask: 1x1 conv (bias) + BN + ReLU + 1x1 conv (bias) + BN + sigmoid."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, mid_channels, 1), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
                         nn.Conv2d(mid_channels, out_channels, 1), nn.BatchNorm2d(out_channels), nn.Sigmoid())


class RefinementBlock(nn.Sequential):
    """One torchvision Bottleneck ``in -> out`` (inner width ``out/4``) with a 1x1 + BN shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(Bottleneck(in_channels, out_channels // Bottleneck.expansion,
                                    downsample=projection(in_channels, out_channels)))


@register_model("mtan", backbones=("resnet",),
                description="MTAN: a shared ResNet with per-task attention masks at every stage")
class MTAN(MultiTaskModel):
    """MTAN on ``resnet18`` / ``resnet50`` (``dilated`` by default). ``downsample``
    ({layer1: bool, layer2: bool, layer3: bool}) overrides where the attention path is
    max-pooled; by default it follows the backbone's strides."""

    task_order_sensitive = False  # every task tensor is keyed by task name

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "resnet50", pretrained: bool = False,
                 weights=None, dilated: bool = True, downsample: Optional[Mapping[str, bool]] = None):
        super().__init__(tasks, num_outputs, input_size)
        self.backbone = ResNetBackbone(backbone, dilated=dilated, pretrained=pretrained, weights=weights)
        c = self.backbone.stage_channels
        if downsample is None:  # the stage after layer k runs at half resolution?
            downsample = {"layer1": True, "layer2": not dilated, "layer3": not dilated}
        unknown = set(downsample) - set(_STAGES)
        if unknown:
            raise ValueError(f"downsample keys must be among {_STAGES}, got {sorted(unknown)}")
        if downsample.get("layer4"):
            raise ValueError("downsample['layer4'] cannot be True: nothing follows layer4")
        self.downsample_after = {s: bool(downsample.get(s, False)) for s in _STAGES[:3]}
        self.attention = nn.ModuleList([
            nn.ModuleDict({t: AttentionLayer(c[s] if k == 0 else 2 * c[s], c[s] // 4, c[s]) for t in self.tasks})
            for k, s in enumerate(_STAGES)])
        self.refine = nn.ModuleList([RefinementBlock(c[_STAGES[k]], c[_STAGES[k + 1]]) for k in range(3)])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.heads = nn.ModuleDict({t: DeepLabHead(c["layer4"], self.num_outputs[t]) for t in self.tasks})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        a: Optional[dict] = None
        u = x
        for k, stage in enumerate(_STAGES):
            u_b = self.backbone.forward_stage_except_last_block(u, stage)
            u = self.backbone.forward_stage_last_block(u_b, stage)
            if a is not None and a[self.tasks[0]].shape[-2:] != u_b.shape[-2:]:
                raise ValueError(
                    f"MTAN: attention features {tuple(a[self.tasks[0]].shape[-2:])} do not match the "
                    f"backbone's {stage} grid {tuple(u_b.shape[-2:])}; downsample={self.downsample_after} "
                    f"does not fit this backbone (dilated={self.backbone.dilated})")
            att_in = {t: u_b if a is None else torch.cat((u_b, a[t]), dim=1) for t in self.tasks}
            a = {t: self.attention[k][t](att_in[t]) * u for t in self.tasks}
            if k < 3:
                a = {t: self.refine[k](a[t]) for t in self.tasks}
                if self.downsample_after[stage]:
                    a = {t: self.pool(a[t]) for t in self.tasks}
        final = {t: self.heads[t](a[t]) for t in self.tasks}
        return {"final": self.upsample(final, size), "aux": {}}
