"""The multitask training loop behind ``train.py``.

One ``Trainer`` owns everything a run needs (data, model, loss weighting, optimizer, schedule, AMP,
DDP, logging) and checkpoints all of it at every epoch boundary, so that training k epochs equals
k/2 epochs + resume + k/2 epochs bit for bit (same seeds, same data order, same RNG streams).
"""
from __future__ import annotations

import difflib
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .. import config as cfglib
from .._io import write_json
from . import checkpoint, distributed

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # Each worker's augmentation RNGs follow the loader's (seeded) base seed: reproducible runs.
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    images = batch["image"].to(device, non_blocking=True)
    targets = {k: v.to(device, non_blocking=True) for k, v in batch.items()
               if k not in ("image", "meta") and torch.is_tensor(v)}
    return images, targets


def _float_outputs(out: dict) -> dict:
    return dict(final={t: p.float() for t, p in out["final"].items()},
                aux={k: {t: p.float() for t, p in a.items()} for k, a in (out.get("aux") or {}).items()})


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_data(cfg: dict, split: str):
    """Dataset for ``split`` from the config's ``data`` section (generating synthetic data if needed)."""
    from ..data import build_dataset
    d = cfg["data"]
    if d["dataset"] == "synthetic" and d.get("generate"):
        from ..data import synthetic
        g = d["generate"]
        synthetic.ensure(d["root"], num_train=g["num_train"], num_val=g["num_val"],
                         size=tuple(g["size"]), seed=g.get("seed", 0), workers=g.get("workers"))
    kw = dict(d.get("options") or {})
    return build_dataset(d["dataset"], d["root"], split, tasks=d.get("tasks"),
                         augment=d.get("augment", False) if split == "train" else False, **kw)


def build_model(cfg: dict, dataset, load_pretrained: bool = True) -> nn.Module:
    """The model of ``cfg["model"]`` for ``dataset``'s tasks, classes and size. With
    ``load_pretrained=False`` backbone weights are neither downloaded nor read (a checkpoint
    replaces them)."""
    from ..models import build_model as build
    m = dict(cfg["model"])
    name = m.pop("name")
    if not load_pretrained:
        m["pretrained"] = False
        m.pop("weights", None)
    return build(name, tasks=list(dataset.tasks), num_classes=dict(dataset.num_classes),
                 input_size=tuple(dataset.size), **m)


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
    o = cfg["optim"]
    name = o["name"].lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=o["lr"], weight_decay=o.get("weight_decay", 0.0))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o.get("weight_decay", 0.01))
    if name == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o.get("momentum", 0.9),
                               weight_decay=o.get("weight_decay", 0.0), nesterov=o.get("nesterov", False))
    raise ValueError(f"optim.name must be adam, adamw or sgd, got {o['name']!r}")


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
    s = cfg.get("schedule") or {"name": "none"}
    name = s["name"].lower()
    if name not in ("cosine", "poly", "step", "none"):
        raise ValueError(f"schedule.name must be cosine, poly, step or none, got {s['name']!r}")
    if name == "step" and "step_size" not in s:
        raise cfglib.ConfigError("schedule.step_size is required by schedule.name=step")
    factors = [LRFactor(name, epochs, g["lr"], min_lr=s.get("min_lr", 0.0), power=s.get("power", 0.9),
                        step_size=s.get("step_size", 1), gamma=s.get("gamma", 0.1))
               for g in opt.param_groups]
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


@torch.no_grad()
def evaluate(model: nn.Module, loader, tasks, num_classes, device, dataset_name: str = "",
             amp: Optional[str] = None, progress: bool = True, max_batches: Optional[int] = None,
             edge_thresholds: int = 99, original_resolution: bool = False) -> dict:
    """Metrics of ``model`` over the whole loader (every batch, the last partial one included).

    ``edge_thresholds`` < 99 makes the (slow) boundary matching of odsF cheaper for validation
    during training; reported results use 99. ``original_resolution`` scores each prediction,
    bilinearly resized, against the image's targets as stored on disk
    (``loader.dataset.original_targets``) instead of the resized ones the network was fed.
    """
    from ..metrics import build_meters, update_meters
    meters = build_meters(tasks, num_classes, dataset=dataset_name, edge_thresholds=edge_thresholds)
    model.eval()
    it = tqdm(loader, desc="eval", leave=False, disable=not progress)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        images, targets = _to_device(batch, device)
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp in AMP_DTYPES):
            out = model(images)["final"]
        if not original_resolution:
            update_meters(meters, {t: p.float() for t, p in out.items()}, targets, where="evaluate")
            continue
        for b, index in enumerate(batch["meta"]["index"].tolist()):
            original = loader.dataset.original_targets(index)
            for t, m in meters.items():
                target = original[t].unsqueeze(0).to(device)
                pred = nn.functional.interpolate(out[t][b:b + 1].float(), size=target.shape[-2:],
                                                 mode="bilinear", align_corners=False)
                m.update(pred, target)
    return {t: m.compute() for t, m in meters.items()}


def check_best_metric(best_metric, tasks) -> None:
    """``eval.best_metric`` must be ``delta_m`` or a ``task/metric`` the meters of ``tasks`` report
    with a known direction (:data:`ctal.metrics.HIGHER_IS_BETTER`); raise ConfigError (a ValueError)
    listing them."""
    import difflib

    from ..metrics import HIGHER_IS_BETTER
    valid = [k for k in HIGHER_IS_BETTER if k.partition("/")[0] in set(tasks)]
    if best_metric == "delta_m" or best_metric in valid:
        return
    close = ([k for k in valid if k.lower() == str(best_metric).lower()]  # semseg/miou -> semseg/mIoU
             or difflib.get_close_matches(str(best_metric), valid, n=3, cutoff=0.6))
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise cfglib.ConfigError(f"eval.best_metric {best_metric!r} is not a metric of this run's tasks {list(tasks)}.{hint} "
                     f"Expected 'delta_m' (with eval.baselines) or one of {valid}")


# Config entries a resumed run may change, and what the change does. Every other difference
# from the checkpoint's config is refused by :meth:`Trainer.resume`: the optimizer, schedule,
# loss weighting and data order come back from the checkpoint, so such a setting could not take
# effect, and recording it would misreport the run.
RESUME_MAY_CHANGE = {
    "train.epochs": "the learning-rate schedule is re-planned for the new length",
    "train.max_steps_per_epoch": "steps per epoch from here on",
    "train.eval_every": "evaluation schedule", "train.log_every": "logging only",
    "train.save_images": "outputs only", "train.find_unused_parameters": "DDP bookkeeping only",
    "data.root": "the same data at another path", "data.eval_batch_size": "evaluation batching only",
    "data.num_workers": "loading only (per-worker augmentation streams differ, so the rest of the "
                        "run is not bit-identical to an uninterrupted one)",
    "data.generate.workers": "generation speed only",
    "device": "where it runs", "output_dir": "where it writes", "name": "a label",
    "model.ctal_backend": "every backend computes the same function",
    "model.pretrained": "initialization only (the checkpoint replaces every weight)",
    "model.weights": "initialization only (the checkpoint replaces every weight)",
    "eval.edge_thresholds": "evaluation only", "eval.original_resolution": "evaluation only",
}


def _leaves(node, prefix: str = "") -> dict:
    """``{"optim.lr": 1e-3, ...}``: the dotted leaf entries of a nested config."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict, current: dict) -> dict:
    """``{dotted key: (saved value, current value)}`` for every entry that differs (a missing
    entry counts as ``None``)."""
    a, b = _leaves(saved), _leaves(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def preflight(cfg: dict, device: str, output_dir) -> None:
    """Cheap checks of everything a run names (dataset, tasks, model, backbone, CTAL backend,
    device, output dir) so that bad input fails before any data is generated or built."""
    from ..data import DATASETS
    from ..models import list_models
    from ..models.backbones import BACKBONES
    from ..ops import backends
    from ..tasks import TASKS
    d, m = cfg["data"], cfg["model"]

    def unknown(what, value, choices):
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return cfglib.ConfigError(f"{what} {value!r} is unknown{hint} (expected one of {sorted(choices)})")

    if str(d["dataset"]).lower().replace("-", "_") not in DATASETS:
        raise unknown("data.dataset", d["dataset"], DATASETS)
    for t in d.get("tasks") or []:
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


class Trainer:
    """Builds a run from a config dict (see ``ctal/configs/*.yaml``) and trains / evaluates it."""

    def __init__(self, cfg: dict, output_dir: Optional[str] = None, device: Optional[str] = None,
                 progress: bool = True, eval_only: bool = False):
        """``eval_only``: build what evaluating a checkpoint needs (no train split, no pretrained
        backbone download: :meth:`load_weights` supplies every weight); :meth:`fit` then refuses."""
        cfglib.validate(cfg)
        self.cfg = cfg
        train = cfg.setdefault("train", {})
        ev = cfg.get("eval") or {}
        self.best_metric = ev.get("best_metric", "delta_m")
        if cfg["data"].get("tasks"):  # fail before any data is generated when the tasks are known
            check_best_metric(self.best_metric, cfg["data"]["tasks"])
        self.baselines = None
        if ev.get("baselines"):
            from ..metrics import load_baselines
            self.baselines = load_baselines(ev["baselines"])
        if self.best_metric == "delta_m" and self.baselines is None:
            raise cfglib.ConfigError("eval.best_metric is delta_m but eval.baselines (single-task results JSON) "
                             "is not set; set it or choose a metric like 'semseg/mIoU'")
        dev = device or cfg.get("device", "auto")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        preflight(cfg, dev, cfglib.output_dir(cfg, output_dir))
        self.dist = distributed.init(dev)
        if dev == "cuda" and self.dist.enabled:
            dev = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(dev)
        self.out = cfglib.output_dir(cfg, output_dir)
        self.progress = progress and self.dist.is_main
        seed_everything(int(cfg.get("seed", 0)) + self.dist.rank)

        self.eval_only = eval_only
        first = "val" if eval_only else "train"
        ref = build_data(cfg, first) if self.dist.is_main else None
        distributed.barrier(self.dist)  # rank 0 generates synthetic data first
        if ref is None:
            ref = build_data(cfg, first)
        self.train_set = None if eval_only else ref
        self.val_set = ref if eval_only else build_data(cfg, "val")
        self.tasks = list(ref.tasks)
        self.num_classes = dict(ref.num_classes)
        check_best_metric(self.best_metric, self.tasks)
        self.model = build_model(cfg, ref, load_pretrained=not eval_only).to(self.device)

        from ..losses import MultiTaskLoss
        lcfg = dict(cfg.get("loss") or {})
        self.criterion = MultiTaskLoss(self.tasks, **lcfg).to(self.device)
        # The loss module's parameters (uncertainty log-variances) are optimized with the model.
        # Models with their own learning-rate scheme (Cross-Stitch, NDDR-CNN: mixing parameters at
        # a multiple of the base rate) provide the groups; the loss parameters join at the base rate.
        loss_params = list(self.criterion.parameters())
        model = _unwrap(self.model)
        if hasattr(model, "optimizer_param_groups"):
            base_lr = float(cfg["optim"]["lr"])
            params = list(model.optimizer_param_groups(base_lr))
            if loss_params:
                params.append({"name": "loss", "params": loss_params, "lr": base_lr})
        else:
            params = list(self.model.parameters()) + loss_params
        self.epochs = int(train.get("epochs", 1))
        self.optimizer = build_optimizer(cfg, params)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.epochs)
        self.amp = train.get("amp") or None
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"train.amp must be null, bf16 or fp16, got {self.amp!r}")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.grad_clip = train.get("grad_clip")
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(train.get("find_unused_parameters", False)))

        seed = int(cfg.get("seed", 0))
        bs = int(cfg["data"].get("batch_size", 8))
        workers = int(cfg["data"].get("num_workers", 0))
        if self.dist.enabled and not eval_only:
            self.sampler = DistributedSampler(self.train_set, self.dist.world_size, self.dist.rank,
                                              shuffle=True, seed=seed, drop_last=True)
            shuffle = False
        else:
            self.sampler, shuffle = None, True
        self.loader_gen = torch.Generator()
        self.train_loader = None if eval_only else DataLoader(
            self.train_set, batch_size=bs, shuffle=shuffle, sampler=self.sampler, num_workers=workers,
            drop_last=True, generator=self.loader_gen, worker_init_fn=_worker_init,
            persistent_workers=False)
        self.val_loader = DataLoader(self.val_set, batch_size=int(cfg["data"].get("eval_batch_size", bs)),
                                     shuffle=False, num_workers=workers, drop_last=False)
        if self.train_loader is not None and len(self.train_loader) == 0:
            raise ValueError(f"train set has {len(self.train_set)} samples, fewer than one batch of {bs}")

        self.start_epoch, self.step, self.best, self.history = 0, 0, None, []
        self.resumes: list = []  # one entry per resume that changed a setting (RESUME_MAY_CHANGE)
        self.pending_eval = False  # the last finished epoch still has to be evaluated
        self.writer = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tb"))

    # ----------------------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return dict(model=_unwrap(self.model).state_dict(), criterion=self.criterion.state_dict(),
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    optimizer_class=type(self.optimizer).__name__,
                    scaler=self.scaler.state_dict(), epoch=epoch, step=self.step, best=self.best,
                    history=self.history, rng=checkpoint.rng_state(), pending_eval=self.pending_eval,
                    loader_rng=self.loader_gen.get_state(), config=self.cfg, tasks=self.tasks,
                    resumes=self.resumes)

    def _check_tasks(self, s: dict, path) -> None:
        """The heads and the fusion weights' task axis follow the task order: a checkpoint of
        ``[semseg, depth]`` loads into a ``[depth, semseg]`` model without a shape error."""
        saved = s.get("tasks")
        if saved is not None and list(saved) != self.tasks:
            raise ValueError(f"checkpoint {path} was trained for the tasks {list(saved)} (in this "
                             f"order), this run has {self.tasks}; set data.tasks={list(saved)}")

    def _check_resumable(self, s: dict, path) -> dict:
        """What resuming ``s`` into this run changes (``{key: (old, new)}``), all of it in
        :data:`RESUME_MAY_CHANGE`; anything else is a ConfigError naming the keys."""
        changes = config_changes(s.get("config") or {}, self.cfg)
        fixed = {k: v for k, v in changes.items() if not _may_change(k)}
        if fixed:
            listed = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in fixed.items())
            back = " ".join(f"{k}={a!r}" if a is not None else f"~{k}" for k, (a, _) in fixed.items())
            raise cfglib.ConfigError(
                f"cannot resume {path}: this run's config differs from the one it was trained with in "
                f"{listed}, which a resumed run cannot change (its optimizer, schedule and data order "
                f"come from the checkpoint). Resume with the checkpoint's values ({back}), or start a "
                f"new run (--overwrite, or another --output-dir). A resume may change: "
                f"{', '.join(RESUME_MAY_CHANGE)}")
        saved_cls = s.get("optimizer_class")
        saved_keys = {k for g in s["optimizer"]["param_groups"] for k in g} - {"params"}
        keys = {k for g in self.optimizer.param_groups for k in g} - {"params"}
        if (saved_cls and saved_cls != type(self.optimizer).__name__) or not saved_keys <= keys:
            raise cfglib.ConfigError(
                f"cannot resume {path}: it holds the state of a {saved_cls or 'different'} optimizer "
                f"(settings {sorted(saved_keys)}), this run builds {type(self.optimizer).__name__}; "
                f"set optim.name as the checkpoint's run had it")
        if self.epochs < s["epoch"]:
            raise cfglib.ConfigError(f"cannot resume {path}: it has trained {s['epoch']} epochs, more "
                                     f"than train.epochs={self.epochs}; set train.epochs >= {s['epoch']}")
        return changes

    def resume(self, path) -> None:
        """Continue the run saved in ``path`` exactly (weights, optimizer, schedule, scaler, loss
        weighting, RNG streams, data order). Only the settings in :data:`RESUME_MAY_CHANGE` may
        differ from the checkpoint's; a longer ``train.epochs`` re-plans the schedule."""
        s = checkpoint.load(path, map_location=self.device)
        self._check_tasks(s, path)
        changes = self._check_resumable(s, path)
        missing, unexpected = _unwrap(self.model).load_state_dict(s["model"], strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        self.criterion.load_state_dict(s["criterion"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        replan_schedule(self.scheduler, self.epochs)  # a no-op unless train.epochs changed
        self.scaler.load_state_dict(s["scaler"])
        self.start_epoch, self.step, self.best = s["epoch"], s["step"], s["best"]
        self.history = s.get("history", [])
        self.pending_eval = bool(s.get("pending_eval", False))
        self.resumes = list(s.get("resumes", []))
        if changes:
            self.resumes.append(dict(epoch=self.start_epoch,
                                     changed={k: [a, b] for k, (a, b) in changes.items()}))
        checkpoint.set_rng_state(s["rng"])
        self.loader_gen.set_state(s["loader_rng"])

    def load_weights(self, path) -> None:
        s = checkpoint.load(path, map_location=self.device)
        self._check_tasks(s, path)
        _unwrap(self.model).load_state_dict(s["model"])

    def score(self, metrics: dict) -> float:
        """Model-selection score (higher is better): delta_m or a named "task/metric"."""
        from ..metrics import HIGHER_IS_BETTER, delta_m
        if self.best_metric == "delta_m":
            return delta_m(metrics, self.baselines)
        task, _, name = self.best_metric.partition("/")
        if task not in metrics or name not in metrics[task]:
            have = sorted(f"{t}/{k}" for t, vals in metrics.items() for k in vals)
            raise KeyError(f"eval.best_metric {self.best_metric!r} not among the metrics {have}")
        v = float(metrics[task][name])
        return v if HIGHER_IS_BETTER.get(self.best_metric, True) else -v

    # ----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, max_steps: Optional[int] = None) -> dict:
        self.model.train()
        self.criterion.train()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        sums = {t: 0.0 for t in self.tasks}
        n = 0
        log_every = int(self.cfg["train"].get("log_every", 20))
        amp_dtype = AMP_DTYPES.get(self.amp, torch.float32)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress)
        for i, batch in enumerate(bar):
            if max_steps is not None and i >= max_steps:
                break
            images, targets = _to_device(batch, self.device)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=self.amp is not None):
                out = self.model(images)
            out = _float_outputs(out)  # losses in fp32 even under autocast
            total, parts = self.criterion(out, targets)
            if not torch.isfinite(total):
                raise FloatingPointError(self._divergence(total, parts, epoch, i))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            distributed.average_gradients(self.criterion.parameters(), self.dist)  # DDP owns the model's
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), float(self.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            n += 1
            for t in self.tasks:
                sums[t] += float(parts[t].detach())
            if self.writer and self.step % log_every == 0:
                self.writer.add_scalar("train/loss", float(total.detach()), self.step)
                for t in self.tasks:
                    self.writer.add_scalar(f"train/loss_{t}", float(parts[t].detach()), self.step)
            bar.set_postfix(loss=f"{float(total.detach()):.3f}")
        self.scheduler.step()
        # The epoch's mean task losses over all processes: DWA weights the next epoch from them.
        avg = distributed.average_floats({t: s / max(n, 1) for t, s in sums.items()}, self.dist)
        self.criterion.end_epoch(avg)
        return avg

    def _divergence(self, total, parts, epoch: int, i: int) -> str:
        """Why training stopped: the non-finite loss, its task terms, and the parameters that
        are no longer finite (if any), with the usual remedies."""
        bad = [n for n, p in _unwrap(self.model).named_parameters() if not bool(torch.isfinite(p).all())]
        where = (f"{len(bad)} parameter tensor(s) are no longer finite, e.g. {bad[:3]}" if bad else
                 "the parameters are still finite (the forward pass produced it)")
        return (f"training diverged: non-finite loss {float(total.detach())} at epoch {epoch + 1} step {i} "
                f"(task terms { {t: float(v.detach()) for t, v in parts.items()} }); {where}. Lower optim.lr, "
                f"set train.grad_clip, or use train.amp=bf16 instead of fp16")

    def evaluate(self, progress: Optional[bool] = None) -> dict:
        ds = self.cfg["data"]["dataset"]
        return evaluate(_unwrap(self.model), self.val_loader, self.tasks, self.num_classes, self.device,
                        dataset_name=ds, amp=self.amp, progress=self.progress if progress is None else progress,
                        edge_thresholds=int((self.cfg.get("eval") or {}).get("edge_thresholds", 99)),
                        original_resolution=bool((self.cfg.get("eval") or {}).get("original_resolution", False)))

    def fit(self, max_steps_per_epoch: Optional[int] = None) -> dict:
        """Train from ``start_epoch`` to ``epochs``, evaluating every ``train.eval_every`` epochs;
        writes ``last.pt`` / ``best.pt`` checkpoints, TensorBoard scalars, images and
        ``metrics.json``; returns the final metrics."""
        if self.eval_only:
            raise RuntimeError("this Trainer was built with eval_only=True (no train split); build "
                               "it without eval_only to train")
        train = self.cfg["train"]
        eval_every = int(train.get("eval_every", 1))
        max_steps = max_steps_per_epoch or train.get("max_steps_per_epoch")
        metrics = None
        t0 = time.time()
        if self.pending_eval:  # a run stopped while evaluating its last epoch: evaluate it now
            metrics = self._evaluate_epoch(self.start_epoch)
        for epoch in range(self.start_epoch, self.epochs):
            avg = self.train_epoch(epoch, max_steps)
            entry = dict(epoch=epoch + 1, train_loss=avg, lr=next((g["lr"] for g in self.optimizer.param_groups if g.get("name") == "base"),
                                                   self.optimizer.param_groups[0]["lr"]),
                         loss_weights=self.criterion.current_weights())
            self.history.append(entry)
            self.pending_eval = epoch + 1 == self.epochs or (epoch + 1) % eval_every == 0
            # The epoch's training is saved before it is evaluated: an error or a kill during
            # evaluation loses no training, and resume runs the evaluation it missed.
            if self.dist.is_main:
                checkpoint.save(self.out / "last.pt", self.state(epoch + 1))
            if self.pending_eval:
                metrics = self._evaluate_epoch(epoch + 1)
            distributed.barrier(self.dist)
        if self.dist.is_main:
            if metrics is None:  # resumed at the end: evaluate what we have
                metrics = self.evaluate()
            self.report(metrics, time.time() - t0)
        return metrics

    def _evaluate_epoch(self, epoch: int) -> Optional[dict]:
        """Evaluate after ``epoch`` epochs (main process), log, keep best.pt and re-save
        last.pt with the result; other processes only clear the pending flag."""
        self.pending_eval = False
        if not self.dist.is_main:
            return None
        metrics = self.evaluate()
        score = self.score(metrics)
        entry = next((h for h in reversed(self.history) if h.get("epoch") == epoch), None)
        if entry is not None:
            entry.update(metrics=metrics, score=score)
        for task, vals in metrics.items():
            for k, v in vals.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"val/{task}/{k}", v, epoch)
        if self.best is None or score > self.best["score"]:
            self.best = dict(score=score, epoch=epoch, metrics=metrics)
            checkpoint.save(self.out / "best.pt", self.state(epoch))
        checkpoint.save(self.out / "last.pt", self.state(epoch))
        return metrics

    def report(self, metrics: dict, seconds: float) -> None:
        """Final ``metrics.json``, images of predictions and CTAL affinities, and a summary table."""
        summary = dict(name=self.cfg.get("name"), metrics=metrics, best=self.best, epochs=self.epochs,
                       steps=self.step, resumes=self.resumes, seconds=round(seconds, 1), history=self.history,
                       ctal_backend=self.cfg["model"].get("ctal_backend"))
        write_json(self.out / "metrics.json", summary, default=float)
        n_img = int(self.cfg["train"].get("save_images", 4))
        if n_img:
            from .images import save_run_images
            save_run_images(_unwrap(self.model), self.val_set, self.out / "images", n_img, self.device)
        print(format_summary(metrics, self.best))
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        distributed.shutdown(self.dist)


def format_summary(metrics: dict, best: Optional[dict] = None) -> str:
    rows = [("task", "metric", "value")]
    for task, vals in metrics.items():
        for k, v in vals.items():
            if isinstance(v, (int, float)):
                rows.append((task, k, f"{v:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    if best:
        lines.append(f"best score {best['score']:.4f} at epoch {best['epoch']}")
    return "\n".join(lines)
