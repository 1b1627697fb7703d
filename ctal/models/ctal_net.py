"""CTALNet (single scale) and M-CTALNet (multi scale): the paper's EMA-Net models.

CTALNet (HRNet; Swin differences in brackets)::

    image -> backbone -> [HRNet: fuse the 4 branches at 1/4, 270 ch]   [Swin: 1/32, 768/1024 ch]
      per task: 2 Bottlenecks (-> 256, projection shortcut)  = task features
                1x1 conv -> initial prediction               (deep supervision, "aux"/"initial")
      CTAL block:
        per task 1x1 conv 256 -> 128                         [Swin: 1x1 conv + BN + ReLU]
        CrossTaskAffinity at the feature grid (1/4)          [Swin: 1/32]
        per task ConvTranspose2d(2, stride 2) + BN + ReLU + 3x3 conv  (grid x 2)
      per task head: 2 Bottlenecks (128) + 1x1 conv          [Swin: DeepLab ASPP head on 128 ch]
      bilinear upsampling to the image size                  ("final")

M-CTALNet (HRNet only): MTI-Net's initial predictions at the 4 HRNet scales, coarse to fine, with
feature propagation modules (FPM) between scales; per task the 4 scale features are fused to 1/4
(``HRNetFuse``, 270 ch); one CTAL block (270 -> 128) and the CTALNet heads. Deep supervision:
the 4 scales' predictions (``aux["scale_0"]`` ... ``aux["scale_3"]``; the paper's loss averages
them).

The affinity, diffusion, propagation and blend are :class:`ctal.nn.CrossTaskAffinity` (value
projection: per-task 3x3 conv with bias; fusion: grouped-conv weights ``(N, T, 3, 3)`` + bias
``(N,)``; ``gamma`` fixed at 0.05), so every ``ctal.ops`` backend can run it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor, nn

from ..nn import CrossTaskAffinity
from .backbones import HRNET_CHANNELS, HRNetBackbone, HRNetFuse, build_backbone
from .base import MultiTaskModel, check_size
from .blocks import FPM, InitialTaskPredictions, add_scale_cascade, run_scale_cascade
from .heads import BottleneckHead, DeepLabHead
from .registry import register_model

__all__ = ["CTALBlock", "CTALNet", "MCTALNet"]


class CTALBlock(nn.Module):
    """The paper's affinity-learning module around :class:`CrossTaskAffinity`.

    Per task: ``conv_in`` (1x1 conv ``in_channels -> channels``, with BN + ReLU when
    ``norm_in``, the Swin variant), then the CTAL op on the ``size`` grid, then ``conv_out``
    (ConvTranspose2d(2, stride 2) + BN + ReLU + 3x3 conv), which doubles the resolution.
    """

    def __init__(self, tasks: Sequence[str], in_channels: int, channels: int, size: tuple[int, int],
                 gamma: float = 0.05, backend: str = "auto", norm_in: bool = False):
        super().__init__()
        self.tasks = list(tasks)

        def reduce():
            if norm_in:
                return nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
            return nn.Conv2d(in_channels, channels, 1)

        self.conv_in = nn.ModuleDict({t: reduce() for t in self.tasks})
        self.affinity = CrossTaskAffinity(self.tasks, channels, size, gamma=gamma,
                                          backend=backend)
        self.conv_out = nn.ModuleDict({t: nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1)) for t in self.tasks})

    @property
    def backend(self) -> str:
        return self.affinity.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.affinity.backend = name  # validated by CrossTaskAffinity

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = {t: self.conv_in[t](features[t]) for t in self.tasks}
        y = self.affinity(x)
        return {t: self.conv_out[t](y[t]) for t in self.tasks}


class _CTALModel(MultiTaskModel):
    """Shared CTAL-model behaviour: the backend switch and grid resampling."""

    grid_bound = True
    feature_stride: int  # image size / CTAL grid size

    def _grid(self, input_size) -> tuple[int, int]:
        H, W = check_size(input_size)
        return H // self.feature_stride, W // self.feature_stride

    def set_ctal_backend(self, backend: str) -> "_CTALModel":
        """Run the CTAL op with ``backend`` (``"auto"`` or any ``ctal.ops.backends()`` name)."""
        self.ctal.backend = backend
        return self

    def resample_ctal(self, input_size, rescale: bool = True) -> "_CTALModel":
        """Re-grid the CTAL fusion weights for images of ``input_size`` (approximate, see
        :meth:`ctal.nn.CrossTaskAffinity.resample`); afterwards the model accepts only the new
        size. Create the optimizer afterwards (the fusion parameters are new objects)."""
        H, W = check_size(input_size)
        self.ctal.affinity.resample(self._grid((H, W)), rescale=rescale)
        self.input_size = (H, W)
        return self


@register_model("ctal", backbones=("hrnet", "swin"), paper=True,
                description="CTALNet: fused backbone features, initial predictions, one CTAL block, refined heads")
class CTALNet(_CTALModel):
    """Single-scale EMA-Net / CTALNet on HRNet-W18-small-v2 (NYUv2, Cityscapes) or Swin-v2
    (PASCAL-Context). See the module docstring for the layer list.

    Args:
        tasks, num_outputs, input_size: see :class:`MultiTaskModel`.
        backbone: ``"hrnet_w18_small_v2"`` or ``"swin_v2_t" | "swin_v2_s" | "swin_v2_b"``.
        pretrained, weights: backbone weights (see ``ctal.models.backbones``).
        gamma: CTAL blend (0.05 in the paper). ctal_backend: any ``ctal.ops`` backend or "auto".
        task_channels, ctal_channels: 256 and 128 in the paper.
    """

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], input_size,
                 backbone: str = "hrnet_w18_small_v2", pretrained: bool = False, weights=None,
                 gamma: float = 0.05, ctal_backend: str = "auto", task_channels: int = 256,
                 ctal_channels: int = 128):
        super().__init__(tasks, num_outputs, input_size)
        bb = build_backbone(backbone, pretrained=pretrained, weights=weights)
        if isinstance(bb, HRNetBackbone):
            fuse = HRNetFuse(bb.channels)
            self.backbone = nn.Sequential(bb, fuse)
            in_channels, self.feature_stride, swin = fuse.channels, bb.reduction, False
        else:
            self.backbone = bb
            in_channels, self.feature_stride, swin = bb.channels, bb.reduction, True
        self.backbone_name = backbone
        self.initial = InitialTaskPredictions(self.tasks, self.num_outputs, in_channels, task_channels)
        self.ctal = CTALBlock(self.tasks, task_channels, ctal_channels, self._grid(self.input_size),
                              gamma=gamma, backend=ctal_backend, norm_in=swin)
        if swin:
            self.heads = nn.ModuleDict({t: DeepLabHead(ctal_channels, self.num_outputs[t]) for t in self.tasks})
        else:
            self.heads = nn.ModuleDict({t: BottleneckHead(ctal_channels, self.num_outputs[t]) for t in self.tasks})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats, initial = self.initial(self.backbone(x))
        refined = self.ctal(feats)
        final = {t: self.heads[t](refined[t]) for t in self.tasks}
        return {"final": self.upsample(final, size), "aux": {"initial": self.upsample(initial, size)}}


@register_model("m_ctal", backbones=("hrnet",), paper=True, multi_scale=True,
                description="M-CTALNet: MTI-Net-style initial predictions at 4 scales with FPMs, one CTAL block at 1/4")
class MCTALNet(_CTALModel):
    """Multi-scale EMA-Net / M-CTALNet on HRNet-W18-small-v2 (see the module docstring)."""

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], input_size,
                 backbone: str = "hrnet_w18_small_v2", pretrained: bool = False, weights=None,
                 gamma: float = 0.05, ctal_backend: str = "auto", ctal_channels: int = 128):
        super().__init__(tasks, num_outputs, input_size)
        bb = build_backbone(backbone, pretrained=pretrained, weights=weights)
        if not isinstance(bb, HRNetBackbone):
            raise ValueError(f"M-CTALNet needs the multi-scale HRNet backbone, got {backbone!r}")
        self.backbone = bb
        self.backbone_name = backbone
        self.feature_stride = bb.reduction
        c = list(HRNET_CHANNELS)
        T, out = self.tasks, self.num_outputs
        add_scale_cascade(self, c, lambda ch: FPM(T, ch))
        self.scale_fusion = nn.ModuleDict({t: HRNetFuse(c) for t in T})
        self.ctal = CTALBlock(T, sum(c), ctal_channels, self._grid(self.input_size), gamma=gamma,
                              backend=ctal_backend, norm_in=False)
        self.heads = nn.ModuleDict({t: BottleneckHead(ctal_channels, out[t]) for t in T})

    def forward(self, x: Tensor) -> dict:
        size = self.check_input(x)
        feats, preds = run_scale_cascade(self, self.backbone(x))
        fused = {t: self.scale_fusion[t]([f[t] for f in feats]) for t in self.tasks}
        refined = self.ctal(fused)
        final = {t: self.heads[t](refined[t]) for t in self.tasks}
        aux = {f"scale_{i}": self.upsample(p, size) for i, p in enumerate(preds)}
        return {"final": self.upsample(final, size), "aux": aux}
