"""Evaluation metrics for multitask dense prediction, accumulated over a whole evaluation set.

Every meter has ``update(pred, target)`` (one batch, predictions as the model emits them, targets
as ``ctal/tasks.py`` defines them), ``compute() -> dict`` and ``reset()``, plus a
``higher_is_better`` dict for its headline numbers (used by :func:`delta_m`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..tasks import TASKS
from .._checks import check_task_names
from .._io import write_json
from ._checks import check_class_count, finite_number
from .edge import EDGE_MAX_DIST, EdgeMeter
from .regression import DepthMeter, NormalsMeter
from .saliency import SaliencyMeter
from .segmentation import SegMeter

__all__ = ["SegMeter", "DepthMeter", "NormalsMeter", "SaliencyMeter", "EdgeMeter", "EDGE_MAX_DIST",
           "build_meters", "update_meters", "MultiTaskMeter", "delta_m", "load_baselines", "save_baselines",
           "HIGHER_IS_BETTER", "DEFAULT_DELTA_METRICS"]

# direction of every reported metric, as "task/metric"
HIGHER_IS_BETTER = {
    **{f"semseg/{k}": v for k, v in SegMeter.higher_is_better.items()},
    **{f"human_parts/{k}": v for k, v in SegMeter.higher_is_better.items()},
    **{f"depth/{k}": v for k, v in DepthMeter.higher_is_better.items()},
    **{f"normals/{k}": v for k, v in NormalsMeter.higher_is_better.items()},
    **{f"sal/{k}": v for k, v in SaliencyMeter.higher_is_better.items()},
    **{f"edge/{k}": v for k, v in EdgeMeter.higher_is_better.items()},
}

# the metrics the papers put into delta_m, per task
DEFAULT_DELTA_METRICS = {
    "semseg": ("mIoU",), "human_parts": ("mIoU",), "depth": ("rmse",), "normals": ("mean",),
    "sal": ("maxF",), "edge": ("odsF",),
}


def build_meters(tasks: Sequence[str], num_classes: Optional[Mapping[str, int]] = None,
                 dataset: Optional[str] = None, edge_max_dist: Optional[float] = None,
                 edge_thresholds=99, depth_average: str = "pixel") -> dict:
    """One meter per task. ``num_classes`` (ints) is required for semseg / human_parts; the edge
    tolerance is ``edge_max_dist``, else the literature's value for ``dataset``, else 0.0075;
    ``depth_average``: ``"pixel"`` or ``"image"`` (:class:`DepthMeter`).
    Feed them with :func:`update_meters`, which names a task missing from a batch."""
    tasks = check_task_names(tasks)
    num_classes = dict(num_classes or {})
    meters = {}
    for t in tasks:
        if t in ("semseg", "human_parts"):
            if t not in num_classes:
                raise ValueError(f"build_meters: num_classes[{t!r}] is required")
            meters[t] = SegMeter(check_class_count(f"build_meters: num_classes[{t!r}]", num_classes[t]))
        elif t == "depth":
            meters[t] = DepthMeter(depth_average)
        elif t == "normals":
            meters[t] = NormalsMeter()
        elif t == "sal":
            meters[t] = SaliencyMeter()
        elif t == "edge":
            md = edge_max_dist if edge_max_dist is not None else EDGE_MAX_DIST.get(dataset or "", 0.0075)
            meters[t] = EdgeMeter(max_dist=md, thresholds=edge_thresholds)
        else:
            raise ValueError(f"build_meters: unknown task {t!r}; expected one of {TASKS}")
    return meters


def update_meters(meters: Mapping, preds: Mapping, targets: Mapping, where: str = "update_meters") -> None:
    """``meters[t].update(preds[t], targets[t])`` for every task of ``meters`` (``preds`` may be
    the model's ``{"final": ...}`` output). A task without a prediction or a target is a
    ``ValueError`` naming it and what is there, raised before any meter is updated."""
    if not isinstance(preds, Mapping) or not isinstance(targets, Mapping):
        raise TypeError(f"{where}: predictions and targets must be dicts task -> tensor, got "
                        f"{type(preds).__name__} and {type(targets).__name__}")
    if "final" in preds and isinstance(preds["final"], Mapping):
        preds = preds["final"]
    for t in meters:
        if t not in preds:
            raise ValueError(f"{where}: no prediction for task {t!r}; the predictions have {sorted(preds)}, "
                             f"the meters need {list(meters)}")
        if t not in targets:
            have = sorted(k for k in targets if k not in ("image", "meta"))
            raise ValueError(f"{where}: no target for task {t!r}; the targets have {have}, the meters "
                             f"need {list(meters)}")
    for t, m in meters.items():
        m.update(preds[t], targets[t])


class MultiTaskMeter:
    """Convenience wrapper: ``update(preds, targets)`` with task dicts (or the model's
    ``{"final": ...}`` output); ``compute()`` -> ``{task: {metric: value}}``."""

    def __init__(self, tasks: Sequence[str], num_classes=None, **kw):
        self.meters = build_meters(tasks, num_classes, **kw)

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()

    def update(self, preds: Mapping, targets: Mapping) -> None:
        update_meters(self.meters, preds, targets, where="MultiTaskMeter.update")

    def compute(self) -> dict:
        return {t: m.compute() for t, m in self.meters.items()}


def _flatten(metrics: Mapping) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                out[f"{k}/{k2}"] = v2
        else:
            out[k] = v
    return out


def delta_m(metrics: Mapping, baselines: Mapping, higher_is_better: Optional[Mapping[str, bool]] = None,
            keys: Optional[Sequence[str]] = None) -> float:
    """Multitask gain over single-task baselines, in percent (Maninis et al. / Vandenhende et al.):

        delta_m = 100 / K * sum_k (-1)^{l_k} (M_k - B_k) / B_k

    with ``l_k = 1`` when lower is better for metric ``k``. ``metrics`` and ``baselines`` are
    ``{task: {metric: value}}`` (or flat ``{"task/metric": value}``). The metrics used are
    ``keys`` ("task/metric" names), else every metric present in the baselines.
    ``higher_is_better`` (flat "task/metric" -> bool) defaults to :data:`HIGHER_IS_BETTER`.
    A NaN / Inf / non-numeric metric or baseline is a ``ValueError`` naming it.
    """
    m, b = _flatten(metrics), _flatten(baselines)
    hib = dict(HIGHER_IS_BETTER)
    if higher_is_better:
        hib.update(_flatten(higher_is_better) if any(isinstance(v, Mapping) for v in higher_is_better.values())
                   else higher_is_better)
    keys = list(keys) if keys is not None else list(b)
    if not keys:
        raise ValueError("delta_m: no metrics to compare (empty baselines / keys)")
    total = 0.0
    for k in keys:
        if k not in m:
            raise KeyError(f"delta_m: metric {k!r} missing from the results (have {sorted(m)})")
        if k not in b:
            raise KeyError(f"delta_m: no baseline for {k!r} (have {sorted(b)})")
        if k not in hib:
            raise KeyError(f"delta_m: direction of {k!r} unknown; pass higher_is_better={{{k!r}: True/False}}")
        base = finite_number("delta_m", f"baseline {k}", b[k])
        if base == 0:
            raise ValueError(f"delta_m: baseline {k} = {base} cannot be a reference (must be finite and non-zero)")
        rel = (finite_number("delta_m", f"metric {k}", m[k]) - base) / base
        total += rel if hib[k] else -rel
    return 100.0 * total / len(keys)


def load_baselines(path) -> dict:
    """Read single-task baselines from JSON: ``{task: {metric: value}}`` (or flat
    ``{"task/metric": value}``); returns the flat form ``{"task/metric": value}``.

    Optionally the file may wrap them as ``{"baselines": {...}, ...other keys...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"baseline file {path} is not valid JSON: {e}") from e
    if isinstance(data, Mapping) and "baselines" in data:
        data = data["baselines"]
    if not isinstance(data, Mapping):
        raise ValueError(f"baseline file {path} must hold an object of task -> metric -> value")
    flat = _flatten(data)
    for k, v in flat.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"baseline file {path}: {k} = {v!r} is not a finite number")
    return flat


def save_baselines(path, metrics: Mapping, keys: Optional[Mapping[str, Sequence[str]]] = None, **info) -> None:
    """Store single-task results as baselines (the headline metrics of each task by default)."""
    keys = keys or DEFAULT_DELTA_METRICS
    out = {}
    for task, vals in metrics.items():
        chosen = keys.get(task, tuple(vals))
        out[task] = {k: float(vals[k]) for k in chosen if k in vals}
    write_json(path, {"baselines": out, **info}, sort_keys=True)
