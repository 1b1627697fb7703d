"""Input handling shared by the meters of binary maps (saliency, edges)."""
from __future__ import annotations

from torch import Tensor


def binary_maps(meter: str, pred: Tensor, target: Tensor, from_logits: bool) -> tuple[Tensor, Tensor]:
    """Check ``(B, 1, H, W)`` (or ``(B, H, W)``) prediction / target pairs; returns the
    probabilities (one sigmoid when ``from_logits``, never on top of probabilities) and the target,
    both ``(B, 1, H, W)``."""
    if pred.dim() == 3:
        pred = pred.unsqueeze(1)
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if pred.shape != target.shape or pred.shape[1] != 1:
        raise ValueError(f"{meter}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                         f"must both be (B, 1, H, W)")
    prob = pred.float().sigmoid() if from_logits else pred.float()
    return prob, target
