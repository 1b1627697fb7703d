"""Per-task losses and weighting schemes against hand-computed values."""
import math

import pytest
import torch

from ctal.losses import (MultiTaskLoss, balanced_bce_loss, balanced_ce_loss, depth_loss, edge_loss,
                         normals_loss, saliency_loss, segmentation_loss)

LN2 = math.log(2)


def test_cross_entropy_ignores_void():
    # pixel 1: logits (0, ln 3), target 1 -> -ln(3/4);  pixel 2: logits (0, 0), target 0 -> ln 2;
    # pixel 3 is void and does not count in the mean
    logits = torch.tensor([[0.0, 0.0, 5.0], [math.log(3), 0.0, -5.0]]).view(1, 2, 1, 3)
    target = torch.tensor([[[1, 0, -1]]])
    loss = segmentation_loss(logits, target)
    assert loss.item() == pytest.approx((-math.log(0.75) + LN2) / 2)
    with pytest.raises(ValueError, match="class 7"):
        segmentation_loss(logits, torch.tensor([[[7, 0, 0]]]))


def test_all_void_batch_gives_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)
    d = torch.randn(1, 1, 2, 2, requires_grad=True)
    assert depth_loss(d, torch.zeros(1, 1, 2, 2)).item() == 0.0


def test_masked_l1_depth():
    # valid pixels (target != 0): |1 - 2| and |3 - 5| -> mean 1.5
    pred = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    target = torch.tensor([2.0, 0.0, 5.0]).view(1, 1, 1, 3)
    assert depth_loss(pred, target).item() == pytest.approx(1.5)


def test_normals_losses_normalize_the_prediction():
    # pixel 1: (2,0,0) vs (1,0,0): cos 1; pixel 2: (0,5,0) vs (1,0,0): cos 0; pixel 3 invalid target
    pred = torch.tensor([[2.0, 0, 0], [0, 5, 0], [0, 0, 1]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 3)
    assert normals_loss(pred, target, "cosine").item() == pytest.approx(0.5)
    # l1: |(0,1,0) - (1,0,0)| summed = 2 -> per component 2/3; mean over 2 valid pixels = 1/3
    assert normals_loss(pred, target, "l1").item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="cosine"):
        normals_loss(pred, target, "l2")


def test_balanced_bce_edges_and_saliency():
    # logits 0 -> p = 1/2.  edges, pos weight .95: positive .95 ln2, negative .05 ln2, ignored pixel
    # excluded -> mean over 2 pixels = ln2 / 2
    logits = torch.zeros(1, 1, 1, 3)
    assert edge_loss(logits, torch.tensor([1.0, 0.0, 255.0]).view(1, 1, 1, 3)).item() == pytest.approx(LN2 / 2)
    # saliency: 1 positive of 4 -> w = 3/4: (3/4 ln2 + 3 * 1/4 ln2) / 4
    assert saliency_loss(torch.zeros(1, 1, 1, 4), torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)).item() == \
        pytest.approx(0.375 * LN2)
    # numerically stable for huge logits
    big = torch.tensor([100.0, -100.0]).view(1, 1, 1, 2)
    assert torch.isfinite(edge_loss(big, torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)))


def test_two_channel_saliency_is_the_papers_balanced_cross_entropy():
    # 2 class logits per pixel (channel 1 = salient); the 5th pixel is ignored.
    #   pixel   logits      target  CE = -ln softmax[target]
    #   1       (0, ln 3)   1       -ln(3/4)
    #   2       (0, 0)      0       ln 2
    #   3       (ln 3, 0)   0       -ln(3/4)
    #   4       (0, -ln 3)  1       -ln(1/4) = ln 4
    ln3 = math.log(3)
    logits = torch.tensor([[0.0, 0, ln3, 0, 9], [ln3, 0, 0, -ln3, -9]]).view(1, 2, 1, 5)
    target = torch.tensor([1.0, 0, 0, 1, 255]).view(1, 1, 1, 5)
    ce = [-math.log(0.75), LN2, -math.log(0.75), math.log(4)]
    # n = 4 valid, 2 of each class: w_neg = n_pos / n = 1/2 = w_pos -> the plain mean of the CEs
    assert saliency_loss(logits, target).item() == pytest.approx(sum(ce) / 4)
    # 3 negatives, 1 positive (pixel 4 relabelled 0: CE = -ln(3/4)): w_neg = 1/4, w_pos = 3/4;
    # loss = (3/4 * ce1 + 1/4 * (ce2 + ce3 + ce4')) / (3/4 + 3 * 1/4)
    target = torch.tensor([1.0, 0, 0, 0, 255]).view(1, 1, 1, 5)
    want = (0.75 * ce[0] + 0.25 * (ce[1] + ce[2] - math.log(0.75))) / 1.5
    assert saliency_loss(logits, target).item() == pytest.approx(want)
    assert balanced_ce_loss(logits, target[:, 0]).item() == pytest.approx(want)  # (B, H, W) targets
    # = PyTorch's class-weighted cross-entropy (a weighted mean) with those weights
    ref = torch.nn.functional.cross_entropy(logits[..., :4], target[:, 0, :, :4].long(),
                                            weight=torch.tensor([0.25, 0.75]))
    assert saliency_loss(logits, target).item() == pytest.approx(ref.item())


def test_two_channel_saliency_edge_cases():
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    for target in (torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3), torch.full((2, 1, 3, 3), 255.0)):
        loss = saliency_loss(logits, target)  # one class (its weight is 0) or nothing valid: 0
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(logits.grad == 0)
    with pytest.raises(ValueError, match=r"sal: targets of the 2-class loss must be 0, 1 or 255.*0\.5"):
        saliency_loss(logits, torch.full((2, 1, 3, 3), 0.5))
    with pytest.raises(ValueError, match="expected 2 class logits, got 1"):
        balanced_ce_loss(logits[:, :1], torch.zeros(2, 1, 3, 3))


def test_one_and_two_channel_saliency_losses_differ_by_the_papers_normalization():
    # A logit z and the class logits (0, z) give the same probabilities. The 1-logit loss averages
    # w y CE + (1 - w)(1 - y) CE over all n pixels; the 2-class loss divides the same sum by the
    # weights' total 2 n_pos n_neg / n: ratio n^2 / (2 n_pos n_neg).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 4, 5, generator=g)
    target = (torch.rand(2, 1, 4, 5, generator=g) > 0.7).float()
    n, n_pos = target.numel(), int(target.sum())
    one = saliency_loss(z, target)
    two = saliency_loss(torch.cat([torch.zeros_like(z), z], 1), target)
    assert two.item() == pytest.approx(one.item() * n * n / (2 * n_pos * (n - n_pos)), rel=1e-5)
    assert one.item() == pytest.approx(balanced_bce_loss(z, target, None, 255.0, "sal").item())


def test_multitask_loss_takes_two_channel_saliency_with_deep_supervision():
    crit = MultiTaskLoss(["sal"])
    target = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)
    final = torch.zeros(1, 2, 2, 2, requires_grad=True)
    aux = torch.zeros(1, 2, 1, 1, requires_grad=True)  # deep supervision at a lower resolution
    total, parts = crit({"final": {"sal": final}, "aux": {"initial": {"sal": aux}}}, {"sal": target})
    # every CE is ln 2 (uniform logits), so each weighted mean is ln 2: final + aux = 2 ln 2
    assert parts["sal"].item() == pytest.approx(2 * LN2)
    total.backward()
    assert final.grad.abs().sum() > 0 and aux.grad.abs().sum() > 0


def _batch():
    preds = {"semseg": torch.tensor([[0.0], [math.log(3)]]).view(1, 2, 1, 1),   # CE = -ln(3/4)
             "depth": torch.tensor([3.0]).view(1, 1, 1, 1)}                         # L1 = 1
    targets = {"semseg": torch.tensor([[[1]]]), "depth": torch.tensor([2.0]).view(1, 1, 1, 1)}
    return preds, targets


def test_fixed_weighting():
    preds, targets = _batch()
    total, per = MultiTaskLoss(["semseg", "depth"], weights={"semseg": 2.0})(preds, targets)
    assert per["semseg"].item() == pytest.approx(-math.log(0.75))
    assert per["depth"].item() == pytest.approx(1.0)
    assert total.item() == pytest.approx(-2 * math.log(0.75) + 1.0)


def test_uncertainty_parameters_are_optimized():
    preds, targets = _batch()
    crit = MultiTaskLoss(["semseg", "depth"], weighting="uncertainty")
    assert [n for n, _ in crit.named_parameters()] == ["log_vars"]
    # total = sum exp(-s) L + s; with s = (ln 2, 0): L_seg / 2 + ln 2 + L_depth
    with torch.no_grad():
        crit.log_vars.copy_(torch.tensor([LN2, 0.0]))
    total, _ = crit(preds, targets)
    assert total.item() == pytest.approx(-math.log(0.75) / 2 + LN2 + 1.0)
    opt = torch.optim.SGD(crit.parameters(), lr=0.1)
    before = crit.log_vars.detach().clone()
    total.backward()
    opt.step()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L: for depth (s=0, L=1) it is 0, for semseg it is positive
    assert crit.log_vars[0].item() < before[0].item()
    assert crit.log_vars[0].item() == pytest.approx(LN2 - 0.1 * (1 + math.log(0.75) / 2))
    assert crit.log_vars[1].item() == pytest.approx(0.0)


def test_dwa_weights_from_epoch_averages():
    preds, targets = _batch()
    crit = MultiTaskLoss(["semseg", "depth"], weighting="dwa")
    assert crit.end_epoch({"semseg": 1.0, "depth": 1.0}) == {"semseg": 1.0, "depth": 1.0}
    w = crit.end_epoch({"semseg": 2.0, "depth": 1.0})
    # ratios r = (2, 1), T = 2: w_t = 2 exp(r_t / 2) / (e^1 + e^0.5)
    e1, e05 = math.exp(1), math.exp(0.5)
    assert w["semseg"] == pytest.approx(2 * e1 / (e1 + e05))
    assert w["depth"] == pytest.approx(2 * e05 / (e1 + e05))
    total, per = crit(preds, targets)
    assert total.item() == pytest.approx(w["semseg"] * per["semseg"].item() + w["depth"] * per["depth"].item())
    # the DWA state is a buffer: it travels with state_dict (exact resume)
    clone = MultiTaskLoss(["semseg", "depth"], weighting="dwa")
    clone.load_state_dict(crit.state_dict())
    assert clone.current_weights() == pytest.approx(w)


def test_deep_supervision_and_errors():
    preds, targets = _batch()
    aux = {"scale1": {"depth": torch.tensor([4.0, 4.0, 4.0, 4.0]).view(1, 1, 2, 2)}}  # upsampled: L1 = 2
    total, per = MultiTaskLoss(["depth"], aux_weight=0.5)({"final": {"depth": preds["depth"]}, "aux": aux},
                                                          {"depth": targets["depth"]})
    assert per["depth"].item() == pytest.approx(1.0 + 0.5 * 2.0)
    with pytest.raises(ValueError, match="weighting"):
        MultiTaskLoss(["depth"], weighting="gradnorm")
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskLoss(["depth", "optical_flow"])
    with pytest.raises(ValueError, match="weights has 1 entries"):
        MultiTaskLoss(["depth", "semseg"], weights=[1.0])
    with pytest.raises(KeyError, match="semseg"):
        MultiTaskLoss(["semseg", "depth"])({"depth": preds["depth"]}, targets)


def test_state_of_another_task_order_is_refused():
    """The loss state (static / DWA weights, uncertainty log-variances, loss history) is indexed by
    task position: loading it into the same tasks in another order would swap the weights."""
    crit = MultiTaskLoss(["semseg", "depth"], weighting="uncertainty", weights={"semseg": 2.0})
    swapped = MultiTaskLoss(["depth", "semseg"], weighting="uncertainty", weights={"semseg": 2.0})
    with pytest.raises(ValueError, match=r"saved for the tasks \['semseg', 'depth'\] \(in this order\), "
                                         r"this MultiTaskLoss has \['depth', 'semseg'\]"):
        swapped.load_state_dict(crit.state_dict())
    same = MultiTaskLoss(["semseg", "depth"], weighting="uncertainty", weights={"semseg": 2.0})
    same.load_state_dict(crit.state_dict())
    old = {k: v for k, v in crit.state_dict().items() if k != "task_order"}
    with pytest.warns(UserWarning, match="no task-order record"):
        same.load_state_dict(old)


@pytest.mark.parametrize("bad", ["keys", "type", "training", "items", "values", "a.b", "", 3, None])
def test_task_names_that_collide_with_module_attributes_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match=r"tasks\[1\] .*task name"):
        MultiTaskLoss(["depth", bad])
