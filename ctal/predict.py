"""Predict with a trained model: every task's map for image files.

    python -m ctal.predict outputs/synthetic_ctal/best.pt photos/ more/*.jpg one.png -o predictions

``CHECKPOINT`` is a trainer checkpoint (``last.pt`` / ``best.pt`` of ``train.py``; the model is
rebuilt from the config it holds) or a file of ``python -m ctal.export`` (``.onnx`` through
onnxruntime, ``.pt2``, ``.torchscript.pt``; on the CPU, the outputs' meaning from its metadata).
``INPUT`` is an image file, a folder (its image files, not its subfolders) or a glob (quoted, so
that the shell leaves it alone; ``**`` recurses).

For each image and task it writes ``<out>/<image name>/<task>.png`` (colourized) and
``<task>.npy``, the prediction at the image's own size:

    semseg, human_parts   int32 (H, W) class ids
    depth                 float32 (H, W) in metres (inverse depth for a Cityscapes-trained model)
    normals               float32 (3, H, W) unit vectors (x, y, z)
    edge, sal             float32 (H, W) probabilities

and ``<out>/predictions.json``: the checkpoint, the outputs' meaning, every image with what was
converted, every input skipped and why. ``--figures`` adds ``figure.png`` per image (labelled
panels with colour bars and class legends).

Images are read as RGB (grayscale, 16-bit, palette, CMYK and alpha images are converted, with a
note), resized to the model's input size (bilinear, antialiased when shrinking; the aspect ratio
is not kept, as in training), normalized like the training data (ImageNet mean / std); the
predictions are resized back to each image's size: nearest for class ids, bilinear for the
continuous maps, normals renormalized to unit length. Unreadable images are skipped with a note;
bad arguments (checkpoint, inputs, device, backend) stop with one line naming the argument
(``CTAL_TRACEBACK=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import export, figures as figlib, vis
from ._checks import positive_int_arg
from ._io import write_json
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .engine.build import TrainedModel, model_from_checkpoint
from .engine.checkpoint import CheckpointError
from .nn import CrossTaskAffinity
from .ops import backends
from .tasks import saliency_probability

__all__ = ["Predictor", "predict", "collect_images", "read_image", "preprocess", "postprocess", "colorize",
           "resolve_device", "check_ctal_backend", "UsageError", "InputError", "UnreadableImage",
           "IMAGE_SUFFIXES", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
_SEG = ("semseg", "human_parts")
MEANING = {
    "semseg": "int32 (H, W) class ids", "human_parts": "int32 (H, W) part ids (0 = background)",
    "depth": "float32 (H, W) depth in metres", "normals": "float32 (3, H, W) unit normals (x, y, z)",
    "edge": "float32 (H, W) edge probability", "sal": "float32 (H, W) saliency probability",
}


class UsageError(ValueError):
    """A bad argument (device, backend, batch size, inputs); the message names it."""


class InputError(UsageError):
    """An input argument names nothing usable (no such file, an empty folder, a glob without
    matches)."""


class UnreadableImage(ValueError):
    """One image file that cannot be read as an image (skipped, the reason is reported)."""


# --- inputs --------------------------------------------------------------------------------------

def collect_images(inputs: Sequence[Union[str, os.PathLike]]) -> list[Path]:
    """The image files ``inputs`` name, in order, each once: files as given (whatever their
    suffix), a folder's files with an image suffix (:data:`IMAGE_SUFFIXES`, sorted, no
    subfolders), a glob's matching files (sorted). An input that names nothing is an
    :class:`InputError` naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise InputError("no INPUT given: name image files, folders or globs")
    found: list[Path] = []
    for arg in inputs:
        text = os.fspath(arg)
        p = Path(text)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"INPUT {text!r}: the folder holds no image files "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
        elif p.is_file():
            files = [p]
        elif glob.has_magic(text):
            files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
            if not files:
                raise InputError(f"INPUT {text!r}: the glob matches no file")
        elif p.exists():
            raise InputError(f"INPUT {text!r} is neither a file nor a folder")
        else:
            raise InputError(f"INPUT {text!r}: no such file or folder")
        found += files
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def read_image(path: Union[str, os.PathLike]) -> tuple[np.ndarray, Optional[str]]:
    """``(image, note)``: the file as float32 RGB ``(H, W, 3)`` in [0, 1] (EXIF orientation
    applied), and what was converted to get there (None for an 8-bit RGB file). Grayscale is
    copied to three channels, 16-bit and float images are scaled to [0, 1], palette / CMYK /
    other colour spaces are converted, an alpha channel is dropped (the colours are kept), a
    multi-frame file gives its first frame. Anything else is an :class:`UnreadableImage`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    notes = []
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of {im.n_frames} frames")
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                a = np.asarray(im, dtype=np.float64)
                top = a.max(initial=0)
                full = 1.0 if mode == "F" and top <= 1.0 else (255.0 if top <= 255 else 65535.0)
                a = np.clip(a / full, 0.0, 1.0)
                notes.append(f"{'float' if mode == 'F' else '16-bit'} grayscale: scaled to [0, 1] and "
                             f"copied to 3 channels")
                return np.repeat(a[..., None], 3, axis=2).astype(np.float32), "; ".join(notes)
            if mode in ("L", "1"):
                notes.append("grayscale: copied to 3 channels")
            elif mode == "LA":
                notes.append("grayscale with alpha: alpha dropped, gray copied to 3 channels")
            elif mode in ("RGBA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in im.info):
                notes.append(f"{mode}: alpha channel dropped")
            elif mode == "P":
                notes.append("palette image: converted to RGB")
            elif mode != "RGB":
                notes.append(f"{mode}: converted to RGB")
            rgb = im.convert("RGB") if mode != "RGB" else im
            a = np.asarray(rgb, dtype=np.float32) / 255.0
    except FileNotFoundError as e:
        raise UnreadableImage(f"no such file ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"not a readable image ({type(e).__name__}: {e})") from e
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise UnreadableImage(f"empty image of shape {a.shape}")
    return a, ("; ".join(notes) or None)


def _output_names(paths: Sequence[Path]) -> list[str]:
    """One folder name per image: its stem, or stem_suffix / stem-2, ... where stems repeat."""
    names, used = [], set()
    for p in paths:
        name = p.stem or p.name
        if name in used:
            name = f"{p.stem}_{p.suffix.lstrip('.').lower()}" if p.suffix else name
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names


# --- the computation -----------------------------------------------------------------------------

def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device; a
    device this machine lacks is a :class:`UsageError` naming it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {device!r} is not a device name (expected auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r}: this machine has no usable CUDA device; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def preprocess(images: Sequence[np.ndarray], size: Sequence[int]) -> Tensor:
    """RGB images ``(H, W, 3)`` in [0, 1] (any sizes) -> one normalized batch ``(B, 3, *size)``."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for a in images:
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]
        if tuple(x.shape[-2:]) != tuple(size):
            # antialiased when shrinking: a photo several times the input size would alias otherwise
            shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
        out.append((x[0] - mean) / std)
    return torch.stack(out)


def postprocess(raw: Mapping[str, Tensor], sizes: Sequence[Sequence[int]]) -> list[dict[str, np.ndarray]]:
    """The model's ``{task: (B, C, h, w)}`` outputs -> per image ``{task: array}`` at that image's
    ``(H, W)`` (the layouts of the module docstring)."""
    out = []
    for i, (H, W) in enumerate(sizes):
        size = (int(H), int(W))
        item = {}
        for task, p in raw.items():
            p = p[i:i + 1].float()
            if task in _SEG:
                ids = p.argmax(1, keepdim=True).float()  # ids, then nearest: no invented classes
                v = F.interpolate(ids, size=size, mode="nearest-exact")[0, 0].to(torch.int32)
            else:
                if task == "edge":
                    p = p.sigmoid()
                elif task == "sal":
                    p = saliency_probability(p)
                v = F.interpolate(p, size=size, mode="bilinear", align_corners=False)[0]
                v = F.normalize(v, dim=0) if task == "normals" else v[0]
            item[task] = v.cpu().numpy()
        out.append(item)
    return out


def colorize(task: str, pred: np.ndarray, num_classes: Optional[int] = None,
             inverse_depth: bool = False) -> np.ndarray:
    """A prediction of :func:`postprocess` as an ``(H, W, 3)`` uint8 picture (``ctal.vis``)."""
    if task in _SEG:
        return vis.colorize_semseg(pred, num_classes)
    if task == "depth":  # near = bright either way
        return vis.colorize_depth(pred, inverse=not inverse_depth)
    if task == "normals":
        return vis.colorize_normals(pred)
    return vis.colorize_edge(pred)


class Predictor:
    """Maps RGB images of any size to per-task predictions at their own size: :func:`preprocess`,
    the network, :func:`postprocess`. Call it on a list of ``(H, W, 3)`` float RGB arrays in
    [0, 1] (:func:`read_image`).

    Build it with :meth:`from_model` (a ctal model or a
    :class:`~ctal.engine.build.TrainedModel`), :meth:`from_checkpoint`, :meth:`from_exported`
    (a file of ``ctal.export``) or :meth:`load` (either file). ``network`` maps a normalized
    batch ``(B, 3, *input_size)`` to ``{task: (B, C, h, w)}`` outputs."""

    def __init__(self, network: Callable[[Tensor], Mapping[str, Tensor]], tasks: Sequence[str],
                 input_size: Sequence[int], num_classes: Mapping[str, int], *, inverse_depth: bool = False,
                 class_names: Optional[Mapping[str, Sequence[str]]] = None, device: Union[str, torch.device] = "cpu",
                 model: Optional[nn.Module] = None, info: Optional[dict] = None):
        self.network = network
        self.tasks = list(tasks)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.num_classes = {t: int(n) for t, n in num_classes.items() if t in _SEG}
        self.inverse_depth = bool(inverse_depth)
        self.class_names = {t: tuple(class_names.get(t) or ()) if class_names else () for t in self.num_classes}
        self.device = torch.device(device)
        self.model = model  # the PyTorch model, None for an exported file
        self.info = dict(info or {})  # where it comes from: checkpoint / file, epoch, CTAL backend

    @classmethod
    def from_model(cls, model: Union[nn.Module, TrainedModel], device: Union[str, torch.device] = "auto",
                   inverse_depth: Optional[bool] = None) -> "Predictor":
        """A ctal model (``tasks``, ``input_size``, ``num_outputs``) or a trained one, moved to
        ``device`` (auto, cpu, cuda[:N]) in eval mode."""
        trained = model if isinstance(model, TrainedModel) else None
        net = (trained.model if trained else model).to(resolve_device(device)).eval()
        dev = next(net.parameters()).device

        @torch.inference_mode()
        def network(batch: Tensor) -> Mapping[str, Tensor]:
            return net(batch.to(dev))["final"]

        blocks = sorted({m.backend for m in net.modules() if isinstance(m, CrossTaskAffinity)})
        info = dict(model=getattr(net, "model_name", type(net).__name__),
                    ctal_backend=blocks[0] if len(blocks) == 1 else (blocks or None))
        if trained:
            info.update(checkpoint=str(trained.checkpoint), epoch=trained.epoch)
        return cls(network, net.tasks, net.input_size, net.num_outputs, device=dev, model=net, info=info,
                   inverse_depth=(inverse_depth if inverse_depth is not None
                                  else bool(trained and trained.inverse_depth)),
                   class_names=trained.class_names if trained else None)

    @classmethod
    def from_checkpoint(cls, checkpoint, device: Union[str, torch.device] = "auto",
                        ctal_backend: Optional[str] = None) -> "Predictor":
        """The model of a trainer checkpoint (see :func:`ctal.engine.build.model_from_checkpoint`);
        ``ctal_backend`` overrides the run's CTAL backend."""
        device = resolve_device(device)  # before the (slow) model build
        return cls.from_model(model_from_checkpoint(checkpoint, ctal_backend=ctal_backend), device)

    @classmethod
    def from_exported(cls, path) -> "Predictor":
        """A file written by ``ctal.export`` (ONNX through onnxruntime, TorchScript, ExportedProgram),
        on the CPU; what the outputs mean comes from the file's metadata."""
        meta = export.read_metadata(path)
        run = export.load_exported(path)
        tasks = meta["tasks"]

        def network(batch: Tensor) -> Mapping[str, Tensor]:
            return dict(zip(tasks, run(batch)))

        info = dict(model=meta.get("model"), checkpoint=meta.get("checkpoint"), epoch=meta.get("epoch"),
                    exported=str(path), format=meta.get("format"), ctal_backend=meta.get("ctal_backend"))
        return cls(network, tasks, meta["input"]["shape"][2:], meta["num_classes"], info=info,
                   inverse_depth=meta.get("inverse_depth", False), class_names=meta.get("class_names"))

    @classmethod
    def load(cls, path, device: Union[str, torch.device] = "auto", ctal_backend: Optional[str] = None) -> "Predictor":
        """:meth:`from_exported` for ``.onnx``, ``.pt2`` and ``.torchscript.pt`` files (CPU only, the
        CTAL form is the file's), else :meth:`from_checkpoint`."""
        if export.is_exported(path):
            if ctal_backend is not None:
                raise UsageError(f"ctal_backend {ctal_backend!r}: {path} is an exported model, its CTAL form "
                                 f"was fixed at export (ctal.export --ctal-backend)")
            if str(device) != "auto" and resolve_device(device).type != "cpu":
                raise UsageError(f"device {str(device)!r}: an exported model runs on the CPU here")
            return cls.from_exported(path)
        return cls.from_checkpoint(path, device, ctal_backend)

    def forward(self, batch: Tensor) -> dict[str, Tensor]:
        """Normalized images ``(B, 3, *input_size)`` -> the network's ``{task: (B, C, h, w)}``."""
        return dict(self.network(batch))

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not images:
            return []
        sizes = [a.shape[:2] for a in images]
        return postprocess(self.forward(preprocess(images, self.input_size)), sizes)


# --- files ---------------------------------------------------------------------------------------

def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _figure(predictor: Predictor, image: np.ndarray, pred: dict, title: str, path: Path) -> None:
    """Labelled panels of one image's predictions (``ctal.figures.prediction_figure``)."""
    preds = {t: (_logit(v) if t in ("edge", "sal") else v) for t, v in pred.items()}  # it takes logits
    names = {}
    for t, n in predictor.num_classes.items():
        known = tuple(predictor.class_names.get(t) or ())
        names[t] = known if len(known) == n else tuple(f"class {i}" for i in range(n))
    fig = figlib.prediction_figure(image.transpose(2, 0, 1), None, preds, class_names=names, title=title,
                                    depth_label="inverse depth" if predictor.inverse_depth else "depth [m]",
                                    mean=None)
    figlib.save_figure(fig, path)


def check_ctal_backend(name: Optional[str]) -> None:
    """None (the checkpoint's), ``"auto"`` or a registered backend, else a :class:`UsageError`."""
    if name is not None and name != "auto" and name not in backends():
        raise UsageError(f"ctal_backend {name!r} is unknown; expected 'auto' or one of {sorted(backends())}")


def predict(checkpoint, inputs, output_dir, *, batch_size: int = 4, device: Union[str, torch.device] = "auto",
            ctal_backend: Optional[str] = None, figures: bool = False, progress: bool = True,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Predict every image of ``inputs`` (:func:`collect_images`) with the model of
    ``checkpoint`` (a trainer checkpoint, or a file of ``ctal.export``: see
    :meth:`Predictor.load`) and write the files of the module docstring under ``output_dir``; returns
    what ``predictions.json`` holds. ``log`` receives the notes (conversions, skipped files;
    default: stderr). An input that names nothing, a bad checkpoint, device or backend is an
    error naming it; an unreadable image is skipped (``"skipped"`` in the result), and an error
    only when no image at all could be read."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_ctal_backend(ctal_backend)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output dir {out} exists and is not a folder")
    paths = collect_images(inputs)
    device = resolve_device(device)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    predictor = Predictor.load(checkpoint, device, ctal_backend)
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    meaning = dict(MEANING)
    if predictor.inverse_depth:
        meaning["depth"] = "float32 (H, W) inverse depth (the training data's unit)"
    # an exported file's info names the checkpoint it came from, and the file ("exported")
    result = dict({"checkpoint": str(checkpoint)}, **predictor.info, tasks=predictor.tasks,
                  num_classes=predictor.num_classes, input_size=list(predictor.input_size),
                  device=str(predictor.device), outputs={t: meaning[t] for t in predictor.tasks},
                  images=[], skipped=[])
    out.mkdir(parents=True, exist_ok=True)
    names = _output_names(paths)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    try:
        for start in range(0, len(paths), batch_size):
            batch = []
            for path, name in zip(paths[start:start + batch_size], names[start:start + batch_size]):
                try:
                    image, note = read_image(path)
                except UnreadableImage as e:
                    say(f"skipped {path}: {e}")
                    result["skipped"].append(dict(source=str(path), reason=str(e)))
                    bar.update(1)
                    continue
                if note:
                    say(f"{path}: {note}")
                batch.append((path, name, image, note))
            preds = predictor([b[2] for b in batch])
            for (path, name, image, note), pred in zip(batch, preds):
                folder = out / name
                folder.mkdir(parents=True, exist_ok=True)
                files = {}
                for task, value in pred.items():
                    np.save(folder / f"{task}.npy", value)
                    vis.save_grid([[colorize(task, value, predictor.num_classes.get(task), predictor.inverse_depth)]],
                                  folder / f"{task}.png", pad=0)
                    files[task] = [f"{name}/{task}.png", f"{name}/{task}.npy"]
                if figures:
                    _figure(predictor, image, pred, path.name, folder / "figure.png")
                    files["figure"] = [f"{name}/figure.png"]
                result["images"].append(dict(source=str(path), name=name, size=list(image.shape[:2]),
                                             note=note, files=files))
                bar.update(1)
    finally:
        bar.close()
    write_json(out / "predictions.json", result)
    if not result["images"]:
        raise InputError(f"none of the {len(paths)} input file(s) could be read as an image (see above); "
                         f"nothing was predicted")
    return result


# --- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ctal.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="trainer checkpoint (last.pt / best.pt of train.py)")
    ap.add_argument("inputs", metavar="INPUT", nargs="+", help="image file, folder or (quoted) glob")
    ap.add_argument("-o", "--output-dir", default="predictions", help="where the predictions go (default: predictions)")
    ap.add_argument("--batch-size", type=positive_int_arg, default=4, metavar="N",
                    help="images per forward pass (default 4)")
    ap.add_argument("--device", default="auto", help="auto (default: a GPU when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--ctal-backend", default=None, metavar="NAME",
                    help="CTAL op backend (default: the checkpoint's, e.g. auto); see ctal.ops.explain")
    ap.add_argument("--figures", action="store_true", help="also write figure.png per image: labelled panels")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> dict:
    ap = _parser()
    args = ap.parse_args(argv)
    for flag, check, value in (("--device", resolve_device, args.device),
                               ("--ctal-backend", check_ctal_backend, args.ctal_backend)):
        try:
            check(value)
        except UsageError as e:
            ap.error(f"argument {flag}: {e}")
    try:
        result = predict(args.checkpoint, args.inputs, args.output_dir, batch_size=args.batch_size,
                         device=args.device, ctal_backend=args.ctal_backend, figures=args.figures,
                         progress=not args.no_progress)
    except (UsageError, FileNotFoundError, NotADirectoryError, CheckpointError, export.ExportError) as e:
        if os.environ.get("CTAL_TRACEBACK"):
            raise
        sys.exit(f"python -m ctal.predict: error: {e}")
    skipped = f", {len(result['skipped'])} skipped" if result["skipped"] else ""
    print(f"{len(result['images'])} image(s) predicted{skipped}: {Path(args.output_dir) / 'predictions.json'}",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
