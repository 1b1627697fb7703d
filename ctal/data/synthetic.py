"""Synthetic multitask scenes: ray-cast rooms with 3D primitives, written in the NYUv2 layout.

Why this exists: ``train.py`` needs data that runs the real loader path, costs nothing to obtain,
and is *learnable* (labels that are a function of what the image shows). Every label comes from
one scene model, so they are mutually consistent: the semantic class, depth, surface normal,
edge and saliency of a pixel all describe the same ray hit.

Scene model (world coordinates, metres, y up):

* a closed box room: floor ``y = 0``, ceiling, back/front/left/right walls;
* 3-7 primitives standing on the floor: spheres, (yawed) boxes, vertical cylinders and cones,
  each with a random colour and procedural texture (plain, stripes or checker);
* a pinhole camera at 1.1-1.8 m height with random yaw/pitch inside the room;
* a point light with Lambertian shading, a little specular, cast shadows and sensor noise.

Labels per pixel (see ``ctal/tasks.py`` for the sample conventions):

* ``label``: class id in :data:`CLASSES` (floor, wall, ceiling, sphere, box, cylinder, cone);
* ``depth``: camera-frame z distance of the hit in metres (like NYUv2 depth);
* ``normal``: unit surface normal in *camera* coordinates (x right, y down, z forward; the
  OpenCV convention), oriented towards the camera (``n . view ray < 0``);
* ``edge``: 1 where the instance id changes, depth jumps by more than 6 % or the normal bends by
  more than 30 degrees between a pixel and its right/lower neighbour (one pixel wide);
* ``sal``: 1 on the primitives (the foreground objects), 0 on the room.

On disk (``root/{train,val}/{image,label,depth,normal,edge,sal}/<i>.npy`` plus ``root/meta.json``):
image ``(H, W, 3)`` float16 in [0, 1]; label ``(H, W)`` int8; depth ``(H, W, 1)`` float32;
normal ``(H, W, 3)`` float16; edge and sal ``(H, W)`` uint8. float16/int8 keep 1000 scenes at
96x128 near 200 MB; the loader accepts these dtypes as well as the float32/float64 of the real
NYUv2 files. ``meta.json`` is written last and marks the folder complete.

Where it writes: the generator never writes into a folder holding anything it did not write
itself, since the layout is the real NYUv2 one and a mistyped ``data.root`` must not overwrite a
real dataset. The output folder must be missing, empty, or hold an earlier generation (marked
by this module's ``meta.json``, or by the ``generating.ctal-synthetic`` marker that a run writes
first and removes last) with nothing but the generator's own names in it: ``meta.json``, the
marker, ``{train,val}/<kind>/<i>.npy`` and the hidden temp files of its atomic writes. Anything
else raises :class:`ForeignFilesError` before a single file is written, for :func:`ensure`,
:func:`generate` and the CLI alike (``--force`` included). An earlier generation with other
parameters is replaced, its numbered files beyond the new counts deleted. Every file is written
to a temp file and renamed, so a killed run leaves no truncated data file, and render workers
exit when the generating process dies.

Generation is deterministic: scene ``i`` of a split is drawn from
``numpy.random.default_rng([seed, split_id, i])``, independent of worker count and order.

CLI::

    python -m ctal.data.synthetic --out data/synthetic --num 1000 --num-val 200 --size 96 128 --seed 0
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .._io import TEMP_RE, atomic_write

__all__ = ["CLASSES", "ForeignFilesError", "generate", "ensure", "render_scene", "is_complete", "main"]

CLASSES = ("floor", "wall", "ceiling", "sphere", "box", "cylinder", "cone")
_CLS = {name: i for i, name in enumerate(CLASSES)}
_PRIMITIVES = ("sphere", "box", "cylinder", "cone")
FORMAT_VERSION = 1
_SPLIT_ID = {"train": 0, "val": 1}
_EPS = 1e-4
_FOLDERS = ("image", "label", "depth", "normal", "edge", "sal")


# --------------------------------------------------------------------------------------------
# ray / primitive intersections: all take ray origin o (3,) and directions d (N, 3) (not unit;
# the camera-frame z component of every direction is 1, so the hit parameter t IS the depth)
# and return (t (N,), normal (N, 3) in world coordinates); t = inf where there is no hit.
# --------------------------------------------------------------------------------------------

def _hit_sphere(o, d, c, r):
    oc = o - c
    a = np.einsum("ij,ij->i", d, d)
    b = 2.0 * d @ oc
    cc = oc @ oc - r * r
    disc = b * b - 4 * a * cc
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t = (-b - sq) / (2 * a)
    t = np.where(ok & (t > _EPS), t, np.inf)
    p = o + t[:, None] * d
    n = (p - c) / r
    return t, n


def _hit_box(o, d, c, ext, yaw):
    cy, sy = np.cos(yaw), np.sin(yaw)
    rot = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])  # local -> world
    ol = rot.T @ (o - c)
    dl = d @ rot  # == (rot.T @ d.T).T
    dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    t1 = (-ext - ol) / dl
    t2 = (ext - ol) / dl
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    tnear = tmin.max(axis=1)
    tfar = tmax.min(axis=1)
    hit = (tnear <= tfar) & (tnear > _EPS)
    t = np.where(hit, tnear, np.inf)
    axis = tmin.argmax(axis=1)
    nl = np.zeros_like(d)
    nl[np.arange(len(d)), axis] = -np.sign(dl[np.arange(len(d)), axis])
    return t, nl @ rot.T


def _hit_cylinder(o, d, cx, cz, r, h):
    ox, oz = o[0] - cx, o[2] - cz
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (ox * d[:, 0] + oz * d[:, 2])
    cc = ox * ox + oz * oz - r * r
    a_safe = np.where(a < 1e-12, 1e-12, a)
    disc = b * b - 4 * a_safe * cc
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    ts = (-b - sq) / (2 * a_safe)
    ys = o[1] + ts * d[:, 1]
    side = ok & (ts > _EPS) & (ys >= 0) & (ys <= h)
    t_side = np.where(side, ts, np.inf)
    dy = np.where(np.abs(d[:, 1]) < 1e-12, 1e-12, d[:, 1])
    tc = (h - o[1]) / dy
    px, pz = ox + tc * d[:, 0], oz + tc * d[:, 2]
    cap = (tc > _EPS) & (px * px + pz * pz <= r * r)
    t_cap = np.where(cap, tc, np.inf)
    use_cap = t_cap < t_side
    t = np.minimum(t_side, t_cap)
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    n = np.stack([(p[:, 0] - cx) / r, np.zeros(len(d)), (p[:, 2] - cz) / r], axis=1)
    n[use_cap] = (0.0, 1.0, 0.0)
    return t, n


def _hit_cone(o, d, cx, cz, r, h):
    k2 = (r / h) ** 2
    ox, oz, oy = o[0] - cx, o[2] - cz, h - o[1]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dz * dz - k2 * dy * dy
    b = 2 * (ox * dx + oz * dz + k2 * oy * dy)
    cc = ox * ox + oz * oz - k2 * oy * oy
    a_safe = np.where(np.abs(a) < 1e-12, 1e-12, a)
    disc = b * b - 4 * a_safe * cc
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    best = np.full(len(d), np.inf)
    for root in ((-b - sq) / (2 * a_safe), (-b + sq) / (2 * a_safe)):
        y = o[1] + root * dy
        valid = ok & (root > _EPS) & (y >= 0) & (y <= h)
        best = np.where(valid & (root < best), root, best)
    p = o + np.where(np.isfinite(best), best, 0.0)[:, None] * d
    n = np.stack([p[:, 0] - cx, k2 * (h - p[:, 1]), p[:, 2] - cz], axis=1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return best, n


def _hit_object(o, d, obj):
    kind = obj["kind"]
    if kind == "sphere":
        return _hit_sphere(o, d, obj["c"], obj["r"])
    if kind == "box":
        return _hit_box(o, d, obj["c"], obj["ext"], obj["yaw"])
    if kind == "cylinder":
        return _hit_cylinder(o, d, obj["c"][0], obj["c"][2], obj["r"], obj["h"])
    return _hit_cone(o, d, obj["c"][0], obj["c"][2], obj["r"], obj["h"])


# --------------------------------------------------------------------------------------------
# scene sampling and rendering
# --------------------------------------------------------------------------------------------

def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _sample_scene(rng: np.random.Generator) -> dict:
    room = {
        "x": rng.uniform(2.2, 3.5),            # side walls at x = +-x
        "zb": rng.uniform(5.5, 8.0),           # back wall
        "zf": -rng.uniform(1.0, 2.0),          # front wall (behind the camera)
        "yc": rng.uniform(2.6, 3.2),           # ceiling
    }
    objects = []
    placed = []
    n_obj = int(rng.integers(3, 8))
    for _ in range(60):
        if len(objects) == n_obj:
            break
        kind = _PRIMITIVES[int(rng.integers(len(_PRIMITIVES)))]
        r = rng.uniform(0.25, 0.6)
        cx = rng.uniform(-room["x"] + r + 0.1, room["x"] - r - 0.1)
        cz = rng.uniform(1.8, room["zb"] - r - 0.2)
        if any((cx - px) ** 2 + (cz - pz) ** 2 < (r + pr + 0.05) ** 2 for px, pz, pr in placed):
            continue
        placed.append((cx, cz, r * 1.45))
        obj = {"kind": kind, "r": r}
        if kind == "sphere":
            obj["c"] = np.array([cx, r, cz])
        elif kind == "box":
            ext = np.array([r * rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.6), r * rng.uniform(0.6, 1.0)])
            obj["c"] = np.array([cx, ext[1], cz])
            obj["ext"] = ext
            obj["yaw"] = rng.uniform(0, np.pi / 2)
        else:
            obj["c"] = np.array([cx, 0.0, cz])
            obj["h"] = rng.uniform(0.5, 1.3) if kind == "cylinder" else rng.uniform(0.6, 1.5)
        obj["color"] = _hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 0.9), rng.uniform(0.45, 0.95))
        obj["pattern"] = int(rng.integers(3))     # 0 plain, 1 stripes, 2 checker
        obj["freq"] = rng.uniform(6, 14)
        obj["spec"] = rng.uniform(0.0, 0.5)
        objects.append(obj)
    cam = {
        "pos": np.array([rng.uniform(-0.5, 0.5) * room["x"], rng.uniform(1.1, 1.8), rng.uniform(-0.3, 0.4)]),
        "yaw": rng.uniform(-0.35, 0.35),
        "pitch": rng.uniform(0.12, 0.4),      # looking down a little
        "fov": rng.uniform(0.95, 1.15),       # horizontal field of view in radians
    }
    light = {
        "pos": np.array([rng.uniform(-0.8, 0.8) * room["x"], room["yc"] - 0.2,
                         rng.uniform(0.5, room["zb"] - 1.0)]),
        "ambient": rng.uniform(0.25, 0.4),
        "tint": np.clip(1 + rng.normal(0, 0.06, 3), 0.85, 1.15),
    }
    surf = {
        "floor": [_hsv_to_rgb(rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.7))
                  for _ in range(2)],
        "floor_tile": rng.uniform(0.4, 0.9),
        "wall": _hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.6, 0.9)),
        "ceiling": _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.1), rng.uniform(0.8, 0.95)),
        "stripe": rng.uniform(0.3, 1.2),
    }
    return {"room": room, "objects": objects, "cam": cam, "light": light, "surf": surf,
            "noise": rng.uniform(0.005, 0.02), "noise_seed": int(rng.integers(2 ** 31))}


def render_scene(scene: dict, size: tuple[int, int]) -> dict:
    """Ray-cast one scene at ``size = (H, W)``; returns HWC numpy arrays (float64 / int)."""
    H, W = size
    cam, room, light = scene["cam"], scene["room"], scene["light"]
    f = (W / 2) / np.tan(cam["fov"] / 2)
    v, u = np.mgrid[0:H, 0:W]
    d_cam = np.stack([(u + 0.5 - W / 2) / f, (v + 0.5 - H / 2) / f, np.ones((H, W))], -1).reshape(-1, 3)
    cy, sy = np.cos(cam["yaw"]), np.sin(cam["yaw"])
    cp, sp = np.cos(cam["pitch"]), np.sin(cam["pitch"])
    fwd = np.array([sy * cp, -sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    down = np.cross(right, fwd)
    R = np.stack([right, down, fwd], axis=1)  # camera -> world (columns are the camera axes)
    o = cam["pos"]
    d = d_cam @ R.T
    N = d.shape[0]

    t_best = np.full(N, np.inf)
    n_best = np.zeros((N, 3))
    inst = np.full(N, -1)
    # room planes: (axis, coordinate, inward normal, instance id, class)
    planes = [(1, 0.0, (0, 1, 0), 0, "floor"), (1, room["yc"], (0, -1, 0), 1, "ceiling"),
              (2, room["zb"], (0, 0, -1), 2, "wall"), (2, room["zf"], (0, 0, 1), 3, "wall"),
              (0, -room["x"], (1, 0, 0), 4, "wall"), (0, room["x"], (-1, 0, 0), 5, "wall")]
    cls_of = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, coord, normal, iid, cname in planes:
            t = (coord - o[axis]) / d[:, axis]
            t = np.where(t > _EPS, t, np.inf)
            win = t < t_best
            t_best = np.where(win, t, t_best)
            n_best[win] = normal
            inst[win] = iid
            cls_of[iid] = _CLS[cname]
        for k, obj in enumerate(scene["objects"]):
            t, n = _hit_object(o, d, obj)
            win = t < t_best
            t_best = np.where(win, t, t_best)
            n_best[win] = n[win]
            inst[win] = 6 + k
            cls_of[6 + k] = _CLS[obj["kind"]]
    if not np.isfinite(t_best).all():  # the room is closed, so this would be a geometry bug
        raise RuntimeError("synthetic renderer: a camera ray escaped the room")
    p = o + t_best[:, None] * d
    n_best /= np.maximum(np.linalg.norm(n_best, axis=1, keepdims=True), 1e-12)
    facing = np.einsum("ij,ij->i", n_best, d) > 0
    n_best[facing] *= -1

    # albedo from procedural textures
    albedo = np.zeros((N, 3))
    surf = scene["surf"]
    m = inst == 0
    tile = (np.floor(p[m, 0] / surf["floor_tile"]) + np.floor(p[m, 2] / surf["floor_tile"])) % 2
    albedo[m] = np.where(tile[:, None] > 0, surf["floor"][0], surf["floor"][1])
    m = (inst >= 2) & (inst <= 5)
    coord = np.where(np.abs(n_best[m, 0]) > 0.5, p[m, 2], p[m, 0])
    albedo[m] = surf["wall"] * (0.92 + 0.08 * np.sign(np.sin(2 * np.pi * coord / surf["stripe"])))[:, None]
    albedo[inst == 1] = surf["ceiling"]
    for k, obj in enumerate(scene["objects"]):
        m = inst == 6 + k
        if not m.any():
            continue
        q = p[m] - obj["c"]
        if obj["pattern"] == 1:
            mod = 0.75 + 0.25 * np.sign(np.sin(obj["freq"] * q[:, 1]))
        elif obj["pattern"] == 2:
            mod = 0.75 + 0.25 * np.sign(np.sin(obj["freq"] * q[:, 0]) * np.sin(obj["freq"] * q[:, 2])
                                        * np.sign(np.sin(obj["freq"] * q[:, 1]) + 0.5))
        else:
            mod = np.ones(len(q))
        albedo[m] = obj["color"] * mod[:, None]

    # shading: ambient + Lambert * shadow + Blinn-Phong highlight
    to_l = light["pos"] - p
    dist_l = np.linalg.norm(to_l, axis=1)
    l_dir = to_l / dist_l[:, None]
    lambert = np.clip(np.einsum("ij,ij->i", n_best, l_dir), 0, None)
    shadow = np.ones(N)
    origin_off = p + n_best * 1e-3
    for k, obj in enumerate(scene["objects"]):
        # shadow rays per pixel: different origins, so shift each object instead of the origin
        t_s = _shadow_hit(origin_off, l_dir, obj)
        shadow = np.where((t_s > _EPS) & (t_s < dist_l) & (inst != 6 + k), 0.35, shadow)
    view = -d / np.linalg.norm(d, axis=1, keepdims=True)
    half = l_dir + view
    half /= np.maximum(np.linalg.norm(half, axis=1, keepdims=True), 1e-12)
    spec_k = np.zeros(N)
    for k, obj in enumerate(scene["objects"]):
        spec_k[inst == 6 + k] = obj["spec"]
    spec = spec_k * np.clip(np.einsum("ij,ij->i", n_best, half), 0, None) ** 32 * (shadow > 0.5)
    falloff = 1.0 / (1.0 + 0.04 * dist_l ** 2)
    rgb = albedo * (light["ambient"] + (1 - light["ambient"]) * 1.6 * lambert * shadow * falloff)[:, None]
    rgb = (rgb + spec[:, None]) * light["tint"]
    noise_rng = np.random.default_rng(scene["noise_seed"])
    rgb = rgb + noise_rng.normal(0, scene["noise"], rgb.shape)
    rgb = np.clip(rgb, 0, 1) ** (1 / 1.1)

    # labels
    lut = np.zeros(6 + len(scene["objects"]), np.int64)
    for iid, c in cls_of.items():
        lut[iid] = c
    label = lut[inst]
    n_cam = n_best @ R  # world -> camera: R^T n, row-vector form
    depth = t_best
    img_inst = inst.reshape(H, W)
    dep = depth.reshape(H, W)
    nc = n_cam.reshape(H, W, 3)
    edge = np.zeros((H, W), bool)
    for a, b in (((slice(None), slice(0, -1)), (slice(None), slice(1, None))),
                 ((slice(0, -1), slice(None)), (slice(1, None), slice(None)))):
        jump = img_inst[a] != img_inst[b]
        jump |= np.abs(dep[a] - dep[b]) > 0.06 * np.minimum(dep[a], dep[b])
        jump |= np.einsum("ijk,ijk->ij", nc[a], nc[b]) < np.cos(np.deg2rad(30))
        edge[a] |= jump
    return {
        "image": rgb.reshape(H, W, 3),
        "label": label.reshape(H, W),
        "depth": dep,
        "normal": nc,
        "edge": edge,
        "sal": img_inst >= 6,
        "instance": img_inst,
    }


def _shadow_hit(origins, dirs, obj):
    """Nearest hit of rays with per-ray origins (surface points) against one object.

    Spheres are exact; boxes, cylinders and cones use their bounding vertical cylinder, which is
    plenty for shading (shadows only darken the image; no label depends on them).
    """
    kind = obj["kind"]
    if kind == "sphere":
        oc = origins - obj["c"]
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = 2 * np.einsum("ij,ij->i", dirs, oc)
        c = np.einsum("ij,ij->i", oc, oc) - obj["r"] ** 2
        disc = b * b - 4 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)
    if kind == "box":
        r, h = float(np.hypot(obj["ext"][0], obj["ext"][2])), 2 * obj["ext"][1]
    else:
        r, h = obj["r"], obj["h"]
    ox, oz = origins[:, 0] - obj["c"][0], origins[:, 2] - obj["c"][2]
    a = dirs[:, 0] ** 2 + dirs[:, 2] ** 2
    a = np.where(a < 1e-12, 1e-12, a)
    b = 2 * (ox * dirs[:, 0] + oz * dirs[:, 2])
    c = ox * ox + oz * oz - r * r
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    y = origins[:, 1] + t * dirs[:, 1]
    return np.where((disc >= 0) & (t > _EPS) & (y >= 0) & (y <= h), t, np.inf)


# --------------------------------------------------------------------------------------------
# the output folder: what the generator owns, and writing into it safely
# --------------------------------------------------------------------------------------------

GENERATOR = "ctal.data.synthetic"
_FORMAT = "ctal-synthetic"
_META = "meta.json"
_MARKER = "generating.ctal-synthetic"
_NPY_RE = re.compile(r"^(0|[1-9][0-9]*)\.npy$")    # the only data file names the generator writes
_TMP_RE = TEMP_RE                                     # ".<name>.<pid>.tmp" of an atomic write
_PR_SET_PDEATHSIG = 1                               # from <linux/prctl.h>


class ForeignFilesError(FileExistsError):
    """The output folder holds something the generator did not write; nothing was written."""


def _is_own_name(rel: tuple, is_dir: bool) -> bool:
    """Whether ``root/<rel>`` (a path split into parts) is a name and kind the generator writes."""
    name = rel[-1]
    tmp = _TMP_RE.match(name)
    if len(rel) == 1:
        if is_dir:
            return name in _SPLIT_ID
        return name in (_META, _MARKER) or bool(tmp and tmp.group(1) == _META)
    if len(rel) == 2:
        return is_dir and name in _FOLDERS
    if len(rel) == 3 and not is_dir:
        return bool(_NPY_RE.match(name) or (tmp and _NPY_RE.match(tmp.group(1))))
    return False


def _scan(root: Path) -> tuple[list[str], list[str]]:
    """Everything under ``root`` as sorted (own, foreign) relative paths, folders with a trailing
    ``/``. Only the generator's own folders are descended, so a foreign folder is one entry and the
    walk stays within the layout; symlinks are foreign (the generator never makes one)."""
    own, foreign = [], []
    todo = [()]
    while todo:
        rel = todo.pop()
        with os.scandir(root.joinpath(*rel)) as it:
            for e in it:
                sub = rel + (e.name,)
                is_dir, is_link = e.is_dir(follow_symlinks=False), e.is_symlink()
                text = "/".join(sub) + ("/" if is_dir else " (symlink)" if is_link else "")
                if not is_link and _is_own_name(sub, is_dir):
                    own.append(text)
                    if is_dir:
                        todo.append(sub)
                else:
                    foreign.append(text)
    return sorted(own), sorted(foreign)


def _is_generated(root: Path) -> bool:
    """Whether ``root`` is marked as the generator's: by its meta.json (written last) or by the
    marker file (written first, so an interrupted run is recognised too)."""
    if (root / _MARKER).is_file():
        return True
    try:
        meta = json.loads((root / _META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("generator") == GENERATOR or meta.get("format") == _FORMAT)


def _check_writable(root: Path) -> None:
    """Raise :class:`ForeignFilesError` unless ``root`` does not exist, is empty, or holds an
    earlier generation and nothing else (see the module docstring)."""
    if not root.exists():
        return
    advice = ("If this is a real dataset, train with its config (e.g. --config nyuv2_ctal) instead of "
              "the synthetic default; otherwise set data.root (or --out) to a new or empty folder, "
              "or move those files away or delete the folder yourself.")
    if not root.is_dir():
        raise ForeignFilesError(f"refusing to write synthetic data to {root}: it exists and is not a "
                                f"folder. Nothing was written. {advice}")
    own, foreign = _scan(root)
    if not own and not foreign:
        return
    generated = _is_generated(root)
    if generated and not foreign:
        return
    if generated:
        listed, where = foreign, "besides an earlier synthetic generation it holds"
    else:
        # unmarked: even files named like the generator's are someone else's (e.g. real NYUv2)
        listed = foreign + [p for p in own if not p.endswith("/")] or own
        where = "it holds"
    n = len(listed)
    what = f"{n} entr{'y' if n == 1 else 'ies'} that {GENERATOR} did not write"
    if not generated:
        what += f" (there is no {_META} from {GENERATOR})"
    what += f", e.g. {', '.join(listed[:3])}"
    raise ForeignFilesError(f"refusing to write synthetic data to {root}: {where} {what}. "
                            f"Nothing was written. {advice}")


def _remove_surplus(root: Path, counts: dict) -> None:
    """Delete the generator's own files that a new generation would not rewrite: numbered files at
    or beyond the new counts (the loader rejects a folder with extra files) and temp files of
    interrupted writes. Only own names inside own folders; :func:`_check_writable` has already
    made sure nothing else is there."""
    for e in os.scandir(root):
        tmp = _TMP_RE.match(e.name)
        if tmp and tmp.group(1) == _META and e.is_file(follow_symlinks=False):
            os.unlink(e.path)
    for split, n in counts.items():
        for folder in _FOLDERS:
            d = root / split / folder
            if not d.is_dir():
                continue
            for e in os.scandir(d):
                num, tmp = _NPY_RE.match(e.name), _TMP_RE.match(e.name)
                stale = (num and int(num.group(1)) >= n) or (tmp and _NPY_RE.match(tmp.group(1)))
                if stale and e.is_file(follow_symlinks=False):
                    os.unlink(e.path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    # a file object, not a name: np.save would append ".npy" to the temp name
    atomic_write(path, lambda f: np.save(f, array))


def _render_and_save(args):
    root, split, seed, start, stop, size = args
    base = Path(root) / split
    for i in range(start, stop):
        rng = np.random.default_rng([seed, _SPLIT_ID[split], i])
        out = render_scene(_sample_scene(rng), size)
        _save_npy(base / "image" / f"{i}.npy", out["image"].astype(np.float16))
        _save_npy(base / "label" / f"{i}.npy", out["label"].astype(np.int8))
        _save_npy(base / "depth" / f"{i}.npy", out["depth"][..., None].astype(np.float32))
        _save_npy(base / "normal" / f"{i}.npy", out["normal"].astype(np.float16))
        _save_npy(base / "edge" / f"{i}.npy", out["edge"].astype(np.uint8))
        _save_npy(base / "sal" / f"{i}.npy", out["sal"].astype(np.uint8))
    return stop - start


def _set_parent_death_signal() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _worker_init(parent_pid: int) -> None:
    """Bind a render worker's life to the generating process. If that one is SIGKILLed, the pool
    never shuts down and idle workers would wait on its queue forever. Killing a worker is safe:
    every file is written atomically, and leftover temp files are removed by the next run."""
    armed = _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                         name="ctal-synthetic-parent-watch").start()


def _render_jobs(jobs: list, workers: int, bar) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done = _render_and_save(job)
            if bar is not None:
                bar.update(done)
        return
    # fork (Linux) and spawn both make this process the workers' parent, which _worker_init
    # relies on; forkserver would not
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        for done in pool.map(_render_and_save, jobs):
            if bar is not None:
                bar.update(done)


def _meta(num_train, num_val, size, seed):
    return {"generator": GENERATOR, "format": _FORMAT, "version": FORMAT_VERSION, "seed": int(seed),
            "size": [int(size[0]), int(size[1])], "num": {"train": int(num_train), "val": int(num_val)},
            "classes": list(CLASSES), "num_classes": len(CLASSES),
            "tasks": ["semseg", "depth", "normals", "edge", "sal"],
            "normals_frame": "camera, x right, y down, z forward",
            "depth_unit": "metres (camera-frame z)"}


def _check_args(num_train, num_val, size):
    for name, n in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and s >= 8 for s in size)):
        raise ValueError(f"size must be (H, W) with both >= 8, got {size!r}")


def generate(root, num_train: int, num_val: int, size: Sequence[int] = (96, 128), seed: int = 0,
             progress: bool = True, workers: Optional[int] = None) -> Path:
    """Render ``num_train`` + ``num_val`` scenes into ``root`` (NYUv2 layout + edge/sal folders).

    ``root`` must be missing, empty, or hold an earlier generation of this module and nothing
    else; otherwise :class:`ForeignFilesError` is raised before anything is written. An earlier
    generation is replaced: its files are overwritten and those beyond the new counts deleted.
    ``workers`` processes render in parallel (default: the number of CPUs, at most 8; 0 or 1
    renders in this process); they exit if this process dies.
    """
    _check_args(num_train, num_val, size)
    size = (int(size[0]), int(size[1]))
    seed = int(seed)
    root = Path(root)
    _check_writable(root)
    root.mkdir(parents=True, exist_ok=True)
    # marker first, meta.json last: during the run the folder is recognisably ours but incomplete
    (root / _MARKER).write_text(json.dumps({"generator": GENERATOR, "pid": os.getpid(),
                                            "meta": _meta(num_train, num_val, size, seed)}, indent=2))
    (root / _META).unlink(missing_ok=True)
    _remove_surplus(root, {"train": num_train, "val": num_val})
    jobs = []
    chunk = 25
    for split, n in (("train", num_train), ("val", num_val)):
        for folder in _FOLDERS:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        jobs += [(str(root), split, seed, s, min(s + chunk, n), size) for s in range(0, n, chunk)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_train + num_val, desc=f"synthetic scenes -> {root}", unit="img")
    try:
        _render_jobs(jobs, workers, bar)
    finally:
        if bar is not None:
            bar.close()
    meta = json.dumps(_meta(num_train, num_val, size, seed), indent=2)
    atomic_write(root / _META, lambda f: f.write(meta.encode()))
    (root / _MARKER).unlink()
    return root


def is_complete(root, num_train: int, num_val: int, size: Sequence[int] = (96, 128), seed: int = 0) -> bool:
    """True when ``root`` holds exactly this generation: meta.json matches and every data folder
    holds exactly ``0.npy .. <n-1>.npy`` (surplus numbered files would fail the loader)."""
    root = Path(root)
    try:
        meta = json.loads((root / _META).read_text())
    except (OSError, ValueError):
        return False
    if meta != json.loads(json.dumps(_meta(num_train, num_val, size, seed))):
        return False
    for split, n in (("train", num_train), ("val", num_val)):
        expected = {f"{i}.npy" for i in range(n)}
        for folder in _FOLDERS:
            d = root / split / folder
            if not d.is_dir():
                return False
            # any <digits>.npy counts, as in the loader
            if {e.name for e in os.scandir(d) if re.fullmatch(r"[0-9]+\.npy", e.name)} != expected:
                return False
    return True


def ensure(root, num_train: int = 1000, num_val: int = 200, size: Sequence[int] = (96, 128), seed: int = 0,
           progress: bool = True, workers: Optional[int] = None) -> Path:
    """Generate the synthetic set in ``root`` unless an identical complete one is already there.

    Raises :class:`ForeignFilesError` (writing nothing) when ``root`` needs generating but holds
    files the generator did not write, e.g. a real dataset in the same layout."""
    _check_args(num_train, num_val, size)
    if is_complete(root, num_train, num_val, size, seed):
        return Path(root)
    return generate(root, num_train, num_val, size=size, seed=seed, progress=progress, workers=workers)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctal.data.synthetic",
                                 description="Render the ctal synthetic multitask scenes (NYUv2 layout).")
    ap.add_argument("--out", required=True,
                    help="output folder: new, empty, or holding only an earlier synthetic generation")
    ap.add_argument("--num", type=int, default=1000, help="number of training scenes (default 1000)")
    ap.add_argument("--num-val", type=int, default=None,
                    help="number of validation scenes (default: --num / 5)")
    ap.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"),
                    help="image height and width (default 96 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs)")
    ap.add_argument("--force", action="store_true",
                    help="regenerate even if a complete copy exists (same rule for --out)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    num_val = a.num // 5 if a.num_val is None else a.num_val
    t0 = time.perf_counter()
    try:
        fn = generate if a.force else ensure
        fn(a.out, a.num, num_val, size=tuple(a.size), seed=a.seed, progress=not a.no_progress,
           workers=a.workers)
    except ValueError as e:
        ap.error(str(e))
    except ForeignFilesError as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    print(f"{a.num} train + {num_val} val scenes at {a.size[0]}x{a.size[1]} in {a.out} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
