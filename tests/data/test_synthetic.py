"""The synthetic scene generator: determinism, label consistency, the loader path, CLI, speed,
and where it may write (never over files it did not write; atomic files; no orphaned workers)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ctal.data import build_dataset
from ctal.data import synthetic as S

SIZE = (24, 32)
from tests.helpers import ROOT


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


# ---------------------------------------------------------------- where the generator may write

def _snapshot(root):
    """Every path under ``root`` -> file bytes and mtime (None for folders, link target for links)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = None
        else:
            out[rel] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def _fake_nyuv2(root, counts=(("train", 3), ("val", 2))):
    """A real dataset in the NYUv2 layout (which the synthetic layout shares)."""
    for split, n in counts:
        for kind, shape in (("image", (8, 8, 3)), ("label", (8, 8)), ("depth", (8, 8, 1)), ("normal", (8, 8, 3))):
            d = root / split / kind
            d.mkdir(parents=True)
            for i in range(n):
                np.save(d / f"{i}.npy", np.full(shape, 0.25, np.float32))


def test_refuses_to_write_into_a_real_dataset(tmp_path):
    root = tmp_path / "nyuv2"
    _fake_nyuv2(root)
    before = _snapshot(root)
    for call in (lambda: S.ensure(root, 3, 2, size=SIZE, progress=False, workers=1),
                 lambda: S.generate(root, 3, 2, size=SIZE, progress=False, workers=1),
                 lambda: S.generate(root, 1, 0, size=SIZE, progress=False, workers=2)):
        with pytest.raises(S.ForeignFilesError) as info:
            call()
        assert isinstance(info.value, FileExistsError)  # train.py prints those as a one-line error
        msg = str(info.value)
        assert "\n" not in msg and str(root) in msg
        assert "20 entries" in msg and "train/depth/0.npy" in msg and "no meta.json" in msg
        assert "--config" in msg and "data.root" in msg and "delete the folder" in msg
        assert _snapshot(root) == before


def test_trainer_refuses_a_real_dataset_as_synthetic_root(tmp_path):
    from ctal.engine.build import build_data
    root = tmp_path / "nyuv2"
    _fake_nyuv2(root)
    before = _snapshot(root)
    cfg = {"data": {"dataset": "synthetic", "root": str(root), "tasks": ["semseg", "depth", "normals"],
                    "generate": {"num_train": 3, "num_val": 2, "size": list(SIZE), "seed": 0, "workers": 1}}}
    with pytest.raises(FileExistsError, match="refusing to write synthetic data"):
        build_data(cfg, "train")
    assert _snapshot(root) == before


def test_cli_refuses_a_foreign_folder_even_with_force(tmp_path, capsys):
    root = tmp_path / "nyuv2"
    _fake_nyuv2(root)
    before = _snapshot(root)
    for extra in ([], ["--force"]):
        with pytest.raises(SystemExit) as info:
            S.main(["--out", str(root), "--num", "3", "--num-val", "2", "--size", "24", "32", "--workers", "1",
                    "--no-progress"] + extra)
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("python -m ctal.data.synthetic: error: refusing to write synthetic data to ")
        assert err.count("\n") == 1 and str(root) in err
        assert _snapshot(root) == before


@pytest.mark.parametrize("extra", ["notes.txt", "train/image/photo.png", "train/label_19/0.npy",
                                   "val/depth/007.npy", "train/edge/.keep", "test/image/0.npy"])
def test_refuses_foreign_files_next_to_an_earlier_generation(tmp_path, extra):
    root = tmp_path / "s"
    S.generate(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)
    p = root / extra
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"not generated")
    before = _snapshot(root)
    for call in (lambda: S.ensure(root, 3, 1, size=SIZE, seed=1, progress=False, workers=1),   # other params
                 lambda: S.generate(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)):  # --force
        with pytest.raises(S.ForeignFilesError, match=r"besides an earlier synthetic generation it holds 1 entry"
                                                      r" .*" + re.escape(extra.split("/")[0])):
            call()
        assert _snapshot(root) == before


def test_refuses_symlinks_out_of_the_folder(tmp_path):
    elsewhere = tmp_path / "real"
    _fake_nyuv2(elsewhere, counts=(("val", 2),))
    root = tmp_path / "s"
    S.generate(root, 2, 1, size=SIZE, seed=0, progress=False, workers=1)
    for f in (root / "val").iterdir():
        for g in f.iterdir():
            g.unlink()
        f.rmdir()
    (root / "val").rmdir()
    (root / "val").symlink_to(elsewhere / "val", target_is_directory=True)
    before, outside = _snapshot(root), _snapshot(elsewhere)
    with pytest.raises(S.ForeignFilesError, match=r"e\.g\. val \(symlink\)"):
        S.generate(root, 2, 1, size=SIZE, seed=0, progress=False, workers=1)
    assert _snapshot(root) == before and _snapshot(elsewhere) == outside


def test_generates_into_a_missing_or_empty_folder_but_not_onto_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "new" / "nested"):
        S.ensure(root, 2, 1, size=SIZE, seed=0, progress=False, workers=1)
        assert S.is_complete(root, 2, 1, size=SIZE, seed=0)
        meta = json.loads((root / "meta.json").read_text())
        assert meta["generator"] == "ctal.data.synthetic"
        assert sorted(os.listdir(root)) == ["meta.json", "train", "val"]  # the marker is gone
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(S.ForeignFilesError, match="not a folder"):
        S.generate(f, 2, 1, size=SIZE, progress=False, workers=1)
    assert f.read_text() == "mine"


def test_regenerates_an_earlier_generation_with_other_parameters(tmp_path):
    root = tmp_path / "s"
    S.generate(root, 2, 1, size=SIZE, seed=0, progress=False, workers=1)
    # a generation whose meta.json predates the "generator" field is recognised by its "format"
    meta = json.loads((root / "meta.json").read_text())
    del meta["generator"]
    (root / "meta.json").write_text(json.dumps(meta))
    S.ensure(root, 2, 1, size=(16, 24), seed=5, progress=False, workers=1)
    assert S.is_complete(root, 2, 1, size=(16, 24), seed=5)
    assert _load(root, "train", "image", 0).shape == (16, 24, 3)


def test_shrinking_an_existing_generation_removes_the_surplus(tmp_path):
    root = tmp_path / "s"
    S.ensure(root, 6, 3, size=SIZE, seed=0, progress=False, workers=1)
    S.ensure(root, 4, 1, size=SIZE, seed=0, progress=False, workers=1)
    for split, n in (("train", 4), ("val", 1)):
        assert len(build_dataset("synthetic", root, split)) == n
        for folder in ("image", "label", "depth", "normal", "edge", "sal"):
            assert sorted(os.listdir(root / split / folder)) == sorted(f"{i}.npy" for i in range(n))
    # a surplus file makes the folder incomplete (the loader would reject it), so ensure repairs it
    (root / "train" / "image" / "4.npy").write_bytes((root / "train" / "image" / "0.npy").read_bytes())
    assert not S.is_complete(root, 4, 1, size=SIZE, seed=0)
    S.ensure(root, 4, 1, size=SIZE, seed=0, progress=False, workers=1)
    assert len(build_dataset("synthetic", root, "train")) == 4


def test_cli_force_shrinks_as_the_loader_advises(tmp_path):
    root = tmp_path / "s"
    args = ["--out", str(root), "--size", "24", "32", "--workers", "1", "--no-progress"]
    assert S.main(args + ["--num", "5", "--num-val", "2"]) == 0
    assert S.main(args + ["--num", "3", "--num-val", "1", "--force"]) == 0
    assert len(build_dataset("synthetic", root, "train")) == 3
    assert len(build_dataset("synthetic", root, "val")) == 1


def test_an_interrupted_generation_leaves_no_partial_file_and_is_regenerated(tmp_path, monkeypatch):
    root = tmp_path / "s"
    real_write = np.lib.format.write_array
    calls = []

    def disk_full_on_the_9th_file(fp, array, *a, **k):
        calls.append(1)
        if len(calls) == 9:  # scene 1's third file: half written, then the disk is full
            fp.write(b"\x93NUMPY\x01\x00")
            raise OSError(28, "No space left on device")
        return real_write(fp, array, *a, **k)

    monkeypatch.setattr(np.lib.format, "write_array", disk_full_on_the_9th_file)
    with pytest.raises(OSError, match="No space"):
        S.generate(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)
    monkeypatch.undo()
    written = sorted(root.rglob("*.npy"))
    assert len(written) == 8
    for p in written:  # every file under a real name is whole
        np.load(p)
    assert not list(root.rglob("*.tmp")) and not (root / "meta.json").exists()
    assert not S.is_complete(root, 3, 1, size=SIZE, seed=0)
    # what a SIGKILL mid-write leaves behind: a temp file of the generator's own
    (root / "train" / "depth" / ".1.npy.4242.tmp").write_bytes(b"\x93NUMPY")
    # no meta.json, but the marker written first identifies the folder as an interrupted generation
    S.ensure(root, 3, 1, size=SIZE, seed=0, progress=False, workers=1)
    assert S.is_complete(root, 3, 1, size=SIZE, seed=0)
    assert not list(root.rglob("*.tmp"))
    assert len(build_dataset("synthetic", root, "train")) == 3


# ---------------------------------------------------------------- worker processes

_BIG_JOB = r"""
import sys
from ctal.data import synthetic as S
if sys.argv[2] == "no-prctl":
    S._set_parent_death_signal = lambda: False  # exercise the getppid watchdog instead
S.generate(sys.argv[1], 50000, 0, size=(48, 64), progress=False, workers=2)
"""


def _proc_stat(pid):
    """(state, ppid, start time) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), fields[19]


def _live_children(pid):
    """{pid: start time} of the live children of ``pid``."""
    out = {}
    for d in os.listdir("/proc"):
        st = _proc_stat(d) if d.isdigit() else None
        if st and st[1] == pid and st[0] != "Z":
            out[int(d)] = st[2]
    return out


def _still_alive(procs):
    alive = []
    for pid, start in procs.items():
        st = _proc_stat(pid)
        if st and st[0] != "Z" and st[2] == start:  # same start time: not a reused pid
            alive.append(pid)
    return alive


def _wait_gone(kids, seconds):
    """The pids of ``kids`` still alive after up to ``seconds``; those are killed before returning."""
    deadline = time.monotonic() + seconds
    while _still_alive(kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _still_alive(kids)
    for pid in left:  # do not leave them running after a failure
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.parametrize("mode", ["prctl", "no-prctl"])
def test_workers_exit_when_the_parent_is_killed(tmp_path, mode):
    root = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-c", _BIG_JOB, str(root), mode], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    kids = {}
    while not (len(kids) >= 2 and any((root / "train" / "image").glob("*.npy"))):  # both workers, rendering
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            err = p.communicate()[1].decode()[-2000:]
            _wait_gone(kids, 0)
            pytest.fail(f"the generation did not get going (rc={p.returncode}): {err}")
        time.sleep(0.05)
        kids = _live_children(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert not _wait_gone(kids, 5), f"render workers outlived their SIGKILLed parent ({mode})"


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
