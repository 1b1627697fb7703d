"""Loaders on tiny fixtures written in the real on-disk formats (including broken files)."""

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

from ctal.data import DataFileError, build_dataset
from ctal.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, HorizontalFlip, RandomScaleCrop, RandomScaleRotate,
                                  Resize)
from ctal.tasks import IGNORE_INDEX

H, W = 6, 8


# ----------------------------------------------------------------------------- fixtures
def write_npy_split(root, split="train", n=3, label_dir="label", normals=True, seed=0):
    rng = np.random.default_rng(seed)
    base = root / split
    for d in ("image", label_dir, "depth") + (("normal",) if normals else ()):
        (base / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(base / "image" / f"{i}.npy", rng.uniform(0, 1, (H, W, 3)))            # float64, like the files
        lab = rng.integers(0, 13, (H, W)).astype(np.float64)
        lab[0, 0] = -1
        np.save(base / label_dir / f"{i}.npy", lab)
        dep = rng.uniform(0.5, 9, (H, W, 1)).astype(np.float32)
        dep[1, 1] = 0
        np.save(base / "depth" / f"{i}.npy", dep)
        if normals:
            v = rng.normal(size=(H, W, 3))
            v /= np.linalg.norm(v, axis=2, keepdims=True)
            v[2, 2] = 0
            np.save(base / "normal" / f"{i}.npy", v.astype(np.float32))
    return base


@pytest.fixture
def nyu(tmp_path):
    write_npy_split(tmp_path, "train")
    write_npy_split(tmp_path, "val", n=2, seed=1)
    return tmp_path


# ----------------------------------------------------------------------------- NYUv2 / Cityscapes
def test_nyuv2_sample_layout(nyu):
    ds = build_dataset("nyuv2", nyu, "val")
    assert len(ds) == 2 and ds.tasks == ("semseg", "depth", "normals")
    assert ds.num_classes == {"semseg": 13} and ds.size == (H, W)
    s = ds[1]
    raw_img = np.load(nyu / "val" / "image" / "1.npy")
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    expected = (raw_img[3, 4, 0] - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert s["image"][0, 3, 4].item() == pytest.approx(expected, rel=1e-5)
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (H, W)
    assert s["semseg"][0, 0].item() == IGNORE_INDEX
    raw_lab = np.load(nyu / "val" / "label" / "1.npy")
    assert s["semseg"][2, 3].item() == int(raw_lab[2, 3])
    assert s["depth"].shape == (1, H, W) and s["depth"][0, 1, 1].item() == 0.0
    assert s["normals"].shape == (3, H, W) and torch.all(s["normals"][:, 2, 2] == 0)
    assert s["meta"]["index"] == 1 and s["meta"]["size"] == (H, W)


def test_missing_file_named_at_construction(nyu):
    (nyu / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DataFileError, match=r"depth[/\\]1\.npy"):
        build_dataset("nyuv2", nyu, "train")


def test_missing_image_index_named(nyu):
    (nyu / "train" / "image" / "1.npy").unlink()
    with pytest.raises(DataFileError, match=r"image[/\\]1\.npy"):
        build_dataset("nyuv2", nyu, "train", tasks=["semseg"])


def test_corrupt_file_named(nyu):
    (nyu / "train" / "label" / "2.npy").write_bytes(b"this is not numpy")
    with pytest.raises(DataFileError, match=r"label[/\\]2\.npy"):
        build_dataset("nyuv2", nyu, "train")


def test_truncated_file_named(nyu):
    p = nyu / "train" / "depth" / "1.npy"
    p.write_bytes(p.read_bytes()[:-40])  # header intact, data cut short
    with pytest.raises(DataFileError, match=r"depth[/\\]1\.npy"):
        build_dataset("nyuv2", nyu, "train")           # the up-front check sees the short file
    ds = build_dataset("nyuv2", nyu, "train", check_files=False)   # checks sample 0 only
    with pytest.raises(DataFileError, match=r"depth[/\\]1\.npy"):
        ds[1]


def test_shape_and_value_checks(nyu):
    np.save(nyu / "train" / "label" / "1.npy", np.zeros((H - 1, W)))
    with pytest.raises(DataFileError, match=r"label[/\\]1\.npy.*shape"):
        build_dataset("nyuv2", nyu, "train")
    lab = np.zeros((H, W))
    lab[0, 0] = 13  # one past the last NYUv2 class
    np.save(nyu / "train" / "label" / "1.npy", lab)
    ds = build_dataset("nyuv2", nyu, "train")
    with pytest.raises(DataFileError, match=r"label[/\\]1\.npy.*class id 13"):
        ds[1]


def test_bad_arguments(nyu):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", nyu, "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset("nyuv2", nyu, "training")
    with pytest.raises(ValueError, match="has no"):
        build_dataset("nyuv2", nyu, "train", tasks=["edge"])
    with pytest.raises(FileNotFoundError, match="image"):
        build_dataset("nyuv2", nyu / "nowhere", "train")
    with pytest.raises(ValueError, match="augment"):
        build_dataset("nyuv2", nyu, "train", augment="mixup")


def test_augmentation_only_on_train(nyu):
    plain = build_dataset("nyuv2", nyu, "val")
    aug = build_dataset("nyuv2", nyu, "val", augment=True)
    assert aug.augment is None
    torch.testing.assert_close(plain[0]["image"], aug[0]["image"])
    assert build_dataset("nyuv2", nyu, "train", augment=True).augment is not None


def test_flip_negates_normals_x():
    n = torch.zeros(3, 2, 3)
    n[0, 0, 0], n[1, 0, 0] = 0.6, 0.8               # left-top pixel points right-ish
    s = {"image": torch.arange(18.0).view(3, 2, 3), "normals": n, "semseg": torch.tensor([[0, 1, 2], [3, 4, 5]])}
    out = HorizontalFlip(p=1.0)(s)
    assert out["semseg"].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert out["normals"][0, 0, 2].item() == pytest.approx(-0.6)
    assert out["normals"][1, 0, 2].item() == pytest.approx(0.8)


def test_scale_crop_divides_depth_and_multiplies_inverse_depth():
    s = {"image": torch.full((3, 8, 8), 0.5), "depth": torch.full((1, 8, 8), 4.0),
         "semseg": torch.full((8, 8), 3, dtype=torch.long)}
    out = RandomScaleCrop(scales=(2.0,))(s)
    assert torch.allclose(out["depth"], torch.full((1, 8, 8), 2.0))
    assert out["semseg"].dtype == torch.long and torch.all(out["semseg"] == 3)
    inv = RandomScaleCrop(scales=(2.0,), inverse_depth=True)(s)
    assert torch.allclose(inv["depth"], torch.full((1, 8, 8), 8.0))


def test_scale_crop_zooms_into_the_image():
    # a 4x4 image whose pixel values are their column; zooming by 2 shows 2 neighbouring source
    # columns, each twice as wide
    img = torch.arange(4.0).repeat(3, 4, 1)
    lab = torch.arange(4).repeat(4, 1)
    torch.manual_seed(0)
    out = RandomScaleCrop(scales=(2.0,))({"image": img, "semseg": lab})
    row = out["semseg"][0].tolist()
    assert row[0] == row[1] and row[2] == row[3] and row[2] == row[0] + 1


def test_rotation_moves_pixels_and_rotates_normals():
    # 5x5, rotate the content by +90 degrees (x right, y down): the pixel right of the centre moves
    # below the centre, and a normal pointing right (x) now points down (y)
    lab = torch.zeros(5, 5, dtype=torch.long)
    lab[2, 4] = 7
    n = torch.zeros(3, 5, 5)
    n[0] = 1.0
    out = RandomScaleRotate(rots=[90.0], scales=[1.0])({"image": torch.zeros(3, 5, 5), "semseg": lab, "normals": n})
    assert out["semseg"][4, 2].item() == 7
    assert out["normals"][0, 2, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert out["normals"][1, 2, 2].item() == pytest.approx(1.0)
    # 45 degrees: the corners come from outside the image -> ignore / invalid
    s = {"image": torch.ones(3, 5, 5), "semseg": torch.zeros(5, 5, dtype=torch.long),
         "depth": torch.ones(1, 5, 5), "edge": torch.zeros(1, 5, 5)}
    out = RandomScaleRotate(rots=[45.0], scales=[1.0])(s)
    assert out["semseg"][0, 0].item() == IGNORE_INDEX and out["depth"][0, 0, 0].item() == 0.0
    assert out["edge"][0, 0, 0].item() == 255.0 and out["semseg"][2, 2].item() == 0


def test_cityscapes_label_19_and_7(tmp_path):
    base = write_npy_split(tmp_path, "train", label_dir="label_19", normals=False)
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert ds.tasks == ("semseg", "depth") and ds.num_classes == {"semseg": 19}
    assert ds[0]["semseg"].shape == (H, W)
    with pytest.raises(FileNotFoundError, match="label_7"):
        build_dataset("cityscapes", tmp_path, "train", num_classes=7)
    (base / "label_7").mkdir()
    for i in range(3):
        np.save(base / "label_7" / f"{i}.npy", np.full((H, W), 6.0))
    assert build_dataset("cityscapes", tmp_path, "train", num_classes=7)[2]["semseg"].max().item() == 6
    with pytest.raises(ValueError, match="7 or 19"):
        build_dataset("cityscapes", tmp_path, "train", num_classes=20)


# ----------------------------------------------------------------------------- PASCAL-Context
PH, PW = 8, 10


def _struct_array(records, fields):
    arr = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(records):
        for f in fields:
            arr[0, i][f] = r[f]
    return arr


def write_pascal(root, ids=("2008_000001", "2008_000002")):
    for d in ("JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts", "normals_distill",
              "sal_distill", "pascal-context/trainval"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(0)
    for k, i in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (PH, PW, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        sem = np.zeros((PH, PW), np.uint8)
        sem[:, 5:] = 15
        sem[0, 0] = 255
        Image.fromarray(sem).save(root / "semseg" / "pascal-context" / f"{i}.png")
        # LabelMap: left half class 3 (also an NYUD class -> normals valid), right half 2 (not)
        lm = np.full((PH, PW), 3, np.uint16)
        lm[:, 5:] = 2
        sio.savemat(root / "pascal-context" / "trainval" / f"{i}.mat", {"LabelMap": lm})
        nrm = np.zeros((PH, PW, 3), np.uint8)
        nrm[...] = (128, 128, 255)                    # 2 * v / 255 - 1 ~ (0, 0, 1)
        Image.fromarray(nrm).save(root / "normals_distill" / f"{i}.png")
        sal = np.zeros((PH, PW), np.uint8)
        sal[2:4, 2:4] = 200                             # > 0.5 * 255 -> salient
        sal[5, 5] = 100                                 # < 0.5 * 255 -> not
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
        if k == 0:   # a person with two parts and a chair (class 9) without parts
            head = np.zeros((PH, PW), np.uint8)
            head[0:2, 6:8] = 1
            shin = np.zeros((PH, PW), np.uint8)
            shin[6:8, 6:8] = 1
            parts = _struct_array([{"part_name": "head", "mask": head}, {"part_name": "llleg", "mask": shin}],
                                  ("part_name", "mask"))
            person = {"class": "person", "class_ind": np.array([[15]]), "mask": np.ones((PH, PW), np.uint8),
                      "parts": parts}
            chair = {"class": "chair", "class_ind": np.array([[9]]), "mask": np.zeros((PH, PW), np.uint8),
                     "parts": np.zeros((0, 0))}
            objects = _struct_array([person, chair], ("class", "class_ind", "mask", "parts"))
        else:        # only a chair: no person parts -> the whole map is void
            chair = {"class": "chair", "class_ind": np.array([[9]]), "mask": np.zeros((PH, PW), np.uint8),
                     "parts": np.zeros((0, 0))}
            objects = _struct_array([chair], ("class", "class_ind", "mask", "parts"))
        anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
        anno[0, 0]["imname"] = i
        anno[0, 0]["objects"] = objects
        sio.savemat(root / "human_parts" / f"{i}.mat", {"anno": anno})
    return root


def test_pascal_context_conventions(tmp_path):
    root = write_pascal(tmp_path)
    ds = build_dataset("pascal_context", root, "train", resize=None)
    assert ds.tasks == ("semseg", "human_parts", "normals", "sal", "edge")
    assert ds.num_classes == {"semseg": 21, "human_parts": 7} and len(ds) == 2
    s = ds[0]
    assert s["meta"]["name"] == "2008_000001"
    assert s["semseg"][0, 0].item() == IGNORE_INDEX and s["semseg"][3, 6].item() == 15
    hp = s["human_parts"]
    assert hp[0, 6].item() == 1 and hp[7, 7].item() == 6 and hp[4, 2].item() == 0
    assert torch.all(ds[1]["human_parts"] == IGNORE_INDEX)
    # normals valid on the class-3 half only, unit length there
    assert torch.all(s["normals"][:, :, 5:] == 0)
    assert torch.allclose(s["normals"][:, :, :5].norm(dim=0), torch.ones(PH, 5))
    assert s["normals"][2, 0, 0].item() == pytest.approx(1.0, abs=1e-4)
    assert s["sal"][0, 2, 2].item() == 1.0 and s["sal"][0, 5, 5].item() == 0.0
    # the LabelMap changes between columns 4 and 5: edges only there, thinned to one pixel per row
    e = s["edge"][0]
    assert e[:, 4:6].sum() >= PH - 2 and e[:, 4:6].sum(1).le(1).all()
    assert e[:, :4].sum() == 0 and e[:, 6:].sum() == 0
    big = build_dataset("pascal_context", root, "train", augment=True)   # default resize 512 + augment
    out = big[0]
    assert out["image"].shape == (3, 512, 512) and out["human_parts"].shape == (512, 512)


def test_pascal_context_bad_files(tmp_path):
    root = write_pascal(tmp_path)
    (root / "sal_distill" / "2008_000002.png").unlink()
    with pytest.raises(DataFileError, match="2008_000002.png"):
        build_dataset("pascal_context", root, "train")
    ds = build_dataset("pascal_context", root, "train", tasks=["semseg", "human_parts"], resize=None)
    (root / "human_parts" / "2008_000001.mat").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="2008_000001.mat"):
        ds[0]
    (root / "JPEGImages" / "2008_000002.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataFileError, match="2008_000002.jpg"):
        build_dataset("pascal_context", root, "train", tasks=["semseg"])
    with pytest.raises(FileNotFoundError, match="val.txt"):
        build_dataset("pascal_context", root, "val")


# ----------------------------------------------------------------------------- NYUD-MT
def write_nyud(root, ids=("0001", "0002"), sizes=None):
    """``sizes``: optional {id: (h, w)} for images (and their labels) of another size than (H, W)."""
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "gt_sets" / "train.txt").write_text("\n".join(ids))
    for i in ids:
        h, w = (sizes or {}).get(i, (H, W))
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(root / "images" / f"{i}.jpg")
        seg = np.full((h, w), 40, np.uint8)
        seg[0, 0] = 0
        seg[1, 1] = 1
        Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        np.save(root / "depth" / f"{i}.npy", np.full((h, w), 2.5, np.float32))
        nrm = np.zeros((h, w, 3), np.float32)
        nrm[..., 2] = -1
        np.save(root / "normals" / f"{i}.npy", nrm)
        edge = np.zeros((h, w), np.float32)
        edge[3] = 1
        np.save(root / "edge" / f"{i}.npy", edge)
    return root


def test_nyud_mt_conventions(tmp_path):
    root = write_nyud(tmp_path)
    ds = build_dataset("nyud_mt", root, "train")
    assert ds.tasks == ("semseg", "depth", "normals", "edge") and ds.num_classes == {"semseg": 40}
    s = ds[1]
    # png 0 = void, 1..40 -> 0..39
    assert s["semseg"][0, 0].item() == IGNORE_INDEX and s["semseg"][1, 1].item() == 0
    assert s["semseg"][2, 2].item() == 39
    assert torch.allclose(s["depth"], torch.full((1, H, W), 2.5))
    assert torch.all(s["normals"][2] == -1)
    assert s["edge"][0, 3].sum().item() == W and s["edge"].sum().item() == W
    np.save(root / "depth" / "0002.npy", np.zeros((H, W + 1), np.float32))
    with pytest.raises(DataFileError, match="0002.npy"):
        build_dataset("nyud_mt", root, "train")
    (root / "edge" / "0001.npy").unlink()
    with pytest.raises(DataFileError, match=r"edge[/\\]0001\.npy"):
        build_dataset("nyud_mt", root, "train", tasks=["edge"])


def test_dataloader_batches(nyu):
    ds = build_dataset("nyuv2", nyu, "train", augment=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, H, W) and batch["semseg"].shape == (3, H, W)
    assert batch["meta"]["index"].tolist() == [0, 1, 2]


def test_original_targets_skip_resize(tmp_path):
    """The val loader resizes to 512x512 by default; ``original_targets`` gives the stored size."""
    root = write_pascal(tmp_path)
    (root / "ImageSets" / "Context" / "val.txt").write_text((root / "ImageSets" / "Context" / "train.txt").read_text())
    ds = build_dataset("pascal_context", root, "val", resize=(16, 16))
    sample, original = ds[0], ds.original_targets(0)
    assert sample["semseg"].shape == (16, 16)
    assert set(original) == set(ds.tasks)
    H, W = sample["meta"]["size"]
    assert original["semseg"].shape == (H, W) and (H, W) != (16, 16)
    assert original["normals"].shape == (3, H, W)


# ----------------------------------------------------------------------------- bad values / sizes / arguments
def test_npy_float_image_range_checked(nyu):
    """Float images must be in [0, 1] (uint8 0..255 is scaled): floats stored as 0..255 or already
    normalized images are an error naming the file, not images with values up to ~1100."""
    img = np.load(nyu / "train" / "image" / "1.npy")
    np.save(nyu / "train" / "image" / "1.npy", img * 255.0)
    ds = build_dataset("nyuv2", nyu, "train")               # sample 0 is fine
    with pytest.raises(DataFileError, match=r"image[/\\]1\.npy: float image values span .*expected \[0, 1\].*255"):
        ds[1]
    np.save(nyu / "train" / "image" / "0.npy", img * 255.0)  # the first image is checked at construction
    with pytest.raises(DataFileError, match=r"image[/\\]0\.npy.*expected \[0, 1\]"):
        build_dataset("nyuv2", nyu, "train", check_files=False)
    np.save(nyu / "train" / "image" / "0.npy", (img - 0.45) / 0.22)
    with pytest.raises(DataFileError, match=r"image[/\\]0\.npy.*expected \[0, 1\].*normalized"):
        build_dataset("nyuv2", nyu, "train")
    np.save(nyu / "train" / "image" / "0.npy", (img * 255).astype(np.int64))
    with pytest.raises(DataFileError, match=r"image[/\\]0\.npy: image dtype int64"):
        build_dataset("nyuv2", nyu, "train")
    # uint8 0..255 is accepted and scaled; float16 in [0, 1] too
    np.save(nyu / "train" / "image" / "0.npy", np.round(img * 255).astype(np.uint8))
    np.save(nyu / "train" / "image" / "1.npy", img.astype(np.float16))
    ds = build_dataset("nyuv2", nyu, "train", normalize=False)
    torch.testing.assert_close(ds[0]["image"], torch.from_numpy(np.round(img * 255).transpose(2, 0, 1) / 255).float())
    assert 0 <= ds[1]["image"].min() and ds[1]["image"].max() <= 1


def test_cityscapes_float_image_range_checked(tmp_path):
    base = write_npy_split(tmp_path, "train", label_dir="label_19", normals=False)
    np.save(base / "image" / "2.npy", np.load(base / "image" / "2.npy") * 255.0)
    ds = build_dataset("cityscapes", tmp_path, "train")
    with pytest.raises(DataFileError, match=r"image[/\\]2\.npy.*expected \[0, 1\]"):
        ds[2]


def test_nyud_mt_mixed_image_sizes(tmp_path):
    root = write_nyud(tmp_path, sizes={"0002": (H + 2, W)})
    msg = rf"images[/\\]0002\.jpg: image is {H + 2}x{W}, expected {H}x{W} like .*0001\.jpg.*resize=\(H, W\)"
    with pytest.raises(DataFileError, match=msg):
        build_dataset("nyud_mt", root, "train")
    ds = build_dataset("nyud_mt", root, "train", check_files=False)   # found when loaded
    assert ds.size == (H, W) and ds[0]["image"].shape == (3, H, W)
    with pytest.raises(DataFileError, match=msg):
        ds[1]
    ds = build_dataset("nyud_mt", root, "train", resize=(H, W))         # resizing makes them batchable
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, H, W) and batch["meta"]["size"][0].tolist() == [H, H + 2]


def test_pascal_mixed_image_sizes_need_resize(tmp_path):
    root = write_pascal(tmp_path)
    Image.fromarray(np.zeros((PH + 3, PW, 3), np.uint8)).save(root / "JPEGImages" / "2008_000002.jpg")
    with pytest.raises(DataFileError, match=rf"2008_000002\.jpg: image is {PH + 3}x{PW}, expected {PH}x{PW}"):
        build_dataset("pascal_context", root, "train", tasks=["sal"], resize=None)
    ds = build_dataset("pascal_context", root, "train", tasks=["semseg"], resize=None, check_files=False)
    assert ds.size == (PH, PW)                           # the first image's header, not a default


def test_npy_mixed_image_sizes(nyu):
    for d, shape in (("image", (H, W + 1, 3)), ("label", (H, W + 1)), ("depth", (H, W + 1, 1)),
                     ("normal", (H, W + 1, 3))):
        np.save(nyu / "train" / d / "2.npy", np.full(shape, 0.5 if d != "label" else 1.0))
    msg = rf"image[/\\]2\.npy: image is {H}x{W + 1}, expected {H}x{W} like .*0\.npy.*resize=\(H, W\)"
    with pytest.raises(DataFileError, match=msg):
        build_dataset("nyuv2", nyu, "train")
    ds = build_dataset("nyuv2", nyu, "train", check_files=False)       # found when loaded
    with pytest.raises(DataFileError, match=msg):
        ds[2]
    for check in (True, False):                                        # resize makes them uniform
        ds = build_dataset("nyuv2", nyu, "train", check_files=check, resize=(H, W))
        assert ds[2]["image"].shape == (3, H, W) and ds[2]["meta"]["size"] == (H, W + 1)
    np.save(nyu / "train" / "depth" / "2.npy", np.ones((H, W, 1)))    # targets must match their own image
    with pytest.raises(DataFileError, match=r"depth[/\\]2\.npy: depth shape .*to match .*image[/\\]2\.npy"):
        build_dataset("nyuv2", nyu, "train", resize=(H, W))


@pytest.mark.parametrize("name", ["nyuv2", "pascal_context", "nyud_mt"])
def test_resize_must_be_a_pair(tmp_path, name):
    root = {"nyuv2": lambda: (write_npy_split(tmp_path, "train"), tmp_path)[1], "pascal_context": lambda: write_pascal(tmp_path),
            "nyud_mt": lambda: write_nyud(tmp_path)}[name]()
    with pytest.raises(ValueError, match=r"resize must be an \(H, W\) pair.*single int 32.*resize=\(32, 32\)"):
        build_dataset(name, root, "train", resize=32)
    for bad in ((0, 4), (4.5, 4), "44", (4, 4, 4), (True, 4)):
        with pytest.raises(ValueError, match=r"resize must be an \(H, W\) pair of positive integers"):
            build_dataset(name, root, "train", resize=bad)
    for ok in ([4, 5], (np.int64(4), 5), np.array([4, 5]), torch.Size([4, 5])):
        ds = build_dataset(name, root, "train", resize=ok)
        assert ds.size == (4, 5) and ds[0]["image"].shape == (3, 4, 5)


def test_transform_size_and_factor_arguments():
    with pytest.raises(ValueError, match=r"size must be an \(H, W\) pair.*size=\(32, 32\)"):
        Resize(32)
    with pytest.raises(ValueError, match=r"size must be an \(H, W\) pair"):
        Resize((32, -1))
    assert Resize([4, 6])({"image": torch.zeros(3, 8, 8)})["image"].shape == (3, 4, 6)
    with pytest.raises(ValueError, match="scales must be a non-empty list of factors >= 1"):
        RandomScaleCrop(scales=1.5)
    with pytest.raises(ValueError, match=r"scales must be a \(low, high\) tuple"):
        RandomScaleRotate(scales=1.2)
    with pytest.raises(ValueError, match=r"rots must be a \(low, high\) tuple"):
        RandomScaleRotate(rots=(20.0, -20.0))
    with pytest.raises(ValueError, match=r"scales must be .*positive"):
        RandomScaleRotate(scales=[0.0, 1.0])


def test_augmentation_runs_at_the_stored_size_before_resize(nyu):
    """A rotation of an image already stretched to another aspect ratio is also a shear that the
    normals' in-plane rotation would not match: augmentation sees the stored grid."""
    ds = build_dataset("nyuv2", nyu, "train", augment=True, resize=(4, 4))
    seen = []
    ds.augment = lambda s: seen.append(tuple(s["image"].shape[-2:])) or s
    sample = ds[0]
    stored = tuple(np.load(nyu / "train" / "image" / "0.npy", mmap_mode="r").shape[:2])
    assert seen == [stored] and stored != (4, 4)
    assert tuple(sample["image"].shape[-2:]) == (4, 4)


def test_resize_samples_labels_at_pixel_centres():
    """Labels (nearest) and the image (bilinear, align_corners=False) sample the same positions:
    a label map equal to the source column index lands within half a source pixel of the
    image's column index after a resize that does not divide evenly."""
    H, W = 5, 375
    cols = torch.arange(W, dtype=torch.float32).expand(H, W)
    sample = {"image": cols.expand(3, H, W).clone() / W, "semseg": cols.long().clone()}
    out = Resize((5, 512))(sample)
    image_col = out["image"][0] * W  # bilinear: the exact source position (interior)
    offset = (out["semseg"].float() - image_col)[:, 2:-2]
    assert offset.abs().max() <= 0.5 + 1e-4
