"""Checkpoints: atomic, verified writes and exact resume (model, optimizer, scheduler, scaler,
loss weighting, epoch, step, best score and every RNG).

A checkpoint is torch's zip format. Every member carries a CRC-32 that ``torch.load`` never
checks, so :func:`load` checks them first: a flipped bit on disk is an error naming the file
instead of NaN weights (or, worse, plausible ones) later.
"""
from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .._checks import state_dict_in
from .._io import atomic_write, temp_files


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint file that is damaged, truncated or not a ctal checkpoint (the file is named)."""


def _stale_temp_files(path: Path) -> list[Path]:
    # ".last.pt.<pid>.tmp" (atomic_write), and "last.pt.<random>.tmp" of earlier ctal versions
    return temp_files(path) + sorted(path.parent.glob(f"{path.name}.*.tmp"))


def save(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically and durably (fsync before the rename): a crash
    mid-write never leaves a truncated file, the old checkpoint stays until the new one is
    complete. Temp files of an earlier writer killed mid-write are removed first (one process
    writes a run's checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temp_files(path):
        stale.unlink(missing_ok=True)
    return atomic_write(path, lambda f: torch.save(state, f), durable=True)


def verify(path: str | Path) -> Path:
    """Check every member of the checkpoint's zip archive against its stored CRC-32; raise
    :class:`CheckpointError` naming ``path`` (and the damaged entry) if one differs or the
    archive is truncated. Reads the file once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} could not be read ({e}): it is damaged, truncated or "
                              f"not a ctal checkpoint. Use another checkpoint (e.g. best.pt) or "
                              f"retrain") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: entry {bad!r} fails its CRC check "
                              f"(the file changed on disk after it was written); it cannot be "
                              f"trusted. Use another checkpoint (e.g. best.pt) or retrain")
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """Verify (:func:`verify`) and load a checkpoint written by :func:`save`."""
    path = verify(path)
    try:
        # Our checkpoints hold RNG states and config dicts, not only tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"checkpoint {path} could not be read ({e}); it may be truncated or "
                              f"not a ctal checkpoint") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a ctal checkpoint (no 'model' entry)")
    return state


CHECKPOINT_NAMES = ("last.pt", "best.pt")


def describe(path: str | Path) -> str:
    """``last.pt (epoch 3, best score 41.2 at epoch 2)``: what a checkpoint holds, for messages."""
    path = Path(path)
    try:
        try:  # memory-mapped: reads only the small entries, not the weights
            s = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not the zip format
            s = torch.load(path, map_location="cpu", weights_only=False)
        info = f"epoch {s['epoch']}"
        if s.get("best"):
            info += f", best score {s['best']['score']:.4g} at epoch {s['best']['epoch']}"
    except Exception as e:  # noqa: BLE001 - only a description
        info = f"unreadable: {type(e).__name__}"
    return f"{path.name} ({info})"


def existing(out_dir: str | Path) -> list[Path]:
    """The checkpoints (last.pt, best.pt) an earlier run left in ``out_dir``."""
    return [Path(out_dir) / n for n in CHECKPOINT_NAMES if (Path(out_dir) / n).is_file()]


def refuse_fresh_run(out_dir: str | Path) -> None:
    """Raise FileExistsError if ``out_dir`` holds checkpoints that a fresh run would overwrite,
    saying what is there and the ways on (--resume auto, --overwrite, another --output-dir)."""
    found = existing(out_dir)
    if not found:
        return
    ways = []
    if (Path(out_dir) / "last.pt").is_file():
        ways.append("continue it with --resume auto")
    ways += ["start over with --overwrite (replaces them)",
             "or write elsewhere with --output-dir DIR (or the override output_dir=DIR)"]
    ways[0] = ways[0][0].upper() + ways[0][1:]
    raise FileExistsError(f"output dir {out_dir} already holds checkpoints of an earlier run: "
                          f"{', '.join(describe(p) for p in found)}; a fresh run would overwrite them. "
                          f"{'; '.join(ways)}.")


def load_model_state(source: str | os.PathLike | Mapping) -> dict:
    """A model's state dict from ``source``: a trainer checkpoint (written by :func:`save`; the
    state is under ``"model"``), a file holding a plain state dict, or such a dict; a DDP
    ``module.`` prefix is stripped. Files are verified first (:func:`verify`).

    Cross-Stitch / NDDR-CNN take their ``single_task_weights`` as state dicts, not paths (the
    models do not depend on the engine): the config's ``model.single_task_weights``
    ({task: checkpoint path}) is resolved with this before the model is built."""
    where = "the source"
    if isinstance(source, (str, os.PathLike)):
        path = verify(source)
        where = str(path)
        try:
            # A trainer checkpoint holds RNG states and config dicts besides the tensors.
            source = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"{path} could not be read ({e}); it may be truncated or not a "
                                  f"PyTorch file") from e
        if not isinstance(source, Mapping):
            raise CheckpointError(f"{path} holds a {type(source).__name__}, not a state dict or a "
                                  f"trainer checkpoint")
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")
    return state_dict_in(source, where)
