"""``python -m ctal.predict``: images of any size and mode in, per-task maps out; bad input is a
clear error naming the argument."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctal import predict as P
from ctal.engine.build import model_from_checkpoint

from tests.helpers import tiny_checkpoint

TASKS = ["semseg", "depth", "normals", "edge", "sal"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("predict"), **{"data.tasks": f"[{', '.join(TASKS)}]"})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG and JPEG files of different sizes, grayscale, RGBA, 16-bit, one broken, one not an
    image (ignored in a folder)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(rgb(40, 56)).save(d / "wide.png")
    Image.fromarray(rgb(50, 30)).save(d / "tall.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(d / "gray.png")
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)).save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (17, 19), dtype=np.uint16)).save(d / "deep.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def run(ckpt, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "out"
    notes = []
    result = P.predict(ckpt, [images], out, batch_size=2, device="cpu", progress=False, log=notes.append)
    return result, out, notes


@pytest.fixture(scope="module")
def predictor(ckpt):
    return P.Predictor.from_model(model_from_checkpoint(ckpt), "cpu")


def test_every_image_and_task(run, images):
    result, out, notes = run
    sizes = {"wide": (40, 56), "tall": (50, 30), "gray": (24, 20), "rgba": (33, 47), "deep": (17, 19)}
    assert sorted(i["name"] for i in result["images"]) == sorted(sizes)
    assert result["tasks"] == TASKS and result["input_size"] == [32, 32]
    ncls = result["num_classes"]["semseg"]
    for name, (H, W) in sizes.items():
        folder = out / name
        ids = np.load(folder / "semseg.npy")
        assert ids.shape == (H, W) and ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < ncls
        depth = np.load(folder / "depth.npy")
        assert depth.shape == (H, W) and depth.dtype == np.float32 and np.isfinite(depth).all()
        normals = np.load(folder / "normals.npy")
        assert normals.shape == (3, H, W)
        assert np.allclose(np.linalg.norm(normals, axis=0), 1, atol=1e-5)
        for task in ("edge", "sal"):
            p = np.load(folder / f"{task}.npy")
            assert p.shape == (H, W) and p.min() >= 0 and p.max() <= 1
        for task in TASKS:
            with Image.open(folder / f"{task}.png") as im:
                assert im.size == (W, H) and im.mode == "RGB"
        assert not (folder / "figure.png").exists()
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["images"] == result["images"] and saved["outputs"]["depth"].endswith("metres")


def test_conversions_and_skips_are_reported(run, images):
    result, _, notes = run
    by_name = {i["name"]: i["note"] for i in result["images"]}
    assert by_name["wide"] is None and by_name["tall"] is None
    assert "grayscale" in by_name["gray"] and "3 channels" in by_name["gray"]
    assert "alpha" in by_name["rgba"]
    assert "16-bit" in by_name["deep"]
    assert [s["source"] for s in result["skipped"]] == [str(images / "broken.jpg")]
    assert "not a readable image" in result["skipped"][0]["reason"]
    assert any("skipped" in n and "broken.jpg" in n for n in notes)
    assert any("gray.png" in n and "grayscale" in n for n in notes)
    assert not any("notes.txt" in n for n in notes)  # a folder's non-image files are not inputs


def test_figures(ckpt, images, tmp_path):
    result = P.predict(ckpt, [images / "tall.jpg"], tmp_path, device="cpu", figures=True, progress=False)
    assert result["images"][0]["files"]["figure"] == ["tall/figure.png"]
    with Image.open(tmp_path / "tall" / "figure.png") as im:
        assert im.mode == "RGB" and im.size[0] > 3 * 30  # panels side by side, at least 3 wide


def test_an_image_at_the_input_size_gets_the_models_own_prediction(predictor):
    """No resize either way: the ids are the argmax of the model's logits on the normalized image."""
    img = np.random.default_rng(1).random((32, 32, 3), dtype=np.float32)
    pred = predictor([img])[0]
    x = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor(P.IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        out = predictor.model(x[None])["final"]
    assert np.array_equal(pred["semseg"], out["semseg"][0].argmax(0).numpy())
    assert np.allclose(pred["depth"], out["depth"][0, 0].numpy(), atol=1e-6)
    assert np.allclose(pred["edge"], out["edge"][0, 0].sigmoid().numpy(), atol=1e-6)


def test_class_ids_are_resized_with_nearest(predictor):
    """Upsampled ids are ids the model predicted (no blend of two classes), and big images are
    brought down to the input size."""
    small = np.random.default_rng(2).random((32, 32, 3), dtype=np.float32)
    big = np.kron(small, np.ones((3, 3, 1), np.float32))  # 96x96, each pixel 3x3
    a, b = predictor([small, big])
    assert b["semseg"].shape == (96, 96)
    assert set(np.unique(b["semseg"])) <= set(np.unique(a["semseg"]))


# --- the command line and its errors --------------------------------------------------------------

def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        P.main(argv)
    assert info.value.code not in (0, None)
    msg = str(info.value.code) if isinstance(info.value.code, str) else capsys.readouterr().err
    return msg


def test_cli_files_and_globs(ckpt, images, tmp_path, capsys):
    out = tmp_path / "cli"
    result = P.main([str(ckpt), str(images / "wide.png"), str(images / "*.jpg"), "-o", str(out),
                     "--device", "cpu", "--ctal-backend", "linear", "--no-progress"])
    assert [i["name"] for i in result["images"]] == ["wide", "tall"]
    assert [s["source"] for s in result["skipped"]] == [str(images / "broken.jpg")]
    assert result["ctal_backend"] == "linear"
    assert "2 image(s) predicted, 1 skipped" in capsys.readouterr().err


def test_cli_errors_name_the_argument(ckpt, images, tmp_path, capsys):
    ok = [str(ckpt), str(images), "-o", str(tmp_path / "o"), "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "INPUT" in _error([str(ckpt), str(tmp_path / "nope.png")], capsys)
    assert "no such file or folder" in _error([str(ckpt), str(tmp_path / "nope.png")], capsys)
    assert "holds no image files" in _error([str(ckpt), str(empty)], capsys)
    assert "matches no file" in _error([str(ckpt), str(tmp_path / "*.png")], capsys)
    assert "checkpoint" in _error([str(tmp_path / "missing.pt"), str(images)], capsys)
    assert "argument --device" in _error(ok + ["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], capsys)
    assert "argument --device" in _error(ok + ["--device", "tpu"], capsys)
    assert "argument --ctal-backend" in _error(ok + ["--ctal-backend", "fastest"], capsys)
    assert "argument --batch-size" in _error(ok + ["--batch-size", "0"], capsys)
    (tmp_path / "file").write_text("x")
    assert "not a folder" in _error([str(ckpt), str(images), "-o", str(tmp_path / "file")], capsys)
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "a.png").write_bytes(b"garbage")
    assert "none of the 1 input file(s) could be read" in _error([str(ckpt), str(only_broken), "-o",
                                                                    str(tmp_path / "o2"), "--no-progress"], capsys)


def test_other_checkpoint_formats_are_refused_clearly(ckpt, images, tmp_path, capsys):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    plain = tmp_path / "weights.pt"
    torch.save(state["model"], plain)  # a bare state dict
    msg = _error([str(plain), str(images)], capsys)
    assert "not a ctal checkpoint" in msg and "trainer checkpoint" in msg
    no_config = tmp_path / "model_only.pt"
    torch.save({"model": state["model"]}, no_config)
    assert "not the config" in _error([str(no_config), str(images)], capsys)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "could not be read" in _error([str(text), str(images)], capsys)
    fake = tmp_path / "model.onnx"  # an exported model by its name only
    fake.write_text("hello")
    assert "could not be read as an ONNX model" in _error([str(fake), str(images)], capsys)
