"""Backbones: HRNet-W18-small-v2 (timm), Swin-v2 T/S/B and (dilated) ResNet-18/50 (torchvision),
with weight loaders.

HRNet-W18-small-v2 returns its four branches ``[1/4: 18, 1/8: 36, 1/16: 72, 1/32: 144]``;
:class:`HRNetFuse` turns them into one 1/4 map (upsample, concat 270 channels, 1x1 conv + BN +
ReLU) for the single-scale models. Swin-v2 returns the last stage (1/32, 768/768/1024 channels)
after the final LayerNorm, permuted to NCHW. :class:`ResNetBackbone` returns ``layer4`` (output
stride 8 when dilated, the default) and can also run stage by stage (Cross-Stitch, NDDR, MTAN).

Weights never download implicitly: ``pretrained=False`` is the default everywhere. ``pretrained=True``
asks the library (timm / torchvision) to download its ImageNet weights and, when that fails
(offline machine), raises an error that says which file to fetch and where to pass it.
``weights="path/to/file"`` loads a local file and reports missing keys; tensors the backbone has
no place for (beyond the classifier) mean a file of another network and are an error.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HRNetBackbone", "HRNetFuse", "SwinBackbone", "ResNetBackbone", "LoadReport",
           "load_hrnet_weights", "load_swin_weights", "load_resnet_weights", "build_backbone",
           "BACKBONES", "BACKBONE_FAMILIES", "HRNET_OFFICIAL_URL", "RESNET_BACKBONES", "RESNET_STAGES",
           "RESNET_STAGE_CHANNELS", "backbone_family", "dilate_basic_layer", "is_resnet",
           "parse_resnet_name"]

HRNET_CHANNELS = (18, 36, 72, 144)
HRNET_OFFICIAL_URL = "https://github.com/HRNet/HRNet-Image-Classification (HRNet-W18-C-Small-v2)"
SWIN_CHANNELS = {"swin_v2_t": 768, "swin_v2_s": 768, "swin_v2_b": 1024}
# Keys of the classification networks that a dense-prediction backbone deliberately drops.
_HRNET_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_SWIN_HEAD_PREFIXES = ("head.",)


@dataclasses.dataclass
class LoadReport:
    """What a weight loader did: keys the model expected but the file lacked (``missing``), keys
    of the file the model has no place for (``unexpected``; the loaders refuse such files, so it
    stays empty), and classification-head keys that were dropped on purpose (``ignored``). ``ok``
    is True when nothing is missing or unexpected."""
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
        try:
            sd, source = torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as err:  # pickle / zip / weights_only errors come in many types
            raise ValueError(f"weight file {path!r} could not be read as a PyTorch checkpoint "
                             f"({type(err).__name__}: {err})") from err
    # Checkpoints wrap the tensors in various ways; unwrap the common ones.
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        what = type(sd).__name__ if not isinstance(sd, dict) else "a dict with non-tensor values"
        raise ValueError(f"{source} does not contain a state dict of tensors (got {what})")
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
    # Tensors the backbone has no place for (beyond the classifier) mean a file of another
    # network; a deeper variant of the same family (ResNet-34 for ResNet-18, Swin-v2-S for -T)
    # has every tensor of the shallower one under the same name and shape, so the rest would
    # load without any error, each block trained inside a different network.
    extra = [k for k in sd if k not in own]
    if extra and sum(k in own for k in sd):
        raise ValueError(f"{source}: holds {len(extra)} tensors this backbone does not have, e.g. "
                         f"{', '.join(extra[:3])}: it is a file of another network (a deeper variant?), "
                         f"whose other tensors would load into a different architecture. Pass the file "
                         f"of this backbone (or a dict without those keys, to load the rest on purpose).")
    result = module.load_state_dict(sd, strict=False)
    # BN step counters are absent from old checkpoints and carry no weights.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    report = LoadReport(source, len(sd) - len(result.unexpected_keys), missing,
                        list(result.unexpected_keys), ignored)
    if report.loaded == 0:
        raise ValueError(f"{source}: none of its {len(sd)} tensors fit this backbone (file keys "
                         f"like {list(sd)[:3]}, backbone keys like {list(own)[:3]}); is it the "
                         f"right file for this architecture?")
    if strict and not report.ok:
        raise RuntimeError(f"weights do not fit the backbone: {report}")
    if not report.ok:  # partly loaded: say so where the user sees it, not only in load_report
        warnings.warn(f"backbone weights partly loaded: {report}", stacklevel=3)
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
    Missing keys are returned in the report (and raise with ``strict=True``); tensors the backbone
    has no place for are a ValueError.
    """
    sd, source = _read_state_dict(weights)
    return _load(backbone.body, sd, source, _HRNET_HEAD_PREFIXES, strict)


def _offline_error(what: str, how: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not download the pretrained {what} weights ({type(err).__name__}: {err}). "
        f"This machine is probably offline. {how} In train.py / a config these are "
        f"model.weights=/path/to/file.pth and model.pretrained=false.")


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
    ``backbone``; the ``head.*`` classifier is dropped, missing keys are reported, tensors of
    another network (e.g. a Swin-v2-S file for Swin-v2-T) are an error."""
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


# Channels after each stage of the ResNets. "conv" = stem (conv1 + bn + relu + maxpool);
# "layer1" = stem + layer1 (the stage the Cross-Stitch / MTAN code calls layer1);
# "layer1_without_conv" = layer1 alone (NDDR-CNN puts a fusion layer after the stem as well).
RESNET_STAGE_CHANNELS = {
    18: {"conv": 64, "layer1": 64, "layer1_without_conv": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    50: {"conv": 64, "layer1": 256, "layer1_without_conv": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
RESNET_STAGES = ("conv", "layer1", "layer1_without_conv", "layer2", "layer3", "layer4")
RESNET_BACKBONES = tuple(f"resnet{d}" for d in RESNET_STAGE_CHANNELS)
_RESNET_HEAD_PREFIXES = ("fc.",)


def parse_resnet_name(name) -> int:
    """``"resnet18"`` / ``18`` -> 18, ``"resnet50"`` / ``50`` -> 50; anything else is a ValueError."""
    if isinstance(name, int) and not isinstance(name, bool) and name in RESNET_STAGE_CHANNELS:
        return name
    for depth in RESNET_STAGE_CHANNELS:
        if name == f"resnet{depth}":
            return depth
    raise ValueError(f"unknown ResNet backbone {name!r}; expected one of {list(RESNET_BACKBONES)} "
                     f"(or the depth {sorted(RESNET_STAGE_CHANNELS)})")


def is_resnet(name) -> bool:
    return isinstance(name, str) and name in RESNET_BACKBONES


def dilate_basic_layer(layer: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Turn a strided BasicBlock stage into a dilated one in place: stride 1 everywhere; the first
    block's first 3x3 conv (the one that used to stride) gets ``previous_dilation``, every other
    3x3 conv ``dilation`` (padding = dilation keeps the grid). This is the rule torchvision applies
    to Bottleneck stages (``replace_stride_with_dilation``, which refuses BasicBlocks), and what
    the protocol's dilated ResNet-18 computes."""
    from torchvision.models.resnet import BasicBlock
    for i, block in enumerate(layer):
        if not isinstance(block, BasicBlock):
            raise TypeError(f"dilate_basic_layer expects BasicBlocks, got {type(block).__name__}")
        for j, conv in enumerate((block.conv1, block.conv2)):
            d = previous_dilation if (i == 0 and j == 0) else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18/50 without ``avgpool``/``fc``, runnable stage by stage: the backbone
    of the Multi-Task-Learning-PyTorch baselines (NYUD: ResNet-50, PASCAL: ResNet-18) and of
    Cross-Stitch, NDDR-CNN and MTAN, which mix features *between* stages (``forward_stage``; MTAN
    also splits each stage before its last block). Module names are torchvision's own
    (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so its ImageNet files load without renaming.

    Dilation (``dilated=True``, the default): the strides of ``layer3`` and ``layer4`` are
    replaced by dilation 2 and 4 (output stride 8 instead of 32), the DeepLab recipe: the strided
    3x3 conv of a stage keeps the previous dilation, every other 3x3 conv of the stage gets the
    new one (torchvision's rule for Bottleneck; ResNet-18 via :func:`dilate_basic_layer`).
    Dilation changes no parameter, only the receptive field and the feature grid.
    ``forward`` returns the ``layer4`` output ``(B, 512 | 2048, H/8, W/8)`` (``H/32`` undilated).

    Args:
        depth: 18 or 50 (or the name ``"resnet18"`` / ``"resnet50"``).
        dilated: replace the strides of layer3/layer4 by dilation 2/4 (output stride 8).
        pretrained: load torchvision's ImageNet weights (download; a clear error when offline).
        weights: a local torchvision ResNet weight file or state dict (``fc.*`` is dropped and
            missing keys are reported in ``self.load_report``; tensors of another network,
            e.g. a ResNet-34 file, are an error).
    """

    def __init__(self, depth: Union[int, str] = 50, dilated: bool = True, pretrained: bool = False,
                 weights: Union[str, os.PathLike, dict, None] = None):
        super().__init__()
        depth = parse_resnet_name(depth)
        if not isinstance(dilated, bool):
            raise TypeError(f"dilated must be a bool, got {dilated!r}")
        from torchvision.models import resnet as tv_resnet
        self.depth, self.dilated = depth, dilated
        if depth == 50:
            net = tv_resnet.resnet50(weights=None, replace_stride_with_dilation=[False, dilated, dilated])
        else:
            net = tv_resnet.resnet18(weights=None)
            if dilated:
                dilate_basic_layer(net.layer3, 2, 1)
                dilate_basic_layer(net.layer4, 4, 2)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.stage_channels = dict(RESNET_STAGE_CHANNELS[depth])
        self.channels = self.stage_channels["layer4"]
        self.reduction = 8 if dilated else 32
        self.load_report: Optional[LoadReport] = None
        if weights is not None:
            self.load_report = load_resnet_weights(self, weights)
        elif pretrained:
            self.load_report = _resnet_torchvision_pretrained(self)

    @property
    def variant(self) -> str:
        return f"resnet{self.depth}"

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        """Run one stage: ``conv`` (stem), ``layer1`` (stem + layer1), ``layer1_without_conv``,
        ``layer2``, ``layer3``, ``layer4``."""
        if stage == "conv":
            return self.stem(x)
        if stage == "layer1":
            return self.layer1(self.stem(x))
        if stage == "layer1_without_conv":
            return self.layer1(x)
        if stage in ("layer2", "layer3", "layer4"):
            return getattr(self, stage)(x)
        raise ValueError(f"unknown stage {stage!r}; expected one of {RESNET_STAGES}")

    def forward_stage_except_last_block(self, x: Tensor, stage: str) -> Tensor:
        """``layerK`` without its last residual block (``layer1`` includes the stem)."""
        if stage not in ("layer1", "layer2", "layer3", "layer4"):
            raise ValueError(f"stage must be layer1..layer4, got {stage!r}")
        if stage == "layer1":
            x = self.stem(x)
        return getattr(self, stage)[:-1](x)

    def forward_stage_last_block(self, x: Tensor, stage: str) -> Tensor:
        if stage not in ("layer1", "layer2", "layer3", "layer4"):
            raise ValueError(f"stage must be layer1..layer4, got {stage!r}")
        return getattr(self, stage)[-1](x)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, dilated={self.dilated}, output_stride={self.reduction}"


def load_resnet_weights(backbone: ResNetBackbone, weights: Union[str, os.PathLike, dict],
                        strict: bool = False) -> LoadReport:
    """Load a torchvision ResNet state dict / file (e.g. ``resnet50-0676ba61.pth``) into
    ``backbone``; the classifier ``fc.*`` is dropped, missing keys are reported, tensors of
    another network (e.g. a ResNet-34 file) are an error."""
    sd, source = _read_state_dict(weights)
    return _load(backbone, sd, source, _RESNET_HEAD_PREFIXES, strict)


def _resnet_torchvision_pretrained(backbone: ResNetBackbone) -> LoadReport:
    from torchvision.models import resnet as tv_resnet
    enum = {18: tv_resnet.ResNet18_Weights, 50: tv_resnet.ResNet50_Weights}[backbone.depth].IMAGENET1K_V1
    try:
        sd = enum.get_state_dict(progress=False)
    except Exception as err:  # network / hub errors come in many types
        raise _offline_error(
            backbone.variant,
            f"Download {enum.url} on a connected machine and pass weights='/path/to/"
            f"{os.path.basename(enum.url)}', or use pretrained=False.", err) from err
    return _load(backbone, sd, f"torchvision:{enum}", _RESNET_HEAD_PREFIXES, strict=True)


# The backbones by family: a model accepts whole families (``ctal.models.register_model``), since
# the members of a family differ only in depth / width, not in the feature maps they return.
BACKBONE_FAMILIES = {"hrnet": ("hrnet_w18_small_v2",), "swin": tuple(SWIN_CHANNELS), "resnet": RESNET_BACKBONES}
BACKBONES = tuple(name for names in BACKBONE_FAMILIES.values() for name in names)


def backbone_family(name) -> str:
    """The family (a key of :data:`BACKBONE_FAMILIES`) of the backbone ``name`` (one of
    :data:`BACKBONES`); anything else is a ValueError."""
    for family, names in BACKBONE_FAMILIES.items():
        if name in names:
            return family
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def build_backbone(name: str, pretrained: bool = False,
                   weights: Union[str, os.PathLike, dict, None] = None,
                   dilated: Optional[bool] = None) -> nn.Module:
    """Backbone by name (one of :data:`BACKBONES`; ``"hrnet_w18"`` is accepted for HRNet).
    ``dilated`` applies to the ResNets only (default True: output stride 8)."""
    if dilated is not None and name not in RESNET_BACKBONES:
        raise ValueError(f"dilated={dilated!r} applies to the ResNet backbones {RESNET_BACKBONES} only, "
                         f"not {name!r}")
    if name in ("hrnet_w18_small_v2", "hrnet_w18", "hrnet18"):
        return HRNetBackbone(pretrained=pretrained, weights=weights)
    if name in SWIN_CHANNELS:
        return SwinBackbone(name, pretrained=pretrained, weights=weights)
    if name in RESNET_BACKBONES:
        return ResNetBackbone(name, dilated=True if dilated is None else dilated, pretrained=pretrained,
                              weights=weights)
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
