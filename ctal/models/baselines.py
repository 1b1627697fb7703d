"""The baselines the CTAL paper compares with, built as its code builds them.

- :class:`SingleTaskNet` (STL): one backbone + one head per task. HRNet: ``HRNetHead`` on the 4
  branches; Swin: DeepLab head on the 1/32 features; (dilated) ResNet-18/50: DeepLab-v3 head on
  ``layer4`` (the registry's ``stl_resnet``, the Multi-Task-Learning-PyTorch single-task
  baselines whose weights ``ctal.models.stitched.init_from_single_task`` copies into
  Cross-Stitch / NDDR-CNN).
- :class:`HardSharingNet` (HPS): one shared backbone, one head per task (heads as STL; on ResNet
  the registry's ``hps_resnet``, the protocol's "multi-task baseline").
- :class:`PADNet`: [HRNet fused at 1/4 | Swin 1/32] -> per task 2 Bottlenecks (256) + initial
  prediction -> multi-modal distillation (each task adds spatially-attended features of every
  other task, ``SABlock``) -> [2 Bottlenecks + 1x1 conv | DeepLab head] on 256 channels.
- :class:`PAPNet`: same start; per task 1x1 conv 256 -> 128 and an affinity matrix of those
  features; each task diffuses its features with a softmax-weighted sum of all tasks' affinities
  (``beta`` = 0.05, 1 iteration); heads on 128 channels.
- :class:`MTINet` (HRNet): initial predictions at 4 scales with FPMs, PAD-Net distillation at every
  scale, per-task ``HRNetHead`` over the 4 distilled scales.

All accept any input size that is a multiple of 32 (no grid-bound parameters).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import HRNET_CHANNELS, HRNetBackbone, HRNetFuse, build_backbone
from .base import MultiTaskModel
from .blocks import FPM, InitialTaskPredictions, SABlock, add_scale_cascade, run_scale_cascade
from .heads import BottleneckHead, DeepLabHead, HRNetHead
from .registry import register_model

__all__ = ["SingleTaskNet", "HardSharingNet", "PADNet", "PAPNet", "MTINet",
           "MultiTaskDistillation", "pap_affinity"]


def _task_head(backbone: nn.Module, num_outputs: int) -> nn.Module:
    if isinstance(backbone, HRNetBackbone):
        return HRNetHead(num_outputs, backbone.channels)
    return DeepLabHead(backbone.channels, num_outputs)


@register_model("stl_resnet", backbones=("resnet",),
                description="single-task networks on a (dilated) ResNet with DeepLab-v3 heads (the protocol's baseline)")
@register_model("stl", backbones=("hrnet", "swin"), paper=True,
                description="single-task networks: one backbone and head per task")
class SingleTaskNet(MultiTaskModel):
    """STL: an independent backbone and head for every task (one network per task, evaluated
    together for convenience; the networks share nothing, so this equals training them
    separately up to the loss weighting). ``aux`` is empty. ``dilated`` (ResNet backbones only,
    default True) chooses output stride 8 or 32."""

    task_order_sensitive = False  # every task tensor is keyed by task name

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "hrnet_w18_small_v2",
                 pretrained: bool = False, weights=None, dilated: Optional[bool] = None):
        super().__init__(tasks, num_outputs, input_size)
        self.backbones = nn.ModuleDict({t: build_backbone(backbone, pretrained, weights, dilated)
                                        for t in self.tasks})
        self.heads = nn.ModuleDict({t: _task_head(self.backbones[t], self.num_outputs[t]) for t in self.tasks})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        final = {t: self.heads[t](self.backbones[t](x)) for t in self.tasks}
        return {"final": self.upsample(final, size), "aux": {}}


@register_model("hps_resnet", backbones=("resnet",),
                description="hard parameter sharing on a (dilated) ResNet with DeepLab-v3 heads")
@register_model("hps", backbones=("hrnet", "swin"), paper=True,
                description="hard parameter sharing: one shared backbone, one head per task")
class HardSharingNet(MultiTaskModel):
    """HPS: shared backbone, task-specific heads. ``aux`` is empty. ``dilated``: as
    :class:`SingleTaskNet`."""

    task_order_sensitive = False  # every task tensor is keyed by task name

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "hrnet_w18_small_v2",
                 pretrained: bool = False, weights=None, dilated: Optional[bool] = None):
        super().__init__(tasks, num_outputs, input_size)
        self.backbone = build_backbone(backbone, pretrained, weights, dilated)
        self.heads = nn.ModuleDict({t: _task_head(self.backbone, self.num_outputs[t]) for t in self.tasks})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats = self.backbone(x)
        final = {t: self.heads[t](feats) for t in self.tasks}
        return {"final": self.upsample(final, size), "aux": {}}


def _single_scale_backbone(name: str, pretrained: bool, weights):
    """HRNet + fuse (1/4, 270 ch) or Swin (1/32); returns (module, channels, is_swin)."""
    bb = build_backbone(name, pretrained, weights)
    if isinstance(bb, HRNetBackbone):
        fuse = HRNetFuse(bb.channels)
        return nn.Sequential(bb, fuse), fuse.channels, False
    return bb, bb.channels, True


class MultiTaskDistillation(nn.Module):
    """PAD-Net distillation: ``out_t = x_t + sum_{a != t} SA_{t<-a}(x_a)`` with one spatial
    attention block per ordered task pair."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.self_attention = nn.ModuleDict({t: nn.ModuleDict(
            {a: SABlock(channels, channels) for a in self.tasks if a != t}) for t in self.tasks})

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            y = x[t]
            for a in self.tasks:
                if a != t:
                    y = y + self.self_attention[t][a](x[a])
            out[t] = y
        return out


@register_model("padnet", backbones=("hrnet", "swin"), paper=True,
                description="PAD-Net: initial predictions and multi-modal distillation between the tasks")
class PADNet(MultiTaskModel):
    """PAD-Net (Xu et al. 2018) as the CTAL paper builds it; ``aux["initial"]`` are the initial
    predictions."""

    task_order_sensitive = False  # every task tensor is keyed by task name (distillation by task pair)

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "hrnet_w18_small_v2",
                 pretrained: bool = False, weights=None, channels: int = 256):
        super().__init__(tasks, num_outputs, input_size)
        self.backbone, in_channels, swin = _single_scale_backbone(backbone, pretrained, weights)
        self.initial = InitialTaskPredictions(self.tasks, self.num_outputs, in_channels, channels)
        self.distillation = MultiTaskDistillation(self.tasks, channels)
        head = DeepLabHead if swin else BottleneckHead
        self.heads = nn.ModuleDict({t: head(channels, self.num_outputs[t]) for t in self.tasks})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats, initial = self.initial(self.backbone(x))
        feats = self.distillation(feats)
        final = {t: self.heads[t](feats[t]) for t in self.tasks}
        return {"final": self.upsample(final, size), "aux": {"initial": self.upsample(initial, size)}}


def pap_affinity(features: Tensor, normalize: str = "channel") -> Tensor:
    """PAP-Net affinity of ``(B, C, H, W)`` features: ``A = n^T n`` ``(B, N, N)``, then each entry
    divided by the sum of its column (``A[i, j] / sum_i A[i, j]``, as in the paper's code).

    ``normalize="channel"``: ``n`` = features L2-normalized per pixel over channels (cosine
    affinity, what PAP-Net describes). ``"spatial"``: normalized per channel over pixels, which is
    what the CTAL paper's baseline code computes (``F.normalize`` on the ``(B, N, C)`` view with
    ``dim=1``); use it to reproduce that baseline exactly.
    """
    B, C, H, W = features.shape
    f = features.reshape(B, C, H * W)
    if normalize == "channel":
        n = F.normalize(f, dim=1)
    elif normalize == "spatial":
        n = F.normalize(f, dim=2)
    else:
        raise ValueError(f"normalize must be 'channel' or 'spatial', got {normalize!r}")
    a = torch.bmm(n.transpose(1, 2), n)
    return a / a.sum(dim=1, keepdim=True)


@register_model("papnet", backbones=("hrnet", "swin"), paper=True,
                description="PAP-Net: task-specific pixel affinities mixed across tasks and diffused")
class PAPNet(MultiTaskModel):
    """PAP-Net (Zhang et al. 2019) as the CTAL paper builds it.

    Per task: 1x1 conv 256 -> 128 features ``f_t`` and their affinity ``A_t`` (:func:`pap_affinity`).
    Task ``t`` mixes all affinities with ``softmax(w_t)`` (``w_t`` a learned ``T``-vector, initialised
    uniform) and diffuses ``num_iters`` times: ``y <- beta * A y + (1 - beta) * f_t``.
    Quadratic in ``N`` (it materializes ``T`` affinity matrices), like the original.
    """

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "hrnet_w18_small_v2",
                 pretrained: bool = False, weights=None, beta: float = 0.05, num_iters: int = 1,
                 affinity_normalize: str = "channel", channels: int = 256):
        super().__init__(tasks, num_outputs, input_size)
        if num_iters < 1:
            raise ValueError(f"num_iters must be >= 1, got {num_iters}")
        pap_affinity(torch.ones(1, 1, 1, 1), affinity_normalize)  # validates the option
        self.beta, self.num_iters, self.affinity_normalize = float(beta), int(num_iters), affinity_normalize
        self.backbone, in_channels, swin = _single_scale_backbone(backbone, pretrained, weights)
        self.initial = InitialTaskPredictions(self.tasks, self.num_outputs, in_channels, channels)
        self.conv = nn.ModuleDict({t: nn.Conv2d(channels, channels // 2, 1) for t in self.tasks})
        T = len(self.tasks)
        self.task_weights = nn.ParameterDict({t: nn.Parameter(torch.full((T,), 1.0 / T)) for t in self.tasks})
        head = DeepLabHead if swin else BottleneckHead
        self.heads = nn.ModuleDict({t: head(channels // 2, self.num_outputs[t]) for t in self.tasks})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats, initial = self.initial(self.backbone(x))
        f = {t: self.conv[t](feats[t]) for t in self.tasks}
        A = torch.stack([pap_affinity(f[t], self.affinity_normalize) for t in self.tasks], dim=1)
        final = {}
        for t in self.tasks:
            w = F.softmax(self.task_weights[t], dim=0)
            joint = torch.einsum("k,bkij->bij", w, A)
            B, C, H, W = f[t].shape
            f0 = f[t].reshape(B, C, H * W).transpose(1, 2)  # [B, N, C]
            y = f0
            for _ in range(self.num_iters):
                y = self.beta * torch.bmm(joint, y) + (1 - self.beta) * f0
            final[t] = self.heads[t](y.transpose(1, 2).reshape(B, C, H, W))
        return {"final": self.upsample(final, size), "aux": {"initial": self.upsample(initial, size)}}


@register_model("mti_net", backbones=("hrnet",), paper=True, multi_scale=True,
                description="MTI-Net: initial predictions at 4 scales with FPMs, distillation per scale")
class MTINet(MultiTaskModel):
    """MTI-Net (Vandenhende et al. 2020) on HRNet: initial predictions at 4 scales (coarse to fine,
    FPMs between them), PAD-Net distillation per scale, per-task ``HRNetHead`` over the 4 scales.
    ``aux["scale_k"]`` are the per-scale initial predictions (the loss averages the 4)."""

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "hrnet_w18_small_v2",
                 pretrained: bool = False, weights=None):
        super().__init__(tasks, num_outputs, input_size)
        bb = build_backbone(backbone, pretrained, weights)
        if not isinstance(bb, HRNetBackbone):
            raise ValueError(f"MTI-Net needs the multi-scale HRNet backbone, got {backbone!r}")
        self.backbone = bb
        c = list(HRNET_CHANNELS)
        T, out = self.tasks, self.num_outputs
        add_scale_cascade(self, c, lambda ch: FPM(T, ch))
        self.distillation = nn.ModuleList([MultiTaskDistillation(T, ch) for ch in c])
        self.heads = nn.ModuleDict({t: HRNetHead(out[t], c) for t in T})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats, preds = run_scale_cascade(self, self.backbone(x))
        distilled = [d(f) for d, f in zip(self.distillation, feats)]
        final = {t: self.heads[t]([d[t] for d in distilled]) for t in self.tasks}
        aux = {f"scale_{i}": self.upsample(p, size) for i, p in enumerate(preds)}
        return {"final": self.upsample(final, size), "aux": aux}
