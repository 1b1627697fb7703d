"""What a run is built from its config: checks of the names it uses, datasets and loaders, the
model, the optimizer and the learning-rate schedule.

Every function takes a whole config, with or without its schema defaults filled in
(:func:`ctal.config.with_defaults`), so callers outside the :class:`~ctal.engine.Trainer` can
pass a config as loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import config as cfglib
from ..data import DATASETS, build_dataset, synthetic
from ..losses import MultiTaskLoss
from ..models import build_model, list_models
from ..models.backbones import BACKBONES
from ..nn import CrossTaskAffinity
from ..ops import backends, check_backend
from ..tasks import TASKS
from . import checkpoint, distributed


def preflight(cfg: dict, device: str, output_dir) -> None:
    """Cheap checks of everything a run names (dataset, tasks, model, backbone, CTAL backend,
    device, output dir) so that bad input fails before any data is generated or built."""
    cfg = cfglib.with_defaults(cfg)
    d, m = cfg["data"], cfg["model"]

    def unknown(what, value, choices):
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return cfglib.ConfigError(f"{what} {value!r} is unknown{hint} (expected one of {sorted(choices)})")

    if str(d["dataset"]).lower().replace("-", "_") not in DATASETS:
        raise unknown("data.dataset", d["dataset"], DATASETS)
    for t in d["tasks"] or []:
        if t not in TASKS:
            raise unknown("data.tasks entry", t, TASKS)
    if m["name"] not in list_models():
        raise unknown("model.name", m["name"], list_models())
    if "backbone" in m and m["backbone"] not in BACKBONES:
        raise unknown("model.backbone", m["backbone"], BACKBONES)
    if "ctal_backend" in m and m["ctal_backend"] != "auto" and m["ctal_backend"] not in backends():
        raise unknown("model.ctal_backend", m["ctal_backend"], ["auto", *backends()])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise cfglib.ConfigError(f"device {device!r} is not a device name (expected auto, cpu, cuda or "
                                 f"cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise cfglib.ConfigError(f"device {device!r}: this machine has no usable CUDA device; use "
                                     f"--device cpu (or device=auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise cfglib.ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise cfglib.ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise cfglib.ConfigError(f"output dir {out} exists and is not a directory")
    # Checked without creating it, so a run refused later leaves nothing behind.
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "" if parent == out else f" (its nearest existing parent {parent} is not a writable folder)"
        raise cfglib.ConfigError(f"output dir {out} is not writable{what}; choose another with --output-dir")


# --- data --------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # Each worker's augmentation RNGs follow the loader's (seeded) base seed: reproducible runs.
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)


def build_data(cfg: dict, split: str):
    """Dataset for ``split`` from the config's ``data`` section (generating synthetic data if needed)."""
    d = cfglib.with_defaults(cfg)["data"]
    if d["dataset"] == "synthetic" and d.get("generate"):
        g = d["generate"]
        synthetic.ensure(d["root"], num_train=g["num_train"], num_val=g["num_val"],
                         size=tuple(g["size"]), seed=g["seed"], workers=g["workers"])
    return build_dataset(d["dataset"], d["root"], split, tasks=d["tasks"],
                         augment=d["augment"] if split == "train" else False, **(d["options"] or {}))


def build_datasets(cfg: dict, dist: distributed.DistInfo, eval_only: bool = False):
    """``(train set, val set)``; ``eval_only``: no train set (None). The main process builds
    first, so that only it generates synthetic data."""
    first = "val" if eval_only else "train"
    ref = build_data(cfg, first) if dist.is_main else None
    distributed.barrier(dist)
    if ref is None:
        ref = build_data(cfg, first)
    if eval_only:
        return None, ref
    return ref, build_data(cfg, "val")


def build_loaders(cfg: dict, train_set, val_set, dist: distributed.DistInfo, generator: torch.Generator):
    """``(sampler, train loader, val loader)``. The train loader (None without a train set) draws
    its order from ``generator``, which a checkpoint saves, and drops the last partial batch; the
    sampler splits it over the processes under DDP (else None)."""
    cfg = cfglib.with_defaults(cfg)
    d = cfg["data"]
    bs, workers = d["batch_size"], d["num_workers"]
    sampler = train_loader = None
    if train_set is not None:
        if dist.enabled:
            sampler = DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True,
                                         seed=cfg["seed"], drop_last=True)
        train_loader = DataLoader(train_set, batch_size=bs, shuffle=sampler is None, sampler=sampler,
                                  num_workers=workers, drop_last=True, generator=generator,
                                  worker_init_fn=_worker_init, persistent_workers=False)
        if len(train_loader) == 0:
            raise ValueError(f"train set has {len(train_set)} samples, fewer than one batch of {bs}")
    val_loader = DataLoader(val_set, batch_size=d["eval_batch_size"] or bs, shuffle=False,
                            num_workers=workers, drop_last=False)
    return sampler, train_loader, val_loader


# --- model and loss ----------------------------------------------------------------------------

def _loaded_states(sources: Mapping) -> dict:
    """``single_task_weights`` with every checkpoint path replaced by its model state dict (a
    file named for several tasks is read once)."""
    states: dict = {}
    out = {}
    for task, src in sources.items():
        if isinstance(src, (str, os.PathLike)):
            key = os.fspath(src)
            if key not in states:
                states[key] = checkpoint.load_model_state(src)
            src = states[key]
        out[task] = src
    return out


def model_for(cfg: dict, dataset, load_pretrained: bool = True) -> nn.Module:
    """The model of ``cfg["model"]`` for ``dataset``'s tasks, classes and size. With
    ``load_pretrained=False`` backbone weights are neither downloaded nor read (a checkpoint
    replaces them)."""
    m = dict(cfg["model"])
    name = m.pop("name")
    if not load_pretrained:
        m["pretrained"] = False
        m.pop("weights", None)
    if m.get("single_task_weights"):
        m["single_task_weights"] = _loaded_states(m["single_task_weights"])
    return build_model(name, tasks=list(dataset.tasks), num_classes=dict(dataset.num_classes),
                       input_size=tuple(dataset.size), **m)


@dataclasses.dataclass
class TrainedModel:
    """A model rebuilt from a trainer checkpoint (:func:`model_from_checkpoint`), with what its
    predictions mean."""
    model: nn.Module  # in eval mode
    config: dict  # the run's config, schema defaults filled in
    checkpoint: Path
    epoch: int
    class_names: dict  # segmentation task -> class names in id order

    @property
    def tasks(self) -> list[str]:
        return list(self.model.tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        """Classes of the segmentation tasks."""
        return {t: n for t, n in self.model.num_outputs.items() if t in ("semseg", "human_parts")}

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.input_size)

    @property
    def inverse_depth(self) -> bool:
        """Depth targets of the training data were inverse depth (Cityscapes), not metres."""
        key = str(self.config["data"]["dataset"]).lower().replace("-", "_")
        return bool(getattr(DATASETS.get(key), "inverse_depth", False))


def set_ctal_backend(model: nn.Module, backend: str) -> int:
    """Run every CTAL block of ``model`` with ``backend`` (``"auto"`` or a ``ctal.ops`` backend
    name); returns how many blocks there are (0 for models without one)."""
    check_backend(backend)
    blocks = [m for m in model.modules() if isinstance(m, CrossTaskAffinity)]
    for m in blocks:
        m.backend = backend
    return len(blocks)


def model_from_checkpoint(path, map_location="cpu", ctal_backend: Optional[str] = None) -> TrainedModel:
    """The model of a trainer checkpoint (``last.pt`` / ``best.pt`` of ``train.py``) with its
    weights, in eval mode, rebuilt from the config the checkpoint holds: no pretrained or
    single-task weights are read and no data is needed (checkpoints before the input size and
    classes were recorded fall back to reading them from the run's validation data).
    ``ctal_backend``: run the CTAL blocks with this backend instead of the run's."""
    path = Path(path)
    try:
        s = checkpoint.load(path, map_location=map_location)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"{e}. Expected a trainer checkpoint (last.pt or best.pt "
                                         f"written by train.py)") from e
    if not isinstance(s.get("config"), dict) or not s.get("tasks"):
        raise checkpoint.CheckpointError(
            f"{path} holds model weights but not the config of the run that trained them (keys "
            f"{sorted(s)[:8]}); a trainer checkpoint (last.pt or best.pt written by train.py) is needed "
            f"to rebuild the model")
    cfg = cfglib.with_defaults(cfglib.migrate(s["config"]))  # configs of older runs: keys renamed since
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "single_task_weights"}  # init only
    tasks = list(s["tasks"])
    if "input_size" in s and "num_classes" in s:
        shape = SimpleNamespace(tasks=tasks, num_classes=dict(s["num_classes"]), size=tuple(s["input_size"]),
                                class_names=dict(s.get("class_names") or {}))
    else:
        try:
            data = build_data(cfg, "val")
        except (OSError, ValueError) as e:
            raise checkpoint.CheckpointError(
                f"{path} predates checkpoints that record the model's input size and classes, so "
                f"they are read from the run's validation data (data.root={cfg['data']['root']!r}), "
                f"which failed: {e}") from e
        shape = SimpleNamespace(tasks=tasks, num_classes=dict(data.num_classes), size=tuple(data.size),
                                class_names=dict(getattr(data, "class_names", None) or {}))
    model = model_for(cfg, shape, load_pretrained=False)
    model.load_state_dict(s["model"])
    if ctal_backend is not None:
        set_ctal_backend(model, ctal_backend)
    names = {t: tuple(shape.class_names.get(t) or ()) for t, n in shape.num_classes.items()}
    names = {t: v if len(v) == shape.num_classes[t] else tuple(f"class {i}" for i in range(shape.num_classes[t]))
             for t, v in names.items()}
    return TrainedModel(model.eval(), cfg, path, int(s.get("epoch", 0)), names)


def loss_for(cfg: dict, tasks) -> MultiTaskLoss:
    """The multitask loss of ``cfg["loss"]`` over ``tasks`` (in this order)."""
    return MultiTaskLoss(list(tasks), **cfglib.with_defaults(cfg)["loss"])


def trained_parameters(cfg: dict, model: nn.Module, criterion: nn.Module) -> list:
    """What the optimizer updates: the model's parameters and the loss module's (uncertainty
    log-variances). Models with their own learning-rate scheme (Cross-Stitch, NDDR-CNN: mixing
    parameters at a multiple of the base rate) provide the groups; the loss parameters join at
    the base rate."""
    loss_params = list(criterion.parameters())
    if not hasattr(model, "optimizer_param_groups"):
        return list(model.parameters()) + loss_params
    base_lr = float(cfg["optim"]["lr"])
    params = list(model.optimizer_param_groups(base_lr))
    if loss_params:
        params.append({"name": "loss", "params": loss_params, "lr": base_lr})
    return params


# --- optimizer and schedule --------------------------------------------------------------------

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    """The optimizer of ``cfg["optim"]`` over ``params``: a list of tensors, or a list of
    parameter-group dicts (``{"params": [...], "lr": ..., ...}``, e.g. a model's
    ``optimizer_param_groups``); a group without ``lr`` gets ``optim.lr``."""
    params = list(params)
    if any(isinstance(p, dict) for p in params):
        bad = [i for i, g in enumerate(params) if not isinstance(g, dict) or "params" not in g]
        if bad:
            raise TypeError(f"build_optimizer: mix of tensors and parameter groups, or groups without "
                            f"'params' (entries {bad[:5]}); pass a list of tensors or a list of group dicts")
    o = cfglib.with_defaults(cfg)["optim"]
    name = o["name"].lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be adam, adamw or sgd, got {o['name']!r}")
    kw = {} if o["weight_decay"] is None else {"weight_decay": o["weight_decay"]}
    if name == "sgd":
        kw.update(momentum=o["momentum"], nesterov=o["nesterov"])
    return OPTIMIZERS[name](params, lr=o["lr"], **kw)


class LRFactor:
    """The learning-rate multiplier of epoch ``e`` in closed form: cosine to ``min_lr``,
    poly ``(1 - e/E)^power``, step (``gamma`` every ``step_size`` epochs) or constant.
    Closed form (not torch's recursive cosine) so that a resumed run given more epochs re-plans
    its schedule exactly by changing :attr:`epochs`."""

    def __init__(self, name: str, epochs: int, base_lr: float, min_lr: float = 0.0,
                 power: float = 0.9, step_size: int = 1, gamma: float = 0.1):
        self.name, self.epochs, self.base_lr = name, epochs, base_lr
        self.min_lr, self.power, self.step_size, self.gamma = min_lr, power, step_size, gamma

    def __call__(self, e: int) -> float:
        E = max(self.epochs, 1)
        if self.name == "cosine":
            floor = self.min_lr / self.base_lr if self.base_lr > 0 else 0.0
            return floor + (1 - floor) * (1 + math.cos(math.pi * min(e, E) / E)) / 2
        if self.name == "poly":
            return max(1 - e / E, 0.0) ** self.power
        if self.name == "step":
            return self.gamma ** (e // self.step_size)
        return 1.0


def build_scheduler(cfg: dict, opt, epochs: int):
    """Per-epoch schedules (:class:`LRFactor`): cosine to ``min_lr``, poly, step, none."""
    s = cfglib.with_defaults(cfg)["schedule"]
    name = s["name"].lower()
    if name not in ("cosine", "poly", "step", "none"):
        raise ValueError(f"schedule.name must be cosine, poly, step or none, got {s['name']!r}")
    kw = dict(min_lr=s["min_lr"], power=s["power"], gamma=s["gamma"])
    if name == "step":
        if "step_size" not in s:
            raise cfglib.ConfigError("schedule.step_size is required by schedule.name=step")
        kw["step_size"] = s["step_size"]
    factors = [LRFactor(name, epochs, g["lr"], **kw) for g in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, factors)


def replan_schedule(scheduler, epochs: int) -> None:
    """Stretch (or shrink) a :func:`build_scheduler` schedule to ``epochs`` in place, keeping
    the epochs already done, and set every group's learning rate to the new plan's value."""
    for f in scheduler.lr_lambdas:
        f.epochs = epochs
    lrs = [g["initial_lr"] * f(scheduler.last_epoch)
           for g, f in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas)]
    for g, lr in zip(scheduler.optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs


def amp_setting(cfg: dict) -> Optional[str]:
    """``train.amp``: None, "bf16" or "fp16" (exactly; the schema's choices ignore case)."""
    amp = cfglib.with_defaults(cfg)["train"]["amp"]
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"train.amp must be null, bf16 or fp16, got {amp!r}")
    return amp
