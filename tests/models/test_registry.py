"""The model registry: ``@register_model`` metadata drives ``build_model``'s checks (import
structure: tests/test_import_graph.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ctal.models import (MODELS, PAPER_SETUPS, ModelInfo, MultiTaskModel, build_model, list_models,
                         model_info, paper_setup, register_model)
from ctal.models import registry
from ctal.models.backbones import BACKBONE_FAMILIES, BACKBONES, backbone_family

PAPER_MODELS = ["ctal", "m_ctal", "stl", "hps", "padnet", "papnet", "mti_net"]
TWO = ["semseg", "depth"]


def test_every_model_is_registered_with_its_metadata():
    assert list_models() == PAPER_MODELS + ["stl_resnet", "hps_resnet", "cross_stitch", "nddr_cnn",
                                            "mtan", "sca"]
    assert list(MODELS) == list_models() and len(MODELS) == len(list_models())
    for name in list_models():
        info = model_info(name)
        assert isinstance(info, ModelInfo) and info.name == name and MODELS[name] is info.cls
        assert issubclass(info.cls, MultiTaskModel) and info.description
        assert set(info.backbones) <= set(BACKBONES) and info.backbones
        assert info.takes_ctal_backend == (name in ("ctal", "m_ctal"))
        if info.multi_scale:
            assert info.backbone_families == ("hrnet",), name
    assert list_models(paper=True) == PAPER_MODELS
    assert list_models(backbone="resnet50") == ["stl_resnet", "hps_resnet", "cross_stitch", "nddr_cnn", "mtan"]
    assert list_models(backbone="swin_v2_s") == ["ctal", "stl", "hps", "padnet", "papnet"]
    assert {n for n in list_models() if model_info(n).multi_scale} == {"m_ctal", "mti_net", "sca"}
    # every paper setup's backbone is accepted by the paper's single-scale models
    for dataset in PAPER_SETUPS:
        backbone = paper_setup(dataset)["backbone"]
        assert {"ctal", "stl", "hps", "padnet", "papnet"} <= set(list_models(backbone=backbone))


def test_models_mapping_is_a_read_only_view():
    with pytest.raises(TypeError):
        MODELS["mine"] = nn.Module  # type: ignore[index]
    with pytest.raises(KeyError):
        MODELS["nope"]
    assert "ctal" in MODELS and "nope" not in MODELS


@pytest.mark.parametrize("name", list_models())
def test_a_backbone_the_model_does_not_accept_is_a_clear_error(name):
    """Checked before anything is built: the message names the argument, the accepted backbones
    and the models that take the given one."""
    info = model_info(name)
    for backbone in BACKBONES:
        if backbone in info.backbones:
            continue
        with pytest.raises(ValueError) as err:
            build_model(name, TWO, {"semseg": 3}, (64, 64), backbone=backbone)
        msg = str(err.value)
        assert f"model {name!r} does not accept backbone={backbone!r}" in msg
        assert str(list(info.backbones)) in msg
        assert str(list_models(backbone=backbone)) in msg
        assert ("multi-scale" in msg) == info.multi_scale


def test_unknown_names_get_suggestions():
    with pytest.raises(ValueError, match=r"unknown model 'ctl'; did you mean 'ctal'.*expected one of"):
        build_model("ctl", TWO, {"semseg": 3}, (64, 64))
    with pytest.raises(ValueError, match=r"unknown model \['ctal'\]"):
        model_info(["ctal"])
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5'; did you mean 'resnet50'"):
        build_model("mtan", TWO, {"semseg": 3}, (64, 64), backbone="resnet5")
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_family("vit_b")
    assert [backbone_family(b) for b in BACKBONES] == [f for f, names in BACKBONE_FAMILIES.items() for _ in names]


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


class _Tiny(MultiTaskModel):
    """A model that records what build_model passed it."""

    def __init__(self, tasks, num_outputs, input_size, backbone="swin_v2_t", pretrained=False):
        super().__init__(tasks, num_outputs, input_size)
        self.backbone_name = backbone
        self.conv = nn.ModuleDict({t: nn.Conv2d(3, num_outputs[t], 1) for t in self.tasks})

    def forward(self, x):
        self.check_input(x)
        return {"final": {t: self.conv[t](x) for t in self.tasks}, "aux": {}}


class _TinyCTAL(_Tiny):
    def __init__(self, tasks, num_outputs, input_size, backbone="swin_v2_t", pretrained=False,
                 ctal_backend="auto"):
        super().__init__(tasks, num_outputs, input_size, backbone, pretrained)
        self.ctal_backend = ctal_backend


def test_register_model_metadata_drives_build_model(scratch_registry):
    assert register_model("tiny", backbones=("swin",), description="a test model")(_Tiny) is _Tiny
    register_model("tiny_ctal", backbones=("swin", "resnet"), description="with a CTAL backend")(_TinyCTAL)
    assert "tiny" in list_models() and MODELS["tiny"] is _Tiny and not model_info("tiny").paper
    model = build_model("tiny", TWO, {"semseg": 3}, (64, 64), backbone="swin_v2_b", ctal_backend="linear")
    assert isinstance(model, _Tiny) and model.model_name == "tiny" and model.backbone_name == "swin_v2_b"
    assert model(torch.zeros(1, 3, 64, 64))["final"]["semseg"].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"model 'tiny' does not accept backbone='resnet18': backbone must be "
                                         r"one of \['swin_v2_t', 'swin_v2_s', 'swin_v2_b'\] \(the Swin-v2 backbones\)"):
        build_model("tiny", TWO, {"semseg": 3}, (64, 64), backbone="resnet18")
    # ctal_backend reaches only the models that take it
    assert build_model("tiny_ctal", TWO, {"semseg": 3}, (64, 64), backbone="resnet50",
                       ctal_backend="linear").ctal_backend == "linear"
    assert model_info("tiny_ctal").backbones == ("swin_v2_t", "swin_v2_s", "swin_v2_b", "resnet18", "resnet50")


def test_register_model_refuses_bad_registrations(scratch_registry):
    with pytest.raises(ValueError, match="backbone families"):
        register_model("x", backbones=("vit",), description="d")
    with pytest.raises(ValueError, match="backbone families"):
        register_model("x", backbones=(), description="d")
    with pytest.raises(ValueError, match="identifier"):
        register_model("my model", backbones=("hrnet",), description="d")
    with pytest.raises(ValueError, match="description"):
        register_model("x", backbones=("hrnet",), description=" ")
    with pytest.raises(TypeError, match="MultiTaskModel subclasses"):
        register_model("x", backbones=("hrnet",), description="d")(nn.Conv2d)
    with pytest.raises(ValueError, match=r"'ctal' is already registered for ctal\.models\.ctal_net\.CTALNet"):
        register_model("ctal", backbones=("hrnet",), description="d")(_Tiny)
    assert model_info("ctal").cls.__name__ == "CTALNet"
