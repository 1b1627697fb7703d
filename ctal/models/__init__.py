"""ctal models: backbones, heads, CTAL nets, the paper's baselines, the published multitask
baselines (Cross-Stitch, NDDR-CNN, MTAN, SCA) and the registry.

Every model maps images ``(B, 3, H, W)`` to ``{"final": {task: tensor}, "aux": {name: {task:
tensor}}}`` (``ctal/tasks.py``), predictions at the input resolution. Start from
:func:`build_model` and :func:`list_models`; each model is registered where it is defined
(:func:`register_model`, :func:`model_info`). Models with special optimizer groups (Cross-Stitch,
NDDR-CNN: mixing parameters at a larger learning rate) have ``optimizer_param_groups(base_lr)``.
"""
from .backbones import (HRNetBackbone, HRNetFuse, LoadReport, ResNetBackbone, SwinBackbone,
                        build_backbone, load_hrnet_weights, load_resnet_weights, load_swin_weights)
from .base import MultiTaskModel
from .registry import (MODELS, PAPER_SETUPS, ModelInfo, build_model, list_models, model_info,
                       paper_setup, register_model)
# Importing the model modules registers their models; list_models() keeps this order within the
# paper's models and within the others.
from .ctal_net import CTALBlock, CTALNet, MCTALNet
from .baselines import HardSharingNet, MTINet, PADNet, PAPNet, SingleTaskNet
from .cross_stitch import CrossStitchNet
from .nddr import NDDRNet
from .mtan import MTAN
from .sca import SCANet
from .stitched import init_from_single_task, param_groups

__all__ = ["build_model", "list_models", "MODELS", "paper_setup", "PAPER_SETUPS", "register_model",
           "model_info", "ModelInfo", "MultiTaskModel",
           "CTALNet", "MCTALNet", "CTALBlock", "SingleTaskNet", "HardSharingNet", "PADNet", "PAPNet",
           "MTINet", "CrossStitchNet", "NDDRNet", "MTAN", "SCANet", "init_from_single_task",
           "param_groups", "HRNetBackbone", "HRNetFuse", "SwinBackbone", "ResNetBackbone",
           "build_backbone", "load_resnet_weights", "load_hrnet_weights", "load_swin_weights",
           "LoadReport"]
