"""``python -m ctal.export``: ONNX (run through onnxruntime), TorchScript and ExportedProgram files
whose outputs equal the PyTorch model's, with the CTAL op in a form of standard ops.

Tolerance (``ctal.export.TOLERANCE``): fp32, relative error ``||a - b|| / ||b||`` of each whole
output below 1e-4 against the model as trained (its own CTAL backend); measured errors are
around 1e-7.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctal import export as E, predict as P
from ctal.engine.build import model_from_checkpoint

from tests.helpers import rel_err, tiny_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def trained(ckpt):
    return model_from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # another batch size


def _want(trained, images):
    with torch.no_grad():
        out = trained.model(images)["final"]
    return [out[t] for t in trained.tasks]


def _check(got, trained, images):
    assert len(got) == len(trained.tasks)
    for t, g, w in zip(trained.tasks, got, _want(trained, images)):
        assert g.shape == w.shape, t
        assert rel_err(g, w) < E.TOLERANCE, (t, rel_err(g, w))


def test_onnx_round_trip_through_onnxruntime(ckpt, trained, images, capsys):
    out = ckpt.with_name("model.onnx")
    result = E.main([str(ckpt), "--format", "onnx", "-o", str(out)])
    assert result["max_rel_err"] < E.TOLERANCE and "wrote" in capsys.readouterr().err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == trained.tasks
    got = [torch.from_numpy(a) for a in session.run(None, {"image": images.numpy()})]
    _check(got, trained, images)
    model = onnx.load(str(out))
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert not any("ctal" in d or "ctal" in o.lower() for d, o in ops), ops  # standard ops only
    assert any(o == "MatMul" for _, o in ops)  # the linear form's GEMMs
    meta = json.loads({p.key: p.value for p in model.metadata_props}["ctal"])
    assert meta == E.read_metadata(out)
    assert meta["ctal_backend"] == "linear-traceable" and "matmuls" in meta["ctal_form"]
    assert meta["tasks"] == trained.tasks and meta["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["input"]["mean"] == [0.485, 0.456, 0.406]
    assert [o["name"] for o in meta["outputs"]] == trained.tasks
    # ctal.predict runs the file like the checkpoint
    img = [np.random.default_rng(0).random((20, 44, 3), dtype=np.float32)]
    from_file, from_ckpt = P.Predictor.load(out)(img)[0], P.Predictor.from_model(trained, "cpu")(img)[0]
    assert np.array_equal(from_file["semseg"], from_ckpt["semseg"])
    assert np.allclose(from_file["depth"], from_ckpt["depth"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_round_trip(fmt, ckpt, trained, images):
    # verified here on another batch size (export's own check, the same code, runs in the ONNX test)
    path = E.export(ckpt, format=fmt, verify=False)["path"]
    assert path.endswith(E.FORMATS[fmt])
    if fmt == "exported-program":
        program = torch.export.load(path)
        assert not [n for n in program.graph.nodes if getattr(n.target, "namespace", None) == "ctal"]
        with torch.no_grad():
            got = program.module()(images)
    else:
        got = E.run_exported(path, images)
    _check(got, trained, images)
    meta = E.read_metadata(path)
    assert meta["format"] == fmt and meta["ctal_backend"] == "linear-traceable"
    assert meta["class_names"]["semseg"] == list(trained.class_names["semseg"])


def test_only_standard_op_forms_are_exported(ckpt):
    with pytest.raises(ValueError, match="custom op"):
        E.export(ckpt, format="onnx", ctal_backend="linear")
    assert set(E.EXPORT_BACKENDS) == {"linear-traceable", "reference"}


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        E.main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code) if isinstance(info.value.code, str) else capsys.readouterr().err


def test_cli_errors_name_the_argument(ckpt, tmp_path, capsys):
    assert "checkpoint" in _error([str(tmp_path / "missing.pt")], capsys)
    assert "argument --format" in _error([str(ckpt), "--format", "tflite"], capsys)
    assert "argument --ctal-backend" in _error([str(ckpt), "--ctal-backend", "cpp"], capsys)
    assert "does not exist" in _error([str(ckpt), "-o", str(tmp_path / "no" / "m.onnx")], capsys)
    assert "ending in '.onnx'" in _error([str(ckpt), "-o", str(tmp_path / "m.pt2")], capsys)
    plain = tmp_path / "weights.pt"
    torch.save(torch.load(ckpt, weights_only=False)["model"], plain)
    assert "trainer checkpoint" in _error([str(plain)], capsys)
