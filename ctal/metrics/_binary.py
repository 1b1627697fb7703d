"""Input handling shared by the meters of binary maps (saliency, edges)."""
from __future__ import annotations

from torch import Tensor

from ..tasks import saliency_probability
from ._checks import as_tensor, check_finite, check_rank, check_values_in


def binary_maps(meter: str, pred: Tensor, target: Tensor, from_logits: bool,
                ignore_value: float, two_class: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Check ``(B, 1, H, W)`` (or ``(B, H, W)``) prediction / target pairs; returns the
    probabilities (one sigmoid when ``from_logits``, never on top of probabilities), the target,
    and the mask of valid (non-ignored) pixels, all ``(B, 1, H, W)``. ``two_class``: logits may
    also be ``(B, 2, H, W)`` class logits (saliency), read by ``ctal.tasks.saliency_probability``.

    ``target`` must hold 0, 1 or ``ignore_value`` (the loaders' float {0, 1} maps with 255 =
    ignore); soft targets or NaN are errors. ``pred`` must be finite on valid pixels, and within
    [0, 1] when it holds probabilities. Numpy arrays are converted."""
    where = f"{meter}.update"
    pred, target = as_tensor(where, "pred", pred), as_tensor(where, "target", target)
    check_rank(where, "pred", pred, (3, 4), "(B, 1, H, W) or (B, H, W)")
    check_rank(where, "target", target, (3, 4), "(B, 1, H, W) or (B, H, W)")
    if pred.dim() == 3:
        pred = pred.unsqueeze(1)
    if target.dim() == 3:
        target = target.unsqueeze(1)
    channels = (1, 2) if two_class and from_logits else (1,)
    if (pred.shape[0], *pred.shape[2:]) != (target.shape[0], *target.shape[2:]) \
            or pred.shape[1] not in channels or target.shape[1] != 1:
        two = " (the prediction may also be (B, 2, H, W) class logits)" if len(channels) == 2 else ""
        raise ValueError(f"{meter}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                         f"must both be (B, 1, H, W){two}")
    ignore = float(ignore_value)
    check_values_in(where, "target", target, (0, 1, ignore), f"0 or 1 (or {ignore:g} = ignore)")
    valid = target != ignore
    check_finite(where, "pred", pred, valid)
    if from_logits:
        return saliency_probability(pred.float()) if two_class else pred.float().sigmoid(), target, valid
    prob = pred.float()
    out = ((prob < 0) | (prob > 1)) & valid
    if out.any():
        raise ValueError(f"{where}: `pred` holds values outside [0, 1] (e.g. {float(prob[out][0]):g}) but "
                         f"from_logits=False expects probabilities; pass logits with from_logits=True")
    return prob, target, valid
