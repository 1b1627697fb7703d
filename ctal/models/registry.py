"""Build any model by name: ``build_model("ctal", ["semseg", "depth"], {"semseg": 13}, (288, 384))``.

Names (``list_models()``): ``ctal`` (CTALNet), ``m_ctal`` (M-CTALNet), ``stl``, ``hps``, ``padnet``,
``papnet``, ``mti_net`` (HRNet / Swin); the other seed systems' models on a (dilated) ResNet-18/50
with DeepLab-v3 heads, as in Multi-Task-Learning-PyTorch: ``stl_resnet`` / ``hps_resnet`` (the same
STL / HPS classes), ``cross_stitch``, ``nddr_cnn``, ``mtan``; and ``sca`` (HRNet only).

Backbone rules (a clear ValueError otherwise): the ResNet backbones (``resnet18``, ``resnet50``)
go with the ResNet models above and only with them; ``m_ctal``, ``mti_net`` and ``sca`` are
multi-scale and need ``hrnet_w18_small_v2``.

``PAPER_SETUPS`` holds the paper's dataset settings (tasks, classes, training grid, backbone) so
that a config can say ``**paper_setup("nyuv2")``.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from torch import nn

from .._checks import check_task_names
from ..tasks import output_channels
from .backbones import BACKBONES, RESNET_BACKBONES, is_resnet
from .baselines import HardSharingNet, MTINet, PADNet, PAPNet, SingleTaskNet
from .cross_stitch import CrossStitchNet
from .ctal_net import CTALNet, MCTALNet
from .mtan import MTAN
from .nddr import NDDRNet
from .sca import SCANet

__all__ = ["build_model", "list_models", "MODELS", "PAPER_SETUPS", "paper_setup"]

MODELS: dict[str, type] = {
    "ctal": CTALNet,
    "m_ctal": MCTALNet,
    "stl": SingleTaskNet,
    "hps": HardSharingNet,
    "padnet": PADNet,
    "papnet": PAPNet,
    "mti_net": MTINet,
    # The Multi-Task-Learning-PyTorch baselines on dilated ResNets (NYUD: 50, PASCAL: 18).
    "stl_resnet": SingleTaskNet,
    "hps_resnet": HardSharingNet,
    "cross_stitch": CrossStitchNet,
    "nddr_cnn": NDDRNet,
    "mtan": MTAN,
    # SCA (sequential cross-task then cross-scale attention) on MTI-Net / HRNet.
    "sca": SCANet,
}
_CTAL_MODELS = ("ctal", "m_ctal")
_HRNET_ONLY = ("m_ctal", "mti_net", "sca")
_RESNET_MODELS = ("stl_resnet", "hps_resnet", "cross_stitch", "nddr_cnn", "mtan")

PAPER_SETUPS = {
    "nyuv2": dict(tasks=["semseg", "depth", "normals"], num_classes={"semseg": 13},
                  input_size=(288, 384), backbone="hrnet_w18_small_v2"),
    "cityscapes": dict(tasks=["semseg", "depth"], num_classes={"semseg": 19},
                       input_size=(128, 256), backbone="hrnet_w18_small_v2"),
    "pascal_context": dict(tasks=["semseg", "normals", "sal", "edge", "human_parts"],
                           num_classes={"semseg": 21, "human_parts": 7},
                           input_size=(512, 512), backbone="swin_v2_s"),
}


def paper_setup(dataset: str) -> dict:
    """The paper's ``tasks``, ``num_classes``, ``input_size`` and ``backbone`` for ``dataset``."""
    if dataset not in PAPER_SETUPS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(PAPER_SETUPS)}")
    s = PAPER_SETUPS[dataset]
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in s.items()}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, tasks: Sequence[str], num_classes: Optional[Mapping[str, int]] = None,
                input_size=(288, 384), backbone: str = "hrnet_w18_small_v2", pretrained: bool = False,
                ctal_backend: str = "auto", **kw) -> nn.Module:
    """Build model ``name`` for ``tasks`` on ``backbone`` and images of ``input_size``.

    ``num_classes`` gives the class count of the segmentation tasks (``semseg``, ``human_parts``);
    the other tasks' channels follow ``ctal.tasks.output_channels``. ``ctal_backend`` is used by
    the models with a CTAL block and ignored by the others (so one config can set it for all).
    Extra keyword arguments go to the model class (e.g. ``gamma``, ``weights``, ``beta``,
    ``dilated`` and ``alpha`` for the ResNet models, ``single_task_weights`` for Cross-Stitch /
    NDDR-CNN).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    if name in _HRNET_ONLY and not backbone.startswith("hrnet"):
        raise ValueError(f"{name} is multi-scale and needs backbone='hrnet_w18_small_v2', got {backbone!r}")
    if (name in _RESNET_MODELS) != is_resnet(backbone):
        raise ValueError(f"{name} with backbone {backbone!r}: the ResNet backbones are used by "
                         f"{_RESNET_MODELS} only, and those need one of {RESNET_BACKBONES}")
    tasks = check_task_names(tasks)
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained must be True or False, got {pretrained!r}")
    num_classes = dict(num_classes or {})
    num_outputs = {t: output_channels(t, num_classes.get(t)) for t in tasks}
    kwargs = dict(backbone=backbone, pretrained=pretrained, **kw)
    if name in _CTAL_MODELS:
        kwargs["ctal_backend"] = ctal_backend
    model = MODELS[name](tasks, num_outputs, input_size, **kwargs)
    model.model_name = name
    return model
