"""Sample transforms: augmentation (training data only), resizing and image normalization.

All transforms act on a sample dict in the ``ctal/tasks.py`` layout, *before* ImageNet
normalization: ``image`` float (3, H, W) in [0, 1], ``semseg``/``human_parts`` int64 (H, W),
``depth`` (1, H, W), ``normals`` (3, H, W), ``edge``/``sal`` (1, H, W). Randomness comes from
torch's global generator, which ``DataLoader`` seeds per worker, so ``torch.manual_seed`` makes
an epoch reproducible.

Geometry rules (why each task is treated differently):

* labels, edges, saliency, normals and depth are resampled with *nearest* neighbour: averaging
  class ids, ignore markers, invalid (zero) depths or unit vectors would invent values. The
  sample positions are pixel centres (``nearest-exact``), the same as the image's bilinear
  ``align_corners=False``; PyTorch's plain ``nearest`` rounds down and shifts labels by up to a
  source pixel against the image;
* augmentation runs at the stored size, before any resize: a rotation of a stretched (resized to
  another aspect ratio) image is also a shear, which the normals' in-plane rotation would not
  match;
* a horizontal flip mirrors the scene, so the normals' x component changes sign;
* zooming in by ``s`` (scale-crop or scale-rotate) brings the scene ``s`` times closer, so depth
  is divided by ``s`` (inverse depth, as stored for Cityscapes, is multiplied by ``s``);
* an in-plane rotation rotates the normals' (x, y) by the same angle (normals are taken in
  camera coordinates with y pointing down the image rows, as ctal's synthetic data stores them);
* pixels that come from outside the source image get the "ignore"/"invalid" value of each task.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_grid
from ..tasks import EDGE_IGNORE, IGNORE_INDEX, SAL_IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# value used for pixels that come from outside the image after a geometric transform
FILL = {"image": 0.0, "semseg": float(IGNORE_INDEX), "human_parts": float(IGNORE_INDEX), "depth": 0.0,
        "normals": 0.0, "edge": EDGE_IGNORE, "sal": SAL_IGNORE}
_SPATIAL = tuple(FILL)

__all__ = ["Compose", "HorizontalFlip", "RandomScaleCrop", "RandomScaleRotate", "Resize", "Normalize",
           "build_augmentation", "IMAGENET_MEAN", "IMAGENET_STD", "FILL"]


def _check_factors(name: str, spec, positive: bool = True) -> None:
    """``spec`` must be a ``(low, high)`` tuple (uniform draw) or a non-empty list of choices."""
    def num(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)

    if isinstance(spec, list):
        ok = len(spec) > 0 and all(num(v) for v in spec)
    elif isinstance(spec, tuple):
        ok = len(spec) == 2 and all(num(v) for v in spec) and spec[0] <= spec[1]
    else:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a (low, high) tuple of {'positive ' if positive else ''}numbers with "
                         f"low <= high, or a non-empty list of choices; got {spec!r}")


def _as_chw(x: Tensor) -> tuple[Tensor, bool]:
    """(H, W) -> (1, H, W) float for resampling; remembers whether to squeeze back."""
    if x.dim() == 2:
        return x.unsqueeze(0), True
    return x, False


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class HorizontalFlip:
    """Flip left-right with probability ``p``; the normals' x component is negated."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, sample: dict) -> dict:
        if torch.rand(()) >= self.p:
            return sample
        out = dict(sample)
        for k in _SPATIAL:
            if k in out:
                out[k] = out[k].flip(-1)
        if "normals" in out:
            n = out["normals"].clone()
            n[0] = -n[0]
            out["normals"] = n
        return out

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


def _warp(sample: dict, theta: Tensor, out_size: tuple[int, int], scale: float, angle: float,
          inverse_depth: bool) -> dict:
    """Resample every spatial entry with the affine ``theta`` (output -> input, normalized coords)."""
    out = dict(sample)
    H, W = out_size
    grid = F.affine_grid(theta.unsqueeze(0), [1, 1, H, W], align_corners=False)
    for k in _SPATIAL:
        if k not in out:
            continue
        x, squeeze = _as_chw(out[k])
        dtype = x.dtype
        xf = x.to(torch.float32).unsqueeze(0)
        mode = "bilinear" if k == "image" else "nearest"
        # mark out-of-image pixels with a mask channel so each task gets its own fill value
        ones = torch.ones_like(xf[:, :1])
        y = F.grid_sample(torch.cat([xf, ones], 1), grid, mode=mode, padding_mode="zeros",
                          align_corners=False)[0]
        inside = y[-1:] > 0.5
        y = torch.where(inside, y[:-1], torch.full_like(y[:-1], FILL[k]))
        if k == "depth":
            y = y * scale if inverse_depth else y / scale
        if k == "normals" and angle != 0.0:
            c, s = math.cos(angle), math.sin(angle)
            nx, ny = y[0].clone(), y[1].clone()
            y[0], y[1] = c * nx - s * ny, s * nx + c * ny
        y = y.to(dtype)
        out[k] = y[0] if squeeze else y
    return out


class RandomScaleCrop:
    """Zoom in by a random ``s`` from ``scales``: crop a random ``(H/s, W/s)`` window at an integer
    offset and resize it back to ``(H, W)`` (the NYUv2 / Cityscapes recipe). Depth is divided by
    ``s`` (multiplied for inverse depth)."""

    def __init__(self, scales: Sequence[float] = (1.0, 1.2, 1.5), inverse_depth: bool = False):
        if (isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales
                or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and s >= 1 for s in scales)):
            raise ValueError(f"scales must be a non-empty list of factors >= 1, got {scales!r}")
        self.scales = tuple(float(s) for s in scales)
        self.inverse_depth = inverse_depth

    def __call__(self, sample: dict) -> dict:
        s = self.scales[int(torch.randint(len(self.scales), ()))]
        if s == 1.0:
            return sample
        H, W = sample["image"].shape[-2:]
        h, w = max(1, int(H / s)), max(1, int(W / s))
        i = int(torch.randint(H - h + 1, ()))
        j = int(torch.randint(W - w + 1, ()))
        out = dict(sample)
        for k in _SPATIAL:
            if k not in out:
                continue
            x, squeeze = _as_chw(out[k])
            crop = x[:, i:i + h, j:j + w].to(torch.float32).unsqueeze(0)
            if k == "image":
                y = F.interpolate(crop, (H, W), mode="bilinear", align_corners=False)[0]
            else:
                y = F.interpolate(crop, (H, W), mode="nearest-exact")[0]  # pixel centres, as bilinear
            if k == "depth":
                y = y * s if self.inverse_depth else y / s
            y = y.to(x.dtype)
            out[k] = y[0] if squeeze else y
        return out

    def __repr__(self) -> str:
        return f"RandomScaleCrop(scales={self.scales}, inverse_depth={self.inverse_depth})"


class RandomScaleRotate:
    """Scale about the centre by ``s`` and rotate by ``a`` degrees, keeping the size (the PASCAL
    multitask recipe: rotations in (-20, 20), scales in (0.75, 1.25)).

    ``scales``/``rots`` are ``(low, high)`` tuples for a uniform draw or lists of choices.
    Out-of-image pixels become ignore/invalid; depth is divided by ``s``; normals are rotated.
    """

    def __init__(self, rots: Union[tuple, list] = (-20.0, 20.0), scales: Union[tuple, list] = (0.75, 1.25),
                 inverse_depth: bool = False):
        _check_factors("rots", rots, positive=False)
        _check_factors("scales", scales)
        self.rots, self.scales, self.inverse_depth = rots, scales, inverse_depth

    @staticmethod
    def _draw(spec):
        if isinstance(spec, list):
            return float(spec[int(torch.randint(len(spec), ()))])
        lo, hi = spec
        return float(lo + (hi - lo) * torch.rand(()).item())

    def __call__(self, sample: dict) -> dict:
        s = self._draw(self.scales)
        a = math.radians(self._draw(self.rots))
        if s == 1.0 and a == 0.0:
            return sample
        H, W = sample["image"].shape[-2:]
        # output pixel p samples input pixel R(-a) p / s (pixel units, centred); convert to the
        # normalized coordinates affine_grid uses, where x spans W and y spans H
        c, sn = math.cos(a), math.sin(a)
        theta = torch.tensor([[c / s, sn / s * H / W, 0.0], [-sn / s * W / H, c / s, 0.0]])
        return _warp(sample, theta, (H, W), s, a, self.inverse_depth)

    def __repr__(self) -> str:
        return f"RandomScaleRotate(rots={self.rots}, scales={self.scales})"


class Resize:
    """Resize every spatial entry to ``size = (H, W)`` (image bilinear, everything else nearest).

    Depth is *not* rescaled: resizing the whole frame changes resolution, not viewpoint."""

    def __init__(self, size: Sequence[int]):
        self.size = check_grid(size, "size")

    def __call__(self, sample: dict) -> dict:
        if tuple(sample["image"].shape[-2:]) == self.size:
            return sample
        out = dict(sample)
        for k in _SPATIAL:
            if k not in out:
                continue
            x, squeeze = _as_chw(out[k])
            xf = x.to(torch.float32).unsqueeze(0)
            if k == "image":
                y = F.interpolate(xf, self.size, mode="bilinear", align_corners=False)[0]
            else:
                y = F.interpolate(xf, self.size, mode="nearest-exact")[0]  # pixel centres, as bilinear
            y = y.to(x.dtype)
            out[k] = y[0] if squeeze else y
        return out

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class Normalize:
    """ImageNet mean/std normalization of ``image`` (applied last, after augmentation)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        out["image"] = (out["image"] - self.mean) / self.std
        return out

    def __repr__(self) -> str:
        return "Normalize(imagenet)"


# the literature's training recipes, by name
_RECIPES = {
    "scale_crop": lambda inv: [RandomScaleCrop((1.0, 1.2, 1.5), inverse_depth=inv), HorizontalFlip()],
    "pascal": lambda inv: [HorizontalFlip(), RandomScaleRotate((-20.0, 20.0), (0.75, 1.25), inverse_depth=inv)],
    "nyud": lambda inv: [HorizontalFlip(), RandomScaleRotate([0.0], [1.0, 1.2, 1.5], inverse_depth=inv)],
    "flip": lambda inv: [HorizontalFlip()],
}


def build_augmentation(augment, default: str, inverse_depth: bool = False) -> Optional[Callable]:
    """Turn a user ``augment`` argument into a transform, or ``None`` for no augmentation.

    ``augment``: ``None``/``False`` -> none; ``True``/``"default"`` -> the dataset's recipe
    (``default``); a recipe name in ``("scale_crop", "pascal", "nyud", "flip")``; or a callable
    taking and returning a sample (before normalization).
    """
    if augment is None or augment is False:
        return None
    if callable(augment):
        return augment
    if augment is True or augment == "default":
        augment = default
    if isinstance(augment, str) and augment in _RECIPES:
        return Compose(_RECIPES[augment](inverse_depth))
    raise ValueError(f"augment must be None, a bool, 'default', one of {sorted(_RECIPES)} or a callable; "
                     f"got {augment!r}")
