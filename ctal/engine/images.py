"""The figures a run writes: for a fixed set of validation samples, predictions next to targets
(``pred_<i>.png``) and, for models with a CTAL block, affinity / diffusion rows of query pixels
(``affinity_<i>.png``) and the learned fusion weights (``fusion_weights.png``); the training
curves (``curves.png``). The same images go to TensorBoard under ``figures/``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import default_collate

from .. import figures
from ..nn import CrossTaskAffinity

__all__ = ["sample_indices", "run_figures", "save_run_images", "save_curves"]


def sample_indices(n: int, count: int) -> list[int]:
    """``min(count, n)`` sample indices spread evenly over a split of ``n`` (always the same
    ones, so that figures of successive evaluations compare)."""
    if count <= 0 or n <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})


def _ctal_block(model) -> Optional[CrossTaskAffinity]:
    return next((m for m in model.modules() if isinstance(m, CrossTaskAffinity)), None)


@torch.no_grad()
def run_figures(model, dataset, count: int, device, title: str = "") -> dict:
    """``{name: Figure}`` for ``count`` fixed samples of ``dataset``: ``pred_<i>`` for each and,
    when the model has a CTAL block, ``affinity_<i>`` and ``fusion_weights`` (``<i>``: the sample
    index in ``dataset``). One forward pass in eval mode; draws no random numbers."""
    indices = sample_indices(len(dataset), count)
    if not indices:
        return {}
    was_training = model.training
    model.eval()
    block = _ctal_block(model)
    captured = {}
    hook = None
    if block is not None:
        def grab(mod, args):
            captured["x"] = mod._stack(args[0])  # the (B, T, C, h, w) features CTAL sees
        hook = block.register_forward_pre_hook(grab)
    try:
        batch = default_collate([dataset[i] for i in indices])
        out = model(batch["image"].to(device))["final"]
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    preds = {t: p.float().cpu() for t, p in out.items()}
    names = dict(getattr(dataset, "class_names", None) or {})
    for t, n in dict(getattr(dataset, "num_classes", None) or {}).items():
        names.setdefault(t, [f"class {c}" for c in range(n)])
    depth_label = "inverse depth" if getattr(dataset, "inverse_depth", False) else "depth [m]"
    tasks = [t for t in getattr(dataset, "tasks", preds) if t in batch]
    seg = next((t for t in ("semseg", "human_parts") if t in batch), None)  # places the CTAL queries
    figs = {}
    for b, i in enumerate(indices):
        head = f"val sample {i}" + (f" · {title}" if title else "")
        figs[f"pred_{i}"] = figures.prediction_figure(
            batch["image"][b], {t: batch[t][b] for t in tasks}, {t: p[b] for t, p in preds.items()},
            names, depth_label=depth_label, title=head)
        if "x" in captured:
            pixels = figures.query_pixels(tuple(block.size), batch[seg][b] if seg else None)
            figs[f"affinity_{i}"] = figures.affinity_figure(
                batch["image"][b], captured["x"][b].float().cpu(), block.weight.float().cpu(),
                None if block.bias is None else block.bias.float().cpu(), pixels, block.tasks,
                title=f"CTAL on {head}")
    if block is not None:
        figs["fusion_weights"] = figures.fusion_weights_figure(
            block.weight.float().cpu(), None if block.bias is None else block.bias.float().cpu(),
            tuple(block.size), block.tasks, title="CTAL fusion weights" + (f" · {title}" if title else ""))
    return figs


def save_run_images(model, dataset, out_dir, count: int, device, writer=None, step: Optional[int] = None,
                    title: str = "") -> list[Path]:
    """Write :func:`run_figures` as PNGs into ``out_dir`` and, with a TensorBoard ``writer``, as
    images ``figures/<name>`` at ``step``; returns the PNG paths."""
    out_dir = Path(out_dir)
    written = []
    for name, fig in run_figures(model, dataset, count, device, title).items():
        arr = figures.render(fig)
        written.append(figures.save_figure(arr, out_dir / f"{name}.png"))
        if writer is not None:
            writer.add_image(f"figures/{name}", arr, step, dataformats="HWC")
    return written


def save_curves(history, path, best_metric: Optional[str] = None) -> Optional[Path]:
    """``curves.png`` of the trainer's per-epoch ``history`` (nothing for an empty history)."""
    if not history:
        return None
    return figures.save_figure(figures.curves_figure(history, best_metric), path)
