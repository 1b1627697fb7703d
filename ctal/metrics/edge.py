"""Edge detection: ODS-F, OIS-F and AP through pyEdgeEval's boundary matcher.

Each prediction (sigmoid of the 1-channel logit) is binarized at every threshold, thinned to
one-pixel boundaries, and matched one-to-one to the ground-truth boundary pixels with the
bipartite matcher of the BSDS benchmark (``pyEdgeEval._lib.correspond_pixels``): a predicted pixel
counts as correct if it is matched to a truth pixel within ``max_dist * image diagonal``. The
literature's tolerances are 0.0075 for PASCAL-Context and 0.011 for NYUD (:data:`EDGE_MAX_DIST`).
Scores (percent):

* ODS-F: F1 of the set-wide recall/precision at the best *common* threshold (interpolated
  between thresholds, as the BSDS code does);
* OIS-F: F1 of the counts accumulated at each image's own best threshold;
* AP: mean over recall levels 0, 0.01, ..., 0.99 of the best precision at at least that recall
  (divided by 101, the benchmark's convention).

pyEdgeEval is imported without its OpenCV-dependent modules (``cv2`` is not needed for this).
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..tasks import EDGE_IGNORE
from ._binary import binary_maps

# the literature's tolerances; the small synthetic images use NYUD's (1.8 px at 96x128, where
# 0.0075 would be under one pixel and demand pixel-exact edges)
EDGE_MAX_DIST = {"pascal_context": 0.0075, "nyud_mt": 0.011, "nyuv2": 0.011, "synthetic": 0.011}


def _missing_pyedgeeval(e: Exception) -> ImportError:
    return ImportError("EdgeMeter needs pyEdgeEval (pip install pyEdgeEval, or pip install 'ctal[edges]'); "
                       f"import failed: {e}")


@lru_cache(None)
def _correspond_pixels():
    try:
        from pyEdgeEval._lib import correspond_pixels
    except ImportError as e:
        raise _missing_pyedgeeval(e) from e
    return correspond_pixels


@lru_cache(None)
def load_binary_thin():
    """pyEdgeEval's morphological thinning, or ``None`` if pyEdgeEval is not installed.

    ``pyEdgeEval.preprocess`` imports OpenCV for its NMS; the thinning module itself needs only
    numpy, so it is loaded from its file when the package import fails for lack of ``cv2``."""
    try:
        from pyEdgeEval.preprocess import binary_thin
        return binary_thin
    except ImportError:
        pass
    try:
        import pyEdgeEval
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(pyEdgeEval.__file__), "preprocess", "thin", "thin.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("_ctal_pyedgeeval_thin", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.binary_thin


def _f1(p, r):
    s = p + r
    return np.where(s > 0, 2 * p * r / np.where(s > 0, s, 1), 0.0)


def _rec_prec(count_r, sum_r, count_p, sum_p):
    rec = count_r / np.where(sum_r == 0, 1, sum_r)
    prec = count_p / np.where(sum_p == 0, 1, sum_p)
    return rec, prec


class EdgeMeter:
    """Boundary-matching edge evaluation (see the module docstring).

    Args:
        max_dist: matching tolerance as a fraction of the image diagonal.
        thresholds: number of thresholds (evenly spaced strictly inside (0, 1), like the BSDS
            code) or an explicit increasing list.
        thin: thin binarized predictions before matching (the benchmark does).
        from_logits: predictions are logits (default) or probabilities.
        ignore_value: target value of ignored pixels (targets are 0 / 1 otherwise).

    Errors (``ValueError``): a target value other than 0, 1 or ``ignore_value`` (soft targets,
    NaN, 0..255 masks), a non-finite prediction on a valid pixel, probabilities outside [0, 1]
    with ``from_logits=False``; ``compute()`` with no valid pixel seen, or with no edge pixel in
    the whole set.
    """

    higher_is_better = {"odsF": True, "oisF": True, "AP": True}

    def __init__(self, max_dist: float = 0.0075, thresholds=99, thin: bool = True, from_logits: bool = True,
                 ignore_value: float = EDGE_IGNORE):
        if not (0 < max_dist < 1):
            raise ValueError(f"max_dist is a fraction of the image diagonal in (0, 1), got {max_dist!r}")
        if isinstance(thresholds, int):
            if thresholds < 1:
                raise ValueError(f"thresholds must be >= 1, got {thresholds}")
            thresholds = np.linspace(1.0 / (thresholds + 1), 1 - 1.0 / (thresholds + 1), thresholds)
        self.thresholds = np.asarray(thresholds, float)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0 or (np.diff(self.thresholds) <= 0).any():
            raise ValueError(f"thresholds must be an int or a non-empty increasing 1-D list, got {thresholds!r}")
        self.max_dist = float(max_dist)
        self.thin = thin
        self.from_logits = from_logits
        self.ignore_value = ignore_value
        self._match = _correspond_pixels()
        self._thin = load_binary_thin() if thin else None
        if thin and self._thin is None:
            raise _missing_pyedgeeval(ImportError("pyEdgeEval thinning not found"))
        self.reset()

    def reset(self) -> None:
        self.per_image = []  # (count_r, sum_r, count_p, sum_p), each [K]
        self.n_valid = 0     # non-ignored target pixels seen

    def _one(self, prob: np.ndarray, gt: np.ndarray):
        K = len(self.thresholds)
        cr, sr, cp, sp = (np.zeros(K) for _ in range(4))
        gt_f = gt.astype(np.float64)
        for k, th in enumerate(self.thresholds):
            b = prob >= th
            if self._thin is not None:
                b = self._thin(b)
            sp[k] = b.sum()
            sr[k] = gt.sum()
            if gt.any() and b.any():
                m1, m2, _, _ = self._match(b.astype(np.float64), gt_f, self.max_dist)
                cp[k] = (m1 > 0).sum()
                cr[k] = (m2 > 0).sum()
        return cr, sr, cp, sp

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        prob, target, valid = binary_maps("EdgeMeter", pred, target, self.from_logits, self.ignore_value)
        prob = prob[:, 0].cpu().double().numpy()
        tgt = target[:, 0].cpu().numpy()
        valid = valid[:, 0].cpu().numpy()
        self.n_valid += int(valid.sum())
        for i in range(prob.shape[0]):
            gt = (tgt[i] == 1) & valid[i]
            p = np.where(valid[i], prob[i], 0.0)
            self.per_image.append(self._one(p, gt))

    def compute(self) -> dict:
        if not self.per_image:
            raise ValueError("EdgeMeter.compute(): no images were seen")
        if self.n_valid == 0:
            raise ValueError("EdgeMeter.compute(): no valid (non-ignored) target pixels were seen")
        arr = np.array(self.per_image)  # [I, 4, K]
        if arr[:, 1, 0].sum() == 0:
            raise ValueError(f"EdgeMeter.compute(): no edge pixel (target == 1) in the whole set, so recall "
                             f"and odsF are undefined; targets must be 0 / 1 with {self.ignore_value:g} = ignore "
                             f"(a {{0, 255}} mask reads as all background / ignored)")
        cr, sr, cp, sp = arr.sum(0)
        rec, prec = _rec_prec(cr, sr, cp, sp)
        # ODS: best F over thresholds, interpolating linearly between neighbouring thresholds
        best = (float(_f1(prec[0], rec[0])), self.thresholds[0])
        for k in range(1, len(self.thresholds)):
            for d in np.linspace(0, 1, 101):
                r = rec[k] * d + rec[k - 1] * (1 - d)
                p = prec[k] * d + prec[k - 1] * (1 - d)
                f = float(_f1(p, r))
                if f > best[0]:
                    best = (f, self.thresholds[k] * d + self.thresholds[k - 1] * (1 - d))
        # OIS: each image at its own best threshold
        f_img = _f1(*_rec_prec(*arr.transpose(1, 0, 2))[::-1])  # [I, K]
        kbest = f_img.argmax(1)
        sel = arr[np.arange(len(arr)), :, kbest].sum(0)   # [4]
        r_o, p_o = _rec_prec(*sel)
        ois = float(_f1(p_o, r_o))
        ap = sum(float(np.max(prec[rec >= t], initial=0.0)) for t in np.arange(0, 1, 0.01)) / 101
        return {"odsF": best[0] * 100, "oisF": ois * 100, "AP": ap * 100, "ods_threshold": float(best[1])}
