"""Datasets for ctal: NYUv2, Cityscapes, PASCAL-Context MT, NYUD-MT and synthetic scenes.

Every dataset returns samples in the ``ctal/tasks.py`` layout and exposes ``.tasks`` (tuple),
``.num_classes`` (task -> classes for semseg / human_parts) and ``.size`` ((H, W) of its samples).
Augmentation runs only on the ``"train"`` split. Expected on-disk layouts: docs/datasets.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch.utils.data import Dataset

from . import transforms
from .base import DataFileError, MultiTaskDataset
from .npy import Cityscapes, NYUv2, SyntheticScenes
from .pascal import NYUDMT, PascalContextMT

__all__ = ["build_dataset", "DATASETS", "DataFileError", "MultiTaskDataset", "NYUv2", "Cityscapes",
           "SyntheticScenes", "PascalContextMT", "NYUDMT", "synthetic", "transforms"]

DATASETS = {
    "nyuv2": NYUv2,
    "cityscapes": Cityscapes,
    "pascal_context": PascalContextMT,
    "nyud_mt": NYUDMT,
    "synthetic": SyntheticScenes,
}


def build_dataset(name: str, root, split: str, tasks: Optional[Sequence[str]] = None, augment=None,
                  **kw) -> Dataset:
    """Build dataset ``name`` (one of :data:`DATASETS`) for ``split`` from ``root``.

    ``augment`` (``None``/``False``, ``True``/``"default"``, a recipe name or a callable) is applied
    only when ``split == "train"``. Extra keyword arguments go to the dataset class (e.g.
    ``resize=(H, W)``, ``num_classes=7`` for Cityscapes, ``check_files=False``).
    """
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[key](root, split=split, tasks=tasks, augment=augment, **kw)


def __getattr__(name):
    # ``synthetic`` is imported lazily so ``python -m ctal.data.synthetic`` runs it only once
    if name == "synthetic":
        import importlib

        return importlib.import_module(".synthetic", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
