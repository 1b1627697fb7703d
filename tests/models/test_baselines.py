"""The published multitask baselines: Cross-Stitch, NDDR-CNN, MTAN on (dilated) ResNet, SCA on
HRNet, the single-task -> multitask initialization, the mixing-parameter learning rates, their configs, and
the MTI-Net evaluation protocol (single-task baselines -> delta_m)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ctal import config as cfglib
from ctal.engine.checkpoint import CheckpointError, load_model_state
from ctal.metrics import delta_m, load_baselines
from ctal.models import MODELS, build_model, init_from_single_task, list_models, param_groups
from ctal.models.backbones import ResNetBackbone, build_backbone, load_resnet_weights
from ctal.models.base import MultiTaskModel
from ctal.models.baselines import HardSharingNet, SingleTaskNet
from ctal.models.cross_stitch import CrossStitchNet
from ctal.models.mtan import MTAN
from ctal.models.nddr import NDDRNet
from ctal.models.sca import SCANet, WindowSelfAttention
from ctal.tasks import output_channels

from scripts import make_baselines

TWO = {"semseg": 5, "depth": 1}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- backbones -------------------------------------------------------------------------------

def test_resnet_dilation_and_weights():
    x = torch.randn(1, 3, 64, 64)
    assert ResNetBackbone(18, dilated=True)(x).shape == (1, 512, 8, 8)     # output stride 8
    assert ResNetBackbone(18, dilated=False)(x).shape == (1, 512, 2, 2)    # output stride 32
    bb = ResNetBackbone(18, dilated=True)
    # The strided 3x3 of a stage keeps the previous dilation, the others get the new one
    # (torchvision's rule for Bottleneck, which its ResNet-50 implements natively).
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer3] == [(1, 2), (2, 2)]
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer4] == [(2, 4), (4, 4)]
    assert all(c.stride == (1, 1) for c in bb.layer4.modules() if isinstance(c, nn.Conv2d))
    with torch.device("meta"):
        r50 = ResNetBackbone(50, dilated=True)
    assert [b.conv2.dilation[0] for b in r50.layer4] == [2, 4, 4]
    # torchvision's ImageNet layout loads 1:1; the classifier is dropped on purpose
    import torchvision
    report = load_resnet_weights(bb, torchvision.models.resnet18().state_dict())
    assert report.ok and report.ignored == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="shapes do not match"):
        load_resnet_weights(bb, {"conv1.weight": torch.zeros(64, 3, 3, 3)})
    # one ResNet implementation: the registry's backbones are the stage-runnable ones
    assert type(build_backbone("resnet18")) is ResNetBackbone
    assert ResNetBackbone("resnet18").depth == 18 and ResNetBackbone(18).variant == "resnet18"
    assert build_backbone("resnet18", dilated=False).reduction == 32
    with pytest.raises(ValueError, match="ResNet backbones"):
        build_backbone("hrnet_w18_small_v2", dilated=False)
    with pytest.raises(ValueError, match="unknown ResNet backbone"):
        ResNetBackbone("resnet34")


def test_registry_knows_the_published_baselines():
    models = set(list_models())
    assert {"stl_resnet", "hps_resnet", "cross_stitch", "nddr_cnn", "mtan", "sca"} <= models
    # one implementation per name: the ResNet baselines are the generic STL / HPS classes
    assert MODELS["stl_resnet"] is SingleTaskNet and MODELS["hps_resnet"] is HardSharingNet
    for name in ("cross_stitch", "nddr_cnn", "mtan", "stl_resnet", "hps_resnet"):
        with pytest.raises(ValueError, match="resnet"):
            build_model(name, list(TWO), {"semseg": 5}, (64, 64), backbone="hrnet_w18_small_v2")
    with pytest.raises(ValueError, match="hrnet"):
        build_model("sca", list(TWO), {"semseg": 5}, (64, 64), backbone="swin_v2_t")
    with pytest.raises(ValueError, match="hrnet"):
        build_model("sca", list(TWO), {"semseg": 5}, (64, 64), backbone="resnet18")
    model = build_model("mtan", list(TWO), {"semseg": 5}, (64, 64), backbone="resnet18", dilated=False)
    assert isinstance(model, MTAN) and model.model_name == "mtan" and model.backbone.reduction == 32
    stl = build_model("stl_resnet", list(TWO), {"semseg": 5}, (64, 64), backbone="resnet18", dilated=False)
    assert all(bb.reduction == 32 for bb in stl.backbones.values())


def test_mtan_undilated_downsamples_the_attention_path():
    model = MTAN(list(TWO), TWO, (64, 64), backbone="resnet18", dilated=False)
    assert model.downsample_after == {"layer1": True, "layer2": True, "layer3": True}
    assert model(torch.randn(2, 3, 64, 64))["final"]["semseg"].shape == (2, 5, 64, 64)
    bad = MTAN(list(TWO), TWO, (64, 64), backbone="resnet18", dilated=True,
               downsample={"layer1": True, "layer2": True})
    with pytest.raises(ValueError, match="downsample"):
        bad(torch.randn(2, 3, 64, 64))


# --- parameter counts equal to the published implementations -----------------------------------
# Source of every number: the published modules, instantiated in a scratch folder outside this
# repository and counted with sum(p.numel()): SimonVandenhende/Multi-Task-Learning-PyTorch
# (models/cross_stitch.py, nddr_cnn.py, mtan.py, resnet.py + resnet_dilated.py (dilated) +
# aspp.py DeepLabHead) with its configs configs/nyud/resnet50/*.yml and
# configs/pascal/resnet18/*.yml; kimsunkyung/SCA_MTL (models/mti_net.py, padnet.py, seg_hrnet.py
# HighResolutionHead / HighResolutionNet with model_info/hrnet_w18.yml).
NYUD = {"semseg": 40, "depth": 1}                                     # NYUD-MT, semseg + depth
PASCAL = {"semseg": 21, "human_parts": 7, "sal": 1, "edge": 1, "normals": 3}

PUBLISHED = {
    ("nyud", "resnet50", "stl_resnet"): 39643752 + 39633729,  # single-task semseg + depth nets
    ("nyud", "resnet50", "hps_resnet"): 55769449,
    ("nyud", "resnet50", "cross_stitch"): 79292841,
    ("nyud", "resnet50", "nddr_cnn"): 101591721,
    ("nyud", "resnet50", "mtan"): 72052713,
    ("pascal", "resnet18", "stl_resnet"): 15904085 + 15900487 + 15898945 + 15898945 + 15899459,
    ("pascal", "resnet18", "hps_resnet"): 34795873,
    ("pascal", "resnet18", "cross_stitch"): 79525921,
    ("pascal", "resnet18", "nddr_cnn"): 88318561,
    ("pascal", "resnet18", "mtan"): 36613425,
}
# SCA: published MTINet (backbone excluded) with the consistent widths (36, 72, 144, 288), plus
# its HRNet-W18-small-v2 (3,860,720, equal to ours). Each published Swin block also holds a
# LayerNorm it never uses (norm2, 2C parameters); ours leaves it out: 2 encoder blocks per branch
# (C = 18, 36, 72, 144) and 1 FPMA block per propagation (C = T * 72, T * 144, T * 288).
SCA_PUBLISHED_HEADLESS = {"nyud": 21902925, "pascal": 71095250}
HRNET_W18_SMALL_V2 = 3860720


def _unused_norm2(T: int) -> int:
    return sum(2 * 2 * c for c in (18, 36, 72, 144)) + sum(2 * T * c for c in (72, 144, 288))


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_parameter_counts_match_published(key):
    dataset, backbone, name = key
    outs = NYUD if dataset == "nyud" else PASCAL
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = MODELS[name](list(outs), outs, (512, 512), backbone=backbone)
    assert n_params(model) == PUBLISHED[key]


@pytest.mark.parametrize("dataset", ["nyud", "pascal"])
def test_sca_parameter_count_matches_published(dataset):
    outs = NYUD if dataset == "nyud" else PASCAL
    with torch.device("meta"):
        model = SCANet(list(outs), outs, (512, 512))
    assert n_params(model.backbone) == HRNET_W18_SMALL_V2
    headless = n_params(model) - n_params(model.backbone)
    assert headless == SCA_PUBLISHED_HEADLESS[dataset] - _unused_norm2(len(outs))
    # channel arithmetic: the cross-scale head sees 6*36 + 4*72 + 2*144 + 288 = 1080 channels
    assert model.heads["semseg"].channels == 1080


def test_window_self_attention_is_shape_preserving_on_any_grid():
    m = WindowSelfAttention(12, depth=2, num_heads=3, window_size=7).eval()
    for hw in [(5, 9), (7, 7), (16, 10)]:
        x = torch.randn(2, 12, *hw)
        assert m(x).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        WindowSelfAttention(10, depth=1, num_heads=4)


# --- mixing modules: initialization semantics ---------------------------------------------------

def test_cross_stitch_unit_and_nddr_layer_initialization():
    cs = CrossStitchNet(list(TWO), TWO, (64, 64), backbone="resnet18", alpha=0.9, beta=0.1)
    unit = cs.cross_stitch["layer2"]
    a, b = torch.rand(2, 128, 3, 3), torch.rand(2, 128, 3, 3)
    out = unit({"semseg": a, "depth": b})
    torch.testing.assert_close(out["semseg"], 0.9 * a + 0.1 * b)
    torch.testing.assert_close(out["depth"], 0.1 * a + 0.9 * b)
    nd = NDDRNet(list(TWO), TWO, (64, 64), backbone="resnet18", alpha=0.9, beta=0.1).eval()
    layer = nd.nddr["layer2"]
    out = layer({"semseg": a, "depth": b})
    bn = layer.layer["semseg"][1]
    scale = 1 / torch.sqrt(torch.tensor(1.0 + bn.eps))
    torch.testing.assert_close(out["semseg"], torch.relu((0.9 * a + 0.1 * b) * scale))
    torch.testing.assert_close(out["depth"], torch.relu((0.1 * a + 0.9 * b) * scale))
    with pytest.raises(ValueError, match=">= 2 tasks"):
        CrossStitchNet(["semseg"], {"semseg": 5}, (64, 64), backbone="resnet18")


# --- single-task -> multitask initialization ------------------------------------------------------

@pytest.fixture(scope="module")
def stl_checkpoints(tmp_path_factory):
    """Two 'trained' single-task ResNet-18 runs (random weights + perturbed BN statistics), saved
    as train.py checkpoints ({"model": state_dict, ...})."""
    d = tmp_path_factory.mktemp("stl")
    torch.manual_seed(1)
    paths = {}
    for t in TWO:
        stl = SingleTaskNet([t], {t: TWO[t]}, (64, 64), backbone="resnet18")
        with torch.no_grad():
            for name, buf in stl.named_buffers():
                if name.endswith("running_mean"):
                    buf.normal_(0, 0.1)
                elif name.endswith("running_var"):
                    buf.uniform_(0.5, 1.5)
        torch.save({"model": stl.state_dict(), "epoch": 3}, d / f"{t}.pt")
        paths[t] = d / f"{t}.pt"
    return paths


@pytest.fixture(scope="module")
def stl_states(stl_checkpoints):
    """The models' state dicts of ``stl_checkpoints``, read as the trainer reads them."""
    return {t: load_model_state(path) for t, path in stl_checkpoints.items()}


@pytest.mark.parametrize("cls", [CrossStitchNet, NDDRNet])
def test_single_task_initialization_copies_every_tensor(cls, stl_checkpoints, stl_states):
    model = cls(list(TWO), TWO, (64, 64), backbone="resnet18", single_task_weights=stl_states)
    for t, path in stl_checkpoints.items():
        src = torch.load(path, weights_only=False)["model"]
        for k, v in model.backbones[t].state_dict().items():
            assert torch.equal(v, src[f"backbones.{t}.{k}"]), k
        for k, v in model.heads[t].state_dict().items():
            assert torch.equal(v, src[f"heads.{t}.{k}"]), k
    # the mixing modules keep their alpha / beta initialization
    if cls is CrossStitchNet:
        w = model.cross_stitch["layer3"].weight
        assert torch.all(w[0, 0] == 0.9) and torch.all(w[0, 1] == 0.1)


def test_identity_mixing_reproduces_the_single_task_networks(stl_checkpoints):
    """With alpha = 1, beta = 0 the stitched model must compute exactly the single-task networks
    it was initialized from (in eval mode): the copy is complete and in the right columns."""
    x = torch.randn(2, 3, 32, 32)
    expected = {}
    for t, path in stl_checkpoints.items():
        stl = SingleTaskNet([t], {t: TWO[t]}, (64, 64), backbone="resnet18")
        stl.load_state_dict(torch.load(path, weights_only=False)["model"])
        expected[t] = stl.eval()(x)["final"][t]
    # trainer-checkpoint dicts ({"model": state, "epoch": ...}) are accepted as they are
    checkpoints = {t: torch.load(path, weights_only=False) for t, path in stl_checkpoints.items()}
    cs = CrossStitchNet(list(TWO), TWO, (64, 64), backbone="resnet18", alpha=1.0, beta=0.0,
                        single_task_weights=checkpoints).eval()
    nd = NDDRNet(list(TWO), TWO, (64, 64), backbone="resnet18", alpha=1.0, beta=0.0,
                 single_task_weights=checkpoints).eval()
    with torch.no_grad():
        out_cs, out_nd = cs(x)["final"], nd(x)["final"]
    for t in TWO:
        torch.testing.assert_close(out_cs[t], expected[t], rtol=1e-4, atol=1e-5)
        # NDDR's BN (eval, fresh statistics) scales by 1/sqrt(1 + eps) per stage: ~5e-6 relative
        torch.testing.assert_close(out_nd[t], expected[t], rtol=1e-3, atol=1e-4)


def test_single_task_initialization_errors(stl_states):
    model = CrossStitchNet(list(TWO), TWO, (64, 64), backbone="resnet18")
    with pytest.raises(ValueError, match="no source for tasks"):
        init_from_single_task(model, {"semseg": stl_states["semseg"]})
    with pytest.raises(KeyError, match="no single-task network for 'depth'"):
        init_from_single_task(model, {"semseg": stl_states["semseg"], "depth": stl_states["semseg"]})
    wrong = SingleTaskNet(["semseg", "depth"], {"semseg": 7, "depth": 1}, (64, 64), backbone="resnet18")
    with pytest.raises(ValueError, match="other shapes"):
        init_from_single_task(model, {"semseg": wrong.state_dict(), "depth": wrong.state_dict()})
    mtan = MTAN(list(TWO), TWO, (64, 64), backbone="resnet18")
    with pytest.raises(TypeError, match="Cross-Stitch / NDDR-CNN"):
        init_from_single_task(mtan, stl_states)
    # a joint STL state dict (all tasks in one model) serves every task
    joint = SingleTaskNet(list(TWO), TWO, (64, 64), backbone="resnet18").state_dict()
    assert init_from_single_task(model, {t: joint for t in TWO}) == {
        t: len(model.backbones[t].state_dict()) + len(model.heads[t].state_dict()) for t in TWO}



def test_single_task_initialization_refuses_networks_that_are_not_single_task(stl_states):
    """A multitask model's tensors fit the single-task columns (same names, same shapes) but were
    trained jointly: a shared HPS backbone, or Cross-Stitch columns trained with stitching. Copying
    them would be a silent change of method, so only single-task layouts are accepted."""
    model = CrossStitchNet(list(TWO), TWO, (64, 64), backbone="resnet18")
    hps = HardSharingNet(list(TWO), TWO, (64, 64), backbone="resnet18").state_dict()
    with pytest.raises(ValueError, match=r"shared 'backbone\.\*'.*heads of 2 tasks \['semseg', 'depth'\]"):
        init_from_single_task(model, {t: hps for t in TWO})
    stitched = CrossStitchNet(list(TWO), TWO, (64, 64), backbone="resnet18").state_dict()
    with pytest.raises(ValueError, match=r"not a single-task network.*'cross_stitch\."):
        init_from_single_task(model, {t: stitched for t in TWO})
    mtan = MTAN(list(TWO), TWO, (64, 64), backbone="resnet18").state_dict()
    with pytest.raises(ValueError, match=r"not a single-task network.*'attention\."):
        init_from_single_task(model, {"semseg": mtan, "depth": stl_states["depth"]})
    # a one-task hard-sharing net is a single-task network
    one = HardSharingNet(["depth"], {"depth": 1}, (64, 64), backbone="resnet18").state_dict()
    assert init_from_single_task(model, {"semseg": stl_states["semseg"], "depth": one})["depth"] > 0


@pytest.mark.parametrize("cls", [CrossStitchNet, NDDRNet])
def test_single_task_weights_are_state_dicts_not_paths(cls, stl_checkpoints, stl_states):
    """The models do not read files (they do not depend on the engine): a path is a TypeError
    that names the argument, the task and the function that reads it."""
    for as_path in (Path, str):
        paths = {t: as_path(p) for t, p in stl_checkpoints.items()}
        with pytest.raises(TypeError, match=r"single_task_weights\['semseg'\] is a path .*"
                                            r"ctal\.engine\.checkpoint\.load_model_state"):
            cls(list(TWO), TWO, (64, 64), backbone="resnet18", single_task_weights=paths)
    with pytest.raises(TypeError, match=r"single_task_weights\['depth'\] is a path"):
        cls(list(TWO), TWO, (64, 64), backbone="resnet18",
            single_task_weights={"semseg": stl_states["semseg"], "depth": str(stl_checkpoints["depth"])})
    with pytest.raises(TypeError, match="single_task_weights must map each task.*load_model_state"):
        cls(list(TWO), TWO, (64, 64), backbone="resnet18", single_task_weights=str(stl_checkpoints["semseg"]))
    with pytest.raises(TypeError, match=r"single_task_weights\['semseg'\] must be a state dict"):
        cls(list(TWO), TWO, (64, 64), backbone="resnet18", single_task_weights={t: 3 for t in TWO})
    model = cls(list(TWO), TWO, (64, 64), backbone="resnet18")
    with pytest.raises(TypeError, match=r"single_task_weights\['semseg'\] is a path"):
        init_from_single_task(model, stl_checkpoints)


def test_load_model_state_reads_checkpoints_state_dict_files_and_dicts(tmp_path, stl_checkpoints):
    from ctal.engine import checkpoint
    state = SingleTaskNet(["depth"], {"depth": 1}, (64, 64), backbone="resnet18").state_dict()

    def same(sd):
        return list(sd) == list(state) and all(torch.equal(sd[k], v) for k, v in state.items())

    checkpoint.save(tmp_path / "run.pt", {"model": state, "epoch": 1, "rng": checkpoint.rng_state()})
    torch.save(state, tmp_path / "plain.pt")
    assert same(load_model_state(tmp_path / "run.pt")) and same(load_model_state(str(tmp_path / "plain.pt")))
    assert same(load_model_state({"model": {f"module.{k}": v for k, v in state.items()}}))  # DDP prefix
    assert same(load_model_state({"state_dict": state}))
    stl = torch.load(stl_checkpoints["depth"], weights_only=False)["model"]  # torch.save'd {"model": ...}
    loaded = load_model_state(stl_checkpoints["depth"])
    assert list(loaded) == list(stl) and all(torch.equal(v, stl[k]) for k, v in loaded.items())
    with pytest.raises(ValueError, match="not a state dict"):
        load_model_state({"weights": 1})
    with pytest.raises(TypeError, match="checkpoint path or a state dict"):
        load_model_state(3)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model_state(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_model_state(tmp_path / "missing.pt")
    damaged = bytearray((tmp_path / "plain.pt").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside a tensor's data: only the CRC can tell
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="damaged"):
        load_model_state(tmp_path / "damaged.pt")

# --- learning-rate scheme of the mixing parameters ----------------------------------------------

@pytest.mark.parametrize("cls,prefix", [(CrossStitchNet, "cross_stitch."), (NDDRNet, "nddr.")])
def test_mixing_parameters_get_100x_learning_rate(cls, prefix):
    model = cls(list(TWO), TWO, (64, 64), backbone="resnet18")
    extra = nn.Parameter(torch.zeros(2))  # e.g. uncertainty weights of the loss
    groups = param_groups(model, 1e-3, extra_params=[extra])
    assert [g["name"] for g in groups] == ["mixing", "base"]
    assert groups[0]["lr"] == pytest.approx(0.1) and groups[1]["lr"] == pytest.approx(1e-3)
    names = {id(p): k for k, p in model.named_parameters()}
    mixing = {names[id(p)] for p in groups[0]["params"]}
    assert mixing == {k for k in names.values() if k.startswith(prefix)}
    if cls is NDDRNet:  # the NDDR layers' BN parameters belong to the mixing group too
        assert any(k.endswith("1.weight") for k in mixing)
    base = [p for p in groups[1]["params"]]
    assert len(mixing) + len(base) == len(list(model.parameters())) + 1
    assert any(p is extra for p in base)
    # the per-group rates survive a schedule (the engine's poly schedule scales each group)
    opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (1 - e / 10) ** 0.9)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"] == pytest.approx(100.0)
    assert param_groups(model, 1e-3, mixing_lr_mult=1.0)[0]["lr"] == pytest.approx(1e-3)


def test_models_without_mixing_parameters_get_one_group():
    model = MTAN(list(TWO), TWO, (64, 64), backbone="resnet18")
    groups = param_groups(model, 1e-4)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))


def test_optimizer_param_groups_only_where_the_method_needs_them():
    for cls in (CrossStitchNet, NDDRNet):
        model = cls(list(TWO), TWO, (64, 64), backbone="resnet18", mixing_lr_mult=10.0)
        groups = model.optimizer_param_groups(1e-3)
        ref = param_groups(model, 1e-3)
        assert [(g["name"], g["lr"]) for g in groups] == [(g["name"], g["lr"]) for g in ref]
        assert groups[0]["lr"] == pytest.approx(1e-2)
        assert [list(map(id, g["params"])) for g in groups] == [list(map(id, g["params"])) for g in ref]
    for cls in (MTAN, SCANet, SingleTaskNet, HardSharingNet):
        assert not hasattr(cls, "optimizer_param_groups"), cls


def test_trainer_uses_the_models_parameter_groups(tmp_path):
    """A Trainer built from the Cross-Stitch config (tiny synthetic data) optimizes the stitch units
    at 100x the base rate, the rest of the model at the base rate, and the loss's uncertainty
    weights as well."""
    from ctal.engine import Trainer
    cfg = cfglib.apply_overrides(cfglib.load("nyud_mt_cross_stitch"), [
        f"data.root={tmp_path / 'data'}", "data.dataset=synthetic", "data.tasks=[semseg, depth]",
        "data.generate={num_train: 4, num_val: 2, size: [32, 32], seed: 0, workers: 0}",
        "data.batch_size=2", "data.num_workers=0", "data.augment=false", "model.backbone=resnet18",
        "model.pretrained=false", "model.single_task_weights=null", "train.epochs=1",
        "train.save_images=0", "loss.weighting=uncertainty", "loss.weights=null",
        "eval.best_metric=semseg/mIoU", "eval.baselines=null", f"output_dir={tmp_path / 'out'}"])
    t = Trainer(cfg, progress=False)
    try:
        groups = t.optimizer.param_groups
        assert [g["name"] for g in groups] == ["mixing", "base", "loss"]
        base_lr = cfg["optim"]["lr"]
        assert groups[0]["lr"] == pytest.approx(100 * base_lr)
        assert groups[1]["lr"] == pytest.approx(base_lr) and groups[2]["lr"] == pytest.approx(base_lr)
        names = {id(p): k for k, p in t.model.named_parameters()}
        assert {names[id(p)].split(".")[0] for p in groups[0]["params"]} == {"cross_stitch"}
        assert any(p is t.criterion.log_vars for p in groups[2]["params"])
        n_opt = sum(len(g["params"]) for g in groups)
        assert n_opt == len(list(t.model.parameters())) + len(list(t.criterion.parameters()))
        before = t.model.cross_stitch["layer4"].weight.detach().clone()
        t.train_epoch(0, max_steps=1)
        assert not torch.equal(before, t.model.cross_stitch["layer4"].weight)
    finally:
        t.close()


# --- the evaluation protocol: single-task baselines -> delta_m -----------------------------------

def _metrics_json(path: Path, best: dict, final: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": "run", "metrics": final, "best": {"score": 0.0, "epoch": 3, "metrics": best}}))
    return path


def test_make_baselines_and_delta_m_on_stored_baselines(tmp_path):
    seg = _metrics_json(tmp_path / "seg/metrics.json", {"semseg": {"mIoU": 0.40, "pixel_acc": 0.7}},
                        {"semseg": {"mIoU": 0.38, "pixel_acc": 0.69}})
    dep = _metrics_json(tmp_path / "dep/metrics.json", {"depth": {"rmse": 0.50, "abs_rel": 0.2}},
                        {"depth": {"rmse": 0.52, "abs_rel": 0.21}})
    out = tmp_path / "baselines.json"
    make_baselines.main([str(seg), str(dep), "--out", str(out)])
    base = load_baselines(out)
    assert base == {"semseg/mIoU": 0.40, "depth/rmse": 0.50}   # headline metrics, best epoch
    # +10% mIoU and +20% RMSE (worse): (10 - 20) / 2 = -5
    mt = {"semseg": {"mIoU": 0.44, "pixel_acc": 0.8}, "depth": {"rmse": 0.60, "abs_rel": 0.1}}
    assert delta_m(mt, base) == pytest.approx(-5.0)
    assert delta_m({"semseg": {"mIoU": 0.40}, "depth": {"rmse": 0.50}}, base) == pytest.approx(0.0)
    # the final evaluation instead of the selected one; a task given twice is refused
    make_baselines.main([str(seg), str(dep), "--out", str(out), "--use", "final"])
    assert load_baselines(out)["depth/rmse"] == 0.52
    with pytest.raises(ValueError, match="appears in both"):
        make_baselines.main([str(seg), str(seg), "--out", str(out)])
    make_baselines.main([f"semseg={seg}", f"depth={dep}", "--out", str(out)])
    assert json.loads(out.read_text())["sources"] == {"semseg": str(seg), "depth": str(dep)}


# --- configs: each builds its model and takes one optimizer step ----------------------------------

CONFIGS = ["nyud_mt_stl_resnet", "nyud_mt_hps_resnet", "nyud_mt_cross_stitch", "nyud_mt_nddr_cnn",
           "nyud_mt_mtan", "nyud_mt_sca", "nyud_mt_stl", "pascal_stl_resnet", "pascal_hps_resnet",
           "pascal_cross_stitch", "pascal_nddr_cnn", "pascal_mtan", "pascal_sca", "pascal_stl_hrnet"]
NUM_CLASSES = {"nyud_mt": {"semseg": 40}, "pascal_context": {"semseg": 21, "human_parts": 7}}


def _random_targets(tasks, num_classes, B, H, W):
    g = torch.Generator().manual_seed(0)
    tgt = {}
    for t in tasks:
        if t in ("semseg", "human_parts"):
            tgt[t] = torch.randint(0, num_classes[t], (B, H, W), generator=g)
        elif t == "depth":
            tgt[t] = torch.rand(B, 1, H, W, generator=g) * 5 + 0.5
        elif t == "normals":
            tgt[t] = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
        else:
            tgt[t] = (torch.rand(B, 1, H, W, generator=g) > 0.8).float()
    return tgt


def _build_from_config(cfg, size, **over):
    m = dict(cfg["model"], **over)
    name = m.pop("name")
    tasks = cfg["data"]["tasks"]
    ncls = NUM_CLASSES[cfg["data"]["dataset"]]
    return build_model(name, tasks, {t: ncls[t] for t in tasks if t in ncls}, size, **m)


def _config_step(name: str, size, full: bool) -> None:
    """Build the model of config ``name`` as the engine would (``full=False``: its first two tasks,
    ResNet-50 -> ResNet-18, to stay CI-sized), check the output contract, and take one optimizer
    step with the config's loss, optimizer (method's parameter groups) and schedule."""
    from ctal.engine.build import build_optimizer, build_scheduler
    from ctal.losses import MultiTaskLoss
    cfg = cfglib.load(name)
    over = dict(pretrained=False)
    if "single_task_weights" in cfg["model"]:
        over["single_task_weights"] = None  # covered by the initialization tests
    if not full:
        cfg["data"]["tasks"] = cfg["data"]["tasks"][:2]
        if (cfg["loss"].get("weights") or {}):
            cfg["loss"]["weights"] = {t: w for t, w in cfg["loss"]["weights"].items() if t in cfg["data"]["tasks"]}
        if cfg["model"].get("backbone") == "resnet50":
            over["backbone"] = "resnet18"
    torch.manual_seed(0)
    model = _build_from_config(cfg, size, **over)
    assert isinstance(model, MultiTaskModel)
    tasks = cfg["data"]["tasks"]
    ncls = NUM_CLASSES[cfg["data"]["dataset"]]
    criterion = MultiTaskLoss(tasks, **cfg["loss"])
    opt = build_optimizer(cfg, param_groups(model, cfg["optim"]["lr"], criterion.parameters()))
    build_scheduler(cfg, opt, cfg["train"]["epochs"])
    if cfg["model"]["name"] in ("cross_stitch", "nddr_cnn"):
        assert cfg["optim"]["name"] == "sgd"
        assert opt.param_groups[0]["lr"] == pytest.approx(100 * cfg["optim"]["lr"])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = model(torch.randn(2, 3, *size))
    assert set(out) == {"final", "aux"} and set(out["final"]) == set(tasks)
    for t in tasks:
        assert out["final"][t].shape == (2, output_channels(t, ncls.get(t)), *size)
    if cfg["model"]["name"] == "sca":  # deep supervision at the 4 MTI-Net scales, input resolution
        assert sorted(out["aux"]) == ["scale_0", "scale_1", "scale_2", "scale_3"]
        assert all(p.shape[-2:] == tuple(size) for a in out["aux"].values() for p in a.values())
    total, parts = criterion(out, _random_targets(tasks, ncls, 2, *size))
    assert torch.isfinite(total) and set(parts) == set(tasks)
    opt.zero_grad()
    total.backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    opt.step()
    # every parameter with a gradient moves (exact zeros with zero gradient may not: e.g. the
    # bias of a BN that feeds only other BNs, as SCA's cross-scale projections)
    stuck = [k for k, p in model.named_parameters() if torch.equal(before[k], p) and p.grad.abs().sum() > 0]
    assert not stuck, stuck[:5]
    changed = sum(not torch.equal(before[k], p) for k, p in model.named_parameters())
    assert changed >= 0.98 * len(before)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(2, 3, 50, 64))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_model_and_steps(name):
    _config_step(name, (32, 32), full=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_full_model_steps(name):
    """All the config's tasks on its own backbone (ResNet-50 on NYUD-MT)."""
    _config_step(name, (64, 96), full=True)


def test_configs_carry_the_published_hyperparameters():
    cs = cfglib.load("nyud_mt_cross_stitch")
    assert (cs["model"]["alpha"], cs["model"]["beta"], cs["optim"]["lr"], cs["train"]["epochs"]) == (0.9, 0.1, 1e-3, 50)
    assert cs["model"]["backbone"] == "resnet50" and cs["data"]["tasks"] == ["semseg", "depth"]
    pc = cfglib.load("pascal_nddr_cnn")
    assert (pc["model"]["alpha"], pc["model"]["beta"], pc["optim"]["lr"], pc["data"]["batch_size"]) == (0.8, 0.05, 5e-3, 12)
    assert pc["loss"]["weights"] == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0}
    assert cfglib.load("pascal_mtan")["optim"]["name"] == "sgd"
    assert cfglib.load("nyud_mt_mtan")["optim"] == {"name": "adam", "lr": 1e-4, "weight_decay": 1e-4}
    assert cfglib.load("nyud_mt_sca")["loss"]["weights"] == {"semseg": 1.44, "depth": 1.15}
    for name in CONFIGS:
        cfg = cfglib.load(name)
        assert cfg["schedule"] == {"name": "poly", "power": 0.9}, name
        is_stl = cfg["model"]["name"] in ("stl", "stl_resnet")
        assert (cfg["eval"]["best_metric"] == "delta_m") != is_stl, name
        assert bool(cfg["eval"]["baselines"]) != is_stl, name


# --- end to end: the protocol through train.py on synthetic scenes --------------------------------

def test_protocol_end_to_end_on_synthetic(tmp_path):
    """Single-task run -> baselines JSON -> Cross-Stitch initialized from it, model selection by
    delta_m, through the real Trainer (2 steps per epoch on 32x32 synthetic scenes)."""
    from ctal.engine import Trainer
    common = [f"data.root={tmp_path / 'data'}", "data.dataset=synthetic", "data.tasks=[semseg, depth]",
              "data.generate={num_train: 4, num_val: 2, size: [32, 32], seed: 0, workers: 0}",
              "data.batch_size=2", "data.num_workers=0", "data.augment=false", "model.backbone=resnet18",
              "model.pretrained=false", "train.epochs=1", "train.max_steps_per_epoch=2",
              "train.save_images=0", "eval.edge_thresholds=5", "loss.weights={semseg: 1.0, depth: 1.0}"]
    stl_cfg = cfglib.apply_overrides(cfglib.load("nyud_mt_stl_resnet"), common + [
        f"output_dir={tmp_path / 'stl'}"])
    t = Trainer(stl_cfg, progress=False)
    try:
        t.fit()
    finally:
        t.close()
    make_baselines.main([str(tmp_path / "stl/metrics.json"), "--out", str(tmp_path / "base.json")])
    cs_cfg = cfglib.apply_overrides(cfglib.load("nyud_mt_cross_stitch"), common + [
        f"output_dir={tmp_path / 'cs'}", f"eval.baselines={tmp_path / 'base.json'}",
        f"model.single_task_weights={{semseg: {tmp_path / 'stl/best.pt'}, depth: {tmp_path / 'stl/best.pt'}}}"])
    t = Trainer(cs_cfg, progress=False)
    try:
        stl_state = torch.load(tmp_path / "stl/best.pt", weights_only=False)["model"]
        k = "backbones.depth.layer3.0.conv1.weight"
        assert torch.equal(t.model.state_dict()[k], stl_state[k])
        metrics = t.fit()
    finally:
        t.close()
    summary = json.loads((tmp_path / "cs/metrics.json").read_text())
    assert summary["best"]["score"] == pytest.approx(delta_m(metrics, load_baselines(tmp_path / "base.json")))
