"""Semantic / human-parts segmentation: confusion matrix over the whole set -> mIoU, pixel acc."""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks import IGNORE_INDEX
from ._checks import as_tensor, check_class_count, check_finite, check_integer_valued, check_rank


class SegMeter:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows = truth, cols = prediction).

    ``update(pred, target)``: ``pred`` is logits ``(B, C, H, W)`` (argmax over C) or class ids
    ``(B, H, W)``; ``target`` is ``(B, H, W)`` with ``ignore_index`` for void. Float targets must
    be integer-valued (never truncated) and logits finite on non-void pixels, else ``ValueError``;
    so is a missing batch dimension. Numpy arrays are converted; other types are a ``TypeError``,
    as is a ``num_classes`` that is not an int (``True``, ``2.5``).

    ``compute()`` returns (in percent): ``mIoU`` = mean over classes that occur in the truth or the
    prediction of ``TP / (TP + FP + FN)`` (a class absent from both has no defined IoU and is
    left out), ``pixel_acc`` = correct / valid pixels, and the per-class ``iou`` list (``nan`` for
    absent classes).
    """

    higher_is_better = {"mIoU": True, "pixel_acc": True}

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = check_class_count("SegMeter: num_classes", num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        where, C = "SegMeter.update", self.num_classes
        pred, target = as_tensor(where, "pred", pred), as_tensor(where, "target", target)
        target_shape = "(B, H, W) class ids (or (B, 1, H, W))"
        check_rank(where, "target", target, (3, 4), target_shape)
        if target.dim() == 4:
            if target.shape[1] != 1:
                raise ValueError(f"{where}: `target` must be {target_shape}, got shape {tuple(target.shape)}")
            target = target[:, 0]
        pred_shape = f"(B, {C}, H, W) logits or (B, H, W) class ids"
        check_rank(where, "pred", pred, (3, 4), pred_shape)
        if pred.dim() == 4 and pred.shape[1] != C:
            raise ValueError(f"SegMeter: prediction has {pred.shape[1]} channels, expected {C}")
        if (pred.shape[:1] + pred.shape[2:] if pred.dim() == 4 else pred.shape) != target.shape:
            raise ValueError(f"{where}: `pred` {tuple(pred.shape)} does not fit `target` {tuple(target.shape)}: "
                             f"pred must be {pred_shape} for a (B, H, W) target")
        check_integer_valued(where, "target", target,
                             f"integer class ids in [0, {C}) or ignore_index {self.ignore_index}")
        if pred.dim() == 4:
            if pred.is_floating_point():
                check_finite(where, "pred", pred, (target != self.ignore_index).unsqueeze(1), "logits")
            pred = pred.argmax(1)
        else:
            check_integer_valued(where, "pred", pred, f"integer class ids in [0, {C})")
        pred = pred.reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if ((target < 0) | (target >= self.num_classes)).any():
            bad = target[(target < 0) | (target >= self.num_classes)][0]
            raise ValueError(f"SegMeter: target class {int(bad)} outside [0, {self.num_classes})")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise ValueError(f"SegMeter: predicted class outside [0, {self.num_classes})")
        idx = target * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes,
                                                                                   self.num_classes)

    def compute(self) -> dict:
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        present = union > 0
        total = cm.sum()
        if total == 0:
            raise ValueError("SegMeter.compute(): no valid pixels were seen")
        return {"mIoU": float(iou[present].mean() * 100), "pixel_acc": float(tp.sum() / total * 100),
                "iou": [float(x * 100) for x in iou]}
