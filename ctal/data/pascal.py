"""PASCAL-Context multitask (semseg 21, human parts 7, saliency, normals, edges) and NYUD-MT.

These follow the on-disk layouts distributed with the ASTMT / MTI-Net multitask benchmarks
(``PASCAL_MT/`` and ``NYUD_MT/``); see docs/datasets.md for the trees and how to obtain them.
Label conventions (facts of the benchmarks, implemented here independently):

PASCAL-Context
    * semseg ``semseg/{VOC12,pascal-context}/<id>.png``: 0 = background, 1..20 = VOC classes,
      255 = void.
    * human parts ``human_parts/<id>.mat`` (Pascal-Part annotations): the parts of every
      ``person`` (class 15) object are merged into 6 groups (head, torso, upper arms, lower
      arms/hands, upper legs, lower legs/feet) plus background = 7 classes; an image with no
      annotated person parts is entirely void (it says nothing about parts).
    * edges from ``pascal-context/trainval/<id>.mat`` ``LabelMap``: pixels where the label
      changes to a 4-neighbour, thinned to one pixel.
    * normals ``normals_distill/<id>.png`` (RGB, ``2 * v / 255 - 1``), valid only on the
      PASCAL-Context classes that also exist in NYUD (the distillation source), else invalid.
    * saliency ``sal_distill/<id>.png``: ``v / 255 > 0.5``.

NYUD-MT
    * ``segmentation/<id>.png``: 0 = void, 1..40 -> classes 0..39.
    * ``depth/<id>.npy`` metres (0 = invalid), ``normals/<id>.npy`` (H, W, 3) or ``.png``,
      ``edge/<id>.npy`` {0, 1}; images ``images/<id>.jpg`` (or .png), 480x640.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..tasks import IGNORE_INDEX
from .base import (DataFileError, MultiTaskDataset, image_size, image_to_float, npy_shape, read_image, read_npy,
                   select_tasks, size_mismatch_error, to_label_tensor)
from .._checks import check_grid

__all__ = ["PascalContextMT", "NYUDMT", "HUMAN_PART_GROUPS", "label_boundaries", "VOC_CLASSES", "HUMAN_PART_CLASSES",
           "NYU40_CLASSES"]

# Pascal-Part person part name -> one of 6 groups (1 head, 2 torso, 3 upper arm, 4 lower arm /
# hand, 5 upper leg, 6 lower leg / foot); 0 is background.
HUMAN_PART_GROUPS = {
    **{p: 1 for p in ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye")},
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5,
    "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}
PERSON_CLASS = 15

# Class names in id order: the PASCAL VOC classes (semseg), the human-part groups above, and the
# NYU40 classes of NYUD-MT.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
               "train", "tv monitor")
HUMAN_PART_CLASSES = ("background", "head", "torso", "upper arm", "lower arm / hand", "upper leg",
                      "lower leg / foot")
NYU40_CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                 "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
                 "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
                 "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
                 "bathtub", "bag", "other structure", "other furniture", "other prop")

# PASCAL-Context label ids (of the 459-class LabelMap) whose class also exists in NYUD, plus
# tvmonitor: the pixels where distilled normals are trusted.
NORMALS_VALID_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53,
    55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113,
    115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193,
    195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250,
    251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293,
    295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357,
    368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421,
    423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457))


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour (both sides of a boundary), thinned.

    Thinning uses pyEdgeEval's morphological thinning when available (the same operation the
    benchmark's MATLAB/skimage pipeline applies), otherwise the two-sided map is returned."""
    lab = np.asarray(labels)
    e = np.zeros(lab.shape, bool)
    dh = lab[:, 1:] != lab[:, :-1]
    dv = lab[1:, :] != lab[:-1, :]
    e[:, 1:] |= dh
    e[:, :-1] |= dh
    e[1:, :] |= dv
    e[:-1, :] |= dv
    thin = _thin_fn()
    return thin(e) if thin is not None else e


def _thin_fn():
    from ..metrics.edge import load_binary_thin

    return load_binary_thin()


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"missing split file: {path}")
    ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DataFileError(f"split file {path} lists no images")
    if len(set(ids)) != len(ids):
        raise DataFileError(f"split file {path} lists an image twice")
    return ids


def _loadmat(path: Path) -> dict:
    import scipy.io as sio

    if not path.is_file():
        raise DataFileError(f"missing file: {path}")
    try:
        return sio.loadmat(str(path), simplify_cells=True)
    except Exception as e:  # noqa: BLE001
        raise DataFileError(f"corrupt or unreadable .mat file {path}: {e}") from e


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, dict):
        return [x]
    if isinstance(x, np.ndarray) and x.dtype == object:
        return list(x.ravel())
    return list(x)


class PascalContextMT(MultiTaskDataset):
    """PASCAL-Context multitask split (4998 train / 5105 val images in the benchmark).

    Args:
        root: the ``PASCAL_MT`` folder.
        split: ``"train"`` or ``"val"``.
        tasks: subset of ``("semseg", "human_parts", "normals", "sal", "edge")`` (default all).
        augment: see :class:`~ctal.data.base.MultiTaskDataset` (default recipe: flip +
            scale (0.75-1.25) + rotation (+-20 degrees)), training split only.
        resize: output size ``(H, W)``, default ``(512, 512)`` as in the benchmark (a single int
            is a ``ValueError``). ``None`` keeps the images' own size, which must then be the same
            for every image (PASCAL's vary: a different one raises :class:`DataFileError` naming
            it, at construction or when loaded); score at each image's own resolution with
            :meth:`original_targets` instead.
        check_files: verify every image header up front (default True; else only the first).
    """

    name = "pascal_context"
    default_augmentation = "pascal"
    known_class_names = {"semseg": VOC_CLASSES, "human_parts": HUMAN_PART_CLASSES}
    available = ("semseg", "human_parts", "normals", "sal", "edge")

    def __init__(self, root, split: str = "train", tasks: Optional[Sequence[str]] = None, augment=None,
                 resize: Optional[Sequence[int]] = (512, 512), normalize: bool = True, check_files: bool = True):
        if split == "test":
            split = "val"
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tasks = select_tasks(tasks, self.available, self.available, self.name)
        if resize is not None:
            resize = check_grid(resize, "resize")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"pascal_context: root {root} does not exist (see docs/datasets.md)")
        self.ids = _read_split(root / "ImageSets" / "Context" / f"{split}.txt")
        self._root = root
        self.tasks = tasks
        # resolve every file up front so a missing one is reported at construction
        self.files = [self._files(i) for i in self.ids]
        size = None
        for f in self.files if check_files else self.files[:1]:
            hw = image_size(f["image"])
            size = size or hw
            if resize is None and hw != size:
                raise size_mismatch_error(self.name, f["image"], hw, size, self.files[0]["image"])
        super().__init__(root, split, tasks, {"semseg": 21, "human_parts": 7}, size,
                         augment=augment, resize=resize, normalize=normalize)

    def _files(self, i: str) -> dict:
        r = self._root
        f = {"image": r / "JPEGImages" / f"{i}.jpg"}
        need = {"image"}
        if "semseg" in self.tasks:
            voc, ctx = r / "semseg" / "VOC12" / f"{i}.png", r / "semseg" / "pascal-context" / f"{i}.png"
            f["semseg"] = voc if voc.is_file() else ctx
            need.add("semseg")
        if "human_parts" in self.tasks:
            f["human_parts"] = r / "human_parts" / f"{i}.mat"
            need.add("human_parts")
        if "normals" in self.tasks:
            f["normals"] = r / "normals_distill" / f"{i}.png"
            need.add("normals")
        if "sal" in self.tasks:
            f["sal"] = r / "sal_distill" / f"{i}.png"
            need.add("sal")
        if "edge" in self.tasks or "normals" in self.tasks:
            f["context"] = r / "pascal-context" / "trainval" / f"{i}.mat"
            need.add("context")
        for k in need:
            if not f[k].is_file():
                raise DataFileError(f"pascal_context: missing file: {f[k]} (image id {i!r})")
        return f

    def __len__(self) -> int:
        return len(self.ids)

    def _name(self, index: int) -> str:
        return self.ids[index]

    def _image_file(self, index: int) -> Path:
        return self.files[index]["image"]

    def _human_parts(self, path: Path, shape) -> np.ndarray:
        mat = _loadmat(path)
        try:
            objects = _as_list(mat["anno"]["objects"])
        except (KeyError, TypeError) as e:
            raise DataFileError(f"{path}: not a Pascal-Part annotation (no anno.objects): {e}") from e
        target = np.zeros(shape, np.int64)
        found = False
        for obj in objects:
            try:
                cls = int(np.asarray(obj["class_ind"]).ravel()[0])
                parts = _as_list(obj.get("parts"))
            except (KeyError, TypeError, IndexError, AttributeError) as e:
                raise DataFileError(f"{path}: malformed object entry: {e}") from e
            if cls != PERSON_CLASS or not parts:
                continue
            for part in parts:
                name = str(part["part_name"])
                if name not in HUMAN_PART_GROUPS:
                    raise DataFileError(f"{path}: unknown person part {name!r}")
                m = np.asarray(part["mask"]).astype(bool)
                if m.shape != tuple(shape):
                    raise DataFileError(f"{path}: part mask {m.shape} differs from image {tuple(shape)}")
                target[m] = HUMAN_PART_GROUPS[name]
                found = True
        if not found:
            target[:] = IGNORE_INDEX
        return target

    def _load(self, index: int) -> dict:
        f = self.files[index]
        img = image_to_float(read_image(f["image"]), f["image"])
        H, W = img.shape[:2]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))}

        def check(a, key):
            if a.shape[:2] != (H, W):
                raise DataFileError(f"{f[key]}: size {a.shape[:2]} differs from its image {f['image']} ({H}, {W})")
            return a

        context = None
        if "context" in f:
            mat = _loadmat(f["context"])
            if "LabelMap" not in mat:
                raise DataFileError(f"{f['context']}: no 'LabelMap' variable")
            context = check(np.asarray(mat["LabelMap"]), "context")
        for t in self.tasks:
            if t == "semseg":
                a = check(read_image(f[t], mode=None), t)
                if a.ndim != 2:
                    raise DataFileError(f"{f[t]}: semseg must be a single-channel (palette/L) png, got {a.shape}")
                sample[t] = to_label_tensor(a, 21, (255,), f[t])
            elif t == "human_parts":
                sample[t] = torch.from_numpy(self._human_parts(f[t], (H, W)))
            elif t == "normals":
                a = check(read_image(f[t], mode="RGB"), t).astype(np.float32)
                n = 2.0 * a / 255.0 - 1.0
                valid = np.isin(context, list(NORMALS_VALID_CLASSES))
                n = np.where(valid[..., None], n, 0.0)
                norm = np.linalg.norm(n, axis=2, keepdims=True)
                n = np.where(norm > 1e-3, n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
                sample[t] = torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))
            elif t == "sal":
                a = check(read_image(f[t], mode="L"), t).astype(np.float32) / 255.0
                sample[t] = torch.from_numpy((a > 0.5).astype(np.float32))[None]
            elif t == "edge":
                sample[t] = torch.from_numpy(label_boundaries(context).astype(np.float32))[None]
        return sample


class NYUDMT(MultiTaskDataset):
    """NYUD-MT (795 train / 654 val, 480x640; semseg 40, depth, normals, edges).

    Args as :class:`PascalContextMT`; default tasks ``("semseg", "depth", "normals", "edge")``,
    default augmentation flip + zoom in {1, 1.2, 1.5}; ``resize`` default ``None`` (native 480x640):
    then every image must have the first one's size, else :class:`DataFileError` naming the image
    (at construction, or when loaded with ``check_files=False``); pass ``resize=(H, W)`` for mixed sizes.
    """

    name = "nyud_mt"
    default_augmentation = "nyud"
    known_class_names = {"semseg": NYU40_CLASSES}
    available = ("semseg", "depth", "normals", "edge")

    def __init__(self, root, split: str = "train", tasks: Optional[Sequence[str]] = None, augment=None,
                 resize: Optional[Sequence[int]] = None, normalize: bool = True, check_files: bool = True):
        if split == "test":
            split = "val"
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tasks = select_tasks(tasks, self.available, self.available, self.name)
        if resize is not None:
            resize = check_grid(resize, "resize")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"nyud_mt: root {root} does not exist (see docs/datasets.md)")
        self.ids = _read_split(root / "gt_sets" / f"{split}.txt")
        self._root = root
        self.tasks = tasks
        self.files = [self._files(i) for i in self.ids]
        size = None
        for f in self.files if check_files else self.files[:1]:
            hw = image_size(f["image"])
            size = size or hw
            if resize is None and hw != size:
                raise size_mismatch_error(self.name, f["image"], hw, size, self.files[0]["image"])
            for t in ("depth", "edge", "normals"):
                if t in f and f[t].suffix == ".npy":
                    s = npy_shape(f[t])
                    ok = {"depth": (hw, hw + (1,)), "edge": (hw, hw + (1,)), "normals": (hw + (3,),)}[t]
                    if s not in ok:
                        raise DataFileError(f"{f[t]}: {t} shape {s}, expected one of {ok} "
                                            f"to match {f['image']}")
        super().__init__(root, split, tasks, {"semseg": 40}, size, augment=augment,
                         resize=resize, normalize=normalize)

    def _files(self, i: str) -> dict:
        r = self._root

        def first(*cands):
            for c in cands:
                if c.is_file():
                    return c
            raise DataFileError(f"nyud_mt: missing file: {cands[0]} (image id {i!r})")

        f = {"image": first(r / "images" / f"{i}.jpg", r / "images" / f"{i}.png")}
        if "semseg" in self.tasks:
            f["semseg"] = first(r / "segmentation" / f"{i}.png")
        if "depth" in self.tasks:
            f["depth"] = first(r / "depth" / f"{i}.npy")
        if "normals" in self.tasks:
            f["normals"] = first(r / "normals" / f"{i}.npy", r / "normals" / f"{i}.png")
        if "edge" in self.tasks:
            f["edge"] = first(r / "edge" / f"{i}.npy")
        return f

    def __len__(self) -> int:
        return len(self.ids)

    def _name(self, index: int) -> str:
        return self.ids[index]

    def _image_file(self, index: int) -> Path:
        return self.files[index]["image"]

    def _load(self, index: int) -> dict:
        f = self.files[index]
        img = image_to_float(read_image(f["image"]), f["image"])
        H, W = img.shape[:2]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))}
        for t in self.tasks:
            p = f[t]
            if t == "semseg":
                a = read_image(p, mode=None)
                if a.shape != (H, W):
                    raise DataFileError(f"{p}: semseg {a.shape}, expected {(H, W)}")
                # 0 = void; 1..40 -> 0..39
                sample[t] = to_label_tensor(a.astype(np.int64) - 1, 40, (-1,), p)
            elif t == "depth":
                a = read_npy(p)
                if a.shape not in ((H, W), (H, W, 1)):
                    raise DataFileError(f"{p}: depth {a.shape}, expected {(H, W)}")
                d = a.reshape(H, W).astype(np.float32)
                d = np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)
                sample[t] = torch.from_numpy(d)[None]
            elif t == "normals":
                if p.suffix == ".png":
                    a = 2.0 * read_image(p, mode="RGB").astype(np.float32) / 255.0 - 1.0
                else:
                    a = read_npy(p).astype(np.float32)
                if a.shape != (H, W, 3):
                    raise DataFileError(f"{p}: normals {a.shape}, expected {(H, W, 3)}")
                norm = np.linalg.norm(a, axis=2, keepdims=True)
                n = np.where(np.isfinite(a) & (norm > 1e-3), a / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
                sample[t] = torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))
            elif t == "edge":
                a = read_npy(p)
                if a.shape not in ((H, W), (H, W, 1)):
                    raise DataFileError(f"{p}: edge {a.shape}, expected {(H, W)}")
                e = a.reshape(H, W).astype(np.float32)
                e = np.where(e == 255, 255.0, (e > 0).astype(np.float32)).astype(np.float32)
                sample[t] = torch.from_numpy(e)[None]
        return sample
