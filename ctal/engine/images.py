"""Images written at the end of a run: predictions next to targets, and CTAL affinity maps."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import default_collate

from .. import vis
from ..nn import CrossTaskAffinity


@torch.no_grad()
def save_run_images(model, dataset, out_dir, count: int, device) -> list[Path]:
    """For the first ``count`` samples of ``dataset``: ``pred_<i>.png`` (image, targets / predictions)
    and, for models with a CTAL block, ``affinity_<i>.png`` (per task: the cosine affinity of the
    centre pixel to every pixel, then the diffusion row ``M[i]`` shared by all tasks)."""
    out_dir = Path(out_dir)
    model.eval()
    ctal_blocks = [m for m in model.modules() if isinstance(m, CrossTaskAffinity)]
    captured = {}
    hook = None
    if ctal_blocks:
        block = ctal_blocks[0]

        def grab(mod, args):
            captured["x"] = mod._stack(args[0])  # the (B, T, C, H, W) features CTAL sees
        hook = block.register_forward_pre_hook(grab)
    written = []
    try:
        for i in range(min(count, len(dataset))):
            sample = default_collate([dataset[i]])
            pred = model(sample["image"].to(device))
            num_classes = getattr(dataset, "num_classes", {})
            written.append(vis.save_grid(vis.visualize_sample(sample, pred, num_classes), out_dir / f"pred_{i}.png"))
            if "x" in captured:
                x = captured["x"].float()
                H, W = x.shape[-2:]
                centre = (H // 2, W // 2)
                rows = vis.affinity_map(x, centre)  # (T, H, W)
                tiles = [vis.colorize_scalar(r, -1.0, 1.0, diverging=True) for r in rows]
                m = vis.diffusion_map(x, block.weight.float(), block.bias.float(), centre)
                tiles.append(vis.colorize_scalar(m, diverging=True))
                written.append(vis.save_grid([tiles], out_dir / f"affinity_{i}.png"))
    finally:
        if hook is not None:
            hook.remove()
    return written
