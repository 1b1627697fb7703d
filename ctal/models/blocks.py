"""Building blocks shared by the CTAL nets and the baselines.

The residual blocks are torchvision's own ``Bottleneck`` (1x1 -> 3x3 -> 1x1, expansion 4) and
``BasicBlock`` (3x3 -> 3x3): bias-free convolutions followed by BatchNorm, exactly the blocks the
paper's code uses. The helpers here only decide *when* a block needs a projection shortcut.

Also here: the squeeze-and-excitation and spatial-attention blocks (PAD-Net, MTI-Net), and the
two MTI-Net pieces reused by M-CTALNet (per-scale initial predictions and the feature propagation
module, FPM).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["Bottleneck", "BasicBlock", "projection", "bottleneck_stack", "basic_stack", "SEBlock",
           "SABlock", "ScaleInitialPrediction", "FPM", "InitialTaskPredictions",
           "add_scale_cascade", "run_scale_cascade"]


def projection(in_channels: int, out_channels: int) -> Optional[nn.Sequential]:
    """1x1 conv (no bias) + BN shortcut when the channel count changes, else ``None`` (identity)."""
    if in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels))


def bottleneck_stack(in_channels: int, out_channels: int, blocks: int = 2) -> nn.Sequential:
    """``blocks`` torchvision Bottlenecks mapping ``in_channels -> out_channels`` (inner width
    ``out_channels // 4``); the first one gets a projection shortcut if the width changes."""
    if out_channels % Bottleneck.expansion:
        raise ValueError(f"out_channels must be a multiple of {Bottleneck.expansion}, got {out_channels}")
    planes = out_channels // Bottleneck.expansion
    layers = [Bottleneck(in_channels, planes, downsample=projection(in_channels, out_channels))]
    layers += [Bottleneck(out_channels, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def basic_stack(in_channels: int, out_channels: int, blocks: int = 2) -> nn.Sequential:
    """``blocks`` torchvision BasicBlocks ``in_channels -> out_channels`` (projection if needed)."""
    layers = [BasicBlock(in_channels, out_channels, downsample=projection(in_channels, out_channels))]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: channel gates from global average pooling through a
    ``C -> C/r -> C`` MLP (ReLU, sigmoid), reduction ``r = 16`` as in MTI-Net."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(f"channels ({channels}) must be >= reduction ({reduction})")
        self.squeeze = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                     nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        gate = self.squeeze(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class SABlock(nn.Module):
    """Spatial attention (PAD-Net's distillation unit): ``conv3x3(x) * sigmoid(conv3x3'(x))``,
    both convolutions bias-free."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                                       nn.Sigmoid())
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * self.attention(x)


class ScaleInitialPrediction(nn.Module):
    """MTI-Net initial prediction at one scale: per task, the backbone features (concatenated with
    the 2x-upsampled task features propagated from the coarser scale, when there is one) go
    through 2 BasicBlocks to ``task_channels`` and a 1x1 conv to the task's outputs."""

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], in_channels: int,
                 task_channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.refinement = nn.ModuleDict({t: basic_stack(in_channels, task_channels) for t in self.tasks})
        self.decoders = nn.ModuleDict({t: nn.Conv2d(task_channels, num_outputs[t], 1) for t in self.tasks})

    def forward(self, features: Tensor, propagated: Optional[Mapping[str, Tensor]] = None):
        """Returns ``(task features, task predictions)`` at this scale."""
        feats, preds = {}, {}
        for t in self.tasks:
            x = features
            if propagated is not None:
                up = F.interpolate(propagated[t], size=features.shape[-2:], mode="bilinear",
                                   align_corners=False)
                x = torch.cat((features, up), dim=1)
            feats[t] = self.refinement[t](x)
            preds[t] = self.decoders[t](feats[t])
        return feats, preds


class FPM(nn.Module):
    """MTI-Net feature propagation module.

    The ``T`` task features are concatenated (``T*C`` channels) and passed through a bottlenecked
    non-linearity (2 BasicBlocks at ``T*C/4`` + 1x1 conv back to ``T*C``) whose output, viewed as
    ``(C, T)`` per pixel, is soft-maxed over tasks: a per-channel task-attention mask. The masked
    concatenation is reduced to ``C`` channels by one BasicBlock, and each task adds its own SE-gated
    copy of that shared representation to its features.
    """

    def __init__(self, tasks: Sequence[str], per_task_channels: int):
        super().__init__()
        self.tasks = list(tasks)
        T, C = len(self.tasks), per_task_channels
        shared = T * C
        self.non_linear = nn.Sequential(*basic_stack(shared, shared // 4),
                                        nn.Conv2d(shared // 4, shared, 1))
        self.dimensionality_reduction = BasicBlock(shared, C, downsample=projection(shared, C))
        self.se = nn.ModuleDict({t: SEBlock(C) for t in self.tasks})

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        T = len(self.tasks)
        concat = torch.cat([features[t] for t in self.tasks], dim=1)
        B, TC, H, W = concat.shape
        # As in MTI-Net: the task-major concatenation is viewed as (B, C, T, H, W), so the softmax
        # runs over T *consecutive* channels of the stack (not over the same channel of the T
        # tasks). Reproduced as-is: it is what the published numbers were trained with.
        mask = F.softmax(self.non_linear(concat).view(B, TC // T, T, H, W), dim=2)
        shared = (mask * concat.view(B, TC // T, T, H, W)).view(B, TC, H, W)
        shared = self.dimensionality_reduction(shared)
        return {t: self.se[t](shared) + features[t] for t in self.tasks}


class InitialTaskPredictions(nn.Module):
    """Per task: 2 Bottlenecks ``in_channels -> channels`` (projection shortcut 1x1 + BN when the
    width changes, e.g. 270 -> 256) give the task features, a 1x1 conv gives the initial
    prediction (the deep-supervision target of CTALNet, PAD-Net and PAP-Net)."""

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], in_channels: int,
                 channels: int = 256):
        super().__init__()
        self.tasks = list(tasks)
        self.channels = channels
        self.layers = nn.ModuleDict({t: bottleneck_stack(in_channels, channels) for t in self.tasks})
        self.conv_out = nn.ModuleDict({t: nn.Conv2d(channels, num_outputs[t], 1) for t in self.tasks})

    def forward(self, x: Tensor):
        """Returns ``(task features, task predictions)`` at the input's resolution."""
        feats = {t: self.layers[t](x) for t in self.tasks}
        return feats, {t: self.conv_out[t](feats[t]) for t in self.tasks}


def add_scale_cascade(model: nn.Module, channels: Sequence[int], make_fpm) -> None:
    """Register MTI-Net's coarse-to-fine stack of initial predictions on ``model`` (which has
    ``tasks`` and ``num_outputs``): ``fpm_scale_{3,2,1}`` = ``make_fpm(channels[k])`` and
    ``scale_{0..3}``, where scale ``k`` sees its backbone features plus the propagated task features
    of scale ``k + 1``. The attribute names and their order are the published checkpoints' (MTI-Net,
    M-CTALNet, SCA), so they are set on the model itself rather than on a sub-module."""
    c = list(channels)
    if len(c) != 4:
        raise ValueError(f"the scale cascade needs 4 scales, got channels {c}")
    for k in (3, 2, 1):
        setattr(model, f"fpm_scale_{k}", make_fpm(c[k]))
    for k in range(4):
        in_channels = c[k] + (c[k + 1] if k < 3 else 0)
        setattr(model, f"scale_{k}",
                ScaleInitialPrediction(model.tasks, model.num_outputs, in_channels, c[k]))


def run_scale_cascade(model: nn.Module, features: Sequence[Tensor], refine=None):
    """Run the stack built by :func:`add_scale_cascade`, coarsest scale first, on the 4 backbone
    feature maps. ``refine`` (optional, one module per scale) transforms each scale's task
    features before they are propagated and returned (SCA's cross-task attention). Returns
    ``(task features, task predictions)``: two lists indexed by scale (0 = finest)."""
    feats, preds = [None] * 4, [None] * 4
    propagated = None
    for k in (3, 2, 1, 0):
        f, preds[k] = getattr(model, f"scale_{k}")(features[k], propagated)
        feats[k] = refine[k](f) if refine is not None else f
        if k:
            propagated = getattr(model, f"fpm_scale_{k}")(feats[k])
    return feats, preds
