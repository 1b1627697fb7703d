"""Visualization: colour maps for every task, CTAL affinity maps for a chosen pixel, PNG grids.

All ``colorize_*`` functions return ``uint8`` arrays ``(H, W, 3)`` so they can be tiled with
:func:`make_grid` and written with :func:`save_grid` (PIL only, no matplotlib needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .tasks import EDGE_IGNORE, IGNORE_INDEX, saliency_probability

__all__ = ["palette", "colorize_semseg", "colorize_depth", "colorize_normals", "colorize_edge", "ctal_rows",
           "colorize_image", "colorize_scalar", "affinity_map", "diffusion_map", "affinity_row",
           "visualize_sample", "make_grid", "save_grid"]

# viridis-like anchors (perceptually ordered dark blue -> green -> yellow) for scalar maps
_SEQ = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
# diverging blue-white-red for signed maps (cosine affinities in [-1, 1])
_DIV = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], np.float64)


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 distinct colours (the PASCAL VOC bit-interleaving scheme)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def colorize_semseg(label, num_classes: Optional[int] = None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Class ids ``(H, W)`` or logits ``(C, H, W)`` -> VOC-palette colours. Void pixels are white
    (class 0 is already black in that palette)."""
    a = _np(label)
    if a.ndim == 3:
        num_classes = num_classes or a.shape[0]
        a = a.argmax(0)
    if a.ndim != 2:
        raise ValueError(f"colorize_semseg: expected (H, W) ids or (C, H, W) logits, got shape {a.shape}")
    a = a.astype(np.int64)
    n = int(num_classes or max(int(a.max()) + 1, 1))
    pal = palette(max(n, 1))
    out = np.full(a.shape + (3,), 255, np.uint8)
    ok = (a >= 0) & (a < n) & (a != ignore_index)
    out[ok] = pal[a[ok]]
    return out


def _lut(v: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, 1) * (len(anchors) - 1)
    lo = np.floor(v).astype(int).clip(0, len(anchors) - 2)
    f = (v - lo)[..., None]
    return (anchors[lo] * (1 - f) + anchors[lo + 1] * f).round().astype(np.uint8)


def colorize_scalar(x, vmin: Optional[float] = None, vmax: Optional[float] = None, valid=None,
                    diverging: bool = False) -> np.ndarray:
    """Scalar map ``(H, W)`` -> colours between ``vmin`` and ``vmax`` (default: the valid range);
    invalid pixels are black."""
    a = _np(x).astype(np.float64)
    a = a.reshape(a.shape[-2:]) if a.ndim == 3 and a.shape[0] == 1 else a
    if a.ndim != 2:
        raise ValueError(f"expected an (H, W) or (1, H, W) map, got shape {a.shape}")
    valid = np.isfinite(a) if valid is None else (np.asarray(valid, bool) & np.isfinite(a))
    if valid.any():
        vmin = float(a[valid].min()) if vmin is None else vmin
        vmax = float(a[valid].max()) if vmax is None else vmax
    else:
        vmin, vmax = 0.0, 1.0
    v = (a - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(a)
    out = _lut(np.where(valid, v, 0), _DIV if diverging else _SEQ)
    out[~valid] = 0
    return out


def colorize_depth(depth, vmin: Optional[float] = None, vmax: Optional[float] = None,
                   inverse: bool = True) -> np.ndarray:
    """Depth ``(1, H, W)`` or ``(H, W)``; 0 = invalid (black). ``inverse=True`` colours by inverse
    depth, which spreads near structure better (near = bright)."""
    d = _np(depth).astype(np.float64)
    d = d.reshape(d.shape[-2:])
    valid = d > 0
    v = np.where(valid, 1.0 / np.where(valid, d, 1), 0) if inverse else d
    if inverse:
        vmin, vmax = (None if vmax is None else 1 / vmax), (None if vmin is None else 1 / vmin)
    return colorize_scalar(v, vmin, vmax, valid)


def colorize_normals(normals) -> np.ndarray:
    """Normals ``(3, H, W)`` (normalized here) -> ``(n + 1) / 2`` as RGB; all-zero = black."""
    n = _np(normals).astype(np.float64)
    if n.ndim != 3 or n.shape[0] != 3:
        raise ValueError(f"colorize_normals: expected (3, H, W), got {n.shape}")
    norm = np.linalg.norm(n, axis=0)
    valid = norm > 1e-6
    n = n / np.where(valid, norm, 1)
    rgb = ((n.transpose(1, 2, 0) + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def colorize_edge(edge, logits: bool = False) -> np.ndarray:
    """Edge map ``(1, H, W)`` / ``(H, W)`` (probabilities, or logits with ``logits=True``) as grey
    levels (edge = white); ignored pixels are drawn red."""
    e = _np(edge).astype(np.float64)
    e = e.reshape(e.shape[-2:])
    ignore = e == EDGE_IGNORE
    if logits:
        e = 1 / (1 + np.exp(-e))
    g = (np.clip(np.where(ignore, 0, e), 0, 1) * 255).round().astype(np.uint8)
    out = np.repeat(g[..., None], 3, -1)
    out[ignore] = (255, 0, 0)
    return out


def colorize_image(image, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """Undo ImageNet normalization of a ``(3, H, W)`` image (pass ``mean=None`` for [0, 1] input)."""
    x = _np(image).astype(np.float64)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"colorize_image: expected (3, H, W), got {x.shape}")
    if mean is not None:
        x = x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    return (np.clip(x.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def _pixel_index(pixel, H: int, W: int) -> int:
    y, x = pixel
    if not (0 <= y < H and 0 <= x < W):
        raise ValueError(f"pixel (y, x) = {pixel} outside the {H}x{W} feature grid")
    return int(y) * W + int(x)


def affinity_map(features: Tensor, pixel: Sequence[int], batch_index: int = 0,
                 max_full: int = 4096) -> Tensor:
    """Cosine affinity of ``pixel = (y, x)`` to every pixel, per task: ``(T, H, W)``.

    ``features`` is ``(B, T, C, H, W)`` (the CTAL input). For grids up to ``max_full`` pixels the
    row is taken from ``ctal.ops.affinity`` (the CTAL stage itself); larger grids compute the same
    row directly (``n_i^T n_j``) instead of materializing ``N x N`` matrices."""
    if not isinstance(features, Tensor) or features.dim() != 5:
        raise ValueError("features must be a (B, T, C, H, W) tensor")
    B, T, C, H, W = features.shape
    if not 0 <= batch_index < B:
        raise ValueError(f"batch_index {batch_index} outside [0, {B})")
    i = _pixel_index(pixel, H, W)
    x = features[batch_index:batch_index + 1].detach()
    with torch.no_grad():
        if H * W <= max_full:
            a = ops.affinity(x)  # (1, T, N, N)
            row = a[0, :, i, :]
        else:
            n = F.normalize(x[0].flatten(2), dim=1)  # (T, C, N)
            row = torch.einsum("tc,tcn->tn", n[:, :, i], n)
    return row.reshape(T, H, W)


def diffusion_map(features: Tensor, weight: Tensor, bias: Optional[Tensor], pixel: Sequence[int],
                  batch_index: int = 0, max_full: int = 4096) -> Tensor:
    """Row ``i`` of the CTAL diffusion matrix ``M`` (shared by all tasks) for ``pixel = (y, x)``:
    ``M[i, j] = b_i + sum_t sum_d w[i, t, d] A_t[i, j + d]``, as an ``(H, W)`` map.

    Grids up to ``max_full`` pixels run the CTAL stages themselves (``ctal.ops.affinity``,
    ``align``, ``diffuse``); larger ones convolve the affinity row of :func:`affinity_map` with
    ``w[i]`` instead of materializing ``N x N`` matrices (the same numbers)."""
    if not isinstance(features, Tensor) or features.dim() != 5:
        raise ValueError("features must be a (B, T, C, H, W) tensor")
    B, T, C, H, W = features.shape
    i = _pixel_index(pixel, H, W)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (H * W, T, 3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (N, T, 3, 3) = ({H * W}, {T}, 3, 3), got {got}")
    if not 0 <= batch_index < B:
        raise ValueError(f"batch_index {batch_index} outside [0, {B})")
    if H * W <= max_full:
        x = features[batch_index:batch_index + 1].detach().to(weight.dtype)
        with torch.no_grad():
            m = ops.diffuse(ops.align(ops.affinity(x), (H, W)), weight.detach(),
                            None if bias is None else bias.detach())
        return m[0, i].reshape(H, W)
    rows = affinity_map(features, pixel, batch_index, max_full)  # (T, H, W)
    with torch.no_grad():
        m = F.conv2d(rows[None].to(weight.dtype), weight[i:i + 1].detach(), padding=1)[0, 0]
        if bias is not None:
            m = m + bias[i].detach()
    return m


def ctal_rows(features: Tensor, weight: Tensor, bias: Optional[Tensor], pixels: Sequence[Sequence[int]],
              batch_index: int = 0, max_full: int = 4096) -> tuple[Tensor, Tensor]:
    """The affinity rows ``A_t[i]`` ``(P, T, H, W)`` and diffusion rows ``M[i]`` ``(P, H, W)`` of
    several query ``pixels`` at once: :func:`affinity_map` and :func:`diffusion_map` with the
    CTAL stages run once for all queries (grids up to ``max_full`` pixels)."""
    if not isinstance(features, Tensor) or features.dim() != 5:
        raise ValueError("features must be a (B, T, C, H, W) tensor")
    B, T, C, H, W = features.shape
    idx = [_pixel_index(p, H, W) for p in pixels]
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (H * W, T, 3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (N, T, 3, 3) = ({H * W}, {T}, 3, 3), got {got}")
    if not 0 <= batch_index < B:
        raise ValueError(f"batch_index {batch_index} outside [0, {B})")
    if H * W > max_full:
        a = torch.stack([affinity_map(features, p, batch_index, max_full) for p in pixels])
        m = torch.stack([diffusion_map(features, weight, bias, p, batch_index, max_full) for p in pixels])
        return a, m
    x = features[batch_index:batch_index + 1].detach().to(weight.dtype)
    with torch.no_grad():
        a = ops.affinity(x)  # (1, T, N, N)
        m = ops.diffuse(ops.align(a, (H, W)), weight.detach(), None if bias is None else bias.detach())
    return a[0][:, idx].transpose(0, 1).reshape(len(idx), T, H, W), m[0, idx].reshape(len(idx), H, W)


def _mark(rgb: np.ndarray, pixel: Sequence[int]) -> np.ndarray:
    """Draw the query pixel as a small cross (black core, white arms) so it shows on any colour."""
    out = rgb.copy()
    H, W = out.shape[:2]
    y, x = int(pixel[0]), int(pixel[1])
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        if 0 <= y + dy < H and 0 <= x + dx < W:
            out[y + dy, x + dx] = 255
    out[y, x] = 0
    return out


def affinity_row(features: Tensor, pixel: Sequence[int], weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, size: Optional[Sequence[int]] = None,
                 batch_index: int = 0) -> list:
    """One :func:`save_grid` row for a query ``pixel = (y, x)`` of the feature grid: each task's
    cosine affinity map (diverging colours on [-1, 1]) and, when ``weight`` is given, the CTAL
    diffusion row ``M[i, :]`` (its own range). Maps are upsampled (nearest) to ``size`` (e.g. the
    input image size) so they line up with :func:`visualize_sample` rows; the pixel is marked."""
    B, T, C, H, W = features.shape
    maps = [colorize_scalar(a, -1.0, 1.0, diverging=True) for a in affinity_map(features, pixel, batch_index)]
    if weight is not None:
        m = diffusion_map(features, weight, bias, pixel, batch_index)
        lim = float(m.abs().max()) or 1.0
        maps.append(colorize_scalar(m, -lim, lim, diverging=True))
    maps = [_mark(t, pixel) for t in maps]
    if size is not None:
        Ho, Wo = int(size[0]), int(size[1])
        ys = (np.arange(Ho) * H // Ho).clip(0, H - 1)
        xs = (np.arange(Wo) * W // Wo).clip(0, W - 1)
        maps = [t[ys][:, xs] for t in maps]
    return maps


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile ``rows`` of ``(H, W, 3)`` uint8 images (all of one size per grid) with ``pad`` pixels."""
    if not rows or not all(rows):
        raise ValueError("make_grid: need at least one non-empty row")
    tiles = [[np.asarray(t) for t in r] for r in rows]
    H, W = tiles[0][0].shape[:2]
    for r in tiles:
        for t in r:
            if t.shape != (H, W, 3) or t.dtype != np.uint8:
                raise ValueError(f"make_grid: every tile must be ({H}, {W}, 3) uint8, got {t.shape} {t.dtype}")
    ncol = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (H + pad) + pad, ncol * (W + pad) + pad, 3), background, np.uint8)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            out[y:y + H, x:x + W] = t
    return out


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: Union[str, Path], pad: int = 2) -> Path:
    """Write :func:`make_grid` of ``rows`` to a PNG (parent folders are created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(rows, pad)).save(path, format="PNG")
    return path


def visualize_sample(sample: dict, pred: Optional[dict] = None, num_classes: Optional[dict] = None,
                     index: int = 0) -> list:
    """Rows for :func:`save_grid`: the image and targets, then (if given) the predictions, of item
    ``index`` of a batch (``sample``: a batched dict in the ``ctal/tasks.py`` layout; ``pred``:
    ``{task: tensor}`` or the model's ``{"final": ...}`` output)."""
    num_classes = num_classes or {}
    if pred is not None and "final" in pred:
        pred = pred["final"]
    order = [t for t in ("semseg", "human_parts", "depth", "normals", "edge", "sal") if t in sample]

    def draw(task, x, is_pred):
        if task in ("semseg", "human_parts"):
            return colorize_semseg(x, num_classes.get(task))
        if task == "depth":
            return colorize_depth(x)
        if task == "normals":
            return colorize_normals(x)
        if task == "sal" and is_pred:  # 1 or 2 channels of logits
            return colorize_edge(saliency_probability(x[None].float())[0])
        return colorize_edge(x, logits=is_pred)

    top = [colorize_image(sample["image"][index])] + [draw(t, sample[t][index], False) for t in order]
    rows = [top]
    if pred is not None:
        H, W = top[0].shape[:2]
        rows.append([np.zeros((H, W, 3), np.uint8)] + [draw(t, pred[t][index], True) for t in order if t in pred])
    return rows
