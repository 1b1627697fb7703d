"""Backbones: HRNet-W18-small-v2 (timm), Swin-v2 T/S/B and dilated ResNet-18/50 (torchvision),
with weight loaders.

HRNet-W18-small-v2 returns its four branches ``[1/4: 18, 1/8: 36, 1/16: 72, 1/32: 144]``;
:class:`HRNetFuse` turns them into one 1/4 map (upsample, concat 270 channels, 1x1 conv + BN +
ReLU) for the single-scale models. Swin-v2 returns the last stage (1/32, 768/768/1024 channels)
after the final LayerNorm, permuted to NCHW.

Weights never download implicitly: ``pretrained=False`` is the default everywhere. ``pretrained=True``
asks the library (timm / torchvision) to download its ImageNet weights and, when that fails
(offline machine), raises an error that says which file to fetch and where to pass it.
``weights="path/to/file"`` loads a local file and reports missing / unexpected keys.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HRNetBackbone", "HRNetFuse", "SwinBackbone", "ResNetBackbone", "LoadReport",
           "load_hrnet_weights", "load_swin_weights", "load_resnet_weights", "build_backbone", "BACKBONES", "HRNET_OFFICIAL_URL"]

HRNET_CHANNELS = (18, 36, 72, 144)
HRNET_OFFICIAL_URL = "https://github.com/HRNet/HRNet-Image-Classification (HRNet-W18-C-Small-v2)"
SWIN_CHANNELS = {"swin_v2_t": 768, "swin_v2_s": 768, "swin_v2_b": 1024}
# Keys of the classification networks that a dense-prediction backbone deliberately drops.
_HRNET_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_SWIN_HEAD_PREFIXES = ("head.",)


@dataclasses.dataclass
class LoadReport:
    """What a weight loader did: keys the model expected but the file lacked (``missing``), keys
    of the file the model has no place for (``unexpected``), and classification-head keys that
    were dropped on purpose (``ignored``). ``ok`` is True when nothing is missing or unexpected."""
    source: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        def few(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} classification-head keys")
        if self.missing:
            lines.append(f"MISSING (left at their initialization): {few(self.missing)}")
        if self.unexpected:
            lines.append(f"UNEXPECTED (not loaded): {few(self.unexpected)}")
        return "; ".join(lines)


def _read_state_dict(weights: Union[str, os.PathLike, dict]) -> tuple[dict, str]:
    if isinstance(weights, dict):
        sd, source = weights, "<state dict>"
    else:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weight file {path!r} does not exist")
        sd, source = torch.load(path, map_location="cpu", weights_only=True), path
    # Checkpoints wrap the tensors in various ways; unwrap the common ones.
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{source} does not contain a state dict (got {type(sd).__name__})")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    return sd, source


def _load(module: nn.Module, sd: dict, source: str, head_prefixes: Sequence[str],
          strict: bool) -> LoadReport:
    ignored = [k for k in sd if k.startswith(tuple(head_prefixes))]
    sd = {k: v for k, v in sd.items() if k not in set(ignored)}
    own = module.state_dict()
    shape_mismatch = [f"{k} (file {tuple(v.shape)} vs model {tuple(own[k].shape)})"
                      for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape_mismatch:
        raise ValueError(f"{source}: shapes do not match this backbone: {shape_mismatch[:5]}")
    result = module.load_state_dict(sd, strict=False)
    # BN step counters are absent from old checkpoints and carry no weights.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    report = LoadReport(source, len(sd) - len(result.unexpected_keys), missing,
                        list(result.unexpected_keys), ignored)
    if strict and not report.ok:
        raise RuntimeError(f"weights do not fit the backbone: {report}")
    return report


class HRNetBackbone(nn.Module):
    """HRNet-W18-small-v2 as timm builds it (``hrnet_w18_small_v2``, ``features_only`` with the
    plain HRNet branches, i.e. ``feature_location=''``), returning the four branch outputs at
    1/4, 1/8, 1/16, 1/32 with 18, 36, 72, 144 channels.

    timm's module names are those of the official HRNet-Image-Classification code, so the official
    ``hrnet_w18_small_model_v2.pth`` and timm's own weights load with the same mapping (drop the
    classification head; see :func:`load_hrnet_weights`). Its 3,860,720 parameters equal the
    paper's ``hrnet_w18`` backbone.

    Two details differ between timm (= the official classification code) and the copy of HRNet
    the paper trains with; both default to the paper's choice and are tested to make the whole
    backbone compute the paper's function:

    - ``upsample``: the exchange units upsample coarser branches ``"bilinear"``-ly in the paper's
      (segmentation) copy, ``"nearest"`` in timm.
    - ``bn_momentum``: 0.01 in the paper's copy, 0.1 in timm (a training-dynamics detail).
    """
    channels = HRNET_CHANNELS
    reduction = 4

    def __init__(self, pretrained: bool = False, weights: Union[str, os.PathLike, dict, None] = None,
                 upsample: str = "bilinear", bn_momentum: Optional[float] = 0.01):
        super().__init__()
        import timm
        if upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
        self.body = timm.create_model("hrnet_w18_small_v2", pretrained=False, features_only=True,
                                      feature_location="", out_indices=(1, 2, 3, 4))
        for m in self.body.modules():
            if isinstance(m, nn.Upsample) and upsample != m.mode:
                # Same scale factors; exact multiples, so this equals interpolating to the size.
                m.mode, m.align_corners = upsample, (False if upsample == "bilinear" else None)
            if isinstance(m, nn.BatchNorm2d) and bn_momentum is not None:
                m.momentum = bn_momentum
        self.load_report: Optional[LoadReport] = None
        if weights is not None:
            self.load_report = load_hrnet_weights(self, weights)
        elif pretrained:
            self.load_report = _hrnet_timm_pretrained(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))


def load_hrnet_weights(backbone: HRNetBackbone, weights: Union[str, os.PathLike, dict],
                       strict: bool = False) -> LoadReport:
    """Load HRNet-W18-small-v2 weights in the official layout (``hrnet_w18_small_model_v2.pth``
    from HRNet-Image-Classification) or timm's layout (the same names) into ``backbone``.

    The classification head (``incre_modules``, ``downsamp_modules``, ``final_layer``,
    ``classifier``) is dropped and listed in ``report.ignored``; a ``module.`` prefix is stripped.
    Missing / unexpected keys are returned in the report (and raise with ``strict=True``).
    """
    sd, source = _read_state_dict(weights)
    return _load(backbone.body, sd, source, _HRNET_HEAD_PREFIXES, strict)


def _offline_error(what: str, how: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not download the pretrained {what} weights ({type(err).__name__}: {err}). "
        f"This machine is probably offline. {how}")


def _hrnet_timm_pretrained(backbone: HRNetBackbone) -> LoadReport:
    import timm
    try:
        full = timm.create_model("hrnet_w18_small_v2", pretrained=True)
    except Exception as err:  # network / hub errors come in many types
        raise _offline_error(
            "HRNet-W18-small-v2",
            f"Download hrnet_w18_small_model_v2.pth from {HRNET_OFFICIAL_URL} on a connected "
            f"machine and pass weights='/path/to/hrnet_w18_small_model_v2.pth' (or pretrained="
            f"False to train from scratch); with a populated Hugging Face cache set HF_HUB_OFFLINE=1.",
            err) from err
    return _load(backbone.body, full.state_dict(), "timm:hrnet_w18_small_v2", _HRNET_HEAD_PREFIXES,
                 strict=True)


class HRNetFuse(nn.Module):
    """Fuse the four HRNet branches at 1/4: bilinear upsampling of branches 2-4 to branch 1's size,
    concatenation (18+36+72+144 = 270 channels), 1x1 conv (with bias) + BN + ReLU, 270 -> 270.
    This is what the paper calls ``fuse_hrnet`` (its ``HighResolutionFuse``)."""

    def __init__(self, channels: Sequence[int] = HRNET_CHANNELS):
        super().__init__()
        c = int(sum(channels))
        self.channels = c
        self.last_layer = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())

    @staticmethod
    def concat(x: Sequence[Tensor]) -> Tensor:
        size = x[0].shape[-2:]
        ups = [x[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in x[1:]]
        return torch.cat(ups, dim=1)

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        return self.last_layer(self.concat(x))


class SwinBackbone(nn.Module):
    """Swin-v2 T/S/B exactly as torchvision defines it (``features``, final ``norm``, ``permute``
    to NCHW), without the classification head: ``(B, 3, H, W) -> (B, C, H/32, W/32)`` with
    C = 768 (T, S) or 1024 (B)."""
    reduction = 32

    def __init__(self, variant: str = "swin_v2_s", pretrained: bool = False,
                 weights: Union[str, os.PathLike, dict, None] = None):
        super().__init__()
        if variant not in SWIN_CHANNELS:
            raise ValueError(f"variant must be one of {sorted(SWIN_CHANNELS)}, got {variant!r}")
        import torchvision.models as tvm
        net = getattr(tvm, variant)(weights=None)
        self.variant = variant
        self.channels = SWIN_CHANNELS[variant]
        self.features, self.norm, self.permute = net.features, net.norm, net.permute
        self.load_report: Optional[LoadReport] = None
        if weights is not None:
            self.load_report = load_swin_weights(self, weights)
        elif pretrained:
            self.load_report = _swin_torchvision_pretrained(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.permute(self.norm(self.features(x)))


def _swin_weights_enum(variant: str):
    import torchvision.models as tvm
    return getattr(tvm, {"swin_v2_t": "Swin_V2_T_Weights", "swin_v2_s": "Swin_V2_S_Weights",
                         "swin_v2_b": "Swin_V2_B_Weights"}[variant]).IMAGENET1K_V1


def load_swin_weights(backbone: SwinBackbone, weights: Union[str, os.PathLike, dict],
                      strict: bool = False) -> LoadReport:
    """Load a torchvision Swin-v2 ImageNet weight file (e.g. ``swin_v2_s-637d8ceb.pth``) into
    ``backbone``; the ``head.*`` classifier is dropped, missing/unexpected keys are reported."""
    sd, source = _read_state_dict(weights)
    return _load(backbone, sd, source, _SWIN_HEAD_PREFIXES, strict)


def _swin_torchvision_pretrained(backbone: SwinBackbone) -> LoadReport:
    w = _swin_weights_enum(backbone.variant)
    try:
        sd = w.get_state_dict(progress=False)
    except Exception as err:
        raise _offline_error(
            backbone.variant,
            f"Download {w.url} on a connected machine and pass weights='/path/to/"
            f"{os.path.basename(w.url)}' (or put it in torch.hub's checkpoint directory, "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}), or use pretrained=False.",
            err) from err
    return _load(backbone, sd, f"torchvision:{w}", _SWIN_HEAD_PREFIXES, strict=True)


RESNET_CHANNELS = {"resnet18": 512, "resnet50": 2048}
_RESNET_HEAD_PREFIXES = ("fc.",)


class ResNetBackbone(nn.Module):
    """Dilated ResNet-18/50 (torchvision blocks) at output stride 8, the backbone of the
    Multi-Task-Learning-PyTorch baselines (NYUD: ResNet-50, PASCAL: ResNet-18).

    The strided convolutions of ``layer3`` and ``layer4`` get stride 1; the following 3x3
    convolutions are dilated by 2 (``layer3``) and 4 (``layer4``), the strided 3x3 itself by half
    that, so the receptive field grows as it would have with the strides. Done on the module
    attributes because torchvision's ``replace_stride_with_dilation`` refuses BasicBlocks.
    Returns the ``layer4`` output: ``(B, 512 | 2048, H/8, W/8)``.
    """
    reduction = 8

    def __init__(self, variant: str = "resnet50", pretrained: bool = False,
                 weights: Union[str, os.PathLike, dict, None] = None, dilated: bool = True):
        super().__init__()
        if variant not in RESNET_CHANNELS:
            raise ValueError(f"variant must be one of {sorted(RESNET_CHANNELS)}, got {variant!r}")
        import torchvision.models as tvm
        net = getattr(tvm, variant)(weights=None)
        self.variant, self.channels = variant, RESNET_CHANNELS[variant]
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if dilated:
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4)
        else:
            self.reduction = 32
        self.load_report: Optional[LoadReport] = None
        if weights is not None:
            self.load_report = load_resnet_weights(self, weights)
        elif pretrained:
            w = getattr(tvm, {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}[variant]).IMAGENET1K_V1
            try:
                sd = w.get_state_dict(progress=False)
            except Exception as err:
                raise _offline_error(variant, f"Download {w.url} on a connected machine and pass "
                                     f"weights='/path/to/{os.path.basename(w.url)}', or use pretrained=False.",
                                     err) from err
            self.load_report = _load(self, sd, f"torchvision:{w}", _RESNET_HEAD_PREFIXES, strict=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _dilate(layer: nn.Module, dilation: int) -> None:
    for m in layer.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        k3 = m.kernel_size == (3, 3)
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if k3:
                m.dilation = m.padding = (dilation // 2, dilation // 2)
        elif k3:
            m.dilation = m.padding = (dilation, dilation)


def load_resnet_weights(backbone: ResNetBackbone, weights: Union[str, os.PathLike, dict],
                        strict: bool = False) -> LoadReport:
    """Load a torchvision ResNet ImageNet file; ``fc.*`` is dropped, other mismatches reported."""
    sd, source = _read_state_dict(weights)
    return _load(backbone, sd, source, _RESNET_HEAD_PREFIXES, strict)


BACKBONES = ("hrnet_w18_small_v2", "swin_v2_t", "swin_v2_s", "swin_v2_b", "resnet18", "resnet50")


def build_backbone(name: str, pretrained: bool = False,
                   weights: Union[str, os.PathLike, dict, None] = None) -> nn.Module:
    """Backbone by name (one of :data:`BACKBONES`; ``"hrnet_w18"`` is accepted for HRNet)."""
    if name in ("hrnet_w18_small_v2", "hrnet_w18", "hrnet18"):
        return HRNetBackbone(pretrained=pretrained, weights=weights)
    if name in SWIN_CHANNELS:
        return SwinBackbone(name, pretrained=pretrained, weights=weights)
    if name in RESNET_CHANNELS:
        return ResNetBackbone(name, pretrained=pretrained, weights=weights)
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
