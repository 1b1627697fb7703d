"""Export a trained model for deployment: ONNX, TorchScript or a torch.export ExportedProgram.

    python -m ctal.export outputs/synthetic_ctal/best.pt --format onnx
    python -m ctal.export best.pt --format torchscript -o model.torchscript.pt
    python -m ctal.export best.pt --format exported-program --ctal-backend reference

The exported model takes one input, ``image``: float32 ``(B, 3, H, W)`` RGB in [0, 1], then
ImageNet-normalized (``(x - mean) / std``), at the model's input size (the batch size may vary);
its outputs are the model's final predictions, one per task in the model's task order, named by
task, exactly as the PyTorch model returns them: class logits (semseg, human_parts), depth,
unnormalized normals, edge / saliency logits. ``python -m ctal.predict FILE IMAGES`` runs a
``.onnx``, ``.pt2`` or ``.torchscript.pt`` file with the post-processing.

The CTAL op is exported in a form made of standard ops, since the ``ctal::`` custom ops exist
only where ctal is installed (ONNX Runtime has none): by default ``linear-traceable``, the exact
linear form as plain matmuls (O(N) memory); ``--ctal-backend reference`` exports the literal
N x N form instead. After writing, the file is run on a random batch and its outputs are
compared with the PyTorch model's as trained (its own backend); a relative error
``||a - b|| / ||b||`` above :data:`TOLERANCE` on any output is an error (``--no-verify`` skips
this; ONNX needs ``onnxruntime`` for it).

Metadata (a JSON object, :func:`read_metadata` reads it back from any format): tasks, classes and
class names, the input's size and normalization, each output's meaning, the CTAL form, the
checkpoint. Where it lives: ONNX ``metadata_props["ctal"]``, TorchScript the extra file
``ctal.json``, ExportedProgram the extra file ``ctal.json`` of ``torch.export.save``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import __version__
from ._io import atomic_write
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .engine.build import TrainedModel, model_from_checkpoint, set_ctal_backend
from .engine.checkpoint import CheckpointError
from .nn import CrossTaskAffinity

__all__ = ["export", "export_model", "read_metadata", "load_exported", "run_exported", "is_exported", "FORMATS",
           "EXPORT_BACKENDS", "TOLERANCE", "ExportError", "main"]

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
# CTAL backends made of standard ops only (no ctal:: custom op), and what the file then computes.
EXPORT_BACKENDS = {
    "linear-traceable": "exact linear form: plain matmuls, O(N) memory (docs/design.md section 2)",
    "reference": "literal form: T affinity matrices of N x N (docs/design.md section 1)",
}
# fp32, relative error over each whole output: float sums in another order (ONNX Runtime's
# kernels, the linear form instead of the run's backend) stay orders of magnitude below it.
TOLERANCE = 1e-4
METADATA_KEY = "ctal"
EXTRA_FILE = "ctal.json"
OUTPUT_MEANING = {
    "semseg": "class logits (argmax = class id)", "human_parts": "part logits (argmax = part id)",
    "depth": "depth in metres", "normals": "surface normals, not normalized (normalize over channels)",
    "edge": "edge logit (sigmoid = probability)",
    "sal": "saliency logits (1 channel: sigmoid; 2 channels: softmax channel 1 = salient)",
}


class ExportError(RuntimeError):
    """Export failed, or the file's outputs differ from the PyTorch model's."""


class _Outputs(nn.Module):
    """The model with a flat output: the final predictions as a tuple in task order (exporters
    want tensors, not the nested dict)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.tasks = list(model.tasks)

    def forward(self, image: Tensor):
        out = self.model(image)["final"]
        return tuple(out[t] for t in self.tasks)


def _metadata(model: nn.Module, trained: Optional[TrainedModel], fmt: str, backend: str) -> dict:
    H, W = model.input_size
    inverse = bool(trained and trained.inverse_depth)
    meaning = dict(OUTPUT_MEANING)
    if inverse:
        meaning["depth"] = "inverse depth (the training data's unit)"
    seg = {t: n for t, n in model.num_outputs.items() if t in ("semseg", "human_parts")}
    names = trained.class_names if trained else {t: [f"class {i}" for i in range(n)] for t, n in seg.items()}
    source = (dict(checkpoint=str(trained.checkpoint), epoch=trained.epoch,
                   backbone=trained.config["model"].get("backbone"), dataset=trained.config["data"]["dataset"])
              if trained else dict(checkpoint=None, epoch=None, backbone=None, dataset=None))
    ctal = _has_ctal(model)
    return dict(
        format=fmt, ctal_version=__version__, torch=torch.__version__, **source,
        model=getattr(model, "model_name", type(model).__name__),
        tasks=list(model.tasks), num_classes=seg, inverse_depth=inverse,
        class_names={t: list(v) for t, v in names.items()},
        input=dict(name="image", shape=["batch", 3, H, W], dtype="float32",
                   layout="RGB in [0, 1], then (x - mean) / std per channel",
                   mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        outputs=[dict(name=t, shape=["batch", model.num_outputs[t], H, W], meaning=meaning[t])
                 for t in model.tasks],
        ctal_backend=backend if ctal else None, ctal_form=EXPORT_BACKENDS[backend] if ctal else None,
    )


def _has_ctal(model: nn.Module) -> bool:
    return any(isinstance(m, CrossTaskAffinity) for m in model.modules())


@contextlib.contextmanager
def _quiet():
    """Silences the exporters' expected chatter: the model's shape checks become constants in a
    trace (the input size is fixed; only the batch varies), TorchScript's deprecation notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.(trace|save|load|script).*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=DeprecationWarning)
        yield


def _write_onnx(wrapper: nn.Module, example: Tensor, out: Path, meta: dict, opset: Optional[int]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    kw = {} if opset is None else dict(opset_version=opset)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["image"],
                                    output_names=list(wrapper.tasks), dynamic_shapes={"image": {0: batch}},
                                    verbose=False, **kw)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.producer_name = "ctal.export"
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))


def _write_torchscript(wrapper: nn.Module, example: Tensor, out: Path, meta: dict) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files={EXTRA_FILE: json.dumps(meta)}))


def _write_exported_program(wrapper: nn.Module, example: Tensor, out: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(wrapper, (example,), dynamic_shapes={"image": {0: batch}})
    atomic_write(out, lambda f: torch.export.save(program, f, extra_files={EXTRA_FILE: json.dumps(meta)}))


def is_exported(path: Union[str, os.PathLike]) -> bool:
    """``path`` is named like a file of :func:`export` (``.onnx``, ``.pt2``, ``.torchscript.pt``);
    a plain ``.pt`` is taken for a checkpoint."""
    name = Path(path).name.lower()
    return name.endswith((".onnx", ".pt2", ".torchscript.pt"))


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".pt2"):
        return "exported-program"
    return "torchscript"


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The metadata :func:`export` stored in ``path`` (format from the suffix: ``.onnx``, ``.pt2``,
    else TorchScript), read without loading the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    if _format_of(path) == "onnx":
        import onnx

        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends, re-raised naming the file
            raise ExportError(f"{path} could not be read as an ONNX model ({type(e).__name__}: {e})") from e
        if METADATA_KEY not in props:
            raise ExportError(f"{path} has no {METADATA_KEY!r} metadata: not written by ctal.export")
        return json.loads(props[METADATA_KEY])
    # TorchScript and torch.export archives are zip files: <root>/extra/<name> holds extra files
    try:
        with zipfile.ZipFile(path) as z:
            member = next((n for n in z.namelist()
                           if n.count("/") == 2 and n.endswith(f"/extra/{EXTRA_FILE}")), None)
            if member is None:
                raise ExportError(f"{path} has no {EXTRA_FILE} extra file: not written by ctal.export")
            return json.loads(z.read(member))
    except zipfile.BadZipFile as e:
        raise ExportError(f"{path} is not a TorchScript or ExportedProgram archive ({e})") from e


def load_exported(path: Union[str, os.PathLike]):
    """A callable ``f(images (B, 3, H, W) tensor) -> tuple of output tensors`` running the file
    (ONNX through onnxruntime on the CPU)."""
    path = Path(path)
    fmt = _format_of(path)
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError("running an ONNX model needs onnxruntime (pip install onnxruntime)") from e
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: tuple(torch.from_numpy(o) for o in session.run(None, {name: x.detach().cpu().numpy()}))
    if fmt == "exported-program":
        module = torch.export.load(str(path)).module()
    else:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu")

    def run(x: Tensor):
        with torch.no_grad():
            return tuple(module(x))
    return run


def run_exported(path: Union[str, os.PathLike], images: Tensor) -> tuple:
    """:func:`load_exported` then one call: the file's outputs for ``images``."""
    return load_exported(path)(images)


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape or not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _check_choices(format: str, ctal_backend: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is unknown; expected one of {sorted(FORMATS)}")
    if ctal_backend not in EXPORT_BACKENDS:
        raise ValueError(f"ctal_backend {ctal_backend!r} cannot be exported: every other backend runs a "
                         f"ctal:: custom op, which ONNX Runtime and other consumers lack; use one of "
                         f"{sorted(EXPORT_BACKENDS)}")


def export(checkpoint, output: Optional[Union[str, os.PathLike]] = None, *, format: str = "onnx",
           ctal_backend: str = "linear-traceable", verify: bool = True, opset: Optional[int] = None) -> dict:
    """Export the model of a trainer checkpoint (see the module docstring) with
    :func:`export_model`. ``output`` defaults to the checkpoint's name with the format's suffix
    (``best.onnx``, ``best.torchscript.pt``, ``best.pt2``)."""
    _check_choices(format, ctal_backend)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    out = Path(output) if output is not None else checkpoint.with_name(checkpoint.stem + FORMATS[format])
    _check_output(out, format)
    return export_model(model_from_checkpoint(checkpoint), out, format=format, ctal_backend=ctal_backend,
                        verify=verify, opset=opset)


def _check_output(out: Path, format: str) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a folder; name the file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output {out}: its folder {out.parent} does not exist")
    if _format_of(out) != format:  # read_metadata and load_exported go by the suffix
        need = ("a name not ending in .onnx or .pt2" if format == "torchscript"
                else f"a name ending in {FORMATS[format]!r}")
        raise ValueError(f"output {out}: a {format} file needs {need}")
    if format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
        except ImportError as e:
            raise ExportError("ONNX export needs the onnx and onnxscript packages "
                              "(pip install 'ctal[export]')") from e


def export_model(model: Union[nn.Module, TrainedModel], output: Union[str, os.PathLike], *, format: str = "onnx",
                 ctal_backend: str = "linear-traceable", verify: bool = True, opset: Optional[int] = None) -> dict:
    """Export a ctal model (``tasks``, ``input_size``, ``num_outputs``), or a
    :class:`~ctal.engine.build.TrainedModel` (whose checkpoint, class names and depth unit go
    into the metadata), to ``output``; returns the metadata, plus ``path`` and, with ``verify``,
    ``max_rel_err`` (the largest relative error of an output against the PyTorch model's with
    its own CTAL backend, on a random batch). The model's CTAL blocks run ``ctal_backend`` while
    it is exported and get their own back afterwards."""
    _check_choices(format, ctal_backend)
    out = Path(output)
    _check_output(out, format)
    trained = model if isinstance(model, TrainedModel) else None
    net = (trained.model if trained else model).eval()
    H, W = net.input_size
    device = next(net.parameters()).device
    if device.type != "cpu":  # traces would bake the device in; the files are checked on the CPU
        raise ValueError(f"the model is on {device}; export it from the CPU (model.cpu())")
    # batch 2: an example of batch 1 would make the exporters specialize the batch size to 1
    example = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    wrapper = _Outputs(net).eval()
    meta = _metadata(net, trained, format, ctal_backend)
    if verify:
        with torch.no_grad():
            want = wrapper(example)  # the model as it is, its own CTAL backend
    own = {m: m.backend for m in net.modules() if isinstance(m, CrossTaskAffinity)}
    set_ctal_backend(net, ctal_backend)
    try:
        if format == "onnx":
            _write_onnx(wrapper, example, out, meta, opset)
        elif format == "torchscript":
            _write_torchscript(wrapper, example, out, meta)
        else:
            _write_exported_program(wrapper, example, out, meta)
    finally:
        for m, name in own.items():
            m.backend = name
    result = dict(meta, path=str(out))
    if not verify:
        return result
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            result["verified"] = "skipped: onnxruntime is not installed"
            return result
    got = run_exported(out, example)
    errs = {t: _rel_err(g, w) for t, g, w in zip(net.tasks, got, want)}
    result["max_rel_err"] = max(errs.values())
    if len(got) != len(want) or result["max_rel_err"] > TOLERANCE:
        raise ExportError(f"{out}: its outputs differ from the PyTorch model's (relative error per task "
                          f"{ {t: f'{e:.2g}' for t, e in errs.items()} }, tolerance {TOLERANCE:g})")
    result["verified"] = f"outputs match the PyTorch model's (largest relative error {result['max_rel_err']:.2g})"
    return result


# --- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ctal.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="trainer checkpoint (last.pt / best.pt of train.py)")
    ap.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="default: onnx")
    ap.add_argument("-o", "--output", default=None, help="file to write (default: next to the checkpoint, "
                    "e.g. best.onnx, best.torchscript.pt, best.pt2)")
    ap.add_argument("--ctal-backend", choices=sorted(EXPORT_BACKENDS), default="linear-traceable",
                    help="form of the CTAL op in the file (default: linear-traceable)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--no-verify", action="store_true", help="do not compare the file's outputs with PyTorch's")
    return ap


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        result = export(args.checkpoint, args.output, format=args.format, ctal_backend=args.ctal_backend,
                        verify=not args.no_verify, opset=args.opset)
    except (FileNotFoundError, IsADirectoryError, CheckpointError, ExportError, ValueError) as e:
        if os.environ.get("CTAL_TRACEBACK"):
            raise
        sys.exit(f"python -m ctal.export: error: {e}")
    print(f"wrote {result['path']} ({result['format']}, CTAL: {result['ctal_backend'] or 'none'}); "
          f"{result.get('verified', 'not verified')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
