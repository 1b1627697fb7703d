"""NYUv2 / Cityscapes in the common preprocessed ``.npy`` layout, and ctal's synthetic scenes.

Layout (one folder per split, files numbered ``0 .. n-1``)::

    root/{train,val}/image/<i>.npy    (H, W, 3) float in [0, 1] (uint8 0..255 also accepted;
                                      anything else, e.g. floats 0..255, is an error)
    root/{train,val}/label/<i>.npy    (H, W) class ids, -1 = void          (NYUv2: 13 classes)
    root/{train,val}/label_19/<i>.npy (H, W) class ids, -1 = void          (Cityscapes: 19 classes;
                                                                            label_7 for 7 classes)
    root/{train,val}/depth/<i>.npy    (H, W, 1) or (H, W); 0 = invalid     (Cityscapes: inverse depth)
    root/{train,val}/normal/<i>.npy   (H, W, 3) unit vectors, all-zero = invalid (NYUv2 only)
    root/{train,val}/edge/<i>.npy     (H, W) {0, 1}  (synthetic only)
    root/{train,val}/sal/<i>.npy      (H, W) {0, 1}  (synthetic only)

The dataset checks up front that every task folder holds exactly the indices of ``image/`` and
that every file's header has the expected shape (and that the first image's values are in range),
so a broken download fails at construction with the offending file named rather than hours into
training. Every loaded image is range-checked too (one min/max).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..tasks import EDGE_IGNORE, SAL_IGNORE
from .base import (DataFileError, MultiTaskDataset, image_to_float, npy_shape, read_npy, select_tasks,
                   size_mismatch_error, to_label_tensor)
from .._checks import check_grid

__all__ = ["NpyMultiTaskDataset", "NYUv2", "Cityscapes", "SyntheticScenes", "NYUV2_CLASSES", "CITYSCAPES_CLASSES"]

_NUM_RE = re.compile(r"^(\d+)\.npy$")

# The 13-class NYUv2 labels (Couprie et al. 2013) of the MTAN / EMA-Net preprocessing, ids 0..12.
NYUV2_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                 "table", "tv", "wall", "window")
# Cityscapes train ids 0..18, and the 7 categories (void removed) of the label_7 preprocessing.
CITYSCAPES_CLASSES = {
    19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
         "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
         "bicycle"),
    7: ("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
}


class NpyMultiTaskDataset(MultiTaskDataset):
    """A split of a numbered-``.npy`` multitask dataset (see the module docstring).

    Args:
        root: dataset root holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"`` (``"test"`` is an alias of ``"val"``, as in the papers).
        tasks: subset of the dataset's tasks (default: its paper setting).
        augment: ``None``/``False``, ``True``/``"default"``, a recipe name or a callable; used only
            when ``split == "train"``.
        resize: optional ``(H, W)`` pair to resize every sample to (a single int is an error);
            with ``None`` all images must have the same size.
        check_files: verify every file's header up front (default True; ~1 ms per file).
    """

    folders: dict = {}
    available: tuple = ()
    default_tasks: tuple = ()
    classes: dict = {}
    expected_size: Optional[tuple] = None

    def __init__(self, root, split: str = "train", tasks: Optional[Sequence[str]] = None, augment=None,
                 resize: Optional[Sequence[int]] = None, normalize: bool = True, check_files: bool = True):
        if split == "test":
            split = "val"
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' (or 'test'), got {split!r}")
        tasks = select_tasks(tasks, self.available, self.default_tasks, self.name)
        if resize is not None:
            resize = check_grid(resize, "resize")
        root = Path(root)
        self.split_dir = root / split
        if not (self.split_dir / "image").is_dir():
            raise FileNotFoundError(
                f"{self.name}: no folder {self.split_dir / 'image'}; expected the layout "
                f"root/{{train,val}}/{{image,{','.join(self.folders[t] for t in tasks)}}}/<i>.npy "
                f"(see docs/datasets.md)")
        self._n = self._count(tasks)
        size = self._check_shapes(tasks, check_files, uniform=resize is None)
        super().__init__(root, split, tasks, self.classes, size, augment=augment, resize=resize,
                         normalize=normalize)

    # ---------------------------------------------------------------- up-front checks
    def _indices(self, folder: Path) -> set[int]:
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: missing folder {folder}")
        return {int(m.group(1)) for e in os.scandir(folder) if (m := _NUM_RE.match(e.name))}

    def _count(self, tasks) -> int:
        img = self._indices(self.split_dir / "image")
        n = len(img)
        if n == 0:
            raise FileNotFoundError(f"{self.name}: no <i>.npy files in {self.split_dir / 'image'}")
        if img != set(range(n)):
            gap = min(set(range(n)) - img)
            raise DataFileError(f"{self.name}: {self.split_dir / 'image'} holds {n} files but not 0..{n - 1}; "
                                f"missing file: {self.split_dir / 'image' / f'{gap}.npy'}")
        for t in tasks:
            folder = self.split_dir / self.folders[t]
            idx = self._indices(folder)
            missing = sorted(img - idx)
            if missing:
                raise DataFileError(f"{self.name}: {len(missing)} {t} file(s) missing, e.g. missing file: "
                                    f"{folder / f'{missing[0]}.npy'} (image/ has {n} files)")
            extra = sorted(idx - img)
            if extra:
                raise DataFileError(f"{self.name}: {folder} has files without an image, e.g. "
                                    f"{folder / f'{extra[0]}.npy'}")
        return n

    def _expected(self, t: str, H: int, W: int) -> tuple:
        return {"semseg": ((H, W), (H, W, 1)), "depth": ((H, W, 1), (H, W)), "normals": ((H, W, 3),),
                "edge": ((H, W), (H, W, 1)), "sal": ((H, W), (H, W, 1))}[t]

    def _check_shapes(self, tasks, check_all: bool, uniform: bool) -> tuple[int, int]:
        """Header shapes of every sample (``check_all``) or the first; ``uniform`` (``resize=None``):
        every image must have the first one's size. Returns that size."""
        first = self.split_dir / "image" / "0.npy"
        shp = npy_shape(first)
        if len(shp) != 3 or shp[2] != 3:
            raise DataFileError(f"{first}: image must be (H, W, 3), got {shp}")
        H, W = shp[:2]
        if self.expected_size is not None and (H, W) != tuple(self.expected_size):
            raise DataFileError(f"{first}: {self.name} images are {self.expected_size[0]}x{self.expected_size[1]}, "
                                f"got {H}x{W}")
        image_to_float(read_npy(first), first)  # value range of the first image (a few ms)
        indices = range(self._n) if check_all else [0]
        for i in indices:
            img = self.split_dir / "image" / f"{i}.npy"
            shp = npy_shape(img)
            if len(shp) != 3 or shp[2] != 3:
                raise DataFileError(f"{img}: image must be (H, W, 3), got shape {shp}")
            h, w = shp[:2]
            if uniform and (h, w) != (H, W):
                raise size_mismatch_error(self.name, img, (h, w), (H, W), first)
            for t in tasks:
                p = self.split_dir / self.folders[t] / f"{i}.npy"
                s = npy_shape(p)
                if s not in self._expected(t, h, w):
                    raise DataFileError(f"{p}: {t} shape {s}, expected one of {self._expected(t, h, w)} "
                                        f"to match {img}")
        return H, W

    # ---------------------------------------------------------------- loading
    def __len__(self) -> int:
        return self._n

    def _file(self, folder: str, index: int) -> Path:
        return self.split_dir / folder / f"{index}.npy"

    def _image_file(self, index: int) -> Path:
        return self._file("image", index)

    def _read(self, folder: str, index: int, shapes) -> tuple[np.ndarray, Path]:
        p = self._file(folder, index)
        a = read_npy(p)
        if a.shape not in shapes:
            raise DataFileError(f"{p}: shape {a.shape}, expected one of {shapes}")
        return a, p

    def _load(self, index: int) -> dict:
        p = self._file("image", index)
        img = read_npy(p)
        if img.ndim != 3 or img.shape[2] != 3:
            raise DataFileError(f"{p}: image must be (H, W, 3), got {img.shape}")
        H, W = img.shape[:2]
        img = image_to_float(img, p)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))}
        for t in self.tasks:
            a, path = self._read(self.folders[t], index, self._expected(t, H, W))
            if t == "semseg":
                sample[t] = to_label_tensor(a.reshape(H, W), self.num_classes[t], self.void_values, path)
            elif t == "depth":
                d = a.reshape(H, W).astype(np.float32)
                d = np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)
                sample[t] = torch.from_numpy(d)[None]
            elif t == "normals":
                n = a.astype(np.float32)
                n = np.where(np.isfinite(n), n, 0.0)
                norm = np.linalg.norm(n, axis=2, keepdims=True)
                # re-normalize valid vectors (float16 storage, interpolation in preprocessing)
                n = np.where(norm > 1e-3, n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
                sample[t] = torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))
            else:  # edge / sal: {0, 1} with 255 = ignore
                m = a.reshape(H, W).astype(np.float32)
                ign = EDGE_IGNORE if t == "edge" else SAL_IGNORE
                ok = (m == 0) | (m == 1) | (m == ign)
                if not ok.all():
                    raise DataFileError(f"{path}: {t} values must be 0, 1 or {int(ign)}, found {m[~ok][0]}")
                sample[t] = torch.from_numpy(m)[None]
        return sample


class NYUv2(NpyMultiTaskDataset):
    """NYUv2 (13 classes, 288x384) in the preprocessed layout of the MTAN / EMA-Net papers."""

    name = "nyuv2"
    folders = {"semseg": "label", "depth": "depth", "normals": "normal"}
    available = ("semseg", "depth", "normals")
    default_tasks = ("semseg", "depth", "normals")
    classes = {"semseg": 13}
    known_class_names = {"semseg": NYUV2_CLASSES}
    void_values = (-1,)
    expected_size = None  # the papers use 288x384; other preprocessings are allowed


class Cityscapes(NpyMultiTaskDataset):
    """Cityscapes (19 or 7 classes + inverse depth, 128x256) in the preprocessed layout.

    ``num_classes=19`` reads ``label_19/``, ``num_classes=7`` reads ``label_7/``. Depth is the
    inverse depth (disparity-derived) the preprocessing stores; random zoom multiplies it."""

    name = "cityscapes"
    available = ("semseg", "depth")
    default_tasks = ("semseg", "depth")
    void_values = (-1,)
    inverse_depth = True

    def __init__(self, root, split: str = "train", tasks=None, augment=None, num_classes: int = 19, **kw):
        if num_classes not in (7, 19):
            raise ValueError(f"Cityscapes num_classes must be 7 or 19, got {num_classes!r}")
        self.folders = {"semseg": f"label_{num_classes}", "depth": "depth"}
        self.classes = {"semseg": num_classes}
        self.known_class_names = {"semseg": CITYSCAPES_CLASSES[num_classes]}
        super().__init__(root, split, tasks, augment=augment, **kw)


class SyntheticScenes(NpyMultiTaskDataset):
    """ctal's generated scenes (``ctal.data.synthetic``): the NYUv2 layout plus ``edge/`` and
    ``sal/``. Class count and names come from the folder's ``meta.json``."""

    name = "synthetic"
    folders = {"semseg": "label", "depth": "depth", "normals": "normal", "edge": "edge", "sal": "sal"}
    available = ("semseg", "depth", "normals", "edge", "sal")
    default_tasks = ("semseg", "depth", "normals")
    void_values = (-1,)

    def __init__(self, root, split: str = "train", tasks=None, augment=None, **kw):
        meta_path = Path(root) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"synthetic: {meta_path} not found; generate the data first with "
                f"`python -m ctal.data.synthetic --out {root}` or ctal.data.synthetic.ensure(root)")
        try:
            meta = json.loads(meta_path.read_text())
            self.known_class_names = {"semseg": tuple(str(c) for c in meta["classes"])}
            self.classes = {"semseg": int(meta["num_classes"])}
            expected_n = int(meta["num"]["val" if split in ("val", "test") else "train"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataFileError(f"corrupt synthetic metadata {meta_path}: {e}") from e
        self.meta = meta
        super().__init__(root, split, tasks, augment=augment, **kw)
        if len(self) != expected_n:
            raise DataFileError(f"synthetic: {self.split_dir / 'image'} has {len(self)} files but "
                                f"{meta_path} says {expected_n}; regenerate with --force")
