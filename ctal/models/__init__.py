"""ctal models: backbones, heads, CTAL nets, the paper's baselines and a registry.

Every model maps images ``(B, 3, H, W)`` to ``{"final": {task: tensor}, "aux": {name: {task:
tensor}}}`` (``ctal/tasks.py``), predictions at the input resolution. Start from
:func:`build_model` and :func:`list_models`.
"""
from .backbones import (HRNetBackbone, HRNetFuse, LoadReport, ResNetBackbone, SwinBackbone,
                        build_backbone, load_hrnet_weights, load_resnet_weights, load_swin_weights)
from .baselines import HardSharingNet, MTINet, PADNet, PAPNet, SingleTaskNet
from .base import MultiTaskModel
from .ctal_net import CTALBlock, CTALNet, MCTALNet, resample_fusion
from .registry import PAPER_SETUPS, build_model, list_models, paper_setup

__all__ = ["build_model", "list_models", "paper_setup", "PAPER_SETUPS", "MultiTaskModel",
           "CTALNet", "MCTALNet", "CTALBlock", "resample_fusion", "SingleTaskNet",
           "HardSharingNet", "PADNet", "PAPNet", "MTINet", "HRNetBackbone", "HRNetFuse",
           "SwinBackbone", "ResNetBackbone", "build_backbone", "load_resnet_weights", "load_hrnet_weights", "load_swin_weights", "LoadReport"]
