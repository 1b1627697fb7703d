"""Task names and the conventions every loader, model, loss and metric in ctal shares.

A dataset sample is a dict:
    "image":        float32 (3, H, W), RGB in [0, 1] then ImageNet-normalized by the loader
    "semseg":       int64 (H, W), class ids, IGNORE_INDEX (-1) = void
    "human_parts":  int64 (H, W), part ids (0 = background), IGNORE_INDEX = void
    "depth":        float32 (1, H, W), metres (or inverse depth for Cityscapes), 0 = invalid
    "normals":      float32 (3, H, W), unit vectors, all-zero = invalid
    "edge":         float32 (1, H, W), {0, 1}, EDGE_IGNORE (255) = ignore
    "sal":          float32 (1, H, W), {0, 1} saliency, SAL_IGNORE (255) = ignore
    "meta":         dict with at least "index" (int) and "size" ((H, W) of the original image)
Only the tasks a dataset provides are present.

A model maps images (B, 3, H, W) to a dict {"final": {task: tensor}, "aux": {name: {task: tensor}}}:
predictions at input resolution with ``output_channels(task, num_classes, sal_channels)`` channels
(logits for semseg / human_parts / edge / sal; raw values for depth; unnormalized normals). "aux"
holds the deep-supervision predictions (may be empty).

Saliency comes in two forms: one logit (probability = its sigmoid) or, as the CTAL paper's
transformer code predicts it, two class logits (probability = softmax channel 1, "salient").
Everything that reads a saliency prediction goes through :func:`saliency_probability`.
"""
from __future__ import annotations

from torch import Tensor

IGNORE_INDEX = -1
EDGE_IGNORE = 255.0
SAL_IGNORE = 255.0

TASKS = ("semseg", "depth", "normals", "edge", "sal", "human_parts")
SAL_CHANNELS = (1, 2)


def output_channels(task: str, num_classes: int | None = None, sal_channels: int = 1) -> int:
    """Channels a model predicts for ``task`` (``num_classes`` for the segmentation tasks,
    ``sal_channels`` (1 or 2) for saliency)."""
    if not isinstance(sal_channels, int) or isinstance(sal_channels, bool) or sal_channels not in SAL_CHANNELS:
        raise ValueError(f"sal_channels must be 1 (a sigmoid logit) or 2 (softmax over background / "
                         f"salient), got {sal_channels!r}")
    if task == "sal":
        return sal_channels
    if task in ("semseg", "human_parts"):
        if num_classes is None:
            raise ValueError(f"{task} needs num_classes (e.g. num_classes={{'{task}': 13}})")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes of {task} must be an int >= 2, got {num_classes!r}")
        return num_classes
    fixed = {"depth": 1, "normals": 3, "edge": 1}
    if task not in fixed:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return fixed[task]


def saliency_probability(pred: Tensor) -> Tensor:
    """The salient-class probability ``(B, 1, H, W)`` of a saliency prediction ``(B, C, H, W)``:
    the sigmoid of a 1-channel logit, or softmax channel 1 of 2 class logits."""
    if pred.dim() != 4 or pred.shape[1] not in SAL_CHANNELS:
        raise ValueError(f"sal: a prediction must be (B, 1, H, W) or (B, 2, H, W) logits, got "
                         f"{tuple(pred.shape)}")
    if pred.shape[1] == 1:
        return pred.sigmoid()
    return pred.softmax(1)[:, 1:]
