"""Figures to read a run by: predictions next to targets and their errors, CTAL affinity and
diffusion rows for query pixels, the learned fusion weights, and training curves.

Every function returns a :class:`matplotlib.figure.Figure` drawn on the Agg canvas through the
object API (no ``pyplot``, so the caller's matplotlib backend and global state are untouched).
:func:`render` turns a figure into an ``(H, W, 3)`` uint8 array (for TensorBoard) and
:func:`save_figure` writes it as a PNG.

Figures are laid out in pixels: each image panel shows its map at ``scale`` times the input
resolution (default: the smallest integer making a panel at least :data:`MIN_TILE` pixels wide),
pasted pixel for pixel; titles, legends and colour bars (with units) go around the panels.
:func:`panel_titles` lists a figure's panels by label.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import IdentityTransform
from PIL import Image
from scipy.ndimage import distance_transform_edt
from torch import Tensor

from ._checks import check_grid
from .metrics import DEFAULT_DELTA_METRICS, HIGHER_IS_BETTER
from .tasks import EDGE_IGNORE, IGNORE_INDEX, SAL_IGNORE, TASKS, saliency_probability
from .vis import colorize_image, ctal_rows

__all__ = ["prediction_figure", "affinity_figure", "fusion_weights_figure", "curves_figure",
           "class_colors", "query_pixels", "panel_titles", "render", "save_figure", "MIN_TILE"]

DPI = 100
MIN_TILE = 192  # pixels: narrower inputs are upscaled by an integer factor to at least this width
INVALID = (0.85, 0.85, 0.85)  # pixels without a target value (void, invalid depth / normals)
NORMALS_MAX_DEG = 60.0  # fixed angle-error range, so that epochs compare at a glance
_TITLE = 9
_LABEL = 8
_TICK = 7
_SEG = ("semseg", "human_parts")


# --- shared helpers ------------------------------------------------------------------------------

def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _plane(name: str, x, size: Optional[tuple] = None) -> np.ndarray:
    """A single-channel map ``(H, W)`` or ``(1, H, W)`` as float ``(H, W)``, or a ValueError naming it."""
    a = _np(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) or (1, H, W) map, got shape {a.shape}")
    if size is not None and a.shape != tuple(size):
        raise ValueError(f"{name} is {a.shape[0]}x{a.shape[1]}, the image is {size[0]}x{size[1]}")
    return a.astype(np.float64)


def _vectors(name: str, x, size: tuple) -> np.ndarray:
    a = _np(x).astype(np.float64)
    if a.ndim != 3 or a.shape[0] != 3 or a.shape[1:] != tuple(size):
        raise ValueError(f"{name} must be (3, H, W) = (3, {size[0]}, {size[1]}) normals, got shape {a.shape}")
    return a


def _labels(name: str, x, size: tuple, n: int) -> np.ndarray:
    """Class ids ``(H, W)`` (or logits ``(C, H, W)``, arg-maxed) as int64."""
    a = _np(x)
    if a.ndim == 3 and a.shape[0] == 1 and n != 1:
        a = a[0]
    if a.ndim == 3:
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} channels, expected {n} class logits")
        a = a.argmax(0)
    if a.ndim != 2 or a.shape != tuple(size):
        raise ValueError(f"{name} must be (H, W) = {tuple(size)} class ids or ({n}, H, W) logits, "
                         f"got shape {a.shape}")
    return a.astype(np.int64)


def _scale(H: int, W: int, scale: Optional[int]) -> int:
    if scale is None:
        return max(1, math.ceil(MIN_TILE / W))
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int (the upscaling of every panel), got {scale!r}")
    return scale


def _gray(rgb: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """The luminance of an RGB image in [0, 1], mapped to [lo, hi], as a grey RGB backdrop."""
    y = np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat((lo + (hi - lo) * y)[..., None], 3, -1)


def class_colors(n: int) -> np.ndarray:
    """``(n, 3)`` float RGB colours of ``n`` classes from matplotlib's qualitative maps
    (``tab10`` up to 10 classes, ``tab20`` up to 20, ``tab20``+``tab20b``+``tab20c`` up to 60,
    else ``turbo`` sampled at ``n`` points)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int (number of classes), got {n!r}")
    cm = matplotlib.colormaps
    if n <= 10:
        cols = cm["tab10"].colors
    elif n <= 20:
        cols = cm["tab20"].colors
    elif n <= 60:
        cols = cm["tab20"].colors + cm["tab20b"].colors + cm["tab20c"].colors
    else:
        cols = cm["turbo"](np.linspace(0, 1, n))[:, :3]
    return np.asarray(cols, np.float64)[:n, :3]


class _Canvas:
    """A figure laid out in pixels measured from the top left. Image panels are pasted pixel for
    pixel (``figimage``, upscaled by repeating pixels): exact sizes, and far cheaper to draw than
    one axes per panel; only colour bars get axes."""

    def __init__(self, width: float, height: float):
        self.W, self.H = int(math.ceil(width)), int(math.ceil(height))
        self.fig = Figure(figsize=(self.W / DPI, self.H / DPI), dpi=DPI)
        FigureCanvasAgg(self.fig)

    def panel(self, x: int, y: int, rgb: np.ndarray, scale: int, title: str, label: str) -> None:
        """``rgb`` (h, w, 3) in [0, 1], shown ``scale`` times larger with its top left at (x, y)
        and ``title`` above it; ``label`` names the panel (see :func:`panel_titles`)."""
        a = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
        a = np.repeat(np.repeat(a, scale, 0), scale, 1)
        h, w = a.shape[:2]
        im = self.fig.figimage(a, xo=int(x), yo=self.H - int(y) - h, origin="upper")
        im.set_label(label)
        self.fig.add_artist(Rectangle((x - 0.5, self.H - y - h - 0.5), w + 1, h + 1, fill=False, lw=0.8,
                                      ec="0.35", transform=IdentityTransform()))
        t = self.text(x + w / 2, y - 3, title, ha="center", va="bottom")
        t.set_gid(label)

    def mark(self, x: float, y: float, size: float = 9) -> None:
        """A yellow cross with a black outline at pixel (x, y): visible on any colour."""
        for mew, color in ((3.2, "black"), (1.6, "#ffd700")):
            self.fig.add_artist(Line2D([x], [self.H - y], marker="x", ms=size, mew=mew, color=color,
                                       transform=IdentityTransform(), label="query marker"))

    def box(self, x: float, y: float, w: float, h: float) -> None:
        for lw, color in ((3.0, "black"), (1.5, "#ffd700")):
            self.fig.add_artist(Rectangle((x, self.H - y - h), w, h, fill=False, lw=lw, ec=color,
                                          transform=IdentityTransform()))

    def colorbar(self, cmap, norm, x: float, y: float, h: float, label: str, extend: str = "neither"):
        cax = self.fig.add_axes((x / self.W, 1 - (y + h) / self.H, 10 / self.W, h / self.H),
                                label=f"colorbar: {label}")
        cb = self.fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, extend=extend)
        cb.set_label(label, fontsize=_LABEL)
        cb.ax.tick_params(labelsize=_TICK)
        return cb

    def text(self, x: float, y: float, s: str, **kw):
        kw.setdefault("fontsize", _TITLE)
        kw.setdefault("va", "top")
        return self.fig.text(x / self.W, 1 - y / self.H, s, **kw)


def _colored(data, cmap, norm) -> np.ndarray:
    return np.asarray(cmap(norm(data)))[..., :3]


def panel_titles(fig: Figure) -> dict[str, str]:
    """``{panel label: title}`` of a figure from this module (``"input"``, ``"depth/error"``,
    ``"query 0/diffusion"``, ...), in drawing order."""
    return {t.get_gid(): t.get_text() for t in fig.texts if t.get_gid()}


def render(fig: Figure) -> np.ndarray:
    """The figure as an ``(H, W, 3)`` uint8 array (its pixel size: ``figsize * dpi``)."""
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Union[Figure, np.ndarray], path: Union[str, Path]) -> Path:
    """Write a figure (or an array from :func:`render`) to a PNG; parent folders are created."""
    arr = render(fig) if isinstance(fig, Figure) else np.asarray(fig)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"fig must be a Figure or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False)
    return path


# --- predictions ---------------------------------------------------------------------------------

def _check_image(image, mean, std) -> np.ndarray:
    a = _np(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got shape {a.shape}")
    return colorize_image(a, mean=mean, std=std).astype(np.float64) / 255.0


def _wrong(rgb: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Wrong pixels in red on a light grey copy of the image (which keeps the scene readable)."""
    img = _gray(rgb, 0.45, 0.95)
    img[wrong] = (0.85, 0.0, 0.0)
    return img


def _seg_panels(task, target, pred, size, names, rgb):
    n = len(names)
    colors = class_colors(n)

    def paint(ids):
        out = np.empty(ids.shape + (3,))
        ok = (ids >= 0) & (ids < n)
        out[ok] = colors[ids[ok]]
        out[~ok] = INVALID
        return out

    t = None if target is None else _labels(f"targets[{task!r}]", target, size, n)
    if t is not None:
        bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= n))
        if bad.any():
            raise ValueError(f"targets[{task!r}] holds class id {int(t[bad][0])} outside [0, {n}) "
                             f"(class_names[{task!r}] names {n} classes)")
    p = None if pred is None else _labels(f"preds[{task!r}]", pred, size, n)
    panels = {}
    if t is not None:
        panels["target"] = (paint(t), "target")
    if p is not None:
        panels["prediction"] = (paint(p), "prediction")
    if t is not None and p is not None:
        valid = t != IGNORE_INDEX
        wrong = valid & (p != t)
        frac = 100.0 * wrong.sum() / max(int(valid.sum()), 1)
        panels["error"] = (_wrong(rgb, wrong), f"wrong pixels ({frac:.1f}%)")
    ref = t if t is not None else p
    ids, counts = np.unique(ref[(ref >= 0) & (ref < n)], return_counts=True)
    order = [int(c) for c in ids[np.argsort(-counts, kind="stable")]]
    if p is not None:  # classes only predicted come last
        order += sorted({int(c) for c in np.unique(p) if 0 <= c < n} - set(order))
    handles = [Patch(facecolor=colors[c], edgecolor="none", label=names[c]) for c in order]
    if t is not None and (t == IGNORE_INDEX).any():
        handles.append(Patch(facecolor=INVALID, edgecolor="0.5", label="void (no label)"))
    return panels, [("legend", handles)]


def _depth_panels(target, pred, size, label):
    t = None if target is None else _plane("targets['depth']", target, size)
    p = None if pred is None else _plane("preds['depth']", pred, size)
    valid = (t > 0) & np.isfinite(t) if t is not None else np.isfinite(p)
    vals = (t if t is not None else p)[valid]
    lo, hi = (float(v) for v in np.percentile(vals, [1, 99])) if vals.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad=INVALID)  # near = bright
    norm = Normalize(lo, hi, clip=True)
    panels, keys = {}, []
    if t is not None:
        panels["target"] = (_colored(np.ma.masked_where(~valid, t), cmap, norm), "target")
    if p is not None:
        panels["prediction"] = (_colored(np.nan_to_num(p), cmap, norm), "prediction")
    keys.append(("colorbar", "prediction" if p is not None else "target", cmap, norm, label, "both"))
    if t is not None and p is not None:
        err = np.abs(p - t)
        ev = err[valid]
        top = float(np.percentile(ev, 99)) if ev.size else 1.0
        unit = label[label.find("[") + 1:label.find("]")] if "[" in label and "]" in label else ""
        mean = f"mean {ev.mean():.3g}{' ' + unit if unit else ''}" if ev.size else "no valid pixels"
        ecmap = matplotlib.colormaps["inferno"].with_extremes(bad=INVALID)
        enorm = Normalize(0.0, top if top > 0 else 1.0, clip=True)
        panels["error"] = (_colored(np.ma.masked_where(~valid, np.nan_to_num(err)), ecmap, enorm),
                           f"abs. error ({mean})")
        keys.append(("colorbar", "error", ecmap, enorm, f"abs. error{' [' + unit + ']' if unit else ''}", "max"))
    return panels, keys


def _normals_panels(target, pred, size):
    def unit(a):
        n = np.linalg.norm(a, axis=0)
        ok = n > 1e-6
        return a / np.where(ok, n, 1.0), ok

    def rgb(a, ok):
        out = (a.transpose(1, 2, 0) + 1) / 2
        out[~ok] = INVALID
        return out

    panels, keys = {}, []
    t = p = None
    if target is not None:
        t, tv = unit(_vectors("targets['normals']", target, size))
        panels["target"] = (rgb(t, tv), "target (x, y, z as RGB)")
    if pred is not None:
        p, pv = unit(_vectors("preds['normals']", np.nan_to_num(_np(pred)), size))
        panels["prediction"] = (rgb(p, pv), "prediction")
    if t is not None and p is not None:
        ang = np.degrees(np.arccos(np.clip((t * p).sum(0), -1.0, 1.0)))
        ev = ang[tv]
        mean = f"mean {ev.mean():.1f}°" if ev.size else "no valid pixels"
        cmap = matplotlib.colormaps["inferno"].with_extremes(bad=INVALID)
        norm = Normalize(0.0, NORMALS_MAX_DEG, clip=True)
        panels["error"] = (_colored(np.ma.masked_where(~tv, ang), cmap, norm), f"angle error ({mean})")
        keys.append(("colorbar", "error", cmap, norm, "angle error [°]", "max"))
    return panels, keys


def _binary_panels(task, target, pred, size, rgb):
    ignore = EDGE_IGNORE if task == "edge" else SAL_IGNORE
    what = "edge" if task == "edge" else "saliency"
    cmap = matplotlib.colormaps["gray"].with_extremes(bad=INVALID)
    norm = Normalize(0.0, 1.0)
    panels, keys = {}, []
    t = p = None
    if target is not None:
        t = _plane(f"targets[{task!r}]", target, size)
        panels["target"] = (_colored(np.ma.masked_where(t == ignore, t), cmap, norm), "target")
    if pred is not None:
        a = _np(pred)
        if task == "sal" and a.ndim == 3 and a.shape[0] == 2:  # background / salient class logits
            p = _np(saliency_probability(torch.as_tensor(a)[None]))[0, 0].astype(np.float64)
            if p.shape != tuple(size):
                raise ValueError(f"preds['sal'] is {p.shape[0]}x{p.shape[1]}, the image is {size[0]}x{size[1]}")
        else:
            p = 1.0 / (1.0 + np.exp(-np.clip(_plane(f"preds[{task!r}]", a, size), -50, 50)))  # a logit
        panels["prediction"] = (_colored(p, cmap, norm), "prediction")
        keys.append(("colorbar", "prediction", cmap, norm, f"{what} probability", "neither"))
    # one-pixel-wide edges make a per-pixel error map meaningless; saliency masks are regions
    if task == "sal" and t is not None and p is not None:
        valid = t != ignore
        wrong = valid & ((p > 0.5) != (t > 0.5))
        frac = 100.0 * wrong.sum() / max(int(valid.sum()), 1)
        panels["error"] = (_wrong(rgb, wrong), f"wrong pixels at p > 0.5 ({frac:.1f}%)")
    return panels, keys


def prediction_figure(image, targets: Optional[Mapping[str, Tensor]], preds: Optional[Mapping[str, Tensor]],
                      class_names: Optional[Mapping[str, Sequence[str]]] = None, *,
                      depth_label: str = "depth [m]", title: Optional[str] = None, scale: Optional[int] = None,
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> Figure:
    """One sample: the input image, then per task a row of target, prediction and error.

    Args:
        image: ``(3, H, W)``, ImageNet-normalized (``mean=None`` for [0, 1] input).
        targets: ``{task: target}`` of this sample in the ``ctal/tasks.py`` layout (no batch
            axis), or None.
        preds: ``{task: prediction}`` as the model outputs them (logits for semseg /
            human_parts / edge / sal), or None. A task in either dict gets a row.
        class_names: ``{task: names in id order}``, required for semseg / human_parts: the
            legend lists the classes in the target (most frequent first), then those only
            predicted.
        depth_label: colour-bar label of depth, unit in brackets (``"inverse depth"`` for
            Cityscapes).
        title: text next to the input image (e.g. the sample and epoch).
        scale: integer upscaling of every panel (default: to at least :data:`MIN_TILE` px wide).

    Errors: segmentation and saliency mark the wrong pixels red on the grey image; depth shows
    the absolute error, normals the angle between the vectors in degrees; edges have no error
    panel. Pixels without a target value are light grey. Panels are labelled
    ``"<task>/<target|prediction|error>"`` and ``"input"`` (see :func:`panel_titles`).
    """
    rgb = _check_image(image, mean, std)
    H, W = rgb.shape[:2]
    targets, preds = dict(targets or {}), dict(preds or {})
    for name, d in (("targets", targets), ("preds", preds)):
        unknown = [t for t in d if t not in TASKS]
        if unknown:
            raise ValueError(f"{name} has unknown task(s) {unknown}; ctal tasks are {TASKS}")
    tasks = [t for t in TASKS if t in targets or t in preds]
    if not tasks:
        raise ValueError("targets and preds are both empty: nothing to draw")
    class_names = dict(class_names or {})
    s = _scale(H, W, scale)
    tw, th = s * W, s * H

    rows = []
    for task in tasks:
        tgt, prd = targets.get(task), preds.get(task)
        if task in _SEG:
            names = class_names.get(task)
            if names is None or isinstance(names, str) or len(names) < 1:
                raise ValueError(f"class_names[{task!r}] is required for {task}: the class names in id "
                                 f"order, got {names!r}")
            panels, keys = _seg_panels(task, tgt, prd, (H, W), [str(c) for c in names], rgb)
        elif task == "depth":
            panels, keys = _depth_panels(tgt, prd, (H, W), depth_label)
        elif task == "normals":
            panels, keys = _normals_panels(tgt, prd, (H, W))
        else:
            panels, keys = _binary_panels(task, tgt, prd, (H, W), rgb)
        rows.append((task, panels, keys))

    # Columns only for what some row has (predictions alone: one column); a colour bar follows
    # the prediction column, the last column is followed by the key area (legend / colour bar).
    left, title_h, gap_y, top, bottom = 30, 18, 10, 4, 6
    key1_w, key2_w, gap_x = 78, 150, 10
    cols = [col for col in ("target", "prediction", "error") if any(col in r[1] for r in rows)]
    xs, x = {}, left
    for j, col in enumerate(cols):
        xs[col] = x
        x += tw + (key2_w if j == len(cols) - 1 else key1_w if col == "prediction" else gap_x)
    key_x = xs[cols[-1]] + tw + 8
    row_h = title_h + th + gap_y
    width = max(x, left + tw + 2 * gap_x + 8 * len(title or "") + 10)  # room for the title
    c = _Canvas(width, top + row_h * (1 + len(rows)) + bottom)
    y = top + title_h
    c.panel(left, y, rgb, s, "input", "input")
    if title:
        c.text(left + tw + 2 * gap_x, y, title, fontsize=_TITLE + 1)
    for task, panels, keys in rows:
        y += row_h
        for col in cols:
            if col in panels:
                c.panel(xs[col], y, panels[col][0], s, panels[col][1], f"{task}/{col}")
        c.text(left - 8, y + th / 2, task, fontsize=_TITLE + 1, fontweight="bold", rotation=90,
               ha="right", va="center")
        for key in keys:
            if key[0] == "legend":
                handles = key[1]
                if not handles:
                    continue
                per_col = max(1, int(th // 13))
                shown = handles[:2 * per_col]
                if len(handles) > len(shown):
                    shown[-1] = Patch(facecolor="none", edgecolor="none",
                                      label=f"+{len(handles) - len(shown) + 1} more")
                c.fig.legend(handles=shown, loc="upper left", fontsize=_TICK, frameon=False,
                             ncol=1 if len(shown) <= per_col else 2, handlelength=1.0, handleheight=0.8,
                             borderaxespad=0, borderpad=0, labelspacing=0.25, columnspacing=0.6,
                             bbox_to_anchor=(key_x / c.W, 1 - y / c.H))
            else:
                _, col, cmap, norm, label, extend = key
                if col in panels:
                    c.colorbar(cmap, norm, xs[col] + tw + 6, y, th, label, extend=extend)
    return c.fig


# --- CTAL ------------------------------------------------------------------------------------------

def query_pixels(grid: Sequence[int], label=None, n: int = 3) -> list[tuple[int, int]]:
    """``n`` query pixels ``(y, x)`` of a CTAL ``grid = (h, w)``.

    With a class-id ``label`` map (any resolution; ``IGNORE_INDEX`` = void) the queries lie deep
    inside the ``n`` largest classes (the grid cell farthest from the class's boundary), so that
    the affinity rows contrast regions; fixed points along the middle row fill up the rest."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"grid must be (h, w) positive ints, got {grid!r}")
    h, w = grid
    out: list = []
    if label is not None:
        lab = _np(label)
        if lab.ndim != 2:
            raise ValueError(f"label must be an (H, W) class-id map, got shape {lab.shape}")
        ys = ((np.arange(h) + 0.5) * lab.shape[0] / h).astype(int).clip(0, lab.shape[0] - 1)
        xs = ((np.arange(w) + 0.5) * lab.shape[1] / w).astype(int).clip(0, lab.shape[1] - 1)
        cells = lab[ys][:, xs].astype(np.int64)
        classes, counts = np.unique(cells[cells != IGNORE_INDEX], return_counts=True)
        for cls in classes[np.argsort(-counts, kind="stable")][:n]:
            # padding with "other" makes the image border a boundary too
            dist = distance_transform_edt(np.pad(cells == cls, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(dist.argmax()), dist.shape)
            out.append((int(y), int(x)))
    for fy, fx in ((0.5, 0.5), (0.5, 0.2), (0.5, 0.8), (0.25, 0.5), (0.75, 0.5)):
        if len(out) >= n:
            break
        p = (min(int(fy * h), h - 1), min(int(fx * w), w - 1))
        if p not in out:
            out.append(p)
    return out[:n]


def _upsample(m: Tensor, size: tuple) -> np.ndarray:
    """A grid map bilinearly upsampled to the image (grid cells centred on their image pixels)."""
    return _np(F.interpolate(m.detach().float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0])


def _overlay(backdrop: np.ndarray, m: np.ndarray, cmap, norm, alpha: float = 0.7) -> np.ndarray:
    return alpha * _colored(m, cmap, norm) + (1 - alpha) * backdrop


def affinity_figure(image, features: Tensor, weight: Tensor, bias: Optional[Tensor], pixels,
                    tasks: Optional[Sequence[str]] = None, *, title: Optional[str] = None,
                    scale: Optional[int] = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> Figure:
    """What CTAL does for a few query pixels of one sample: per query ``i`` (one row), the input
    with the query's grid cell, each task's affinity row ``A_t[i]`` (cosine similarity of the
    query's features to every pixel's, on [-1, 1]) and the diffusion row ``M[i]`` (the weight of
    every pixel in the query's propagated features; its own symmetric range), upsampled
    bilinearly to the image and overlaid on it. The query is marked in every panel.

    Args:
        image: ``(3, H, W)``, ImageNet-normalized (``mean=None`` for [0, 1] input).
        features: the CTAL block's input for this sample, ``(T, C, h, w)`` or ``(1, T, C, h, w)``.
        weight, bias: the block's fusion parameters ``(h*w, T, 3, 3)`` and ``(h*w,)`` (or None).
        pixels: query pixels ``(y, x)`` on the ``h x w`` grid (see :func:`query_pixels`).
        tasks: the task names in the block's order (default ``"task 0"``, ...).

    Panels are labelled ``"query <r>/input"``, ``"query <r>/affinity <task>"`` and
    ``"query <r>/diffusion"`` (see :func:`panel_titles`).
    """
    rgb = _check_image(image, mean, std)
    H, W = rgb.shape[:2]
    if (not isinstance(features, Tensor) or features.dim() not in (4, 5)
            or (features.dim() == 5 and features.shape[0] != 1)):
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be one sample's CTAL input, (T, C, h, w) or (1, T, C, h, w), got {got}")
    x = (features if features.dim() == 5 else features[None]).detach().float()
    T, h, w = x.shape[1], x.shape[3], x.shape[4]
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (h * w, T, 3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (h*w, T, 3, 3) = ({h * w}, {T}, 3, 3) for these features, got {got}")
    tasks = _bias_and_task_names(bias, h, w, tasks, T, "features have")
    if isinstance(pixels, tuple) and len(pixels) == 2 and all(isinstance(v, int) for v in pixels):
        pixels = [pixels]
    pixels = [tuple(p) for p in (pixels or [])]
    if not pixels:
        raise ValueError("pixels must list at least one query pixel (y, x)")
    for p in pixels:
        if len(p) != 2 or not all(isinstance(v, (int, np.integer)) for v in p) or not (0 <= p[0] < h and 0 <= p[1] < w):
            raise ValueError(f"pixels: {p} is not a pixel (y, x) of the {h}x{w} CTAL grid")
    weight = weight.detach().float()
    bias = None if bias is None else bias.detach().float()
    s = _scale(H, W, scale)
    tw, th = s * W, s * H
    sy, sx = H / h, W / w  # image pixels per grid cell

    left, title_h, gap_y, top, bottom, gap_x, key_w = 30, 18, 10, 4 + (22 if title else 0), 6, 8, 84
    cols_x = [left + j * (tw + gap_x) for j in range(T + 1)]
    m_x = cols_x[-1] + tw + key_w
    row_h = title_h + th + gap_y
    c = _Canvas(m_x + tw + key_w, top + row_h * len(pixels) + bottom)
    if title:
        c.text(left, 6, title, fontsize=_TITLE + 1)
    rows, mrows = ctal_rows(x, weight, bias, pixels)  # (P, T, h, w), (P, h, w)
    lim = float(mrows.abs().max()) or 1.0  # one scale for every query, so that rows compare
    backdrop = _gray(rgb)
    cmap = matplotlib.colormaps["RdBu_r"]
    anorm, mnorm = Normalize(-1.0, 1.0), Normalize(-lim, lim)
    for r, (py, px) in enumerate(pixels):
        y = top + title_h + r * row_h
        cx, cy = (px + 0.5) * sx * s, (py + 0.5) * sy * s  # the cell centre, in panel pixels
        c.panel(cols_x[0], y, rgb, s, f"query {r}: grid cell ({py}, {px})", f"query {r}/input")
        c.box(cols_x[0] + px * sx * s, y + py * sy * s, sx * s, sy * s)
        c.text(left - 8, y + th / 2, f"query {r}", fontsize=_TITLE + 1, fontweight="bold", rotation=90,
               ha="right", va="center")
        for t in range(T):
            c.panel(cols_x[t + 1], y, _overlay(backdrop, _upsample(rows[r, t], (H, W)), cmap, anorm), s,
                    f"{tasks[t]}: affinity A[i]", f"query {r}/affinity {tasks[t]}")
            c.mark(cols_x[t + 1] + cx, y + cy)
        c.panel(m_x, y, _overlay(backdrop, _upsample(mrows[r], (H, W)), cmap, mnorm), s, "diffused row M[i]",
                f"query {r}/diffusion")
        c.mark(m_x + cx, y + cy)
    span = row_h * len(pixels) - title_h - gap_y
    c.colorbar(cmap, anorm, cols_x[-1] + tw + 6, top + title_h, span, "cosine affinity")
    c.colorbar(cmap, mnorm, m_x + tw + 6, top + title_h, span, "M[i, j]")
    return c.fig


def _bias_and_task_names(bias, h: int, w: int, tasks, T: int, t_from: str) -> list[str]:
    """Check the fusion bias ``(h*w,)`` (or None) and return the T task labels."""
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (h * w,)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must be (h*w,) = ({h * w},) or None, got {got}")
    tasks = [f"task {t}" for t in range(T)] if tasks is None else [str(t) for t in tasks]
    if len(tasks) != T:
        raise ValueError(f"tasks names {len(tasks)} tasks, {t_from} T = {T}")
    return tasks


def fusion_weights_figure(weight: Tensor, bias: Optional[Tensor], grid: Sequence[int],
                          tasks: Optional[Sequence[str]] = None, *, title: Optional[str] = None,
                          scale: Optional[int] = None) -> Figure:
    """The learned CTAL fusion parameters over the query grid: per task the centre tap
    ``w[i, t, 1, 1]`` (how strongly query ``i`` weighs its own affinity row of task ``t``; one
    colour scale for all tasks) and the bias ``b[i]`` (its own scale). Panels are labelled
    ``"centre tap <task>"`` and ``"bias"``."""
    h, w = check_grid(grid, "grid")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[0] != h * w or weight.shape[2:] != (3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (h*w, T, 3, 3) = ({h * w}, T, 3, 3) for the {h}x{w} grid, got {got}")
    T = weight.shape[1]
    tasks = _bias_and_task_names(bias, h, w, tasks, T, "weight has")
    s = _scale(h, w, scale)
    tw, th = s * w, s * h
    centre = _np(weight[:, :, 1, 1]).reshape(h, w, T)
    lim = float(np.abs(centre).max()) or 1.0
    left, title_h, top, bottom, gap_x, key_w = 10, 18, 4 + (22 if title else 0), 22, 8, 84
    cols_x = [left + j * (tw + gap_x) for j in range(T)]
    b_x = cols_x[-1] + tw + key_w
    c = _Canvas(b_x + (tw + key_w if bias is not None else 0), top + title_h + th + bottom)
    if title:
        c.text(left, 6, title, fontsize=_TITLE + 1)
    y = top + title_h
    cmap = matplotlib.colormaps["RdBu_r"]
    norm = Normalize(-lim, lim)
    for t in range(T):
        c.panel(cols_x[t], y, _colored(centre[..., t], cmap, norm), s, f"{tasks[t]}", f"centre tap {tasks[t]}")
    c.colorbar(cmap, norm, cols_x[-1] + tw + 6, y, th, "centre tap w[i, t, 1, 1]")
    if bias is not None:
        b = _np(bias).reshape(h, w)
        blim = float(np.abs(b).max()) or 1.0
        bnorm = Normalize(-blim, blim)
        c.panel(b_x, y, _colored(b, cmap, bnorm), s, "bias b[i]", "bias")
        c.colorbar(cmap, bnorm, b_x + tw + 6, y, th, "bias")
    c.text(left, y + th + 6, f"one pixel per query i of the {h}x{w} CTAL grid", fontsize=_TICK, color="0.3")
    return c.fig


# --- training curves -------------------------------------------------------------------------------

def _main_metric(task: str, names) -> Optional[str]:
    for k in DEFAULT_DELTA_METRICS.get(task, ()):
        if k in names:
            return k
    return next(iter(names), None)


def curves_figure(history: Sequence[Mapping], best_metric: Optional[str] = None) -> Figure:
    """Per epoch: the training loss of every task (log scale when it spans more than 20x), each
    task's main validation metric (the one delta_m uses; arrow = better direction),
    ``best_metric`` if it is another, and the learning rate. ``history``: the trainer's list of
    ``{"epoch", "train_loss": {task: loss}, "lr", "metrics": {task: {name: value}} (evaluated
    epochs only)}``."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence) or not history:
        raise ValueError(f"history must be a non-empty list of per-epoch dicts, got {history!r:.80}")
    for i, e in enumerate(history):
        if not isinstance(e, Mapping) or "epoch" not in e:
            raise ValueError(f"history[{i}] must be a dict with an 'epoch' entry, got {e!r:.80}")
    loss_epochs, losses = [], {}
    for e in history:
        if isinstance(e.get("train_loss"), Mapping):
            loss_epochs.append(e["epoch"])
            for t, v in e["train_loss"].items():
                losses.setdefault(t, []).append(float(v))
    evaluated = [e for e in history if isinstance(e.get("metrics"), Mapping)]
    panels = []  # (title, ylabel, {series: (xs, ys)}, log)
    if losses:
        panels.append(("training loss", "loss", {t: (loss_epochs, v) for t, v in losses.items()}, True))
    tasks = list(dict.fromkeys(t for e in evaluated for t in e["metrics"]))
    wanted = []
    for t in tasks:
        names = [k for e in evaluated for k, v in e["metrics"].get(t, {}).items() if isinstance(v, (int, float))]
        k = _main_metric(t, list(dict.fromkeys(names)))
        if k:
            wanted.append((t, k))
    if best_metric and "/" in best_metric and tuple(best_metric.split("/", 1)) not in wanted:
        wanted.append(tuple(best_metric.split("/", 1)))
    for t, k in wanted:
        pts = [(e["epoch"], float(e["metrics"][t][k])) for e in evaluated
               if isinstance(e["metrics"].get(t, {}).get(k), (int, float)) and math.isfinite(e["metrics"][t][k])]
        if pts:
            arrow = {True: " ↑", False: " ↓"}.get(HIGHER_IS_BETTER.get(f"{t}/{k}"), "")
            panels.append((f"val {t}/{k}{arrow}", k, {k: tuple(zip(*pts))}, False))
    lrs = [(e["epoch"], float(e["lr"])) for e in history if isinstance(e.get("lr"), (int, float))]
    if lrs:
        panels.append(("learning rate", "lr", {"lr": tuple(zip(*lrs))}, False))
    if not panels:
        raise ValueError("history holds no losses, metrics or learning rates to plot")
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(3.4 * ncol, 2.6 * nrow), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, (name, ylabel, series, log) in zip(axes, panels):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", ms=3, lw=1.5, label=label)
        values = [v for _, ys in series.values() for v in ys]
        if log and min(values) > 0 and max(values) > 20 * min(values):  # log only where it helps
            ax.set_yscale("log")
        ax.set_title(name, fontsize=_TITLE + 1)
        ax.set_xlabel("epoch", fontsize=_LABEL)
        ax.set_ylabel(ylabel, fontsize=_LABEL)
        ax.tick_params(labelsize=_TICK)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        epochs = sorted({x for xs, _ in series.values() for x in xs})
        if len(epochs) <= 12:  # few epochs: tick each one (the locator alone shows 0.96 ... 1.04)
            ax.set_xticks(epochs)
        if len(series) > 1:
            ax.legend(fontsize=_TICK, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12 / nrow + 0.04, top=1 - 0.1 / nrow, wspace=0.35,
                        hspace=0.55)
    return fig
