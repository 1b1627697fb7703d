"""Evaluation: the metrics of a model over a loader, model selection (``eval.best_metric``), and
the end-of-run report (``metrics.json``, images, the printed summary)."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import config as cfglib
from .._io import write_json
from ..metrics import HIGHER_IS_BETTER, build_meters, delta_m, load_baselines, update_meters
from .images import save_curves, save_run_images

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """A loader batch as ``(images, {task: target})`` on ``device``."""
    images = batch["image"].to(device, non_blocking=True)
    targets = {k: v.to(device, non_blocking=True) for k, v in batch.items()
               if k not in ("image", "meta") and torch.is_tensor(v)}
    return images, targets


@torch.no_grad()
def evaluate(model: nn.Module, loader, tasks, num_classes, device, dataset_name: str = "",
             amp: Optional[str] = None, progress: bool = True, max_batches: Optional[int] = None,
             edge_thresholds: int = 99, original_resolution: bool = False,
             depth_average: str = "pixel") -> dict:
    """Metrics of ``model`` over the whole loader (every batch, the last partial one included).

    ``edge_thresholds`` < 99 makes the (slow) boundary matching of odsF cheaper for validation
    during training; reported results use 99. ``original_resolution`` scores each prediction,
    bilinearly resized, against the image's targets as stored on disk
    (``loader.dataset.original_targets``) instead of the resized ones the network was fed.
    ``depth_average``: depth errors over all valid pixels of the set (``"pixel"``) or per image,
    then averaged over images (``"image"``).
    """
    meters = build_meters(tasks, num_classes, dataset=dataset_name, edge_thresholds=edge_thresholds,
                          depth_average=depth_average)
    model.eval()
    it = tqdm(loader, desc="eval", leave=False, disable=not progress)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        images, targets = to_device(batch, device)
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp in AMP_DTYPES):
            out = model(images)["final"]
        if not original_resolution:
            update_meters(meters, {t: p.float() for t, p in out.items()}, targets, where="evaluate")
            continue
        for b, index in enumerate(batch["meta"]["index"].tolist()):
            original = loader.dataset.original_targets(index)
            for t, m in meters.items():
                target = original[t].unsqueeze(0).to(device)
                pred = nn.functional.interpolate(out[t][b:b + 1].float(), size=target.shape[-2:],
                                                 mode="bilinear", align_corners=False)
                m.update(pred, target)
    return {t: m.compute() for t, m in meters.items()}


def evaluation_due(epoch: int, epochs: int, every: int = 1, final_epochs: int = 0) -> bool:
    """Whether a run of ``epochs`` epochs evaluates after its ``epoch``-th (1-based): every
    ``every``-th epoch, each of the last ``final_epochs`` and always the last one
    (``eval.every``, ``eval.final_epochs``)."""
    return epoch % every == 0 or epoch > epochs - final_epochs or epoch == epochs


# --- model selection ---------------------------------------------------------------------------

def check_best_metric(best_metric, tasks) -> None:
    """``eval.best_metric`` must be ``delta_m`` or a ``task/metric`` the meters of ``tasks`` report
    with a known direction (:data:`ctal.metrics.HIGHER_IS_BETTER`); raise ConfigError (a ValueError)
    listing them."""
    valid = [k for k in HIGHER_IS_BETTER if k.partition("/")[0] in set(tasks)]
    if best_metric == "delta_m" or best_metric in valid:
        return
    close = ([k for k in valid if k.lower() == str(best_metric).lower()]  # semseg/miou -> semseg/mIoU
             or difflib.get_close_matches(str(best_metric), valid, n=3, cutoff=0.6))
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise cfglib.ConfigError(f"eval.best_metric {best_metric!r} is not a metric of this run's tasks {list(tasks)}.{hint} "
                     f"Expected 'delta_m' (with eval.baselines) or one of {valid}")


def model_selection(cfg: dict) -> tuple[str, Optional[dict]]:
    """``(eval.best_metric, the single-task baselines of eval.baselines or None)``. Checked
    against ``data.tasks`` when the config names them, so that a typo fails before any data is
    generated; delta_m without baselines is a ConfigError."""
    cfg = cfglib.with_defaults(cfg)
    ev = cfg["eval"]
    best_metric = ev["best_metric"]
    if cfg["data"]["tasks"]:
        check_best_metric(best_metric, cfg["data"]["tasks"])
    baselines = load_baselines(ev["baselines"]) if ev["baselines"] else None
    if best_metric == "delta_m" and baselines is None:
        raise cfglib.ConfigError("eval.best_metric is delta_m but eval.baselines (single-task results JSON) "
                                 "is not set; set it or choose a metric like 'semseg/mIoU'")
    return best_metric, baselines


def selection_score(metrics: dict, best_metric: str, baselines: Optional[dict] = None) -> float:
    """Model-selection score (higher is better): delta_m against ``baselines``, or the named
    ``task/metric`` (negated where lower is better)."""
    if best_metric == "delta_m":
        return delta_m(metrics, baselines)
    task, _, name = best_metric.partition("/")
    if task not in metrics or name not in metrics[task]:
        have = sorted(f"{t}/{k}" for t, vals in metrics.items() for k in vals)
        raise KeyError(f"eval.best_metric {best_metric!r} not among the metrics {have}")
    v = float(metrics[task][name])
    return v if HIGHER_IS_BETTER.get(best_metric, True) else -v


# --- the report --------------------------------------------------------------------------------

def format_summary(metrics: dict, best: Optional[dict] = None) -> str:
    rows = [("task", "metric", "value")]
    for task, vals in metrics.items():
        for k, v in vals.items():
            if isinstance(v, (int, float)):
                rows.append((task, k, f"{v:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    if best:
        lines.append(f"best score {best['score']:.4f} at epoch {best['epoch']}")
    return "\n".join(lines)


def write_report(out_dir, summary: dict, model: nn.Module, dataset, images: int, device) -> None:
    """``<out_dir>/metrics.json`` (``summary``: its ``metrics`` and ``best`` are printed as a
    table), ``curves.png`` of its ``history``, and the figures of ``images`` fixed samples of
    ``dataset`` (predictions, CTAL affinities) in ``<out_dir>/images``."""
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", summary, default=float)
    save_curves(summary.get("history"), out_dir / "curves.png")
    if images:
        save_run_images(model, dataset, out_dir / "images", images, device, title="end of training")
    print(format_summary(summary["metrics"], summary["best"]))
