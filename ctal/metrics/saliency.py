"""Saliency: max F-measure (beta^2 = 0.3) and max mIoU over binarization thresholds."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..tasks import SAL_IGNORE
from ._binary import binary_maps


class SaliencyMeter:
    """Per image and threshold ``th`` (probability ``> th`` is salient), over non-ignored pixels:
    precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)`` and IoU ``TP / (TP + FP + FN)`` (an
    image with no salient pixel in truth and prediction has IoU 1). These are averaged over images;
    ``F(th) = (1 + b2) P R / (b2 P + R)`` with ``b2 = 0.3`` from the mean P and R. ``compute()``
    reports ``maxF`` and ``max_mIoU`` (maxima over thresholds, in percent) and the arg-max
    thresholds.

    ``update(pred, target)``: ``pred`` is the model's saliency output, a 1-channel *logit*
    ``(B, 1, H, W)`` or 2 class logits ``(B, 2, H, W)`` (``ctal.tasks.saliency_probability`` gives
    the probability: sigmoid, or softmax channel 1); pass ``from_logits=False`` for ``(B, 1, H, W)``
    probabilities. Only one sigmoid / softmax is ever applied. ``target`` is ``(B, 1, H, W)`` in
    {0, 1} with ``SAL_IGNORE`` = ignore.

    Errors (``ValueError``): a target value other than 0, 1 or the ignore value (soft targets, NaN,
    0..255 masks), a non-finite prediction on a valid pixel, probabilities outside [0, 1] with
    ``from_logits=False``; ``compute()`` with no valid pixel seen, or with no salient (1) pixel in
    the whole set. Images whose pixels are all ignored (and empty batches) are skipped: they have
    no precision, recall or IoU.
    """

    higher_is_better = {"maxF": True, "max_mIoU": True}

    def __init__(self, thresholds=None, beta2: float = 0.3, from_logits: bool = True,
                 ignore_value: float = SAL_IGNORE):
        self.thresholds = np.asarray(np.linspace(0.2, 0.9, 15) if thresholds is None else thresholds, float)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0:
            raise ValueError("thresholds must be a non-empty 1-D list")
        self.beta2 = float(beta2)
        self.from_logits = from_logits
        self.ignore_value = ignore_value
        self.reset()

    def reset(self) -> None:
        self.prec, self.rec, self.iou = [], [], []
        self.n_salient = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        prob, target, valid = binary_maps("SaliencyMeter", pred, target, self.from_logits, self.ignore_value,
                                          two_class=True)
        prob = prob.flatten(1).cpu()
        target = target.flatten(1).cpu()
        valid = valid.flatten(1).cpu()
        keep = valid.any(1)             # an image without valid pixels has no P / R / IoU: skipped
        if not keep.any():
            return
        prob, target, valid = prob[keep], target[keep], valid[keep]
        gt = (target == 1) & valid
        self.n_salient += int(gt.sum())
        th = torch.as_tensor(self.thresholds, dtype=torch.float32).view(-1, 1, 1)   # [K, 1, 1]
        fg = (prob.unsqueeze(0) > th) & valid.unsqueeze(0)                          # [K, B, P]
        tp = (fg & gt).sum(-1).double()
        fp = (fg & ~gt).sum(-1).double()
        fn = (~fg & gt & valid).sum(-1).double()
        self.prec.append((tp / (tp + fp).clamp_min(1)).T.numpy())  # no prediction -> precision 0
        self.rec.append((tp / (tp + fn).clamp_min(1)).T.numpy())
        union = tp + fp + fn
        self.iou.append(torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp)).T.numpy())

    def compute(self) -> dict:
        if not self.prec:
            raise ValueError("SaliencyMeter.compute(): no valid (non-ignored) target pixels were seen")
        if self.n_salient == 0:
            raise ValueError(f"SaliencyMeter.compute(): no salient target pixel (target == 1) in the whole set, "
                             f"so recall and maxF are undefined; targets must be 0 / 1 with "
                             f"{self.ignore_value:g} = ignore (a {{0, 255}} mask reads as all background / ignored)")
        p = np.concatenate(self.prec).mean(0)
        r = np.concatenate(self.rec).mean(0)
        iou = np.concatenate(self.iou).mean(0)
        denom = self.beta2 * p + r
        f = np.where(denom > 0, (1 + self.beta2) * p * r / np.where(denom > 0, denom, 1), 0.0)
        kf, ki = int(np.argmax(f)), int(np.argmax(iou))
        return {"maxF": float(f[kf] * 100), "max_mIoU": float(iou[ki] * 100),
                "maxF_threshold": float(self.thresholds[kf]), "max_mIoU_threshold": float(self.thresholds[ki])}
