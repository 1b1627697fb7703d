"""Per-task losses and multitask loss weighting (fixed, uncertainty, DWA).

Targets follow ``ctal/tasks.py`` (void/invalid markers are excluded from every loss); predictions
are model outputs: logits for semseg / human_parts / edge / sal (1 or 2 channels), raw depth,
unnormalized normals.
Every per-task loss is a mean over the *valid* pixels of the batch and is exactly 0 (with a
gradient path, so DDP sees every parameter used) when a batch has no valid pixel.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import TaskOrderState, check_task_names
from .tasks import EDGE_IGNORE, IGNORE_INDEX, SAL_IGNORE, TASKS

__all__ = ["segmentation_loss", "depth_loss", "normals_loss", "balanced_bce_loss", "balanced_ce_loss",
           "edge_loss", "saliency_loss", "task_loss", "MultiTaskLoss", "WEIGHTINGS"]

WEIGHTINGS = ("fixed", "uncertainty", "dwa")


def _zero(pred: Tensor) -> Tensor:
    return pred.sum() * 0.0


def _match(pred: Tensor, target: Tensor, task: str) -> Tensor:
    """Upsample a (deep-supervision) prediction to the target's size; check batch/ranks."""
    if pred.dim() != 4:
        raise ValueError(f"{task}: prediction must be (B, C, H, W), got {tuple(pred.shape)}")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"{task}: prediction batch {pred.shape[0]} != target batch {target.shape[0]}")
    size = tuple(target.shape[-2:])
    if tuple(pred.shape[-2:]) != size:
        pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
    return pred


def segmentation_loss(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, task: str = "semseg") -> Tensor:
    """Cross-entropy over classes, void pixels (``ignore_index``) excluded."""
    pred = _match(pred, target, task)
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"{task}: target must be (B, H, W) class ids, got {tuple(target.shape)}")
    target = target.long()
    valid = target != ignore_index
    if not valid.any():
        return _zero(pred)
    bad = valid & ((target < 0) | (target >= pred.shape[1]))
    if bad.any():
        raise ValueError(f"{task}: target class {int(target[bad][0])} outside [0, {pred.shape[1]}) "
                         f"(prediction has {pred.shape[1]} channels)")
    return F.cross_entropy(pred, target, ignore_index=ignore_index)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over pixels with valid (non-zero, finite) depth."""
    pred = _match(pred, target, "depth")
    valid = (target != 0) & torch.isfinite(target)
    if not valid.any():
        return _zero(pred)
    return (pred - target).abs()[valid].mean()


def normals_loss(pred: Tensor, target: Tensor, kind: str = "cosine") -> Tensor:
    """Loss between L2-normalized predicted normals and unit targets on valid (non-zero) pixels.

    ``kind="cosine"``: mean of ``1 - cos(angle)``; ``kind="l1"``: mean absolute component
    difference (mean over valid pixels and the 3 components)."""
    pred = _match(pred, target, "normals")
    if pred.shape[1] != 3 or target.shape[1] != 3:
        raise ValueError(f"normals: prediction and target need 3 channels, got {pred.shape[1]} and {target.shape[1]}")
    valid = (target.abs().sum(1) > 0) & torch.isfinite(target).all(1)
    if not valid.any():
        return _zero(pred)
    n = F.normalize(pred, dim=1)
    if kind == "cosine":
        cos = (n * target).sum(1)
        return (1 - cos)[valid].mean()
    if kind == "l1":
        return (n - target).abs().sum(1)[valid].mean() / 3.0
    raise ValueError(f"normals loss kind must be 'cosine' or 'l1', got {kind!r}")


def balanced_bce_loss(logits: Tensor, target: Tensor, pos_weight: Optional[float] = None,
                      ignore_value: float = 255.0, task: str = "edge") -> Tensor:
    """Class-balanced binary cross-entropy on logits, ignoring ``ignore_value`` pixels.

    ``loss = -(w y log p + (1 - w)(1 - y) log(1 - p))`` averaged over valid pixels, with
    ``w = pos_weight`` or, when ``None``, the fraction of valid pixels that are negative (so the
    rare class counts as much as the frequent one, as for saliency)."""
    logits = _match(logits, target, task)
    if logits.shape[1] != 1:
        raise ValueError(f"{task}: expected a 1-channel logit, got {logits.shape[1]} channels")
    valid = target != ignore_value
    if not valid.any():
        return _zero(logits)
    y = torch.where(valid, target, torch.zeros_like(target))
    if pos_weight is None:
        w = 1.0 - y[valid].mean()
    else:
        w = torch.as_tensor(float(pos_weight), dtype=logits.dtype, device=logits.device)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    per_px = -(w * y * log_p + (1 - w) * (1 - y) * log_1mp)
    return per_px[valid].mean()


def balanced_ce_loss(logits: Tensor, target: Tensor, ignore_value: float = SAL_IGNORE,
                     task: str = "sal") -> Tensor:
    """Class-balanced cross-entropy over two class logits ``(B, 2, H, W)`` (channel 1 = positive),
    ignoring ``ignore_value`` pixels: the saliency loss of the CTAL paper's code.

    Each valid pixel's cross-entropy is weighted by the *other* class's share of the valid pixels
    (``w_neg = n_pos / n``, ``w_pos = n_neg / n``) and the result is the weighted mean
    ``sum w_y CE / sum w_y``, i.e. the mean of the two classes' mean cross-entropies. A batch with
    one class only gives that class weight 0: the loss is 0 (with a gradient path), as with no
    valid pixel."""
    logits = _match(logits, target, task)
    if logits.shape[1] != 2:
        raise ValueError(f"{task}: expected 2 class logits, got {logits.shape[1]} channels")
    if target.dim() == 4:
        if target.shape[1] != 1:
            raise ValueError(f"{task}: target must be (B, 1, H, W) or (B, H, W), got {tuple(target.shape)}")
        target = target[:, 0]
    valid = target != ignore_value
    bad = valid & (target != 0) & (target != 1)
    if bad.any():
        raise ValueError(f"{task}: targets of the 2-class loss must be 0, 1 or {ignore_value:g} (ignore), "
                         f"got {float(target[bad][0]):g}")
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    n_pos = (y.bool() & valid).sum()
    n_neg = valid.sum() - n_pos
    if n_pos == 0 or n_neg == 0:
        return _zero(logits)
    ce = F.cross_entropy(logits, y, reduction="none")
    w = torch.where(y.bool(), n_neg, n_pos).to(ce.dtype)[valid]
    return (w * ce[valid]).sum() / w.sum()


def edge_loss(logits: Tensor, target: Tensor, pos_weight: float = 0.95) -> Tensor:
    return balanced_bce_loss(logits, target, pos_weight, EDGE_IGNORE, "edge")


def saliency_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Balanced BCE on a 1-channel logit, or :func:`balanced_ce_loss` on 2 class logits."""
    if logits.dim() == 4 and logits.shape[1] == 2:
        return balanced_ce_loss(logits, target, SAL_IGNORE, "sal")
    return balanced_bce_loss(logits, target, None, SAL_IGNORE, "sal")


def task_loss(task: str, pred: Tensor, target: Tensor, normals: str = "cosine",
              edge_pos_weight: float = 0.95) -> Tensor:
    """The default loss of ``task``."""
    if task in ("semseg", "human_parts"):
        return segmentation_loss(pred, target, task=task)
    if task == "depth":
        return depth_loss(pred, target)
    if task == "normals":
        return normals_loss(pred, target, normals)
    if task == "edge":
        return edge_loss(pred, target, edge_pos_weight)
    if task == "sal":
        return saliency_loss(pred, target)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


class MultiTaskLoss(TaskOrderState, nn.Module):
    """Weighted sum of per-task losses.

    Args:
        tasks: task names.
        weighting: ``"fixed"`` (``sum w_t L_t``), ``"uncertainty"`` (Kendall et al.:
            ``sum exp(-s_t) L_t + s_t`` with learned log-variances ``s_t``, which are
            ``nn.Parameter`` of this module: give ``loss.parameters()`` to the optimizer), or
            ``"dwa"`` (Liu et al.: ``w_t = T exp(r_t / temp) / sum_i exp(r_i / temp)`` with
            ``r_t = L_t(k-1) / L_t(k-2)`` from per-epoch average losses; call
            :meth:`end_epoch` once per epoch; weights are 1 for the first two epochs).
        weights: fixed per-task weights (dict or sequence; default 1). With ``"uncertainty"`` /
            ``"dwa"`` they multiply the learned / dynamic weights.
        normals: ``"cosine"`` or ``"l1"`` normals loss.
        aux_weight: weight of the deep-supervision losses; each task's loss is
            ``L(final) + aux_weight * mean over aux outputs of L(aux)``.
        temperature: DWA temperature (2 in the paper).

    The weights, log-variances and DWA state are indexed by task position; the state dict records
    the task order, and loading the state of the same tasks in another order is a ``ValueError``.

    ``forward(preds, targets)`` accepts either ``{task: tensor}`` or the model output
    ``{"final": {...}, "aux": {name: {...}}}`` and returns ``(total, {task: loss})`` where each
    task's loss is its unweighted (final + aux) loss.
    """

    def __init__(self, tasks: Sequence[str], weighting: str = "fixed", weights=None, normals: str = "cosine",
                 aux_weight: float = 1.0, temperature: float = 2.0, edge_pos_weight: float = 0.95):
        super().__init__()
        tasks = tuple(check_task_names(tasks))
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; expected names from {TASKS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if normals not in ("cosine", "l1"):
            raise ValueError(f"normals must be 'cosine' or 'l1', got {normals!r}")
        self.tasks = tasks
        self.weighting = weighting
        self.normals = normals
        self.aux_weight = float(aux_weight)
        self.temperature = float(temperature)
        self.edge_pos_weight = float(edge_pos_weight)
        if weights is None:
            w = [1.0] * len(tasks)
        elif isinstance(weights, Mapping):
            extra = [k for k in weights if k not in tasks]
            if extra:
                raise ValueError(f"weights for unknown task(s) {extra}; tasks are {tasks}")
            w = [float(weights.get(t, 1.0)) for t in tasks]
        else:
            w = [float(x) for x in weights]
            if len(w) != len(tasks):
                raise ValueError(f"weights has {len(w)} entries for {len(tasks)} tasks {tasks}")
        if any(not math.isfinite(x) or x < 0 for x in w):
            raise ValueError(f"weights must be finite and >= 0, got {w}")
        self.register_buffer("static_weights", torch.tensor(w, dtype=torch.float32))
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(tasks)))
        else:
            self.register_parameter("log_vars", None)
        # DWA state: dynamic weights and the last two epochs' average losses
        self.register_buffer("dwa_weights", torch.ones(len(tasks)))
        self.register_buffer("loss_history", torch.zeros(2, len(tasks)))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, weighting={self.weighting!r}, normals={self.normals!r}"

    def current_weights(self) -> dict:
        """The effective multiplier of each task's loss now (for logging)."""
        w = self.static_weights.clone()
        if self.weighting == "uncertainty":
            w = w * torch.exp(-self.log_vars.detach())
        elif self.weighting == "dwa":
            w = w * self.dwa_weights
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def end_epoch(self, avg_losses: Mapping[str, float]) -> dict:
        """Record this epoch's average per-task losses and update the DWA weights.

        Returns the weights for the next epoch. A no-op for other weightings (returns them)."""
        missing = [t for t in self.tasks if t not in avg_losses]
        if missing:
            raise ValueError(f"end_epoch: average losses missing for {missing}")
        vals = torch.tensor([float(avg_losses[t]) for t in self.tasks], dtype=torch.float32,
                            device=self.loss_history.device)
        if not torch.isfinite(vals).all():
            raise ValueError(f"end_epoch: non-finite average losses {dict(avg_losses)}")
        self.loss_history[0] = self.loss_history[1]
        self.loss_history[1] = vals
        self.epochs_seen += 1
        if self.weighting == "dwa" and int(self.epochs_seen) >= 2:
            r = self.loss_history[1] / self.loss_history[0].clamp_min(1e-12)
            e = torch.softmax(r / self.temperature, dim=0)
            self.dwa_weights.copy_(len(self.tasks) * e)
        return self.current_weights()

    def _one(self, task: str, pred: Tensor, target: Tensor) -> Tensor:
        return task_loss(task, pred, target, self.normals, self.edge_pos_weight)

    def forward(self, preds: Mapping, targets: Mapping) -> tuple[Tensor, dict]:
        if "final" in preds and isinstance(preds["final"], Mapping):
            final, aux = preds["final"], preds.get("aux") or {}
        else:
            final, aux = preds, {}
        losses = {}
        for t in self.tasks:
            if t not in final:
                raise KeyError(f"prediction for task {t!r} missing; got {sorted(final)}")
            if t not in targets:
                raise KeyError(f"target for task {t!r} missing; got {sorted(k for k in targets if k != 'meta')}")
            l = self._one(t, final[t], targets[t])
            aux_l = [self._one(t, a[t], targets[t]) for a in aux.values() if t in a]
            if aux_l and self.aux_weight:
                l = l + self.aux_weight * torch.stack(aux_l).mean()
            losses[t] = l
        stacked = torch.stack([losses[t] for t in self.tasks])
        w = self.static_weights.to(stacked.dtype)
        if self.weighting == "uncertainty":
            s = self.log_vars.to(stacked.dtype)
            total = (w * (torch.exp(-s) * stacked + s)).sum()
        elif self.weighting == "dwa":
            total = (w * self.dwa_weights.to(stacked.dtype) * stacked).sum()
        else:
            total = (w * stacked).sum()
        return total, losses
