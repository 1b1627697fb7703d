"""Shared machinery of the ctal datasets: task selection, file reading with clear errors, and the
per-sample pipeline (augmentation on training data only -> optional resize -> normalization)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_grid, check_task_names
from ..tasks import IGNORE_INDEX, TASKS
from .transforms import Normalize, Resize, build_augmentation

__all__ = ["MultiTaskDataset", "DataFileError", "read_npy", "read_image", "select_tasks", "image_to_float"]

# slack on the [0, 1] range of float images (float16 storage, interpolation overshoot in preprocessing)
IMAGE_RANGE_TOL = 1e-2


class DataFileError(ValueError):
    """A dataset file is missing, unreadable or has the wrong shape/values; the message names it."""


def read_npy(path: Path) -> np.ndarray:
    """``np.load`` with an error that names the file (missing, truncated, not an .npy)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"missing file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise DataFileError(f"corrupt or unreadable .npy file {path}: {e}") from e
    if not isinstance(arr, np.ndarray):
        raise DataFileError(f"{path} holds {type(arr).__name__}, expected one array")
    return arr


def npy_shape(path: Path) -> tuple:
    """Shape from an .npy header without reading the data (cheap up-front checks)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"missing file: {path}")
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except Exception as e:  # noqa: BLE001
        raise DataFileError(f"corrupt or unreadable .npy file {path}: {e}") from e


def read_image(path: Path, mode: Optional[str] = "RGB") -> np.ndarray:
    """Read an image file with PIL into a numpy array; errors name the file."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"missing file: {path}")
    try:
        with Image.open(path) as im:
            if mode is not None:
                im = im.convert(mode)
            return np.array(im)
    except Exception as e:  # noqa: BLE001
        raise DataFileError(f"corrupt or unreadable image {path}: {e}") from e


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header only."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"missing file: {path}")
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:  # noqa: BLE001
        raise DataFileError(f"corrupt or unreadable image {path}: {e}") from e


def image_to_float(img: np.ndarray, path) -> np.ndarray:
    """An image array as float32 in [0, 1]: uint8 (0..255) is divided by 255, a float array must
    already be in [0, 1] (up to ``IMAGE_RANGE_TOL``). Anything else (floats 0..255, images already
    mean/std-normalized, other integer types, NaN/Inf) raises :class:`DataFileError` naming ``path``.
    Costs one min and one max over the pixels."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype.kind != "f":
        raise DataFileError(f"{path}: image dtype {img.dtype}, expected float in [0, 1] or uint8 0..255")
    out = img.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataFileError(f"{path}: image has non-finite values")
    if lo < -IMAGE_RANGE_TOL or hi > 1 + IMAGE_RANGE_TOL:
        hint = ("; it looks like 0..255: divide by 255 or store uint8" if hi > 2 and lo >= -IMAGE_RANGE_TOL
                else "; store the raw image, not a normalized one" if lo < -IMAGE_RANGE_TOL else "")
        raise DataFileError(f"{path}: float image values span [{lo:.4g}, {hi:.4g}], expected [0, 1] "
                            f"(or uint8 0..255){hint}")
    return out


def size_mismatch_error(name: str, path, got: Sequence[int], expected: Sequence[int], first) -> DataFileError:
    """The error for an image whose size differs from the dataset's when ``resize=None``."""
    return DataFileError(f"{path}: image is {got[0]}x{got[1]}, expected {expected[0]}x{expected[1]} like {first}; "
                         f"with resize=None every {name} image must have the same size (the dataset's size); "
                         f"pass resize=(H, W) to resize every sample")


def select_tasks(tasks: Optional[Iterable[str]], available: Sequence[str], default: Sequence[str],
                 dataset: str) -> tuple[str, ...]:
    if tasks is None:
        return tuple(default)
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = tuple(check_task_names(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; ctal tasks are {TASKS}")
    missing = [t for t in tasks if t not in available]
    if missing:
        raise ValueError(f"dataset {dataset!r} has no {missing}; it provides {tuple(available)}")
    return tasks


class MultiTaskDataset(Dataset):
    """Base class: subclasses implement ``__len__`` and ``_load(index) -> raw sample`` (tensors in
    the ``ctal/tasks.py`` layout, image in [0, 1], no "meta"); this class adds augmentation (only
    when ``split == "train"``), resizing to ``size`` and ImageNet normalization.

    ``resize``: ``None`` (every sample must then have the dataset's ``size``, else
    :class:`DataFileError` naming the image) or an ``(H, W)`` pair of positive ints (a single int
    is a ``ValueError``)."""

    name = "dataset"
    default_augmentation = "scale_crop"
    inverse_depth = False
    # task -> class names in id order; subclasses name the classes of their label sets
    known_class_names: Mapping[str, Sequence[str]] = {}

    def __init__(self, root, split: str, tasks: Sequence[str], num_classes: Mapping[str, int],
                 size: tuple[int, int], augment=None, resize: Optional[Sequence[int]] = None,
                 normalize: bool = True):
        self.root = Path(root)
        self.split = split
        self.tasks = tuple(tasks)
        self.num_classes = {t: int(n) for t, n in num_classes.items() if t in self.tasks}
        if resize is not None:
            resize = check_grid(resize, "resize")
        self.size = resize if resize is not None else (int(size[0]), int(size[1]))
        self.augment = (build_augmentation(augment, self.default_augmentation, self.inverse_depth)
                        if split == "train" else None)
        self._resize = Resize(resize) if resize is not None else None
        self._normalize = Normalize() if normalize else None

    @property
    def class_names(self) -> dict[str, tuple[str, ...]]:
        """Segmentation task -> its class names in id order (for legends). A task whose names
        the dataset does not know (or whose count differs from ``num_classes``) gets
        ``"class 0"``, ``"class 1"``, ..."""
        out = {}
        for t, n in self.num_classes.items():
            names = tuple(str(c) for c in self.known_class_names.get(t, ()))
            out[t] = names if len(names) == n else tuple(f"class {i}" for i in range(n))
        return out

    def _load(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _name(self, index: int) -> str:
        return str(index)

    def _image_file(self, index: int):
        """The image file of sample ``index`` (named in errors)."""
        return f"{self.name} {self.split} sample {index}"

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} {self.split} ({len(self)} samples)")
        index = index % len(self)
        sample = self._load(index)
        orig = tuple(sample["image"].shape[-2:])
        if self._resize is None and orig != self.size:
            raise size_mismatch_error(self.name, self._image_file(index), orig, self.size, self._image_file(0))
        if self.augment is not None:  # at the stored size: see the geometry rules in transforms.py
            sample = self.augment(sample)
        if self._resize is not None:
            sample = self._resize(sample)
        if self._normalize is not None:
            sample = self._normalize(sample)
        sample["meta"] = {"index": index, "size": orig, "name": self._name(index)}
        return sample

    def original_targets(self, index: int) -> dict:
        """The targets of sample ``index`` as stored on disk: no resize, no augmentation. Used to
        score predictions at each image's original resolution (the MTI-Net protocol on PASCAL)."""
        sample = self._load(index % len(self))
        return {t: sample[t] for t in self.tasks}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"tasks={self.tasks}, size={self.size}, augment={self.augment!r})")


def to_label_tensor(arr: np.ndarray, num_classes: int, void_values: Iterable[int], path) -> torch.Tensor:
    """Class-id array -> int64 tensor with void -> IGNORE_INDEX; checks the id range."""
    a = np.asarray(arr)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise DataFileError(f"{path}: class ids must be integers, found non-integer values")
    a = a.astype(np.int64)
    for v in void_values:
        a[a == v] = IGNORE_INDEX
    bad = (a != IGNORE_INDEX) & ((a < 0) | (a >= num_classes))
    if bad.any():
        raise DataFileError(f"{path}: class id {int(a[bad][0])} outside [0, {num_classes}) "
                            f"(void values {list(void_values)})")
    return torch.from_numpy(a)
