"""Depth and surface-normal meters, accumulated pixel-wise over the whole set (depth optionally per image)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import as_tensor, check_finite, check_rank


def _check(pred: Tensor, target: Tensor, channels: int, name: str):
    where = f"{name}.update"
    pred, target = as_tensor(where, "pred", pred), as_tensor(where, "target", target)
    # A (B, H, W) map is read as one channel; a normal map always needs its channel axis.
    ranks, expected = ((3, 4), "(B, 1, H, W) or (B, H, W)") if channels == 1 else ((4,), f"(B, {channels}, H, W)")
    check_rank(where, "pred", pred, ranks, expected)
    check_rank(where, "target", target, ranks, expected)
    if pred.dim() == 3:
        pred = pred.unsqueeze(1)
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if pred.shape != target.shape or pred.shape[1] != channels:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                         f"(B, {channels}, H, W)")
    return pred.detach().double().cpu(), target.detach().double().cpu()


class DepthMeter:
    """Depth errors over the valid (non-zero, finite) target pixels of the set.

    ``average="pixel"`` (default): ``abs_err = sum|p - t| / n``, ``rel_err = sum(|p - t| / t) / n``,
    ``rmse = sqrt(sum (p - t)^2 / n)`` with ``n`` the number of valid pixels in the *whole set*.
    ``average="image"``: each image's ``abs_err``, ``rel_err`` and ``rmse`` over its own valid
    pixels, then the mean over images (so every image counts the same, whatever its number of
    valid pixels); an image without valid pixels has no error and is skipped, and ``compute()``
    reports ``images`` (averaged over) and ``skipped_images`` (without a valid pixel).
    A non-finite prediction on a valid pixel is a ``ValueError``.
    """

    higher_is_better = {"abs_err": False, "rel_err": False, "rmse": False}
    AVERAGES = ("pixel", "image")

    def __init__(self, average: str = "pixel"):
        if average not in self.AVERAGES:
            raise ValueError(f"DepthMeter: average must be 'pixel' or 'image', got {average!r}")
        self.average = average
        self.reset()

    def reset(self) -> None:
        self.n = 0  # valid pixels (pixel) or images with a valid pixel (image)
        self.skipped = 0
        self.sum_abs = 0.0
        self.sum_rel = 0.0
        self.sum_sq = 0.0
        self.sum_rmse = 0.0  # of the per-image RMSEs (image)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        pred, target = _check(pred, target, 1, "DepthMeter")
        valid = (target != 0) & torch.isfinite(target)
        check_finite("DepthMeter.update", "pred", pred, valid)
        if self.average == "pixel":
            diff = (pred - target)[valid]
            self.n += int(valid.sum())
            self.sum_abs += float(diff.abs().sum())
            self.sum_rel += float((diff.abs() / target[valid].abs()).sum())
            self.sum_sq += float((diff ** 2).sum())
            return
        valid = valid.flatten(1)
        count = valid.sum(1)
        keep = count > 0
        self.skipped += int((~keep).sum())
        t = torch.where(valid, target.flatten(1), 1.0)  # invalid pixels never divide (or count)
        err = torch.where(valid, (pred.flatten(1) - t).abs(), 0.0)
        n = count[keep].double()
        self.n += int(keep.sum())
        self.sum_abs += float((err.sum(1)[keep] / n).sum())
        self.sum_rel += float(((err / t.abs()).sum(1)[keep] / n).sum())
        self.sum_rmse += float(((err ** 2).sum(1)[keep] / n).sqrt().sum())

    def compute(self) -> dict:
        if self.n == 0:
            more = (f" ({self.skipped} image(s) had none)" if self.average == "image" else "")
            raise ValueError(f"DepthMeter.compute(): no valid depth pixels were seen{more}")
        if self.average == "image":
            return {"abs_err": self.sum_abs / self.n, "rel_err": self.sum_rel / self.n,
                    "rmse": self.sum_rmse / self.n, "images": self.n, "skipped_images": self.skipped}
        return {"abs_err": self.sum_abs / self.n, "rel_err": self.sum_rel / self.n,
                "rmse": math.sqrt(self.sum_sq / self.n)}


class NormalsMeter:
    """Angular error (degrees) between normalized predictions and unit targets on valid pixels.

    ``mean``, ``rmse`` and ``% within 11.25 / 22.5 / 30`` are exact sums over the set. ``median``
    comes from a histogram with ``resolution`` degree bins (default 0.001 degrees), so the set's
    angles need not be kept in memory (NYUv2 val has ~72 M valid pixels); it is exact to within
    half a bin.

    Valid pixels have a finite, non-zero target (targets are normalized); predictions are
    normalized too (an all-zero prediction is 90 degrees from anything). A non-finite prediction
    on a valid pixel is a ``ValueError``.
    """

    higher_is_better = {"mean": False, "median": False, "rmse": False, "11.25": True, "22.5": True, "30": True}
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, resolution: float = 1e-3):
        self.resolution = float(resolution)
        self.bins = int(math.ceil(180.0 / self.resolution)) + 1
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum = 0.0
        self.sum_sq = 0.0
        self.within = [0, 0, 0]
        self.hist = torch.zeros(self.bins, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        pred, target = _check(pred, target, 3, "NormalsMeter")
        valid = (target.abs().sum(1) > 0) & torch.isfinite(target).all(1)
        check_finite("NormalsMeter.update", "pred", pred, valid.unsqueeze(1))
        n = F.normalize(pred, dim=1)
        t = F.normalize(target, dim=1)
        cos = (n * t).sum(1).clamp(-1.0, 1.0)
        ang = torch.rad2deg(torch.acos(cos))[valid]
        self.n += ang.numel()
        self.sum += float(ang.sum())
        self.sum_sq += float((ang ** 2).sum())
        for i, th in enumerate(self.THRESHOLDS):
            self.within[i] += int((ang < th).sum())
        idx = torch.floor(ang / self.resolution).long().clamp(0, self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins)

    def compute(self) -> dict:
        if self.n == 0:
            raise ValueError("NormalsMeter.compute(): no valid normal pixels were seen")
        cum = torch.cumsum(self.hist, 0)
        # median of n values: mean of the (n-1)//2-th and n//2-th order statistics (0-based)
        lo = int(torch.searchsorted(cum, torch.tensor((self.n - 1) // 2 + 1)))
        hi = int(torch.searchsorted(cum, torch.tensor(self.n // 2 + 1)))
        median = ((lo + hi) / 2 + 0.5) * self.resolution
        out = {"mean": self.sum / self.n, "median": median, "rmse": math.sqrt(self.sum_sq / self.n)}
        for i, th in enumerate(self.THRESHOLDS):
            out[f"{th:g}"] = 100.0 * self.within[i] / self.n
        return out
