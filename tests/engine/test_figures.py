"""Figures: labelled prediction / CTAL / fusion-weight / curve figures (panels, sizes, the numbers
in their titles, clear errors), class names for legends, and the figures a training run writes
per evaluation (PNG files and TensorBoard images) without changing the training."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ctal import figures, vis
from ctal.data import SyntheticScenes
from ctal.data.base import MultiTaskDataset
from ctal.engine import Trainer, checkpoint, images
from ctal.tasks import IGNORE_INDEX
from tests.helpers import tiny_cfg

NAMES = {"semseg": ("floor", "wall", "box")}


def _sample(H=8, W=12):
    """An image, targets and predictions with known errors: 1/4 of the valid semseg pixels
    wrong, depth off by 0.5 m everywhere, normals off by 90 degrees on the left half."""
    torch.manual_seed(0)
    image = torch.randn(3, H, W)
    seg = torch.zeros(H, W, dtype=torch.long)
    seg[:, W // 2:] = 1
    seg[0] = IGNORE_INDEX
    logits = torch.nn.functional.one_hot(seg.clamp(min=0), 3).permute(2, 0, 1).float()
    wrong = torch.zeros(H, W, dtype=torch.bool)
    wrong[1:, :] = (torch.arange((H - 1) * W) % 4 == 0).view(H - 1, W)
    logits[2][wrong] = 5.0  # predicted "box" where the target says floor / wall
    depth = torch.full((1, H, W), 2.0)
    depth[0, -1] = 0.0  # invalid
    n_t = torch.zeros(3, H, W)
    n_t[2] = -1.0
    n_p = n_t.clone()
    n_p[:, :, : W // 2] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    targets = {"semseg": seg, "depth": depth, "normals": n_t, "edge": torch.zeros(1, H, W)}
    preds = {"semseg": logits, "depth": depth + 0.5, "normals": n_p, "edge": torch.zeros(1, H, W)}
    return image, targets, preds, wrong


def test_prediction_figure_panels_titles_and_size(tmp_path):
    image, targets, preds, wrong = _sample()
    fig = figures.prediction_figure(image, targets, preds, NAMES, title="sample 0")
    titles = figures.panel_titles(fig)
    assert list(titles) == ["input", "semseg/target", "semseg/prediction", "semseg/error", "depth/target",
                            "depth/prediction", "depth/error", "normals/target", "normals/prediction",
                            "normals/error", "edge/target", "edge/prediction"]  # edges: no error panel
    frac = 100 * wrong.sum().item() / (7 * 12)  # row 0 is void
    assert titles["semseg/error"] == f"wrong pixels ({frac:.1f}%)"
    assert titles["depth/error"] == "abs. error (mean 0.5 m)"   # the invalid row does not count
    assert titles["normals/error"] == "angle error (mean 45.0°)"
    # 8x12 inputs are upscaled to at least MIN_TILE pixels wide, whole pixels per input pixel
    s = math.ceil(figures.MIN_TILE / 12)
    panels = {im.get_label(): im for im in fig.images}
    assert all(im.get_array().shape[:2] == (8 * s, 12 * s) for im in panels.values())
    # colour bars with units; the legend names the classes present (target's first), and void
    bars = {ax.get_label() for ax in fig.axes}
    assert {"colorbar: depth [m]", "colorbar: abs. error [m]", "colorbar: angle error [°]",
            "colorbar: edge probability"} <= bars
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["floor", "wall", "box", "void (no label)"]
    path = figures.save_figure(fig, tmp_path / "sub" / "pred.png")
    w, h = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert Image.open(path).size == (w, h) and w > 3 * 12 * s and h > 5 * 8 * s


def test_prediction_figure_scale_and_predictions_only():
    image, targets, preds, _ = _sample(32, 48)
    fig = figures.prediction_figure(image, targets, preds, NAMES, scale=1)
    assert all(im.get_array().shape[:2] == (32, 48) for im in fig.images)
    # predictions alone (ctal.predict): one column, no error panels; 2-channel saliency accepted
    preds["sal"] = torch.randn(2, 32, 48)
    titles = figures.panel_titles(figures.prediction_figure(image, None, preds, NAMES))
    assert [k for k in titles if k != "input"] == [f"{t}/prediction" for t in ("semseg", "depth", "normals",
                                                                             "edge", "sal")]


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(image=torch.zeros(8, 12)), r"image must be a \(3, H, W\)"),
    (lambda a: a["targets"].update(depth=torch.zeros(1, 4, 4)), r"targets\['depth'\] is 4x4, the image is 8x12"),
    (lambda a: a["preds"].update(normals=torch.zeros(2, 8, 12)), r"preds\['normals'\] must be \(3, H, W\)"),
    (lambda a: a["preds"].update(semseg=torch.zeros(5, 8, 12)), r"preds\['semseg'\] has 5 channels, expected 3"),
    (lambda a: a["targets"].update(semseg=torch.full((8, 12), 7)), r"targets\['semseg'\] holds class id 7"),
    (lambda a: a.update(class_names={}), r"class_names\['semseg'\] is required"),
    (lambda a: a["preds"].update(depht=torch.zeros(1, 8, 12)), r"preds has unknown task\(s\) \['depht'\]"),
    (lambda a: a.update(scale=0), r"scale must be a positive int"),
    (lambda a: a.update(targets=None, preds=None), r"nothing to draw"),
])
def test_prediction_figure_bad_inputs_name_the_argument(change, match):
    image, targets, preds, _ = _sample()
    args = dict(image=image, targets=targets, preds=preds, class_names=NAMES, scale=None)
    change(args)
    with pytest.raises(ValueError, match=match):
        figures.prediction_figure(args["image"], args["targets"], args["preds"], args["class_names"],
                                  scale=args["scale"])


def test_class_colors_come_from_matplotlib_maps():
    import matplotlib

    assert np.allclose(figures.class_colors(7), np.asarray(matplotlib.colormaps["tab10"].colors)[:7])
    assert len({tuple(c) for c in figures.class_colors(40)}) == 40
    assert figures.class_colors(100).shape == (100, 3)
    with pytest.raises(ValueError, match="n must be a positive int"):
        figures.class_colors(0)


def test_ctal_rows_agree_with_the_single_row_maps():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    w, b = torch.randn(20, 2, 3, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    pixels = [(0, 0), (2, 3), (3, 4)]
    for max_full in (4096, 1):  # the CTAL stages, and the row-only path of large grids
        a, m = vis.ctal_rows(x, w, b, pixels, max_full=max_full)
        for k, p in enumerate(pixels):
            torch.testing.assert_close(a[k], vis.affinity_map(x, p))
            torch.testing.assert_close(m[k], vis.diffusion_map(x, w, b, p))
    torch.testing.assert_close(vis.diffusion_map(x, w, b, (1, 2), max_full=1), vis.diffusion_map(x, w, b, (1, 2)))
    with pytest.raises(ValueError, match="weight must be"):
        vis.ctal_rows(x, w[:5], b, pixels)


def test_query_pixels_lie_inside_the_largest_classes():
    label = torch.zeros(16, 24, dtype=torch.long)
    label[:, 16:] = 1
    label[10:14, 2:6] = 2
    label[0] = IGNORE_INDEX
    px = figures.query_pixels((8, 12), label, n=3)  # the grid is half the label's resolution
    cells = label[1::2, 1::2]
    assert [int(cells[p]) for p in px] == [0, 1, 2]  # largest first, each deep inside its class
    assert figures.query_pixels((4, 6), None, n=2) == [(2, 3), (2, 1)]
    with pytest.raises(ValueError, match="grid must be"):
        figures.query_pixels((0, 4))


def test_affinity_and_fusion_figures():
    torch.manual_seed(0)
    image = torch.randn(3, 16, 24)
    x, w, b = torch.randn(2, 4, 4, 6), torch.randn(24, 2, 3, 3), torch.randn(24)
    fig = figures.affinity_figure(image, x, w, b, [(1, 1), (2, 4)], ["semseg", "depth"], title="t")
    titles = figures.panel_titles(fig)
    assert list(titles) == [f"query {r}/{p}" for r in (0, 1)
                            for p in ("input", "affinity semseg", "affinity depth", "diffusion")]
    assert titles["query 1/input"] == "query 1: grid cell (2, 4)"
    assert titles["query 0/affinity depth"] == "depth: affinity A[i]" and titles["query 0/diffusion"] == "diffused row M[i]"
    assert {ax.get_label() for ax in fig.axes} == {"colorbar: cosine affinity", "colorbar: M[i, j]"}
    s = math.ceil(figures.MIN_TILE / 24)
    assert all(im.get_array().shape[:2] == (16 * s, 24 * s) for im in fig.images)
    marks = [a for a in fig.artists if a.get_label() == "query marker"]
    assert len(marks) == 2 * 3 * 2  # each query marked in its 3 map panels, two strokes each
    for args, match in [((image, x, w, b, [(4, 0)]), r"pixels: \(4, 0\) is not a pixel"),
                        ((image, x, w[:3], b, [(0, 0)]), r"weight must be \(h\*w, T, 3, 3\)"),
                        ((image, x, w, b[:3], [(0, 0)]), r"bias must be"),
                        ((image, x[None, None], w, b, [(0, 0)]), r"features must be one sample's CTAL input"),
                        ((image, x, w, b, []), r"pixels must list at least one")]:
        with pytest.raises(ValueError, match=match):
            figures.affinity_figure(*args)
    fig = figures.fusion_weights_figure(w, b, (4, 6), ["semseg", "depth"])
    assert list(figures.panel_titles(fig)) == ["centre tap semseg", "centre tap depth", "bias"]
    with pytest.raises(ValueError, match=r"weight must be \(h\*w, T, 3, 3\) = \(20, T, 3, 3\)"):
        figures.fusion_weights_figure(w, b, (4, 5))


def test_curves_figure():
    history = [dict(epoch=1, train_loss={"semseg": 2.0, "depth": 1.0}, lr=1e-3),
               dict(epoch=2, train_loss={"semseg": 1.5, "depth": 0.7}, lr=5e-4,
                    metrics={"semseg": {"mIoU": 0.3, "pixel_acc": 0.6}, "depth": {"rmse": 0.9, "abs_err": 0.5}})]
    fig = figures.curves_figure(history, best_metric="semseg/pixel_acc")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["training loss", "val semseg/mIoU ↑", "val depth/rmse ↓", "val semseg/pixel_acc ↑",
                      "learning rate"]
    with pytest.raises(ValueError, match="history must be a non-empty list"):
        figures.curves_figure([])
    with pytest.raises(ValueError, match=r"history\[0\] must be a dict with an 'epoch'"):
        figures.curves_figure([{"loss": 1}])


def test_datasets_name_their_classes(tmp_path):
    from ctal.data import synthetic

    synthetic.generate(tmp_path, num_train=1, num_val=1, size=(16, 16), workers=0, progress=False)
    ds = SyntheticScenes(tmp_path, "val")
    assert ds.class_names == {"semseg": synthetic.CLASSES}

    class Unnamed(MultiTaskDataset):
        known_class_names = {"semseg": ("a", "b")}  # too few: generic names instead

        def __len__(self):
            return 0
    d = Unnamed(tmp_path, "val", ["semseg", "depth"], {"semseg": 3}, (4, 4))
    assert d.class_names == {"semseg": ("class 0", "class 1", "class 2")}


def _tb_images(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return {tag: sorted(e.step for e in acc.Images(tag)) for tag in acc.Tags()["images"]}


def test_training_writes_figures_per_evaluation(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 2, "train.max_steps_per_epoch": 1})
    t = Trainer(cfg, progress=False)
    try:
        t.fit()
    finally:
        t.close()
    out = tmp_path / "out"
    for folder in (out / "images" / "epoch_1", out / "images" / "epoch_2", out / "images"):
        names = sorted(p.name for p in folder.glob("*.png"))
        assert names == ["affinity_0.png", "fusion_weights.png", "pred_0.png"], folder
    w, h = Image.open(out / "images" / "epoch_2" / "pred_0.png").size
    assert w >= 3 * figures.MIN_TILE and h >= 5 * 32 * math.ceil(figures.MIN_TILE / 32)  # 4 tasks + input
    assert Image.open(out / "curves.png").size[0] >= 600
    assert _tb_images(out / "tb") == {f"figures/{n}": [1, 2] for n in ("pred_0", "affinity_0", "fusion_weights")}
    # figures draw no random numbers and leave the model as they found it: training does not
    # depend on them
    rng, weights = checkpoint.rng_state(), {k: v.clone() for k, v in t.model.state_dict().items()}
    t.model.train()
    assert [p.name for p in images.save_run_images(t.model, t.val_set, tmp_path / "again", 1, t.device)] == \
        ["pred_0.png", "affinity_0.png", "fusion_weights.png"]
    after = checkpoint.rng_state()
    assert t.model.training and torch.equal(after["torch"], rng["torch"]) and after["python"] == rng["python"]
    assert all(torch.equal(v, weights[k]) for k, v in t.model.state_dict().items())
