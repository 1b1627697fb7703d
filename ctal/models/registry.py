"""The model registry: build any model by name, e.g.
``build_model("ctal", ["semseg", "depth"], {"semseg": 13}, (288, 384))``.

Each model class is registered where it is defined, with ``@register_model(name, ...)``, and the
registration records what :func:`build_model` needs to know about it (:class:`ModelInfo`): the
backbone families it accepts (``hrnet``, ``swin``, ``resnet``; see
``ctal.models.backbones.BACKBONE_FAMILIES``), whether it is one of the CTAL paper's models,
whether it is multi-scale, and a one-line description. One class may be registered under several
names (``stl`` on HRNet / Swin and ``stl_resnet`` on ResNet are both ``SingleTaskNet``).

Names (``list_models()``): the CTAL paper's models ``ctal`` (CTALNet), ``m_ctal`` (M-CTALNet),
``stl``, ``hps``, ``padnet``, ``papnet``, ``mti_net`` (HRNet / Swin); the published multitask
baselines on a (dilated) ResNet-18/50 with DeepLab-v3 heads, as in Multi-Task-Learning-PyTorch:
``stl_resnet`` / ``hps_resnet`` (the same STL / HPS classes), ``cross_stitch``, ``nddr_cnn``,
``mtan``; and ``sca`` (HRNet only). A backbone a model does not accept is a ValueError naming
the accepted ones.

``PAPER_SETUPS`` holds the paper's dataset settings (tasks, classes, training grid, backbone,
saliency channels) so that a config can say ``**paper_setup("nyuv2")``.

The registry is filled when ``ctal.models`` imports the model modules (``ctal/models/__init__.py``);
this module imports none of them, so that they can import :func:`register_model`.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Iterator, Mapping
from typing import Optional, Sequence

from torch import nn

from .._checks import check_task_names
from ..tasks import output_channels
from .backbones import BACKBONE_FAMILIES, BACKBONES, backbone_family
from .base import MultiTaskModel

__all__ = ["register_model", "ModelInfo", "model_info", "build_model", "list_models", "MODELS",
           "PAPER_SETUPS", "paper_setup"]

_FAMILY_LABELS = {"hrnet": "HRNet", "swin": "Swin-v2", "resnet": "ResNet"}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model name (see :func:`register_model`)."""

    name: str
    cls: type
    backbone_families: tuple[str, ...]
    description: str
    paper: bool
    multi_scale: bool
    takes_ctal_backend: bool  # the class has a ``ctal_backend`` argument (it runs a CTAL block)

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbone names the model accepts."""
        return tuple(b for f in self.backbone_families for b in BACKBONE_FAMILIES[f])


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, backbones: Sequence[str], description: str, paper: bool = False,
                   multi_scale: bool = False):
    """Class decorator: register a :class:`~ctal.models.base.MultiTaskModel` subclass as model
    ``name`` for :func:`build_model`.

    ``backbones``: the backbone families the model accepts (keys of
    ``ctal.models.backbones.BACKBONE_FAMILIES``: ``"hrnet"``, ``"swin"``, ``"resnet"``).
    ``description``: one line for listings and messages. ``paper``: one of the models the CTAL
    paper compares (its configs and :data:`PAPER_SETUPS`). ``multi_scale``: the model uses the
    four HRNet branches (said in the error for another backbone). Decorators stack, registering
    one class under several names. The class is returned unchanged."""
    families = (backbones,) if isinstance(backbones, str) else tuple(backbones)
    unknown = [f for f in families if f not in BACKBONE_FAMILIES]
    if not families or unknown:
        raise ValueError(f"register_model({name!r}): backbones must name backbone families from "
                         f"{list(BACKBONE_FAMILIES)}, got {backbones!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_model: the model name must be an identifier, got {name!r}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"register_model({name!r}): description must be a non-empty line")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, MultiTaskModel)):
            raise TypeError(f"register_model({name!r}) applies to MultiTaskModel subclasses "
                            f"(the output contract of build_model), not {cls!r}")
        old = _REGISTRY.get(name)
        # The same class defined again (a reloaded module) replaces its entry; another class may
        # not take the name.
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"model name {name!r} is already registered for "
                             f"{old.cls.__module__}.{old.cls.__qualname__}")
        _REGISTRY[name] = ModelInfo(
            name=name, cls=cls, backbone_families=families, description=description.strip(),
            paper=bool(paper), multi_scale=bool(multi_scale),
            takes_ctal_backend="ctal_backend" in inspect.signature(cls).parameters)
        return cls

    return register


def list_models(*, backbone: Optional[str] = None, paper: Optional[bool] = None) -> list[str]:
    """The registered model names: the CTAL paper's models first, then the others, each group in
    the order the models are registered. ``backbone``: only the models that accept it;
    ``paper``: only the paper's models (True) or only the others (False)."""
    names = [n for n, i in _REGISTRY.items()
             if (backbone is None or backbone in i.backbones) and (paper is None or i.paper == paper)]
    return sorted(names, key=lambda n: not _REGISTRY[n].paper)  # stable: keeps registration order


class _ModelClasses(Mapping):
    """Read-only ``{name: model class}`` view of the registry, in :func:`list_models` order."""

    def __getitem__(self, name: str) -> type:
        return _REGISTRY[name].cls

    def __iter__(self) -> Iterator[str]:
        return iter(list_models())

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"MODELS({ {n: self[n].__name__ for n in self} })"


MODELS: Mapping[str, type] = _ModelClasses()


def model_info(name: str) -> ModelInfo:
    """The registration of model ``name``; an unknown name is a ValueError with suggestions."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (expected one of {list_models()})") from None


def _families_text(families: Sequence[str]) -> str:
    return f"the {' / '.join(_FAMILY_LABELS[f] for f in families)} backbones"


def _check_backbone(info: ModelInfo, backbone) -> None:
    """A clear ValueError unless ``backbone`` is known and accepted by the model."""
    if backbone not in BACKBONES:
        close = difflib.get_close_matches(str(backbone), BACKBONES, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown backbone {backbone!r}{hint} (backbone must be one of {list(BACKBONES)})")
    if backbone in info.backbones:
        return
    why = f"; {info.name} is multi-scale" if info.multi_scale else ""
    family = backbone_family(backbone)
    raise ValueError(
        f"model {info.name!r} does not accept backbone={backbone!r}: backbone must be one of "
        f"{list(info.backbones)} ({_families_text(info.backbone_families)}{why}). {backbone!r} is one "
        f"of {_families_text((family,))}, which the models {list_models(backbone=backbone)} accept")


PAPER_SETUPS = {
    "nyuv2": dict(tasks=["semseg", "depth", "normals"], num_classes={"semseg": 13},
                  input_size=(288, 384), backbone="hrnet_w18_small_v2"),
    "cityscapes": dict(tasks=["semseg", "depth"], num_classes={"semseg": 19},
                       input_size=(128, 256), backbone="hrnet_w18_small_v2"),
    "pascal_context": dict(tasks=["semseg", "normals", "sal", "edge", "human_parts"],
                           num_classes={"semseg": 21, "human_parts": 7},
                           input_size=(512, 512), backbone="swin_v2_s", sal_channels=2),
}


def paper_setup(dataset: str) -> dict:
    """The paper's ``tasks``, ``num_classes``, ``input_size`` and ``backbone`` for ``dataset``
    (and ``sal_channels`` where it has saliency)."""
    if dataset not in PAPER_SETUPS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(PAPER_SETUPS)}")
    s = PAPER_SETUPS[dataset]
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in s.items()}


def build_model(name: str, tasks: Sequence[str], num_classes: Optional[Mapping[str, int]] = None,
                input_size=(288, 384), backbone: str = "hrnet_w18_small_v2", pretrained: bool = False,
                ctal_backend: str = "auto", sal_channels: int = 1, **kw) -> nn.Module:
    """Build model ``name`` for ``tasks`` on ``backbone`` and images of ``input_size``.

    ``num_classes`` gives the class count of the segmentation tasks (``semseg``, ``human_parts``);
    the other tasks' channels follow ``ctal.tasks.output_channels``: ``sal_channels=2`` gives
    every saliency head (initial predictions included) two class logits, as the CTAL paper's
    PASCAL-Context models have, instead of one sigmoid logit. ``ctal_backend`` is used by
    the models with a CTAL block and ignored by the others (so one config can set it for all).
    Extra keyword arguments go to the model class (e.g. ``gamma``, ``weights``, ``beta``,
    ``dilated`` and ``alpha`` for the ResNet models, ``single_task_weights`` for Cross-Stitch /
    NDDR-CNN: state dicts, see ``ctal.models.stitched.init_from_single_task``).
    """
    info = model_info(name)
    _check_backbone(info, backbone)
    tasks = check_task_names(tasks)
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained must be True or False, got {pretrained!r}")
    num_classes = dict(num_classes or {})
    num_outputs = {t: output_channels(t, num_classes.get(t), sal_channels) for t in tasks}
    kwargs = dict(backbone=backbone, pretrained=pretrained, **kw)
    if info.takes_ctal_backend:
        kwargs["ctal_backend"] = ctal_backend
    model = info.cls(tasks, num_outputs, input_size, **kwargs)
    model.model_name = name
    return model
