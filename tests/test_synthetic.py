"""The synthetic scene generator: determinism, label consistency, the loader path, CLI, speed."""
import json
import os
import time

import numpy as np
import pytest
import torch

from ctal.data import build_dataset
from ctal.data import synthetic as S

SIZE = (24, 32)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    S.generate(root, 6, 2, size=SIZE, seed=3, progress=False, workers=1)
    return root


def _load(root, split, folder, i):
    return np.load(root / split / folder / f"{i}.npy")


def test_layout_and_meta(syn_root):
    meta = json.loads((syn_root / "meta.json").read_text())
    assert meta["num_classes"] == len(S.CLASSES) == 7 and meta["classes"][:3] == ["floor", "wall", "ceiling"]
    assert meta["num"] == {"train": 6, "val": 2} and meta["size"] == list(SIZE)
    for folder in ("image", "label", "depth", "normal", "edge", "sal"):
        assert sorted(os.listdir(syn_root / "train" / folder)) == sorted(f"{i}.npy" for i in range(6))
    assert _load(syn_root, "train", "image", 0).shape == SIZE + (3,)
    assert _load(syn_root, "train", "depth", 0).shape == SIZE + (1,)


def test_deterministic_by_seed(syn_root, tmp_path):
    S.generate(tmp_path / "again", 6, 2, size=SIZE, seed=3, progress=False, workers=2)   # other worker count
    S.generate(tmp_path / "other", 2, 0, size=SIZE, seed=4, progress=False, workers=1)
    for folder in ("image", "label", "depth", "normal", "edge", "sal"):
        np.testing.assert_array_equal(_load(syn_root, "train", folder, 5), _load(tmp_path / "again", "train", folder, 5))
    assert not np.array_equal(_load(syn_root, "train", "image", 1), _load(tmp_path / "other", "train", "image", 1))
    # train and val scenes differ
    assert not np.array_equal(_load(syn_root, "train", "image", 0), _load(syn_root, "val", "image", 0))


def test_labels_are_mutually_consistent():
    H, W = 48, 64
    for i in range(4):
        scene = S._sample_scene(np.random.default_rng([9, 0, i]))
        out = S.render_scene(scene, (H, W))
        label, depth, normal, edge, sal, inst = (out[k] for k in ("label", "depth", "normal", "edge", "sal", "instance"))
        assert set(np.unique(label)) <= set(range(len(S.CLASSES)))
        # saliency = exactly the primitives (class ids of sphere/box/cylinder/cone)
        np.testing.assert_array_equal(sal, label >= S.CLASSES.index("sphere"))
        assert np.all(depth > 0) and np.all(np.isfinite(depth))
        np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-6)
        # visible surfaces face the camera: normal . view ray < 0 (pinhole rays in camera coordinates)
        f = (W / 2) / np.tan(scene["cam"]["fov"] / 2)
        v, u = np.mgrid[0:H, 0:W]
        ray = np.stack([(u + 0.5 - W / 2) / f, (v + 0.5 - H / 2) / f, np.ones((H, W))], -1)
        assert np.all(np.einsum("hwc,hwc->hw", normal, ray) < 0)
        # every change of instance between horizontal neighbours is marked as an edge on the left
        change = inst[:, :-1] != inst[:, 1:]
        assert np.all(edge[:, :-1][change])
        # the floor is one plane: all its normals are equal
        floor = normal[label == S.CLASSES.index("floor")]
        assert floor.size and np.allclose(floor, floor[0], atol=1e-6)
        # floor depth grows towards the horizon (up the image) in every column where it is visible
        fl = label == 0
        col = int(np.argmax(fl.sum(0)))
        rows = np.nonzero(fl[:, col])[0]
        assert np.all(np.diff(depth[rows, col]) < 0)


def test_sphere_geometry_matches_its_normals():
    # a lone sphere in front of the camera: its silhouette pixel nearest the camera axis has the
    # smallest depth among sphere pixels, and the normal there points back at the camera
    rng = np.random.default_rng(0)
    scene = S._sample_scene(rng)
    scene["objects"] = [{"kind": "sphere", "r": 0.5, "c": scene["cam"]["pos"] + np.array([0, 0, 3.0]),
                         "color": np.array([0.5, 0.5, 0.5]), "pattern": 0, "freq": 1.0, "spec": 0.0}]
    scene["objects"][0]["c"][1] = 0.5
    scene["cam"].update(yaw=0.0, pitch=0.0)
    scene["cam"]["pos"][1] = 0.5
    out = S.render_scene(scene, (33, 33))
    assert out["label"][16, 16] == S.CLASSES.index("sphere")
    assert out["depth"][16, 16] == pytest.approx(2.5, rel=1e-6)       # 3 m to the centre minus 0.5 m
    np.testing.assert_allclose(out["normal"][16, 16], [0, 0, -1], atol=1e-6)


def test_loader_reads_generated_data(syn_root):
    ds = build_dataset("synthetic", syn_root, "train", tasks=["semseg", "depth", "normals", "edge", "sal"], augment=True)
    assert ds.num_classes == {"semseg": 7} and ds.size == SIZE and len(ds) == 6
    s = ds[2]
    assert s["semseg"].dtype == torch.int64 and s["edge"].shape == (1,) + SIZE and s["sal"].max() <= 1
    val = build_dataset("synthetic", syn_root, "val")
    assert val.tasks == ("semseg", "depth", "normals") and len(val) == 2
    with pytest.raises(FileNotFoundError, match="ctal.data.synthetic"):
        build_dataset("synthetic", syn_root / "missing", "train")


def test_ensure_skips_complete_and_repairs_incomplete(tmp_path):
    root = tmp_path / "s"
    S.ensure(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)
    stamp = (root / "meta.json").stat().st_mtime_ns
    S.ensure(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    (root / "train" / "edge" / "2.npy").unlink()
    assert not S.is_complete(root, 3, 1, size=SIZE, seed=0)
    S.ensure(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)
    assert S.is_complete(root, 3, 1, size=SIZE, seed=0)
    assert not S.is_complete(root, 3, 1, size=SIZE, seed=1)       # another seed is another dataset
    with pytest.raises(ValueError, match="size"):
        S.ensure(root, 3, 1, size=(4, 4))


def test_cli(tmp_path, capsys):
    assert S.main(["--out", str(tmp_path / "cli"), "--num", "3", "--num-val", "1", "--size", "16", "24",
                   "--seed", "5", "--workers", "1", "--no-progress"]) == 0
    assert S.is_complete(tmp_path / "cli", 3, 1, size=(16, 24), seed=5)
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "bad"), "--num", "-1"])


@pytest.mark.slow
def test_speed_1000_images_at_96x128_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    S.generate(tmp_path / "big", 1000, 0, size=(96, 128), seed=0, progress=False)
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_small_net_learns_the_synthetic_scenes(tmp_path):
    """The data must be learnable: a tiny conv net beats trivial predictors clearly in ~1 minute."""
    from torch import nn

    from ctal.losses import MultiTaskLoss
    from ctal.metrics import DepthMeter, SegMeter

    torch.manual_seed(0)
    S.generate(tmp_path / "d", 192, 48, size=(32, 48), seed=0, progress=False)
    tasks = ["semseg", "depth"]
    train = build_dataset("synthetic", tmp_path / "d", "train", tasks=tasks, augment=True)
    val = build_dataset("synthetic", tmp_path / "d", "val", tasks=tasks)

    def block(i, o, d=1):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=d, dilation=d), nn.BatchNorm2d(o), nn.ReLU())

    body = nn.Sequential(block(3, 32), block(32, 32, 2), block(32, 32, 4), block(32, 32, 8), block(32, 32))
    heads = nn.ModuleDict({"semseg": nn.Conv2d(32, 7, 1), "depth": nn.Conv2d(32, 1, 1)})
    crit = MultiTaskLoss(tasks)
    opt = torch.optim.Adam(list(body.parameters()) + list(heads.parameters()), 3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, drop_last=True)
    for _ in range(12):
        for b in loader:
            f = body(b["image"])
            total, _ = crit({t: heads[t](f) for t in tasks}, b)
            opt.zero_grad()
            total.backward()
            opt.step()
    body.eval()
    seg, dep = SegMeter(7), DepthMeter()
    labels, depths = [], []
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(val, batch_size=48):
            f = body(b["image"])
            seg.update(heads["semseg"](f), b["semseg"])
            dep.update(heads["depth"](f), b["depth"])
            labels.append(b["semseg"])
            depths.append(b["depth"])
    labels, depths = torch.cat(labels), torch.cat(depths)
    majority = (labels == labels.flatten().mode().values).float().mean().item() * 100
    mean_pred_err = (depths - depths.mean()).abs().mean().item()
    assert seg.compute()["pixel_acc"] > majority + 20
    assert dep.compute()["abs_err"] < 0.6 * mean_pred_err
