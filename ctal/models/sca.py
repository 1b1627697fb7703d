"""SCA: sequential cross attention for multitask learning (Kim, Choi & Min, ICIP 2022) on the
MTI-Net structure with HRNet-W18-small-v2, as its public code (kimsunkyung/SCA_MTL) computes it.

Pipeline (``c = (18, 36, 72, 144)`` HRNet branch channels, ``c' = 2c = (36, 72, 144, 288)``):

1. **Self-attention in the feature extractor.** Each HRNet branch ``x_k`` goes through a window
   self-attention encoder (1x1 "patch" embedding + LayerNorm, 2 Swin-v1 attention blocks (no MLP,
   as published) with 6 heads, window 7, alternately shifted, stochastic depth 0 -> 0.2, final
   LayerNorm); the encoder output is
   concatenated with the branch: ``x_k' = [enc_k(x_k), x_k]`` with ``c'_k = 2 c_k`` channels.
2. **Initial task predictions, coarse to fine** (MTI-Net): scale 3 from ``x_3'``; scale ``k < 3``
   from ``[x_k', up(fpm_{k+1})]`` (``c'_k + c'_{k+1}`` channels) -> 2 BasicBlocks to ``c'_k``
   task features + 1x1 conv predictions (deep supervision, ``aux["scale_k"]``).
3. **Cross-task attention (CTAM)** at every scale, right after the initial prediction: for task
   ``t`` and every other task ``a``, a global-context (linear) attention block with queries from
   ``t`` and keys/values from ``a``; the pairs ``[f_t, att_{t<-a}]`` of all other tasks are
   concatenated (``2 c'_k (T-1)`` channels) and reduced by one BasicBlock (shared by the tasks) to
   ``c'_k``, added to ``f_t`` as a residual.
4. **Feature propagation with attention (FPMA)** from scale ``k`` to ``k-1``: MTI-Net's FPM with
   its non-linearity replaced by one window self-attention block (4 heads) on the ``T c'_k``
   concatenation.
5. **Cross-scale attention (CSAM)** in each task's head: for target scales 0, 1, 2 and every
   coarser source scale, the source is projected to the target's width (1x1 conv + BN) and
   attended by the target scale's global-context block (one block per target scale, shared by
   its sources); the pairs ``[x_i, att_{i<-j}]`` and ``x_3`` are upsampled to 1/4 and
   concatenated (``6c'_0 + 4c'_1 + 2c'_2 + c'_3 = 1080`` channels), then 1x1 conv + BN + ReLU +
   1x1 conv.

Channel arithmetic: the published code passes the raw HRNet widths ``(18, 36, 72, 144)`` to the
MTI-Net modules although step 1 doubles them, and hard-codes the head width 1080, which is the
sum above only for the doubled widths ``c'``. With ``c`` the network cannot run (scale 3 gets 288
channels where it expects 144); the consistent reading, used here, is ``c' = 2c`` after the
encoder everywhere. Parameter counts are tested against the published modules instantiated with
``c'``.

The window attention is torchvision's ``ShiftedWindowAttention`` (Swin v1: same parameters as the
published one). Two differences: the published blocks also build a LayerNorm they never use
(``norm2``, ``2C`` parameters per block; left out here, so the count is theirs minus those), and
torchvision does not shift a window that covers the whole feature map (the published code does,
which there only permutes the tokens under a mask).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.ops import StochasticDepth

from .backbones import HRNET_CHANNELS, HRNetBackbone, build_backbone
from .base import MultiTaskModel
from .blocks import FPM, BasicBlock, add_scale_cascade, projection, run_scale_cascade
from .registry import register_model

__all__ = ["WindowAttentionBlock", "WindowSelfAttention", "GlobalContextAttention", "CrossTaskAttention", "FPMA",
           "CrossScaleHead", "SCANet"]


class WindowAttentionBlock(nn.Module):
    """``x + drop_path(W-MSA(LayerNorm(x)))`` on channels-last ``(B, H, W, C)``: a Swin-v1 block
    *without* its MLP, as the SCA code uses it (its blocks build a second LayerNorm, ``norm2``,
    but never call it and have no MLP; the unused norm is left out here). The (shifted) window
    attention with relative position bias is torchvision's ``ShiftedWindowAttention``."""

    def __init__(self, channels: int, num_heads: int, window_size: int, shift: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = ShiftedWindowAttention(channels, [window_size, window_size], [shift, shift], num_heads)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.attn(self.norm1(x)))


class WindowSelfAttention(nn.Module):
    """``(B, C, H, W) -> (B, C, H, W)``: 1x1 conv embedding + LayerNorm, ``depth``
    :class:`WindowAttentionBlock` (shift 0, w/2, 0, ...; stochastic depth rising linearly from 0
    to ``drop_path``), LayerNorm. Any ``H x W`` works (the attention pads to whole windows)."""

    def __init__(self, channels: int, depth: int, num_heads: int, window_size: int = 7,
                 drop_path: float = 0.2):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.embed = nn.Conv2d(channels, channels, 1)
        self.embed_norm = nn.LayerNorm(channels)
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.Sequential(*[
            WindowAttentionBlock(channels, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, rates[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed_norm(self.embed(x).permute(0, 2, 3, 1))  # [B, H, W, C]
        return self.norm(self.blocks(x)).permute(0, 3, 1, 2).contiguous()


def _conv_bn(in_channels: int, out_channels: int, relu: bool, affine: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels, affine=affine)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class GlobalContextAttention(nn.Module):
    """Linear (kernelized) attention of a target map on a source map of any resolution.

    ``q = softplus(BN(conv(ReLU(BN(conv(target))))))``, ``k`` likewise from the source,
    ``v = ReLU(BN(conv(source)))`` (all 1x1 convs, ``out_channels`` wide). Then, per batch item,
    ``out[:, i] = (v k^T) q_i / (1^T k^T q_i)``: every target pixel receives a positively weighted
    average of the source values, at cost linear in both pixel counts. Output at the target grid.
    """

    def __init__(self, in_channels: int, out_channels: int, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.query_project = nn.Sequential(_conv_bn(in_channels, out_channels, True),
                                           _conv_bn(out_channels, out_channels, False), nn.Softplus())
        self.key_project = nn.Sequential(_conv_bn(in_channels, out_channels, True),
                                         _conv_bn(out_channels, out_channels, False), nn.Softplus())
        self.value_project = _conv_bn(in_channels, out_channels, True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        B, _, H, W = target.shape
        k = self.key_project(source).flatten(2)      # [B, d, Ns]
        v = self.value_project(source).flatten(2)    # [B, m, Ns]
        q = self.query_project(target).flatten(2)    # [B, d, Nt]
        context = torch.bmm(v, k.transpose(1, 2))    # [B, m, d]
        denom = torch.bmm(k.sum(dim=2, keepdim=True).transpose(1, 2), q)  # [B, 1, Nt]
        out = torch.bmm(context, q) / denom.clamp_min(self.eps)
        return out.view(B, -1, H, W)


class CrossTaskAttention(nn.Module):
    """CTAM at one scale: ``out_t = f_t + R([f_t, A_{t<-a}(f_t, f_a)] for a != t)`` with one
    :class:`GlobalContextAttention` per ordered task pair and one reduction BasicBlock
    ``2C(T-1) -> C`` (projection shortcut) shared by all tasks. The other tasks are concatenated
    last-first, the published layout (so its checkpoints would map 1:1)."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        if len(self.tasks) < 2:
            raise ValueError(f"cross-task attention needs >= 2 tasks, got {self.tasks}")
        c_in = 2 * channels * (len(self.tasks) - 1)
        self.cross_attention = nn.ModuleDict({t: nn.ModuleDict(
            {a: GlobalContextAttention(channels, channels) for a in self.tasks if a != t}) for t in self.tasks})
        self.dimensionality_reduction = BasicBlock(c_in, channels, downsample=projection(c_in, channels))

    def forward(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            others = [a for a in self.tasks if a != t][::-1]
            cat = torch.cat([torch.cat((x[t], self.cross_attention[t][a](x[t], x[a])), dim=1) for a in others], dim=1)
            out[t] = x[t] + self.dimensionality_reduction(cat)
        return out


class FPMA(FPM):
    """MTI-Net's feature propagation module with its non-linearity (2 BasicBlocks + 1x1 conv) replaced
    by window self-attention on the ``T*C`` task concatenation (1 attention block, 4 heads); the
    per-channel task softmax, the reduction BasicBlock and the per-task SE gates are FPM's."""

    def __init__(self, tasks: Sequence[str], per_task_channels: int, depth: int = 1, num_heads: int = 4,
                 window_size: int = 7, drop_path: float = 0.2):
        super().__init__(tasks, per_task_channels)
        self.non_linear = WindowSelfAttention(len(self.tasks) * per_task_channels, depth, num_heads,
                                              window_size, drop_path=drop_path)


class CrossScaleHead(nn.Module):
    """CSAM + prediction head over the 4 scale features of one task (see the module docstring)."""

    def __init__(self, channels: Sequence[int], num_outputs: int):
        super().__init__()
        c = list(channels)
        if len(c) != 4:
            raise ValueError(f"CrossScaleHead needs 4 scale widths, got {c}")
        self.pairs = [(i, j) for i in range(3) for j in range(i + 1, 4)]  # (target, source), fine first
        self.cross_scale_attention = nn.ModuleList([GlobalContextAttention(c[i], c[i]) for i in range(3)])
        self.project = nn.ModuleDict({f"{j}to{i}": _conv_bn(c[j], c[i], relu=False) for i, j in self.pairs})
        total = sum(2 * c[i] for i, _ in self.pairs) + c[3]
        self.channels = total
        self.last_layer = nn.Sequential(nn.Conv2d(total, total, 1), nn.BatchNorm2d(total), nn.ReLU(),
                                        nn.Conv2d(total, num_outputs, 1))

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        size = x[0].shape[-2:]
        pieces = []
        for i, j in self.pairs:
            att = self.cross_scale_attention[i](x[i], self.project[f"{j}to{i}"](x[j]))
            pieces.append(torch.cat((x[i], att), dim=1))
        pieces.append(x[3])
        pieces = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                  for p in pieces]
        return self.last_layer(torch.cat(pieces, dim=1))


@register_model("sca", backbones=("hrnet",), multi_scale=True,
                description="SCA: sequential cross-task then cross-scale attention on MTI-Net")
class SCANet(MultiTaskModel):
    """SCA on HRNet-W18-small-v2. ``aux["scale_k"]`` are the initial predictions at the 4 scales.

    Args beyond the registry's: ``encoder_depth`` / ``encoder_heads`` (2 / 6), ``fpm_depth`` /
    ``fpm_heads`` (1 / 4), ``window_size`` (7), ``drop_path`` (0.2), the published values."""

    def __init__(self, tasks, num_outputs, input_size, backbone: str = "hrnet_w18_small_v2",
                 pretrained: bool = False, weights=None, encoder_depth: int = 2, encoder_heads: int = 6,
                 fpm_depth: int = 1, fpm_heads: int = 4, window_size: int = 7, drop_path: float = 0.2):
        super().__init__(tasks, num_outputs, input_size)
        if len(self.tasks) < 2:
            raise ValueError(f"SCA needs >= 2 tasks (cross-task attention), got {self.tasks}")
        bb = build_backbone(backbone, pretrained, weights)
        if not isinstance(bb, HRNetBackbone):
            raise ValueError(f"SCA is multi-scale and needs backbone='hrnet_w18_small_v2', got {backbone!r}")
        self.backbone = bb
        raw = list(HRNET_CHANNELS)
        c = [2 * ch for ch in raw]
        self.channels = c
        T, out = self.tasks, self.num_outputs
        self.encoder = nn.ModuleList([WindowSelfAttention(ch, encoder_depth, encoder_heads, window_size,
                                                          drop_path=drop_path) for ch in raw])
        add_scale_cascade(self, c, lambda ch: FPMA(T, ch, fpm_depth, fpm_heads, window_size, drop_path))
        self.cross_task = nn.ModuleList([CrossTaskAttention(T, ch) for ch in c])
        self.heads = nn.ModuleDict({t: CrossScaleHead(c, out[t]) for t in T})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats = [torch.cat((enc(f), f), dim=1) for enc, f in zip(self.encoder, self.backbone(x))]
        attended, preds = run_scale_cascade(self, feats, refine=self.cross_task)
        final = {t: self.heads[t]([d[t] for d in attended]) for t in self.tasks}
        aux = {f"scale_{i}": self.upsample(p, size) for i, p in enumerate(preds)}
        return {"final": self.upsample(final, size), "aux": aux}
