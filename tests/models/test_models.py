"""Models: parameter counts of the paper's configs, equality with the paper's forward function,
output contract, forward/backward of every model, backends, resolution handling, weight loaders.

Parameter counts and golden outputs come from instantiating the paper's own code
(Dimitri-Sinodinos/CTAL @ b2d3bb9, ``code_cnn/config.py::get_model`` for HRNet models and
``code_transformer/config.py::get_model`` for Swin models, with ``pretrained=False``; the ResNet
baselines from SimonVandenhende/Multi-Task-Learning-PyTorch) in a scratch folder outside this
repository; the numbers are recorded here, not the code.
"""
from __future__ import annotations

import math

import pytest
import torch

import ctal.ops as ops
from ctal.models import (CTALNet, HRNetBackbone, ResNetBackbone, SwinBackbone, build_model,
                         list_models, load_hrnet_weights, load_swin_weights, paper_setup)
from ctal.tasks import output_channels

HRNET = "hrnet_w18_small_v2"
SIZE = (32, 64)  # small: every backbone stage still has >= 1x2 pixels
TASKS3 = ["semseg", "depth", "normals"]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name, **kw):
    """Build on the meta device: shapes only, no memory, no init (param counts in milliseconds)."""
    with torch.device("meta"):
        return build_model(name, **kw)


# --------------------------------------------------------------------------- parameter counts
# Source: the paper's code (see module docstring), instantiated with the same tasks / classes /
# training size. NYUv2: semseg 13 + depth + normals at 288x384; Cityscapes: semseg 19 + depth at
# 128x256. The fusion weights of the CTAL models depend on the grid (N = H/4 * W/4).
PAPER_HRNET_COUNTS = {
    ("nyuv2", "stl"): 11_807_897, ("nyuv2", "hps"): 4_086_457, ("nyuv2", "padnet"): 12_077_440,
    ("nyuv2", "papnet"): 4_780_425, ("nyuv2", "ctal"): 6_057_216, ("nyuv2", "m_ctal"): 11_149_783,
    ("nyuv2", "mti_net"): 12_638_901,
    ("cityscapes", "stl"): 7_874_280, ("cityscapes", "hps"): 4_013_560,
    ("cityscapes", "padnet"): 7_008_262, ("cityscapes", "papnet"): 4_501_770,
    ("cityscapes", "ctal"): 5_262_854, ("cityscapes", "m_ctal"): 8_474_086,
    ("cityscapes", "mti_net"): 8_566_734,
}
# PASCAL-Context at 512x512 (semseg 21, normals, sal, edge, human_parts 7), as the paper's code has
# them: 2 saliency channels (paper_setup's sal_channels=2). With one saliency logit every count is
# 257 smaller per saliency 1x1 conv from 256 channels (256 weights + 1 bias): one for STL and HPS
# (the head), two for PAD-Net, PAP-Net and CTALNet (the initial prediction and the head).
PAPER_SWIN_COUNTS = {
    ("swin_v2_t", "stl"): 171_035_188, ("swin_v2_t", "hps"): 60_704_908,
    ("swin_v2_t", "padnet"): 67_154_606, ("swin_v2_t", "papnet"): 38_974_791,
    ("swin_v2_t", "ctal"): 40_793_262,
    ("swin_v2_s", "stl"): 277_964_548, ("swin_v2_s", "hps"): 82_090_780,
    ("swin_v2_s", "padnet"): 88_540_478, ("swin_v2_s", "papnet"): 60_360_663,
    ("swin_v2_s", "ctal"): 62_179_134,
    ("swin_v2_b", "stl"): 477_154_298, ("swin_v2_b", "hps"): 129_530_906,
    ("swin_v2_b", "padnet"): 126_887_484, ("swin_v2_b", "papnet"): 98_707_669,
    ("swin_v2_b", "ctal"): 100_526_140,
}
SAL_CONVS = {"stl": 1, "hps": 1, "padnet": 2, "papnet": 2, "ctal": 2}

# Every packaged config of the paper's models (built as the engine builds them, weights off), with
# the count of the paper's code for its dataset's setting: the NYUv2 / Cityscapes numbers above and
# the Swin-v2-S PASCAL ones (2 saliency channels, model.sal_channels in _pascal.yaml).
PAPER_CONFIG_COUNTS = {
    **{f"{d}_{n}": c for (d, n), c in PAPER_HRNET_COUNTS.items()},
    **{f"pascal_{n}": c for (b, n), c in PAPER_SWIN_COUNTS.items() if b == "swin_v2_s"},
}


# Multi-Task-Learning-PyTorch (SimonVandenhende, models/resnet.py + resnet_dilated.py +
# aspp.DeepLabHead), instantiated with pretrained=False: NYUD on dilated ResNet-50 (semseg 40 +
# depth) and PASCAL on dilated ResNet-18 (semseg 21, human_parts 7, sal 1, normals, edge). STL is
# the sum of its single-task models.
MTL_RESNET_COUNTS = {
    ("resnet50", "hps_resnet"): 55_769_449, ("resnet50", "stl_resnet"): 79_277_481,
    ("resnet18", "hps_resnet"): 34_795_873, ("resnet18", "stl_resnet"): 79_501_921,
}
MTL_RESNET_SETUPS = {
    "resnet50": dict(tasks=["semseg", "depth"], num_classes={"semseg": 40}),
    "resnet18": dict(tasks=["semseg", "human_parts", "sal", "normals", "edge"],
                     num_classes={"semseg": 21, "human_parts": 7}),
}


@pytest.mark.parametrize("backbone,name", sorted(MTL_RESNET_COUNTS))
def test_param_count_resnet_baselines(backbone, name):
    model = build_meta(name, input_size=(480, 640), backbone=backbone, **MTL_RESNET_SETUPS[backbone])
    assert n_params(model) == MTL_RESNET_COUNTS[(backbone, name)]


@pytest.mark.parametrize("dataset,name", sorted(PAPER_HRNET_COUNTS))
def test_param_count_hrnet_models(dataset, name):
    assert n_params(build_meta(name, **paper_setup(dataset))) == PAPER_HRNET_COUNTS[(dataset, name)]


@pytest.mark.parametrize("backbone,name", sorted(PAPER_SWIN_COUNTS))
def test_param_count_swin_models(backbone, name):
    setup = paper_setup("pascal_context")
    setup["backbone"] = backbone
    assert n_params(build_meta(name, **setup)) == PAPER_SWIN_COUNTS[(backbone, name)]
    if backbone == "swin_v2_s":
        one_logit = build_meta(name, **dict(setup, sal_channels=1))
        assert n_params(one_logit) == PAPER_SWIN_COUNTS[(backbone, name)] - 257 * SAL_CONVS[name]


def _config_model(name: str):
    """The model of packaged config ``name`` as the engine builds it (``model_for``), on the meta
    device, for the paper's grid and classes of its dataset."""
    from types import SimpleNamespace

    from ctal import config as cfglib
    from ctal.engine.build import model_for
    cfg = cfglib.with_defaults(cfglib.load(name))
    setup = paper_setup(cfg["data"]["dataset"])
    tasks = cfg["data"]["tasks"]
    shape = SimpleNamespace(tasks=tasks, size=setup["input_size"],
                            num_classes={t: c for t, c in setup["num_classes"].items() if t in tasks})
    with torch.device("meta"):
        return model_for(cfg, shape, load_pretrained=False)


def test_every_paper_config_is_listed():
    from ctal import config as cfglib
    paper = {p.stem for p in cfglib.CONFIG_DIR.glob("*.yaml") if p.stem.split("_")[0] in ("nyuv2", "cityscapes", "pascal")
             and cfglib.load(p.stem)["model"]["name"] in list_models(paper=True)}
    # pascal_stl_hrnet: HRNet single-task baselines of SCA's protocol, not a model of the paper
    assert paper - {"pascal_stl_hrnet"} == set(PAPER_CONFIG_COUNTS)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIG_COUNTS))
def test_param_count_paper_configs(name):
    model = _config_model(name)
    assert n_params(model) == PAPER_CONFIG_COUNTS[name]
    if "sal" in model.tasks:
        assert model.num_outputs["sal"] == 2


@pytest.mark.parametrize("name", ["pascal_stl_resnet", "pascal_hps_resnet", "pascal_mtan", "pascal_sca"])
def test_mti_net_protocol_configs_keep_one_saliency_logit(name):
    """The published baselines' code predicts one saliency logit (balanced BCE)."""
    model = _config_model(name)
    assert model.num_outputs["sal"] == 1
    if name in ("pascal_stl_resnet", "pascal_hps_resnet"):
        assert n_params(model) == MTL_RESNET_COUNTS[("resnet18", name.removeprefix("pascal_"))]


def test_param_count_backbones():
    # HRNet: the paper's hrnet_w18 (models/hrnet.py, model_info/hrnet_w18.yml) has 3,860,720.
    # Swin-v2: torchvision's swin_v2_{t,s,b} minus the 1000-class head (768/768/1024 * 1000 + 1000).
    import torchvision.models as tvm
    with torch.device("meta"):
        assert n_params(HRNetBackbone()) == 3_860_720
        for variant, width in (("swin_v2_t", 768), ("swin_v2_s", 768), ("swin_v2_b", 1024)):
            full = n_params(getattr(tvm, variant)())
            assert n_params(SwinBackbone(variant)) == full - (width * 1000 + 1000)


def test_ctal_fusion_params_scale_with_grid():
    # One (T, 3, 3) kernel + 1 bias per query pixel of the 1/4 grid: N * (9T + 1) parameters.
    a = build_meta("ctal", tasks=TASKS3, num_classes={"semseg": 13}, input_size=(64, 64))
    b = build_meta("ctal", tasks=TASKS3, num_classes={"semseg": 13}, input_size=(64, 128))
    assert n_params(b) - n_params(a) == (16 * 32 - 16 * 16) * (9 * 3 + 1)
    assert tuple(a.ctal.affinity.weight.shape) == (256, 3, 3, 3)


# ---------------------------------------------------------- equality with the paper's function
def fill_deterministic(model, key_order=None):
    """Set every parameter and BN running statistic from a closed-form pseudo-random pattern, in
    ``key_order`` (state-dict keys; default: the model's own order). Independent of RNGs, so the
    same pattern could be applied to the paper's modules in their order."""
    params = dict(model.named_parameters())
    sd = model.state_dict(keep_vars=True)
    keys = key_order or list(sd)
    largest = max(t.numel() for t in sd.values())
    phase = 0.618 * torch.arange(largest, dtype=torch.float64)
    sin_a, cos_a = torch.sin(phase), torch.cos(phase)
    k = 0
    with torch.no_grad():
        for name in keys:
            t = sd[name]
            is_stat = name.endswith("running_mean") or name.endswith("running_var")
            if name not in params and not is_stat:
                continue
            k += 1
            n = t.numel()
            # sin(0.618 i + 1.3 k), by the angle-sum identity (one sin/cos table for all tensors)
            s = sin_a[:n] * math.cos(1.3 * k) + cos_a[:n] * math.sin(1.3 * k)
            if name.endswith("running_var"):
                v = 1.0 + 0.5 * s * s
            elif name.endswith("logit_scale"):
                v = math.log(10.0) + 0.1 * s
            elif t.dim() == 1:
                v = (1.0 + 0.1 * s) if name.endswith("weight") else 0.1 * s
            else:
                fan_in = t[0].numel()
                v = s * math.sqrt(3.0 / fan_in)
            t.copy_(v.reshape(t.shape).to(t.dtype))


def paper_order(model):
    """The paper's module order differs in one place: its CTAL module registers the value
    projections before the fusion conv; ``CrossTaskAffinity`` holds weight/bias before ``proj``."""
    keys = list(model.state_dict())
    fusion = [k for k in keys if k.endswith("affinity.weight") or k.endswith("affinity.bias")]
    if not fusion:
        return keys
    rest = [k for k in keys if k not in fusion]
    last = max(i for i, k in enumerate(rest) if ".affinity.proj." in k)
    return rest[:last + 1] + fusion + rest[last + 1:]


def fingerprint(y):
    """mean, RMS and a fixed pseudo-random projection: moments plus spatial arrangement."""
    y = y.double()
    w = torch.sin(0.37 * torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape)
    return [y.mean().item(), y.pow(2).mean().sqrt().item(), (y * w).sum().item() / y.numel()]


def fingerprint_input(shape):
    n = torch.arange(math.prod(shape), dtype=torch.float64)
    return torch.cos(0.71 * n).reshape(shape)


# Golden fingerprints: the paper's code (HRNet models: code_cnn; Swin: code_transformer with
# torchvision swin_v2_t), filled with fill_deterministic in its own state-dict order, in float64,
# eval mode, on fingerprint_input((1, 3, 32, 64)); tasks semseg (5 classes), depth, normals
# (HRNet) / semseg (5), normals, sal (Swin); PAP-Net with the code's pixel-wise normalization.
# (Swin HPS is left out for time: its backbone is covered by the Swin CTAL/PAD/PAP entries.)
# Each entry: task -> fingerprint(final prediction).
GOLDEN = {
    # Multi-Task-Learning-PyTorch @ HEAD (models/resnet_dilated.py + aspp.DeepLabHead +
    # models.MultiTaskModel): shared dilated ResNet-18, DeepLab heads; tasks semseg 5, normals, sal.
    ('resnet18', 'hps_resnet'): {
        'semseg': [0.050819420760626045, 0.652314753849769, 0.00017406849098056853],
        'normals': [0.5422275463736248, 0.6343555057350817, -0.0003340157239912543],
        'sal': [0.015834861499092155, 0.020024781278218173, 3.341545475520811e-05],
    },
    ('hrnet_w18_small_v2', 'ctal'): {
        'semseg': [-0.008965702805949003, 1.0875038695709796, 9.135776999134263e-05],
        'depth': [1.4195650184261797, 1.4335746863430983, 0.004828179634399438],
        'normals': [0.27379872378487335, 1.6008060480493524, -0.0014469984107852057],
    },
    ('hrnet_w18_small_v2', 'hps'): {
        'semseg': [31.65454752128374, 233.42339750707882, -0.13748563098403158],
        'depth': [263.89835189365016, 269.8705910655093, 0.5643648557312537],
        'normals': [79.69594595115622, 281.6844765394689, 0.19162416656835557],
    },
    ('hrnet_w18_small_v2', 'm_ctal'): {
        'semseg': [-0.014895271780782593, 1.072518717085571, -0.0010729945739301223],
        'depth': [0.9448354997812094, 0.9523040496247361, 0.0030873551602133204],
        'normals': [0.19545079886977415, 1.1707145442840834, 0.00047943659600006806],
    },
    ('hrnet_w18_small_v2', 'mti_net'): {
        'semseg': [29.275586836483416, 211.68318058933045, -0.13909344258110737],
        'depth': [43.76079658856956, 44.8365424687743, 0.11079804098297157],
        'normals': [40.24994268781597, 142.34323522908062, 0.06980106894396942],
    },
    ('hrnet_w18_small_v2', 'padnet'): {
        'semseg': [1.5193558018418167, 75.85449149536186, -0.007195047373373153],
        'depth': [-41.38309958523674, 61.93676289813745, -0.03532998152580323],
        'normals': [-0.2937841250018926, 141.31693683757493, 0.1180786649782239],
    },
    ('hrnet_w18_small_v2', 'papnet'): {
        'semseg': [-0.7746170985512623, 17.29637802797743, -0.0032474900021235652],
        'depth': [43.7334719618323, 44.77304722467235, 0.1031755606917818],
        'normals': [-5.876351415070888, 25.16471294460263, -0.03743842126595164],
    },
    ('hrnet_w18_small_v2', 'stl'): {
        'semseg': [30.457025977768854, 221.7736389170125, -0.11426116080956938],
        'depth': [196.24616971625076, 200.25943567054696, 0.4173506025416636],
        'normals': [39.66180020391209, 141.5244918851434, 0.08887522350362724],
    },
    ('swin_v2_t', 'ctal'): {
        'semseg': [0.06737644599203066, 0.5717554699754743, 6.777172854701896e-05],
        'normals': [0.4915260056326174, 0.5586693627728401, -0.0002842092851589032],
        'sal': [0.18008222716419964, 0.18023652677887148, 0.0004293129609083878],
    },
    ('swin_v2_t', 'padnet'): {
        'semseg': [0.11801960405311207, 0.59391922809401, 8.202110571280379e-05],
        'normals': [0.40131982879196837, 0.48293527520697543, -0.00031257752734875453],
        'sal': [0.19822829049243762, 0.1982309457068745, 0.0004948654992491426],
    },
    ('swin_v2_t', 'papnet'): {
        'semseg': [0.06701616388033045, 0.687223782343245, 0.00018561258622236445],
        'normals': [0.5522756108855559, 0.6472479147132771, -0.0003628719770087721],
        'sal': [0.02571144056488445, 0.025873041614146032, 6.28158868343302e-05],
    },
}


@pytest.mark.parametrize("key", sorted(GOLDEN), ids=lambda k: f"{k[0]}-{k[1]}")
def test_matches_paper_forward(key):
    backbone, name = key
    tasks = TASKS3 if backbone == HRNET else ["semseg", "normals", "sal"]
    kw = {"affinity_normalize": "spatial"} if name == "papnet" else {}
    # "linear" equals "reference" to float64 rounding (test_every_backend_...) and is faster here.
    model = build_model(name, tasks, {"semseg": 5}, input_size=(32, 64), backbone=backbone,
                        ctal_backend="linear", **kw).double().eval()
    fill_deterministic(model, paper_order(model))
    with torch.no_grad():
        out = model(fingerprint_input((1, 3, 32, 64)))
    for t, expected in GOLDEN[key].items():
        got = fingerprint(out["final"][t])
        # float64 rounding differs between the two codes (e.g. summation order): 1e-9 of the RMS.
        tol = 1e-9 * max(1.0, expected[1])
        assert got == pytest.approx(expected, rel=1e-9, abs=tol), (key, t)


# ------------------------------------------------------------- forward / backward, contract
def check_contract(out, tasks, num_classes, B, size):
    assert set(out) == {"final", "aux"}
    assert list(out["final"]) == list(tasks)
    for preds in [out["final"], *out["aux"].values()]:
        assert set(preds) == set(tasks)
        for t, p in preds.items():
            assert tuple(p.shape) == (B, output_channels(t, num_classes.get(t)), *size), t
            assert torch.isfinite(p).all(), t


EXPECTED_AUX = {"ctal": {"initial"}, "padnet": {"initial"}, "papnet": {"initial"},
                "m_ctal": {f"scale_{i}" for i in range(4)}, "mti_net": {f"scale_{i}" for i in range(4)},
                "stl": set(), "hps": set(), "stl_resnet": set(), "hps_resnet": set(),
                # the published multitask baselines (forward/backward in tests/models/test_baselines.py)
                "cross_stitch": set(), "nddr_cnn": set(), "mtan": set(),
                "sca": {f"scale_{i}" for i in range(4)}}


def run_fwd_bwd(name, backbone, tasks, num_classes):
    torch.manual_seed(0)
    # The CTAL models run the reference op here; other backends are compared in their own test.
    model = build_model(name, tasks, num_classes, input_size=SIZE, backbone=backbone,
                        ctal_backend="reference")
    x = torch.randn(2, 3, *SIZE)
    out = model(x)
    check_contract(out, tasks, num_classes, 2, SIZE)
    assert set(out["aux"]) == EXPECTED_AUX[name]
    loss = sum(p.square().mean() for preds in [out["final"], *out["aux"].values()] for p in preds.values())
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["stl", "hps", "padnet", "papnet", "ctal", "m_ctal", "mti_net"])
def test_hrnet_models_forward_backward(name):
    # STL builds one HRNet per task: two tasks are enough to show the per-task wiring.
    tasks = ["semseg", "depth"] if name == "stl" else TASKS3
    run_fwd_bwd(name, HRNET, tasks, {"semseg": 5})


@pytest.mark.parametrize("name", ["stl", "hps", "padnet", "papnet", "ctal"])
def test_swin_models_forward_backward(name):
    # Two tasks for STL keeps it to two Swin-T backbones.
    tasks = ["semseg", "sal"] if name == "stl" else ["semseg", "human_parts", "sal", "edge", "normals"]
    run_fwd_bwd(name, "swin_v2_t", tasks, {"semseg": 4, "human_parts": 3})


@pytest.mark.parametrize("name", ["stl_resnet", "hps_resnet"])
def test_resnet_baselines_forward_backward(name):
    run_fwd_bwd(name, "resnet18", ["semseg", "edge"], {"semseg": 4})


def test_registry_lists_and_rejects():
    assert set(list_models()) == set(EXPECTED_AUX)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", TASKS3, {"semseg": 5}, SIZE)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("hps", TASKS3, {"semseg": 5}, SIZE, backbone="resnet101")
    with pytest.raises(ValueError, match="ResNet backbones"):
        build_model("ctal", TASKS3, {"semseg": 5}, SIZE, backbone="resnet18")
    with pytest.raises(ValueError, match="ResNet backbones"):
        build_model("hps_resnet", TASKS3, {"semseg": 5}, SIZE)
    with pytest.raises(ValueError, match="multi-scale"):
        build_model("m_ctal", TASKS3, {"semseg": 5}, SIZE, backbone="swin_v2_t")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("hps", TASKS3, {}, SIZE)
    for bad in (-3, 2.7, 1, True):
        with pytest.raises(ValueError, match="num_classes of semseg must be an int >= 2"):
            build_model("hps", TASKS3, {"semseg": bad}, SIZE)
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        build_model("hps", "semseg", {"semseg": 5}, SIZE)
    with pytest.raises(ValueError, match="pretrained must be True or False"):
        build_model("hps", TASKS3, {"semseg": 5}, SIZE, pretrained="false")
    with pytest.raises(ValueError, match="gamma must be a number in"):
        build_model("ctal", TASKS3, {"semseg": 5}, SIZE, gamma=5.0)
    with pytest.raises(ValueError, match="unknown task"):
        build_model("hps", ["semseg", "optical_flow"], {"semseg": 5}, SIZE)
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model("ctal", TASKS3, {"semseg": 5}, (60, 64))


# --------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name,backbone,which", [("ctal", HRNET, "all"), ("m_ctal", HRNET, "pytorch"),
                                                ("ctal", "swin_v2_t", "pytorch")])
def test_every_backend_gives_the_reference_output(name, backbone, which):
    """The model's CTAL block (1x1 reductions, CTAL op, upsampling convs), forward and backward,
    against "reference", in float64: CTALNet with every backend available on CPU (Triton ones
    interpreted when TRITON_INTERPRET=1) and "auto"; the other models with "linear" and "auto"
    (their block is the same class, only the wiring differs)."""
    torch.manual_seed(0)
    # A 32x32 input (8x8 CTAL grid on HRNet) and 8 CTAL channels keep interpreted kernels cheap.
    model = build_model(name, ["semseg", "depth"], {"semseg": 3}, input_size=(32, 32),
                        backbone=backbone, ctal_backend="reference", ctal_channels=8).double()
    block = model.ctal
    in_channels = next(iter(block.conv_in.parameters())).shape[1]
    feats0 = {t: torch.randn(2, in_channels, *block.affinity.size, dtype=torch.float64)
              for t in block.tasks}

    def run(backend):
        model.zero_grad()
        model.set_ctal_backend(backend)
        feats = {t: f.clone().requires_grad_() for t, f in feats0.items()}
        out = block(feats)
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in out.values())
        loss.backward()
        grads = [block.affinity.weight.grad, block.affinity.bias.grad,
                 next(iter(block.conv_in.parameters())).grad, *[f.grad for f in feats.values()]]
        return [o.detach() for o in out.values()], [g.clone() for g in grads]

    ref_out, ref_grads = run("reference")
    backends = ops.available_backends("cpu") if which == "all" else ["linear"]
    assert "linear" in backends
    for backend in backends + ["auto"]:
        out, grads = run(backend)
        for o, r in zip(out, ref_out):
            assert torch.allclose(o, r, rtol=1e-9, atol=1e-12), backend
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-8, atol=1e-12), backend


def test_whole_model_follows_the_backend_switch():
    torch.manual_seed(0)
    model = build_model("ctal", ["semseg", "depth"], {"semseg": 3}, input_size=(32, 32),
                        ctal_backend="reference").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)["final"]
        lin = model.set_ctal_backend("linear")(x)["final"]
    assert model.ctal.affinity.backend == "linear"
    for t in ref:  # float32: exact algorithms, different summation order
        assert torch.allclose(lin[t], ref[t], rtol=1e-4, atol=1e-5)


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend"):
        build_model("ctal", TASKS3, {"semseg": 5}, SIZE, ctal_backend="cudnn-magic")
    model = build_meta("ctal", tasks=TASKS3, num_classes={"semseg": 5}, input_size=SIZE)
    with pytest.raises(ValueError, match="backend"):
        model.set_ctal_backend("nope")


# ------------------------------------------------------------------------------- resolution
def test_wrong_input_size_is_a_clear_error():
    model = build_model("ctal", TASKS3, {"semseg": 5}, input_size=SIZE)
    with pytest.raises(ValueError, match=r"built for 32x64.*resample_ctal"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    hps = build_model("hps", TASKS3, {"semseg": 5}, input_size=SIZE)
    with pytest.raises(ValueError, match="multiples of 32"):
        hps(torch.randn(1, 3, 70, 64))


def test_models_without_grid_parameters_take_other_sizes():
    model = build_model("papnet", TASKS3, {"semseg": 5}, input_size=SIZE).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 32))
    check_contract(out, TASKS3, {"semseg": 5}, 1, (64, 32))


@pytest.mark.parametrize("name", ["ctal", "m_ctal"])
def test_resample_ctal_to_a_new_grid(name):
    torch.manual_seed(0)
    model = build_model(name, ["semseg", "depth"], {"semseg": 3}, input_size=SIZE).eval()
    aff = model.ctal.affinity
    with torch.no_grad():
        aff.weight.fill_(0.25)
        aff.bias.fill_(-0.5)
    model.resample_ctal((64, 96))
    assert model.input_size == (64, 96) and aff.size == (16, 24)
    assert tuple(aff.weight.shape) == (16 * 24, 2, 3, 3) and tuple(aff.bias.shape) == (16 * 24,)
    # A constant kernel field stays constant, rescaled by N_old / N_new (the sum over keys grows).
    ratio = (8 * 16) / (16 * 24)
    assert torch.allclose(aff.weight, torch.full_like(aff.weight, 0.25 * ratio))
    assert torch.allclose(aff.bias, torch.full_like(aff.bias, -0.5 * ratio))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    check_contract(out, ["semseg", "depth"], {"semseg": 3}, 1, (64, 96))
    with pytest.raises(ValueError, match="built for 64x96"):
        model(torch.randn(1, 3, *SIZE))


def test_resample_keeps_a_smooth_field_and_is_identity_on_same_grid():
    model = build_model("ctal", ["semseg", "depth"], {"semseg": 3}, input_size=(64, 64))
    aff = model.ctal.affinity
    before = aff.weight.detach().clone()
    aff.resample((16, 16))
    assert torch.equal(aff.weight, before)
    # A field varying linearly along W (per query column) is reproduced in the interior
    # of the new grid up to the documented N rescaling.
    cols = torch.arange(16, dtype=torch.float32).repeat(16)  # query i = r*16 + c -> c
    with torch.no_grad():
        aff.weight.copy_(cols[:, None, None, None].expand_as(aff.weight))
    aff.resample((16, 32), rescale=False)
    w = aff.weight.detach().reshape(16, 32, -1)[:, :, 0]
    expected = (torch.arange(32, dtype=torch.float32) + 0.5) / 2 - 0.5
    assert torch.allclose(w[:, 1:-1], expected[1:-1].expand(16, 30), atol=1e-5)


# ---------------------------------------------------------------------------- weight loaders
def test_hrnet_loader_official_layout(tmp_path):
    """The official hrnet_w18_small_model_v2.pth uses the HRNet-Image-Classification names, which
    timm's full classification model also uses: build one, save it the way a DataParallel
    training script would (``module.`` prefix), load it into the dense-prediction backbone."""
    import timm
    full = timm.create_model("hrnet_w18_small_v2")
    sd = {"module." + k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "hrnet_w18_small_model_v2.pth"
    torch.save(sd, path)
    backbone = HRNetBackbone(weights=path)
    report = backbone.load_report
    assert report.ok, str(report)
    assert {k.split(".")[0] for k in report.ignored} == {"incre_modules", "downsamp_modules",
                                                          "final_layer", "classifier"}
    assert torch.equal(backbone.body.stage4[1].branches[3][1].conv2.weight,
                       full.stage4[1].branches[3][1].conv2.weight)
    # A file that lacks tensors: the missing keys are reported, not hidden.
    bad = dict(full.state_dict())
    bad.pop("conv1.weight")
    with pytest.warns(UserWarning, match="partly loaded.*MISSING"):  # said, not only stored
        report = load_hrnet_weights(HRNetBackbone(), bad)
    assert "conv1.weight" in report.missing and not report.unexpected
    assert not report.ok and "MISSING" in str(report)
    with pytest.raises(RuntimeError, match="do not fit"):
        load_hrnet_weights(HRNetBackbone(), bad, strict=True)
    # A file with tensors the backbone has no place for is from another network: an error.
    bad["stage5.0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="holds 1 tensors this backbone does not have, e.g. stage5.0.weight"):
        load_hrnet_weights(HRNetBackbone(), bad)
    with pytest.raises(FileNotFoundError):
        HRNetBackbone(weights=tmp_path / "absent.pth")


def test_weight_files_that_do_not_fit_are_errors(tmp_path):
    """A file none of whose tensors fit, a dict of non-tensors, or a file that is no checkpoint
    at all: each is an error naming the file, never a backbone left at its initialization."""
    wrong = tmp_path / "wrongkeys.pth"
    torch.save({"encoder.block.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="wrongkeys.pth: none of its 1 tensors fit this backbone"):
        HRNetBackbone(weights=wrong)
    not_tensors = tmp_path / "config.pth"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ValueError, match="config.pth does not contain a state dict of tensors"):
        HRNetBackbone(weights=not_tensors)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.*could not be read as a PyTorch checkpoint"):
        ResNetBackbone("resnet18", weights=garbage)


def test_swin_loader_torchvision_file(tmp_path):
    import torchvision.models as tvm
    full = tvm.swin_v2_t()
    path = tmp_path / "swin_v2_t.pth"
    torch.save(full.state_dict(), path)
    backbone = SwinBackbone("swin_v2_t", weights=path)
    assert backbone.load_report.ok, str(backbone.load_report)
    assert sorted(backbone.load_report.ignored) == ["head.bias", "head.weight"]
    assert torch.equal(backbone.norm.weight, full.norm.weight)
    # Shapes from another variant are refused with the offending keys named.
    with pytest.raises(ValueError, match="shapes do not match"), torch.device("meta"):
        SwinBackbone("swin_v2_b", weights=path)  # meta: the shape check runs before any copy


def test_resnet_loader_torchvision_file(tmp_path):
    import torchvision.models as tvm
    full = tvm.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    backbone = ResNetBackbone("resnet18", weights=path)
    assert backbone.load_report.ok and sorted(backbone.load_report.ignored) == ["fc.bias", "fc.weight"]
    # Dilated: output stride 8 (layer3/4 keep the resolution, dilations 2 and 4).
    assert backbone.layer4[1].conv1.dilation == (4, 4) and backbone.layer3[0].conv1.stride == (1, 1)
    with torch.no_grad():
        assert tuple(backbone.eval()(torch.randn(1, 3, 32, 64)).shape) == (1, 512, 4, 8)


def test_pretrained_offline_says_what_to_do(monkeypatch):
    """No network in tests: make the libraries' downloads fail as they do offline."""
    import timm
    from torchvision.models._api import WeightsEnum

    def offline(*a, **k):
        raise OSError("network is unreachable")

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model",
                        lambda name, pretrained=False, **k: offline() if pretrained else real_create(name, **k))
    with pytest.raises(RuntimeError, match=r"hrnet_w18_small_model_v2\.pth.*weights="):
        HRNetBackbone(pretrained=True)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"swin_v2_t-.*\.pth.*weights="):
        SwinBackbone("swin_v2_t", pretrained=True)
    with pytest.raises(RuntimeError, match=r"resnet18-.*\.pth.*weights="):
        ResNetBackbone("resnet18", pretrained=True)


def test_hrnet_backbone_options():
    with pytest.raises(ValueError, match="upsample"):
        HRNetBackbone(upsample="bicubic")
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    a = HRNetBackbone().eval()
    b = HRNetBackbone(upsample="nearest").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert [tuple(f.shape) for f in fa] == [(1, 18, 16, 16), (1, 36, 8, 8), (1, 72, 4, 4), (1, 144, 2, 2)]
    assert not torch.allclose(fa[0], fb[0])  # the option really changes the exchange units


def test_ctalnet_class_direct_use():
    model = CTALNet(["semseg", "depth"], {"semseg": 4, "depth": 1}, SIZE, gamma=0.1,
                    ctal_backend="linear")
    assert model.ctal.affinity.gamma == 0.1 and model.ctal.backend == "linear"
    assert model.ctal.affinity.size == (8, 16)


# ------------------------------------------------------------------------ task order in the state
TWO_TASKS = ["semseg", "depth"]
ORDER_CASES = [("ctal", HRNET), ("m_ctal", HRNET), ("papnet", HRNET), ("mti_net", HRNET), ("sca", HRNET),
               ("cross_stitch", "resnet18"), ("nddr_cnn", "resnet18")]


@pytest.mark.parametrize("name,backbone", ORDER_CASES)
def test_state_of_another_task_order_is_refused(name, backbone):
    """These models hold tensors indexed by task position (CTAL fusion weights, PAP task weights,
    cross-stitch / NDDR mixing, FPM / SCA concatenations): a state dict of the same tasks in
    another order matches every key and shape, so only a recorded order can refuse it."""
    torch.manual_seed(0)
    a = build_model(name, TWO_TASKS, {"semseg": 3}, (64, 64), backbone=backbone)
    b = build_model(name, TWO_TASKS[::-1], {"semseg": 3}, (64, 64), backbone=backbone)
    sd = a.state_dict()
    assert sd["task_order"].dtype == torch.uint8
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"saved for the tasks \['semseg', 'depth'\] \(in this order\), "
                                             r"this \w+ has \['depth', 'semseg'\]"):
            b.load_state_dict(sd, strict=strict)
    build_model(name, TWO_TASKS, {"semseg": 3}, (64, 64), backbone=backbone).load_state_dict(sd)


def test_ctal_model_state_without_task_order_still_loads():
    a = build_model("ctal", TWO_TASKS, {"semseg": 3}, (64, 64))
    old = {k: v for k, v in a.state_dict().items() if not k.endswith("task_order")}
    with pytest.warns(UserWarning, match="no task-order record"):
        build_model("ctal", TWO_TASKS, {"semseg": 3}, (64, 64)).load_state_dict(old)


@pytest.mark.parametrize("name,backbone", [("stl", HRNET), ("hps", HRNET), ("padnet", HRNET), ("mtan", "resnet18")])
def test_models_without_positional_task_tensors_load_any_task_order(name, backbone):
    """Every task tensor of these models is keyed by task name, so a state dict of the tasks in
    another order is the same network: it loads and computes the same predictions."""
    torch.manual_seed(0)
    a = build_model(name, TWO_TASKS, {"semseg": 3}, (64, 64), backbone=backbone).eval()
    b = build_model(name, TWO_TASKS[::-1], {"semseg": 3}, (64, 64), backbone=backbone).eval()
    assert not a.task_order_sensitive
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ya, yb = a(x)["final"], b(x)["final"]
    for t in TWO_TASKS:
        assert torch.equal(ya[t], yb[t])


@pytest.mark.parametrize("bad", ["keys", "type", "training", "items", "values", "a.b", "", 3, None])
def test_build_model_refuses_task_names_that_collide_with_module_attributes(bad):
    with pytest.raises((ValueError, TypeError), match=r"tasks\[1\] .*task name"):
        build_model("hps", ["semseg", bad], {"semseg": 3}, SIZE)
    from ctal.models import HardSharingNet
    with pytest.raises((ValueError, TypeError), match=r"tasks\[1\] .*task name"):
        HardSharingNet(["semseg", bad], {"semseg": 3, bad: 1}, SIZE)


def test_weight_files_of_a_deeper_variant_are_errors():
    """ResNet-34 / Swin-v2-S hold every tensor of ResNet-18 / Swin-v2-T under the same names and
    shapes (they only have more blocks): loading one would fill the shallower backbone with
    blocks trained inside another network. The extra tensors give it away."""
    import torchvision.models as tvm
    from ctal.models import load_resnet_weights
    with torch.device("meta"):  # the check runs before any copy
        r34 = tvm.resnet34().state_dict()
        s = tvm.swin_v2_s().state_dict()
        with pytest.raises(ValueError, match=r"<state dict>: holds \d+ tensors this backbone does not have, "
                                             r"e.g. layer1.2.conv1.weight"):
            ResNetBackbone("resnet18", weights=r34)
        with pytest.raises(ValueError, match=r"holds \d+ tensors this backbone does not have.*another network"):
            SwinBackbone("swin_v2_t", weights=s)
        with pytest.raises(ValueError, match="holds 1 tensors this backbone does not have"):
            load_resnet_weights(ResNetBackbone("resnet18"), {**tvm.resnet18().state_dict(),
                                                             "layer5.0.weight": torch.zeros(3)}, strict=False)
