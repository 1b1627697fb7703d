"""Every metric against answers computed by hand on tiny inputs (derivations in the comments)."""
import json
import math

import numpy as np
import pytest
import torch

from ctal.metrics import (DepthMeter, EdgeMeter, MultiTaskMeter, NormalsMeter, SaliencyMeter, SegMeter,
                          build_meters, delta_m, load_baselines, save_baselines)
from ctal.tasks import saliency_probability


# ----------------------------------------------------------------------------- segmentation
def test_seg_meter_hand_computed():
    # valid (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the -1 pixel is void
    # class 0: TP 1, FN 1, FP 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0, FN 1 -> 0
    # class 3 never occurs -> excluded;  mIoU = (1/3 + 2/3 + 0) / 3;  pixel acc = 3/5
    target = torch.tensor([[[0, 0, 1], [1, 2, -1]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 3]]])
    m = SegMeter(4)
    m.update(pred, target)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100 / 3)
    assert r["pixel_acc"] == pytest.approx(60.0)
    assert r["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert math.isnan(r["iou"][3])


def test_seg_meter_accumulates_over_the_set_not_per_batch():
    # batch A: truth [0, 0] pred [0, 0]; batch B: truth [1, 1, 1, 1] pred [1, 0, 0, 0]
    # set confusion: class 0 TP 2 FP 3 -> 2/5; class 1 TP 1 FN 3 -> 1/4; mIoU 0.325; acc 3/6
    m = SegMeter(2)
    m.update(torch.tensor([[[0, 0]]]), torch.tensor([[[0, 0]]]))
    logits = torch.tensor([[[[0.0, 1, 1, 1]], [[1.0, 0, 0, 0]]]])  # argmax -> [1, 0, 0, 0]
    m.update(logits, torch.tensor([[[1, 1, 1, 1]]]))
    r = m.compute()
    assert r["mIoU"] == pytest.approx(32.5)
    assert r["pixel_acc"] == pytest.approx(50.0)


def test_seg_meter_errors():
    m = SegMeter(3)
    with pytest.raises(ValueError, match="channels"):
        m.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target class 5"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 5))
    with pytest.raises(ValueError, match="no valid pixels"):
        SegMeter(3).compute()


def test_seg_meter_rejects_fractional_targets_and_nan_logits():
    m = SegMeter(3)
    with pytest.raises(ValueError, match=r"`target` must hold integer class ids in \[0, 3\) or ignore_index -1.*0\.5"):
        m.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0.0, 0.5]]]))
    with pytest.raises(ValueError, match=r"`target` must hold integer class ids.*nan"):
        m.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0.0, float("nan")]]]))
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`pred` has 1 non-finite value.*logits must be finite"):
        m.update(logits, torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match=r"`pred` must hold integer class ids.*1\.5"):
        m.update(torch.tensor([[[0.0, 1.5]]]), torch.tensor([[[0, 1]]]))
    assert m.confusion.sum() == 0                        # nothing was counted by the failed updates
    # integer-valued float targets (-1.0 = void) are fine, and a NaN logit on a void pixel is not looked at
    m.update(logits, torch.tensor([[[-1.0, 1.0]]]))      # pixel 2: logits (0, 0, 0) -> argmax 0, truth 1
    assert m.compute()["pixel_acc"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- depth
def test_depth_meter_pixel_accumulated():
    # batch 1 valid diffs (target 0 is invalid): -1 (t=2), 2 (t=1), 0 (t=4)
    # batch 2: diff 4 (t=1).  n = 4
    # abs = (1 + 2 + 0 + 4) / 4; rel = (1/2 + 2 + 0 + 4) / 4; rmse = sqrt((1 + 4 + 0 + 16) / 4)
    m = DepthMeter()
    m.update(torch.tensor([1.0, 2, 3, 4]).view(1, 1, 1, 4), torch.tensor([2.0, 0, 1, 4]).view(1, 1, 1, 4))
    m.update(torch.tensor([5.0]).view(1, 1, 1, 1), torch.tensor([1.0]).view(1, 1, 1, 1))
    r = m.compute()
    assert r["abs_err"] == pytest.approx(7 / 4)
    assert r["rel_err"] == pytest.approx(6.5 / 4)
    assert r["rmse"] == pytest.approx(math.sqrt(21 / 4))


def _depth(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_depth_meter_image_averaged():
    # image 1: diffs -1 (t=2), 2 (t=1); the 0 target is invalid -> abs 3/2, rel (1/2 + 2)/2 = 5/4,
    #          rmse sqrt((1 + 4)/2)
    # image 2: diff 4 (t=1); three invalid pixels -> abs 4, rel 4, rmse 4
    # image 3: no valid pixel (targets 0) -> skipped, counted; its NaN prediction is never scored
    # image 4 (second update): diffs 0, 0, 3 (t=4, 4, 3) -> abs 1, rel 1/3, rmse sqrt(3)
    # mean over the 3 scored images; pixel-wise (one image counting per pixel) would differ
    nan = float("nan")
    m = DepthMeter("image")
    m.update(_depth([1.0, 2, 3, 4], [5, 7, 7, 7], [nan, 1, 1, 1]),
             _depth([2.0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]))
    m.update(_depth([4.0, 4, 6, 9]), _depth([4.0, 4, 3, 0]))
    r = m.compute()
    assert r["abs_err"] == pytest.approx((3 / 2 + 4 + 1) / 3)
    assert r["rel_err"] == pytest.approx((5 / 4 + 4 + 1 / 3) / 3)
    assert r["rmse"] == pytest.approx((math.sqrt(5 / 2) + 4 + math.sqrt(3)) / 3)
    assert (r["images"], r["skipped_images"]) == (3, 1)
    # the same data pixel-wise: 6 valid pixels, |diffs| 1 2 4 0 0 3
    p = DepthMeter()
    p.update(_depth([1.0, 2, 3, 4], [5, 7, 7, 7], [nan, 1, 1, 1]),
             _depth([2.0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]))
    p.update(_depth([4.0, 4, 6, 9]), _depth([4.0, 4, 3, 0]))
    assert p.compute() == pytest.approx({"abs_err": 10 / 6, "rel_err": (1 / 2 + 2 + 4 + 1) / 6,
                                         "rmse": math.sqrt(30 / 6)})
    m.reset()
    assert (m.n, m.skipped) == (0, 0)


def test_depth_meter_image_average_errors():
    m = DepthMeter("image")
    m.update(_depth([1.0, 2]), _depth([0.0, 0]))
    with pytest.raises(ValueError, match=r"no valid depth pixels were seen \(1 image\(s\) had none\)"):
        m.compute()
    with pytest.raises(ValueError, match="average must be 'pixel' or 'image', got 'batch'"):
        DepthMeter("batch")
    with pytest.raises(ValueError, match="`pred` has 1 non-finite value"):
        DepthMeter("image").update(_depth([float("inf"), 1.0]), _depth([2.0, 1.0]))
    assert build_meters(["depth"], depth_average="image")["depth"].average == "image"
    assert build_meters(["depth"])["depth"].average == "pixel"


def test_depth_meter_shape_error():
    with pytest.raises(ValueError, match="DepthMeter"):
        DepthMeter().update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))


def test_depth_meter_rejects_nan_predictions_on_valid_pixels_only():
    nan = float("nan")
    with pytest.raises(ValueError, match="DepthMeter.update: `pred` has 1 non-finite value"):
        DepthMeter().update(torch.tensor([nan, 1.0]).view(1, 1, 1, 2), torch.tensor([2.0, 1.0]).view(1, 1, 1, 2))
    m = DepthMeter()                                     # NaN where the target is invalid (0): not scored
    m.update(torch.tensor([nan, 3.0]).view(1, 1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))
    assert m.compute()["abs_err"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- normals
def _normals(vectors):
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, len(vectors))


def test_normals_meter_hand_computed():
    # angles 0, 90, 45, 180 (predictions are normalized first); the last target is invalid
    pred = _normals([[2, 0, 0], [0, 3, 0], [1, 1, 0], [-1, 0, 0], [0, 0, 1]])
    target = _normals([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    m = NormalsMeter()
    m.update(pred, target)
    r = m.compute()
    assert r["mean"] == pytest.approx(315 / 4)
    assert r["median"] == pytest.approx((45 + 90) / 2, abs=1e-3)   # even count: mean of the middle two
    assert r["rmse"] == pytest.approx(math.sqrt((0 + 45 ** 2 + 90 ** 2 + 180 ** 2) / 4))
    assert r["11.25"] == pytest.approx(25.0)
    assert r["22.5"] == pytest.approx(25.0)
    assert r["30"] == pytest.approx(25.0)


def test_normals_meter_thresholds_and_odd_median():
    # angles 10, 20, 29 degrees in the x-y plane: within 11.25 -> 1/3, 22.5 -> 2/3, 30 -> 3/3
    ang = np.deg2rad([10, 20, 29])
    pred = _normals([[np.cos(a), np.sin(a), 0] for a in ang])
    m = NormalsMeter()
    m.update(pred, _normals([[1, 0, 0]] * 3))
    r = m.compute()
    assert r["median"] == pytest.approx(20, abs=1e-3)
    assert (r["11.25"], r["22.5"], r["30"]) == pytest.approx((100 / 3, 200 / 3, 100.0))


def test_normals_meter_two_updates_equal_one_update_on_the_concatenation():
    # image 1: angles 10 and 90 degrees; image 2: 25 and 180 (targets all +x)
    # mean (10 + 90 + 25 + 180) / 4 = 76.25; median (25 + 90) / 2 = 57.5;
    # rmse sqrt((100 + 8100 + 625 + 32400) / 4); within 11.25: 1/4, 22.5: 1/4, 30: 2/4
    def img(a, b):
        return _normals([[math.cos(math.radians(x)), math.sin(math.radians(x)), 0] for x in (a, b)])
    p1, p2 = img(10, 90), img(25, 180)
    t = _normals([[1, 0, 0]] * 2)
    two, one = NormalsMeter(), NormalsMeter()
    two.update(p1, t)
    two.update(p2, t)
    one.update(torch.cat([p1, p2]), torch.cat([t, t]))
    r2, r1 = two.compute(), one.compute()
    assert r2 == pytest.approx(r1)
    assert r1["mean"] == pytest.approx(76.25, abs=1e-4)
    assert r1["median"] == pytest.approx(57.5, abs=1e-3)
    assert r1["rmse"] == pytest.approx(math.sqrt(41225 / 4), abs=1e-4)
    assert (r1["11.25"], r1["22.5"], r1["30"]) == pytest.approx((25.0, 25.0, 50.0))


def test_normals_meter_rejects_non_finite_predictions():
    # before: a NaN angle made the mean NaN but fell into histogram bin 0 (median, % within looked fine)
    pred = _normals([[1, 0, 0], [float("nan"), 0, 0], [0, 1, 0]])
    target = _normals([[1, 0, 0], [1, 0, 0], [1, 0, 0]])
    m = NormalsMeter()
    with pytest.raises(ValueError, match="NormalsMeter.update: `pred` has 1 non-finite value.*must be finite"):
        m.update(pred, target)
    pred[0, 0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.update(pred, target)
    assert m.n == 0
    # on a pixel with an invalid (all-zero) target the prediction is not scored, so NaN is allowed there
    m.update(pred, _normals([[1, 0, 0], [0, 0, 0], [1, 0, 0]]))
    assert m.compute()["mean"] == pytest.approx(45.0)    # angles 0 and 90


# ----------------------------------------------------------------------------- saliency
def test_saliency_meter_beta2_hand_computed():
    # probs .9 .6 .3 .1, truth 1 0 1 0; the 5th pixel is ignored (255)
    # th .2: TP2 FP1 FN0 -> P 2/3 R 1 IoU 2/3 -> F = 1.3 * 2/3 / (0.3 * 2/3 + 1) = 0.7222
    # th .5: TP1 FP1 FN1 -> P .5 R .5 IoU 1/3 -> F = .5
    # th .8: TP1 FP0 FN1 -> P 1 R .5 IoU .5  -> F = 1.3 * .5 / (.3 + .5) = .8125  (F1 would pick .2)
    probs = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.95]).view(1, 1, 1, 5)
    gt = torch.tensor([1.0, 0, 1, 0, 255]).view(1, 1, 1, 5)
    m = SaliencyMeter(thresholds=[0.2, 0.5, 0.8], from_logits=False)
    m.update(probs, gt)
    r = m.compute()
    assert r["maxF"] == pytest.approx(81.25)
    assert r["maxF_threshold"] == pytest.approx(0.8)
    assert r["max_mIoU"] == pytest.approx(200 / 3)
    assert r["max_mIoU_threshold"] == pytest.approx(0.2)


def test_saliency_meter_applies_exactly_one_sigmoid_to_logits():
    probs = torch.tensor([0.9, 0.6, 0.3, 0.1])
    logits = torch.log(probs / (1 - probs)).view(1, 1, 1, 4)
    gt = torch.tensor([1.0, 0, 1, 0]).view(1, 1, 1, 4)
    m = SaliencyMeter(thresholds=[0.2, 0.5, 0.8])
    m.update(logits, gt)
    assert m.compute()["maxF"] == pytest.approx(81.25)


def test_saliency_probability_of_one_or_two_channels():
    z = torch.tensor([-2.0, 0.0, 3.0]).view(1, 1, 1, 3)
    assert torch.allclose(saliency_probability(z), torch.sigmoid(z))
    two = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 2.0]]).view(1, 2, 1, 3)
    # softmax channel 1 = sigmoid of the difference of the two logits
    assert torch.allclose(saliency_probability(two), torch.sigmoid(two[:, 1:] - two[:, :1]))
    assert saliency_probability(two).shape == (1, 1, 1, 3)
    for bad in (torch.zeros(1, 3, 1, 3), torch.zeros(1, 3)):
        with pytest.raises(ValueError, match=r"\(B, 1, H, W\) or \(B, 2, H, W\) logits"):
            saliency_probability(bad)


def test_saliency_meter_takes_one_logit_or_two_class_logits():
    # the hand-computed example above: probs .9 .6 .3 .1 as one logit z = logit(p) and as the
    # class logits (0, z), and as arbitrary class logits (a, a + z): the same maxF
    probs = torch.tensor([0.9, 0.6, 0.3, 0.1])
    z = torch.log(probs / (1 - probs)).view(1, 1, 1, 4)
    gt = torch.tensor([1.0, 0, 1, 0]).view(1, 1, 1, 4)
    a = torch.tensor([3.0, -1.0, 0.5, 7.0]).view(1, 1, 1, 4)
    results = []
    for pred in (z, torch.cat([torch.zeros_like(z), z], 1), torch.cat([a, a + z], 1)):
        m = SaliencyMeter(thresholds=[0.2, 0.5, 0.8])
        m.update(pred, gt)
        results.append(m.compute())
    assert results[0]["maxF"] == pytest.approx(81.25)
    assert results[1] == pytest.approx(results[0]) and results[2] == pytest.approx(results[0])
    m = SaliencyMeter(thresholds=[0.5])
    with pytest.raises(ValueError, match="`pred` has 1 non-finite value"):
        m.update(torch.tensor([[0.0, 0], [float("nan"), 0]]).view(1, 2, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"must both be \(B, 1, H, W\) \(the prediction may also be \(B, 2"):
        m.update(torch.zeros(1, 3, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"must both be \(B, 1, H, W\)$"):  # probabilities: 1 channel
        SaliencyMeter(from_logits=False).update(torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"must both be \(B, 1, H, W\)$"):  # edges: 1 logit only
        EdgeMeter().update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


def test_saliency_meter_averages_per_image():
    # image 1 (th .5): P .5 R .5 IoU 1/3; image 2: truth and prediction empty -> P 0, R 0, IoU 1
    # mean P = R = .25 -> F = .25; mean IoU = 2/3
    m = SaliencyMeter(thresholds=[0.5], from_logits=False)
    m.update(torch.tensor([[0.9, 0.6, 0.3, 0.1], [0.1, 0.1, 0.1, 0.1]]).view(2, 1, 1, 4),
             torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]]).view(2, 1, 1, 4))
    r = m.compute()
    assert r["maxF"] == pytest.approx(25.0)
    assert r["max_mIoU"] == pytest.approx(200 / 3)


def test_saliency_meter_two_updates_equal_one_update_on_the_concatenation():
    # threshold .5.  image A: probs .9 .6 .3 .1, truth 1 0 1 0 -> TP1 FP1 FN1: P 1/2, R 1/2, IoU 1/3
    #                image B: probs .9 .8 .3 .2, truth 1 1 1 0 -> TP2 FP0 FN1: P 1, R 2/3, IoU 2/3
    #                image C: every pixel ignored -> no P / R / IoU, skipped
    # mean P 3/4, mean R 7/12 -> F = 1.3 * (3/4)(7/12) / (0.3 * 3/4 + 7/12) = 0.56875 / (9.7/12) = 6.825 / 9.7
    # mean IoU 1/2.  (Pooling the pixels instead would give P 3/4, R 3/5.)
    pa = torch.tensor([0.9, 0.6, 0.3, 0.1]).view(1, 1, 1, 4)
    ga = torch.tensor([1.0, 0, 1, 0]).view(1, 1, 1, 4)
    pb = torch.tensor([[0.9, 0.8, 0.3, 0.2], [0.9, 0.9, 0.9, 0.9]]).view(2, 1, 1, 4)
    gb = torch.tensor([[1.0, 1, 1, 0], [255, 255, 255, 255]]).view(2, 1, 1, 4)
    two = SaliencyMeter(thresholds=[0.5], from_logits=False)
    two.update(pa, ga)
    two.update(pb, gb)
    one = SaliencyMeter(thresholds=[0.5], from_logits=False)
    one.update(torch.cat([pa, pb]), torch.cat([ga, gb]))
    r2, r1 = two.compute(), one.compute()
    assert r2 == pytest.approx(r1)
    assert r1["maxF"] == pytest.approx(100 * 6.825 / 9.7)
    assert r1["max_mIoU"] == pytest.approx(50.0)


def test_saliency_meter_accepts_the_loaders_label_conventions():
    # float {0, 1} with 255 = ignore (what ctal/data produces), uint8 and bool give the same numbers
    probs = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.95]).view(1, 1, 1, 5)
    gt = torch.tensor([1.0, 0, 1, 0, 255]).view(1, 1, 1, 5)
    results = []
    for g in (gt, gt.to(torch.uint8)):
        m = SaliencyMeter(thresholds=[0.2, 0.5, 0.8], from_logits=False)
        m.update(probs, g)
        results.append(m.compute()["maxF"])
    m = SaliencyMeter(thresholds=[0.2, 0.5, 0.8], from_logits=False)
    m.update(probs[..., :4], gt[..., :4].bool())
    results.append(m.compute()["maxF"])
    assert results == pytest.approx([81.25] * 3)


def test_saliency_meter_errors():
    nan = float("nan")
    m = SaliencyMeter(thresholds=[0.5], from_logits=False)
    p = torch.full((1, 1, 1, 4), 0.7)
    with pytest.raises(ValueError, match=r"SaliencyMeter.update: `target` must hold 0 or 1 \(or 255 = ignore\).*0\.5"):
        m.update(p, torch.tensor([1.0, 0.5, 0, 255]).view(1, 1, 1, 4))         # soft target
    with pytest.raises(ValueError, match=r"`target` must hold 0 or 1.*nan"):
        m.update(p, torch.tensor([1.0, nan, 0, 0]).view(1, 1, 1, 4))
    with pytest.raises(ValueError, match="SaliencyMeter.update: `pred` has 1 non-finite value"):
        m.update(torch.tensor([0.7, nan, 0.1, 0.1]).view(1, 1, 1, 4), torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4))
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*from_logits=False"):
        m.update(torch.tensor([3.0, 0, 0, 0]).view(1, 1, 1, 4), torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4))
    assert not m.prec                                                          # nothing was recorded
    # compute() without a single valid pixel: nothing seen, an all-ignored image, a zero-size batch
    for pred, target in [(None, None), (p, torch.full((1, 1, 1, 4), 255.0)),
                         (torch.zeros(0, 1, 1, 4), torch.zeros(0, 1, 1, 4))]:
        m = SaliencyMeter()
        if pred is not None:
            m.update(pred, target)
        with pytest.raises(ValueError, match=r"SaliencyMeter.compute\(\): no valid \(non-ignored\) target pixels"):
            m.compute()
    # a {0, 255} mask passes the value check (255 is the ignore value) but has no salient pixel at all
    m = SaliencyMeter()
    m.update(torch.zeros(1, 1, 1, 4), torch.tensor([0.0, 255, 255, 0]).view(1, 1, 1, 4))
    with pytest.raises(ValueError, match=r"no salient target pixel \(target == 1\) in the whole set"):
        m.compute()


# ----------------------------------------------------------------------------- edges
def _line(row, value=1.0, cols=slice(None), size=10):
    x = torch.zeros(1, 1, size, size)
    x[0, 0, row, cols] = value
    return x


def test_edge_meter_exact_and_tolerance():
    gt = _line(5)
    m = EdgeMeter(thresholds=[0.5], from_logits=False)
    m.update(_line(5, 0.9), gt)
    r = m.compute()
    # one threshold, P = R = 1; AP = 100 recall levels at precision 1, divided by 101
    assert r["odsF"] == pytest.approx(100.0)
    assert r["oisF"] == pytest.approx(100.0)
    assert r["AP"] == pytest.approx(100 * 100 / 101)
    # one row off: the diagonal of a 10x10 image is 14.1 px; 0.0075 of it (0.11 px) matches nothing,
    # 0.1 of it (1.41 px) matches every pixel
    strict = EdgeMeter(max_dist=0.0075, thresholds=[0.5], from_logits=False)
    strict.update(_line(6, 0.9), gt)
    assert strict.compute()["odsF"] == pytest.approx(0.0)
    loose = EdgeMeter(max_dist=0.1, thresholds=[0.5], from_logits=False)
    loose.update(_line(6, 0.9), gt)
    assert loose.compute()["odsF"] == pytest.approx(100.0)


def test_edge_meter_half_recall():
    m = EdgeMeter(thresholds=[0.5], from_logits=False)
    m.update(_line(5, 0.9, cols=slice(0, 5)), _line(5))
    assert m.compute()["odsF"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)  # P 1, R 1/2


def test_edge_meter_ods_ois_ap():
    # thresholds .25 / .75.  Image A: true line at .9, false line (row 1) at .5;  image B: true line at .5
    # per threshold (count_r, sum_r, count_p, sum_p): .25 -> A (10,10,10,20) B (10,10,10,10)
    #                                                  .75 -> A (10,10,10,10) B (0,10,0,0)
    # set-wide: .25 -> R 1, P 2/3;  .75 -> R 1/2, P 1.  ODS interpolates (R, P) = (1 - d/2, 2/3 + d/3);
    # the best of the 101 points is d = 0.2: R .9, P 11/15 -> F = 1.32 / (49/30) = 39.6 / 49
    # OIS: A at .75 and B at .25 are both perfect -> 100
    # AP: recall >= t reaches precision 1 for t <= .5 (51 levels), 2/3 above (49 levels) -> /101
    a = _line(5, 0.9)
    a[0, 0, 1] = 0.5
    m = EdgeMeter(thresholds=[0.25, 0.75], from_logits=False)
    m.update(torch.cat([a, _line(5, 0.5)]), torch.cat([_line(5), _line(5)]))
    r = m.compute()
    assert r["odsF"] == pytest.approx(100 * 39.6 / 49)
    assert r["oisF"] == pytest.approx(100.0)
    assert r["AP"] == pytest.approx(100 * (51 + 49 * 2 / 3) / 101)


def test_edge_meter_ignores_ignore_pixels_and_uses_logits():
    gt = _line(5)
    gt[0, 0, 2] = 255.0                          # an ignored row
    logits = torch.full((1, 1, 10, 10), -10.0)
    logits[0, 0, 5] = 10.0
    logits[0, 0, 2] = 10.0                       # predicted edges on the ignored row do not count
    m = EdgeMeter(thresholds=[0.5])
    m.update(logits, gt)
    assert m.compute()["odsF"] == pytest.approx(100.0)


def test_edge_meter_rejects_bad_tolerance():
    with pytest.raises(ValueError, match="max_dist"):
        EdgeMeter(max_dist=2)


def test_edge_meter_matching_is_one_to_one():
    # truth: row 5; prediction: rows 5 and 6, both .9; no thinning; tolerance 0.1 * 14.1 px = 1.41 px
    # reaches the neighbour row.  One-to-one matching: the 10 truth pixels match the 10 row-5
    # predictions, the 10 row-6 predictions find no free partner -> P 10/20, R 10/10,
    # F = 2 * .5 / 1.5 = 2/3.  (A nearest-distance matcher would count all 20 as correct: P 1.)
    # AP: recall 1 at every level 0 .. .99 with precision 1/2 -> 100 * .5 / 101
    pred = _line(5, 0.9)
    pred[0, 0, 6] = 0.9
    m = EdgeMeter(max_dist=0.1, thresholds=[0.5], thin=False, from_logits=False)
    m.update(pred, _line(5))
    r = m.compute()
    assert r["odsF"] == pytest.approx(200 / 3)
    assert r["oisF"] == pytest.approx(200 / 3)
    assert r["AP"] == pytest.approx(100 * 0.5 * 100 / 101)


def test_edge_meter_errors():
    nan = float("nan")
    m = EdgeMeter(thresholds=[0.5], from_logits=False)
    soft = _line(5, 0.5)
    with pytest.raises(ValueError, match=r"EdgeMeter.update: `target` must hold 0 or 1 \(or 255 = ignore\).*0\.5"):
        m.update(_line(5, 0.9), soft)
    bad = _line(5, 0.9)
    bad[0, 0, 0, 0] = nan
    with pytest.raises(ValueError, match="EdgeMeter.update: `pred` has 1 non-finite value"):
        m.update(bad, _line(5))
    assert not m.per_image
    # NaN on an ignored pixel is not scored
    gt = _line(5)
    gt[0, 0, 0, 0] = 255.0
    m.update(bad, gt)
    assert m.compute()["odsF"] == pytest.approx(100.0)
    # a {0, 255} edge map: 255 reads as ignore, leaving no edge pixel at all
    m = EdgeMeter(thresholds=[0.5], from_logits=False)
    m.update(_line(5, 0.9), _line(5, 255.0))
    with pytest.raises(ValueError, match=r"no edge pixel \(target == 1\) in the whole set"):
        m.compute()
    m = EdgeMeter(thresholds=[0.5], from_logits=False)
    m.update(_line(5, 0.9), torch.full((1, 1, 10, 10), 255.0))
    with pytest.raises(ValueError, match=r"EdgeMeter.compute\(\): no valid \(non-ignored\) target pixels"):
        m.compute()


# ----------------------------------------------------------------------------- delta_m & builders
def test_delta_m_hand_computed():
    base = {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}, "normals": {"mean": 20.0}}
    res = {"semseg": {"mIoU": 44.0, "pixel_acc": 1.0}, "depth": {"rmse": 0.55}, "normals": {"mean": 18.0}}
    # +10 % mIoU, rmse 10 % worse (lower is better) -> -10 %, normals 10 % better -> +10 %
    assert delta_m(res, base) == pytest.approx(10 / 3)
    assert delta_m(res, base, keys=["semseg/mIoU", "depth/rmse"]) == pytest.approx(0.0)
    # a custom metric needs its direction
    with pytest.raises(KeyError, match="direction"):
        delta_m({"x": {"score": 2}}, {"x": {"score": 1}})
    assert delta_m({"x": {"score": 2}}, {"x": {"score": 1}}, {"x/score": False}) == pytest.approx(-100)


def test_delta_m_rejects_non_finite_metrics():
    base = {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}
    with pytest.raises(ValueError, match="delta_m: metric depth/rmse = nan is not a finite number"):
        delta_m({"semseg": {"mIoU": 44.0}, "depth": {"rmse": float("nan")}}, base)
    with pytest.raises(ValueError, match="metric semseg/mIoU = inf"):
        delta_m({"semseg": {"mIoU": float("inf")}, "depth": {"rmse": 0.5}}, base)
    with pytest.raises(ValueError, match="baseline depth/rmse = nan"):
        delta_m({"semseg": {"mIoU": 44.0}, "depth": {"rmse": 0.5}}, {**base, "depth": {"rmse": float("nan")}})


def test_baselines_json_roundtrip_and_errors(tmp_path):
    p = tmp_path / "stl.json"
    save_baselines(p, {"semseg": {"mIoU": 40.0, "pixel_acc": 70.0}, "depth": {"rmse": 0.5, "abs_err": 0.3}},
                   model="stl")
    assert load_baselines(p) == {"semseg/mIoU": 40.0, "depth/rmse": 0.5}
    assert json.loads(p.read_text())["model"] == "stl"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_baselines(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_baselines(tmp_path / "missing.json")
    nan = tmp_path / "nan.json"
    nan.write_text('{"semseg": {"mIoU": "high"}}')
    with pytest.raises(ValueError, match="semseg/mIoU"):
        load_baselines(nan)


def test_build_meters_and_multitask_meter():
    meters = build_meters(["semseg", "depth", "normals", "sal", "edge"], {"semseg": 3}, dataset="nyud_mt")
    assert isinstance(meters["semseg"], SegMeter) and meters["semseg"].num_classes == 3
    assert meters["edge"].max_dist == pytest.approx(0.011)
    assert build_meters(["edge"])["edge"].max_dist == pytest.approx(0.0075)
    with pytest.raises(ValueError, match="num_classes"):
        build_meters(["semseg"])
    mm = MultiTaskMeter(["semseg", "depth"], {"semseg": 2})
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])
    mm.update({"final": {"semseg": logits, "depth": torch.ones(1, 1, 1, 2)}, "aux": {}},
              {"semseg": torch.tensor([[[0, 0]]]), "depth": torch.full((1, 1, 1, 2), 2.0)})
    r = mm.compute()
    assert r["semseg"]["pixel_acc"] == pytest.approx(50.0)
    assert r["depth"]["abs_err"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad input
def test_meters_convert_numpy_arrays():
    """Numpy predictions / targets are converted (same numbers as the tensors); other types are a
    TypeError naming the argument."""
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])
    target = torch.tensor([[[0, 0]]])
    a, b = SegMeter(2), SegMeter(2)
    a.update(logits, target)
    b.update(logits.numpy(), target.numpy())
    assert torch.equal(a.confusion, b.confusion)
    d = DepthMeter()
    d.update(np.ones((1, 1, 1, 2), np.float32), np.full((1, 1, 1, 2), 2.0))
    assert d.compute()["abs_err"] == pytest.approx(1.0)
    s = SaliencyMeter()
    s.update(np.zeros((1, 1, 1, 2), np.float32), np.array([[[[1.0, 0.0]]]]))
    with pytest.raises(TypeError, match=r"SegMeter.update: `pred` must be a torch.Tensor or a numpy array, got list"):
        SegMeter(2).update([[0, 1]], target)
    with pytest.raises(TypeError, match=r"NormalsMeter.update: `target` must be a torch.Tensor or a numpy array, got str"):
        NormalsMeter().update(torch.zeros(1, 3, 1, 1), "normals.png")


def test_seg_meter_class_count_must_be_an_int():
    for bad in (True, False, 2.5, "13", None):
        with pytest.raises(TypeError, match=r"SegMeter: num_classes must be an int \(the class count\)"):
            SegMeter(bad)
    with pytest.raises(ValueError, match=r"SegMeter: num_classes must be >= 1, got 0"):
        SegMeter(0)
    assert SegMeter(np.int64(3)).num_classes == 3
    for bad in (True, 2.7):  # int() would have made these 1 and 2 classes
        with pytest.raises(TypeError, match="num_classes"):
            build_meters(["semseg"], {"semseg": bad})


def test_meters_refuse_inputs_without_a_batch_dimension():
    with pytest.raises(ValueError, match=r"SegMeter.update: `target` must be \(B, H, W\) class ids.*got shape \(2, 3\)"):
        SegMeter(3).update(torch.zeros(3, 2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"SegMeter.update: `target` must be \(B, H, W\)"):
        SegMeter(3).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    # (C, H, W) logits against a batch of one: named as a shape mismatch, not as non-integer ids
    with pytest.raises(ValueError, match=r"SegMeter.update: `pred` \(3, 2, 3\) does not fit `target` \(1, 2, 3\).*"
                                         r"\(B, 3, H, W\) logits or \(B, H, W\) class ids"):
        SegMeter(3).update(torch.randn(3, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"DepthMeter.update: `pred` must be \(B, 1, H, W\) or \(B, H, W\), got shape \(2, 3\)"):
        DepthMeter().update(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"NormalsMeter.update: `pred` must be \(B, 3, H, W\), got shape \(3, 2, 2\)"):
        NormalsMeter().update(torch.ones(3, 2, 2), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match=r"SaliencyMeter.update: `pred` must be \(B, 1, H, W\) or \(B, H, W\), got shape \(2, 2\)"):
        SaliencyMeter().update(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"EdgeMeter.update: `target` must be \(B, 1, H, W\) or \(B, H, W\), got shape \(2, 2\)"):
        EdgeMeter(thresholds=3).update(torch.zeros(1, 2, 2), torch.zeros(2, 2))


def test_missing_tasks_are_named():
    mm = MultiTaskMeter(["semseg", "depth"], {"semseg": 2})
    pred = {"semseg": torch.zeros(1, 2, 1, 2), "depth": torch.ones(1, 1, 1, 2)}
    target = {"semseg": torch.zeros(1, 1, 2, dtype=torch.long), "depth": torch.ones(1, 1, 1, 2)}
    with pytest.raises(ValueError, match=r"no prediction for task 'depth'.*predictions have \['semseg'\]"):
        mm.update({"semseg": pred["semseg"]}, target)
    with pytest.raises(ValueError, match=r"no target for task 'semseg'.*targets have \['depth'\]"):
        mm.update({"final": pred, "aux": {}}, {"depth": target["depth"], "meta": {}})
    with pytest.raises(ValueError, match=r"tasks.*distinct"):
        build_meters(["depth", "depth"])
