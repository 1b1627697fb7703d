"""ctal models: backbones, heads, CTAL nets, the paper's baselines, the other seed systems
(Cross-Stitch, NDDR-CNN, MTAN, SCA) and a registry.

Every model maps images ``(B, 3, H, W)`` to ``{"final": {task: tensor}, "aux": {name: {task:
tensor}}}`` (``ctal/tasks.py``), predictions at the input resolution. Start from
:func:`build_model` and :func:`list_models`. Models with special optimizer groups (Cross-Stitch,
NDDR-CNN: mixing parameters at a larger learning rate) have ``optimizer_param_groups(base_lr)``.
"""
from .backbones import (HRNetBackbone, HRNetFuse, LoadReport, ResNetBackbone, SwinBackbone,
                        build_backbone, load_hrnet_weights, load_resnet_weights, load_swin_weights)
from .baselines import HardSharingNet, MTINet, PADNet, PAPNet, SingleTaskNet
from .base import MultiTaskModel
from .cross_stitch import CrossStitchNet
from .ctal_net import CTALBlock, CTALNet, MCTALNet
from .mtan import MTAN
from .nddr import NDDRNet
from .registry import MODELS, PAPER_SETUPS, build_model, list_models, paper_setup
from .sca import SCANet
from .seed_systems import init_from_single_task, param_groups

__all__ = ["build_model", "list_models", "MODELS", "paper_setup", "PAPER_SETUPS", "MultiTaskModel",
           "CTALNet", "MCTALNet", "CTALBlock", "SingleTaskNet", "HardSharingNet", "PADNet", "PAPNet",
           "MTINet", "CrossStitchNet", "NDDRNet", "MTAN", "SCANet", "init_from_single_task",
           "param_groups", "HRNetBackbone", "HRNetFuse", "SwinBackbone", "ResNetBackbone",
           "build_backbone", "load_resnet_weights", "load_hrnet_weights", "load_swin_weights",
           "LoadReport"]
