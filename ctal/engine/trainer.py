"""The multitask training loop behind ``train.py``.

One ``Trainer`` owns everything a run needs (data, model, loss weighting, optimizer, schedule, AMP,
DDP, logging) and checkpoints all of it at every epoch boundary, so that training k epochs equals
k/2 epochs + resume + k/2 epochs bit for bit (same seeds, same data order, same RNG streams).
Building the pieces is :mod:`ctal.engine.build`'s, evaluating and reporting
:mod:`ctal.engine.evaluation`'s.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import config as cfglib
from . import checkpoint, distributed
from .build import (amp_setting, build_datasets, build_loaders, build_optimizer,
                    build_scheduler, loss_for, model_for, preflight, replan_schedule, seed_everything,
                    trained_parameters)
from .evaluation import (AMP_DTYPES, check_best_metric, evaluate, evaluation_due, model_selection,
                         selection_score, to_device, write_report)
from .images import save_run_images

__all__ = ["Trainer", "RESUME_MAY_CHANGE", "config_changes"]


def _float_outputs(out: dict) -> dict:
    return dict(final={t: p.float() for t, p in out["final"].items()},
                aux={k: {t: p.float() for t, p in a.items()} for k, a in (out.get("aux") or {}).items()})


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# Config entries a resumed run may change, and what the change does. Every other difference
# from the checkpoint's config is refused by :meth:`Trainer.resume`: the optimizer, schedule,
# loss weighting and data order come back from the checkpoint, so such a setting could not take
# effect, and recording it would misreport the run.
RESUME_MAY_CHANGE = {
    "train.epochs": "the learning-rate schedule is re-planned for the new length",
    "train.max_steps_per_epoch": "steps per epoch from here on",
    "train.log_every": "logging only",
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
    "eval.depth_average": "evaluation only",
    # evaluation leaves the random streams as it found them, so training does not depend on it
    "eval.every": "evaluation schedule only", "eval.final_epochs": "evaluation schedule only",
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


class Trainer:
    """Builds a run from a config dict (see ``ctal/configs/*.yaml``) and trains / evaluates it."""

    def __init__(self, cfg: dict, output_dir: Optional[str] = None, device: Optional[str] = None,
                 progress: bool = True, eval_only: bool = False):
        """``eval_only``: build what evaluating a checkpoint needs (no train split, no pretrained
        backbone download: :meth:`load_weights` supplies every weight); :meth:`fit` then refuses.
        ``cfg`` is not modified; :attr:`cfg` is it with the schema's defaults filled in."""
        self.cfg = cfglib.with_defaults(cfglib.validate(cfg))
        self.eval_only = eval_only
        self.best_metric, self.baselines = model_selection(self.cfg)
        self._setup_process(device, output_dir, progress)
        self._build_data()
        self._build_model()
        self._build_optimization()
        self._build_loaders()
        self.start_epoch, self.step, self.best, self.history = 0, 0, None, []
        self.resumes: list = []  # one entry per resume that changed a setting (RESUME_MAY_CHANGE)
        self.pending_eval = False  # the last finished epoch still has to be evaluated
        self._open_log()

    def _setup_process(self, device: Optional[str], output_dir, progress: bool) -> None:
        """Device, output dir, DDP process group, progress bars and seeds."""
        dev = device or self.cfg["device"]
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.out = cfglib.output_dir(self.cfg, output_dir)
        preflight(self.cfg, dev, self.out)
        self.dist = distributed.init(dev)
        if dev == "cuda" and self.dist.enabled:
            dev = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(dev)
        self.progress = progress and self.dist.is_main
        seed_everything(self.cfg["seed"] + self.dist.rank)

    def _build_data(self) -> None:
        self.train_set, self.val_set = build_datasets(self.cfg, self.dist, self.eval_only)
        ref = self.val_set if self.eval_only else self.train_set
        self.tasks = list(ref.tasks)
        self.num_classes = dict(ref.num_classes)
        check_best_metric(self.best_metric, self.tasks)

    def _build_model(self) -> None:
        """The model (without pretrained weights under eval_only) and the loss."""
        ref = self.val_set if self.eval_only else self.train_set
        self.model = model_for(self.cfg, ref, load_pretrained=not self.eval_only).to(self.device)
        self.criterion = loss_for(self.cfg, self.tasks).to(self.device)

    def _build_optimization(self) -> None:
        """Optimizer, schedule, AMP and gradient scaler, clipping, and the DDP wrapper."""
        train = self.cfg["train"]
        self.epochs = train["epochs"]
        self.optimizer = build_optimizer(self.cfg, trained_parameters(self.cfg, self.model, self.criterion))
        self.scheduler = build_scheduler(self.cfg, self.optimizer, self.epochs)
        self.amp = amp_setting(self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.grad_clip = train["grad_clip"]
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=train["find_unused_parameters"])

    def _build_loaders(self) -> None:
        self.loader_gen = torch.Generator()  # the data order; checkpointed
        self.sampler, self.train_loader, self.val_loader = build_loaders(
            self.cfg, self.train_set, self.val_set, self.dist, self.loader_gen)

    def _open_log(self) -> None:
        """TensorBoard, on the main process."""
        self.writer = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes
            self.writer = SummaryWriter(str(self.out / "tb"))

    # ----------------------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return dict(model=_unwrap(self.model).state_dict(), criterion=self.criterion.state_dict(),
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    optimizer_class=type(self.optimizer).__name__,
                    scaler=self.scaler.state_dict(), epoch=epoch, step=self.step, best=self.best,
                    history=self.history, rng=checkpoint.rng_state(), pending_eval=self.pending_eval,
                    loader_rng=self.loader_gen.get_state(), config=self.cfg, tasks=self.tasks,
                    resumes=self.resumes,
                    # the dataset facts the model was built from, so that it can be rebuilt
                    # without the data (build.model_from_checkpoint)
                    num_classes=self.num_classes, input_size=list(_unwrap(self.model).input_size),
                    class_names=dict(getattr(self.val_set, "class_names", None) or {}))

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
        # Keys the checkpoint's config leaves out had their (schema) defaults in that run too.
        changes = config_changes(cfglib.with_defaults(cfglib.migrate(s.get("config") or {})), self.cfg)
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
        return selection_score(metrics, self.best_metric, self.baselines)

    # ----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, max_steps: Optional[int] = None) -> dict:
        self.model.train()
        self.criterion.train()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        sums = {t: 0.0 for t in self.tasks}
        n = 0
        log_every = self.cfg["train"]["log_every"]
        amp_dtype = AMP_DTYPES.get(self.amp, torch.float32)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress)
        for i, batch in enumerate(bar):
            if max_steps is not None and i >= max_steps:
                break
            images, targets = to_device(batch, self.device)
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
        ev = self.cfg["eval"]
        return evaluate(_unwrap(self.model), self.val_loader, self.tasks, self.num_classes, self.device,
                        dataset_name=self.cfg["data"]["dataset"], amp=self.amp,
                        progress=self.progress if progress is None else progress,
                        edge_thresholds=ev["edge_thresholds"], original_resolution=ev["original_resolution"],
                        depth_average=ev["depth_average"])

    def fit(self, max_steps_per_epoch: Optional[int] = None) -> dict:
        """Train from ``start_epoch`` to ``epochs``, evaluating every ``eval.every`` epochs, in the
        last ``eval.final_epochs`` and after the last (:func:`~ctal.engine.evaluation.evaluation_due`);
        writes ``last.pt`` / ``best.pt`` checkpoints, TensorBoard scalars, images and
        ``metrics.json``; returns the final metrics."""
        if self.eval_only:
            raise RuntimeError("this Trainer was built with eval_only=True (no train split); build "
                               "it without eval_only to train")
        train = self.cfg["train"]
        max_steps = max_steps_per_epoch or train["max_steps_per_epoch"]
        metrics = None
        t0 = time.time()
        if self.pending_eval:  # a run stopped while evaluating its last epoch: evaluate it now
            metrics = self._evaluate_epoch(self.start_epoch)
        for epoch in range(self.start_epoch, self.epochs):
            avg = self.train_epoch(epoch, max_steps)
            entry = dict(epoch=epoch + 1, train_loss=avg, lr=next((g["lr"] for g in self.optimizer.param_groups if g.get("name") == "base"),
                                                   self.optimizer.param_groups[0]["lr"]),
                         loss_weights=self.criterion.current_weights(), evaluated=False)
            self.history.append(entry)
            self.pending_eval = evaluation_due(epoch + 1, self.epochs, self.cfg["eval"]["every"],
                                               self.cfg["eval"]["final_epochs"])
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
        # Evaluation may draw random numbers (the loader's seed); putting the streams back makes
        # the training independent of the evaluation schedule.
        rng = checkpoint.rng_state()
        metrics = self.evaluate()
        checkpoint.set_rng_state(rng)
        score = self.score(metrics)
        entry = next((h for h in reversed(self.history) if h.get("epoch") == epoch), None)
        if entry is not None:
            entry.update(metrics=metrics, score=score, evaluated=True)
        for task, vals in metrics.items():
            for k, v in vals.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"val/{task}/{k}", v, epoch)
        if self.best is None or score > self.best["score"]:
            self.best = dict(score=score, epoch=epoch, metrics=metrics)
            checkpoint.save(self.out / "best.pt", self.state(epoch))
        checkpoint.save(self.out / "last.pt", self.state(epoch))
        self._write_figures(epoch)
        return metrics

    def _write_figures(self, epoch: int) -> None:
        """Figures of ``train.save_images`` fixed validation samples after ``epoch`` epochs:
        ``images/epoch_<epoch>/`` and TensorBoard ``figures/*`` (main process, at evaluations)."""
        count = self.cfg["train"]["save_images"]
        if not count or not self.dist.is_main:
            return
        rng = checkpoint.rng_state()  # as for evaluate: training must not depend on the figures
        save_run_images(_unwrap(self.model), self.val_set, self.out / "images" / f"epoch_{epoch}", count,
                        self.device, writer=self.writer, step=epoch, title=f"epoch {epoch}")
        checkpoint.set_rng_state(rng)

    def report(self, metrics: dict, seconds: float) -> None:
        """Final ``metrics.json``, images of predictions and CTAL affinities, and a summary table."""
        summary = dict(name=self.cfg["name"], metrics=metrics, best=self.best, epochs=self.epochs,
                       evaluated_epochs=[h["epoch"] for h in self.history if "metrics" in h],
                       steps=self.step, resumes=self.resumes, seconds=round(seconds, 1), history=self.history,
                       ctal_backend=self.cfg["model"].get("ctal_backend"))
        write_report(self.out, summary, _unwrap(self.model), self.val_set, self.cfg["train"]["save_images"],
                     self.device)
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        distributed.shutdown(self.dist)
