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
predictions at input resolution with ``output_channels(task, num_classes)`` channels (logits for
semseg / human_parts / edge / sal; raw values for depth; unnormalized normals). "aux" holds the
deep-supervision predictions (may be empty).
"""
from __future__ import annotations

IGNORE_INDEX = -1
EDGE_IGNORE = 255.0
SAL_IGNORE = 255.0

TASKS = ("semseg", "depth", "normals", "edge", "sal", "human_parts")


def output_channels(task: str, num_classes: int | None = None) -> int:
    """Channels a model predicts for ``task`` (``num_classes`` for the segmentation tasks)."""
    if task in ("semseg", "human_parts"):
        if num_classes is None:
            raise ValueError(f"{task} needs num_classes (e.g. num_classes={{'{task}': 13}})")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes of {task} must be an int >= 2, got {num_classes!r}")
        return num_classes
    fixed = {"depth": 1, "normals": 3, "edge": 1, "sal": 1}
    if task not in fixed:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return fixed[task]
