"""Prediction heads.

- :class:`HRNetHead`: the HRNet segmentation head the paper's HRNet baselines use (STL, HPS,
  MTI-Net, M-CTAL's unused default): fuse the four branches at 1/4 (270 channels, 1x1 conv + BN +
  ReLU) then a 1x1 conv to the outputs.
- :class:`BottleneckHead`: 2 torchvision Bottlenecks + 1x1 conv (the CTALNet / PAD-Net / PAP-Net
  final heads on HRNet).
- :class:`DeepLabHead`: torchvision's DeepLab-v3 head (ASPP with rates 12/24/36, 256 channels,
  dropout 0.5 + 3x3 conv + BN + ReLU + 1x1 conv), the head of every Swin model in the paper.

Heads return predictions at their input's resolution; the models upsample to the image size.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from .backbones import HRNET_CHANNELS, HRNetFuse
from .blocks import bottleneck_stack

__all__ = ["HRNetHead", "BottleneckHead", "DeepLabHead", "ASPP", "build_head"]


class HRNetHead(nn.Module):
    """``HRNetFuse`` (upsample + concat 270 ch + 1x1 conv/BN/ReLU) followed by a 1x1 conv."""

    def __init__(self, num_outputs: int, channels: Sequence[int] = HRNET_CHANNELS):
        super().__init__()
        self.fuse = HRNetFuse(channels)
        self.conv_out = nn.Conv2d(self.fuse.channels, num_outputs, 1)

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        return self.conv_out(self.fuse(x))


class BottleneckHead(nn.Sequential):
    """Two Bottlenecks (``in_channels -> channels``, projection shortcut if they differ) and a
    1x1 conv to ``num_outputs``."""

    def __init__(self, in_channels: int, num_outputs: int, channels: int | None = None):
        channels = in_channels if channels is None else channels
        super().__init__(*bottleneck_stack(in_channels, channels), nn.Conv2d(channels, num_outputs, 1))


def build_head(kind: str, in_channels, num_outputs: int) -> nn.Module:
    """``kind``: ``"hrnet"`` (``in_channels`` = the branch channels), ``"bottleneck"`` or
    ``"deeplab"`` (``in_channels`` an int)."""
    if kind == "hrnet":
        return HRNetHead(num_outputs, in_channels)
    if kind == "bottleneck":
        return BottleneckHead(in_channels, num_outputs)
    if kind == "deeplab":
        return DeepLabHead(in_channels, num_outputs)
    raise ValueError(f"unknown head {kind!r}; expected 'hrnet', 'bottleneck' or 'deeplab'")
