"""Training engine: configs, exact resume, eval-only, uncertainty weighting, AMP, DDP, learning."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ctal import config as cfglib
from ctal.engine import Trainer, checkpoint

import train
from tests.helpers import ROOT, tiny_cfg


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# --- configs -----------------------------------------------------------------------------------

def test_overrides_parse_yaml_scalars():
    cfg = cfglib.apply_overrides({"train": {"amp": None}, "optim": {"lr": 1}},
                                 ["train.amp=bf16", "optim.lr=1e-4", "train.flag=False", "train.clip=null"])
    assert cfg["train"] == {"amp": "bf16", "flag": False, "clip": None}  # "False" is False, not True
    assert cfg["optim"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="unknown key 'trian'"):
        cfglib.apply_overrides(cfg, ["trian.epochs=3"])
    with pytest.raises(ValueError, match="key.sub=value"):
        cfglib.apply_overrides(cfg, ["epochs"])
    with pytest.raises(FileNotFoundError, match="not found"):
        cfglib.load("no_such_config")


def test_paper_configs_carry_the_papers_hyperparameters():
    nyu = cfglib.load("nyuv2_ctal")
    assert nyu["optim"] == {"name": "adam", "lr": 1e-4, "weight_decay": 1e-4}
    assert nyu["train"]["epochs"] == 200 and nyu["data"]["batch_size"] == 8
    assert nyu["schedule"]["name"] == "cosine"
    city = cfglib.load("cityscapes_m_ctal")
    assert city["optim"]["lr"] == 5e-4 and city["train"]["epochs"] == 75
    assert city["loss"]["weights"] == {"semseg": 1.0, "depth": 10.0}
    pascal = cfglib.load("pascal_ctal")
    assert pascal["optim"]["lr"] == 2e-5 and pascal["optim"]["weight_decay"] == 1e-5
    assert pascal["train"]["epochs"] == 70 and pascal["train"]["grad_clip"] == 10.0
    assert pascal["model"]["backbone"] == "swin_v2_s"


def test_packaged_configs_validate():
    for p in sorted(cfglib.CONFIG_DIR.glob("*.yaml")):
        if not p.stem.startswith("_"):
            cfglib.validate(cfglib.load(p.stem))


@pytest.mark.parametrize("override, match", [
    ("train.epohcs=3", r"unknown config key 'train.epohcs'; did you mean 'train.epochs'"),
    ("data.batch_szie=4", r"unknown config key 'data.batch_szie'; did you mean 'data.batch_size'"),
    ("eval.best_metirc=depth/rmse", r"unknown config key 'eval.best_metirc'; did you mean 'eval.best_metric'"),
    ("train.epochs=abc", r"train.epochs must be an integer >= 1, got 'abc'"),
    ("train.epochs=-1", r"train.epochs must be an integer >= 1, got -1"),
    ("train.epochs=2.5", r"train.epochs must be an integer >= 1, got 2.5"),
    ("train.epochs=true", r"train.epochs must be an integer >= 1, got True"),
    ("optim.lr=abc", r"optim.lr must be a finite number > 0, got 'abc'"),
    ("optim.lr=0", r"optim.lr must be a finite number > 0, got 0"),
    ("train.grad_clip=abc", r"train.grad_clip must be a finite number > 0 or null, got 'abc'"),
    ("train.grad_clip=0", r"train.grad_clip must be a finite number > 0 or null, got 0"),
    ("data.batch_size=0", r"data.batch_size must be an integer >= 1, got 0"),
    ("data=5", r"data must be a mapping \(a section with keys .*\), got int 5"),
    ("model.pretrained='false'", r"model.pretrained must be true or false, got 'false'"),
    ("train.amp=fp8", r"train.amp must be one of 'bf16', 'fp16' or null, got 'fp8'"),
])
def test_config_validation_names_key_value_and_expectation(override, match):
    cfg = cfglib.apply_overrides(cfglib.load("synthetic"), [override])
    with pytest.raises(cfglib.ConfigError, match=match):
        cfglib.validate(cfg)


def test_config_validation_accepts_nullable_and_free_entries():
    cfg = cfglib.apply_overrides(cfglib.load("synthetic"), [
        "train.grad_clip=null", "train.amp=bf16", "optim.lr=1", "schedule=null", "loss.weights=null",
        "data.options={resize: [32, 32]}", "model.gamma=0.1", "model.task_channels=64"])
    assert cfglib.validate(cfg) is cfg
    # every problem at once, and missing required entries
    cfg = cfglib.apply_overrides(cfglib.load("synthetic"), ["train.epochs=0", "optim.lr=-1"])
    del cfg["model"]["name"]
    with pytest.raises(ValueError) as e:
        cfglib.validate(cfg)
    for part in ("train.epochs must be", "optim.lr must be", "model.name is required"):
        assert part in str(e.value)


def test_schema_defaults_fill_what_a_config_leaves_out():
    raw = cfglib.load("synthetic")
    assert "momentum" not in raw["optim"] and "find_unused_parameters" not in raw["train"]  # as written
    cfg = cfglib.with_defaults(raw)
    assert raw == cfglib.load("synthetic")  # a copy: the given config is not modified
    assert cfg["optim"]["momentum"] == 0.9 and cfg["optim"]["nesterov"] is False
    assert cfg["optim"]["weight_decay"] == 1e-4  # set values stay
    assert cfg["train"]["find_unused_parameters"] is False and cfg["train"]["save_images"] == 4
    assert cfg["data"]["eval_batch_size"] is None and cfg["data"]["generate"]["workers"] is None
    assert cfg["eval"]["original_resolution"] is False and cfg["eval"]["edge_thresholds"] == 19
    assert cfg["schedule"] == {"name": "cosine", "min_lr": 0.0, "power": 0.9, "gamma": 0.1}
    assert cfglib.with_defaults(cfg) == cfg
    assert cfglib.validate(cfg) is cfg
    # A section left out or null stands for its default; one without a default stays out, and
    # the model's keys are the model class's (no defaults in the schema).
    bare = cfglib.with_defaults({"data": {"dataset": "synthetic", "root": "x"}, "model": {"name": "ctal"},
                                 "optim": {"name": "adam", "lr": 1.0}, "schedule": None, "eval": None})
    assert bare["schedule"] == {"name": "none", "min_lr": 0.0, "power": 0.9, "gamma": 0.1}
    assert bare["eval"] == {"best_metric": "delta_m", "baselines": None, "edge_thresholds": 99,
                            "original_resolution": False, "every": 1, "final_epochs": 0,
                            "depth_average": "pixel"}
    assert bare["train"]["epochs"] == 1 and bare["loss"] == {} and bare["device"] == "auto"
    assert "generate" not in bare["data"] and bare["model"] == {"name": "ctal"}
    cfglib.validate(bare)
    # every default is listed, by dotted key, and is a value its key accepts
    d = cfglib.defaults()
    assert d["optim.momentum"] == 0.9 and d["train.log_every"] == 20 and d["schedule"] == {"name": "none"}
    assert not any(k.startswith("model.") for k in d)
    cfglib.validate(cfglib.with_defaults({**bare, "data": {**bare["data"], "generate": {
        "num_train": 1, "num_val": 1, "size": [8, 8]}}}))


def test_bad_config_fails_before_data_is_generated(tmp_path):
    with pytest.raises(ValueError, match="train.epochs must be"):
        Trainer(tiny_cfg(tmp_path, **{"train.epochs": 0}), progress=False)
    with pytest.raises(ValueError, match="train.epochs must be"):
        train.main(["--no-progress", f"data.root={tmp_path / 'data'}", "train.epochs=abc",
                    "--output-dir", str(tmp_path / "cli")])
    assert not (tmp_path / "data").exists() and not (tmp_path / "cli").exists()


def test_best_metric_typo_is_caught_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"eval.best_metric 'semseg/miou'.*Did you mean 'semseg/mIoU'\?"
                                         r".*'semseg/pixel_acc'.*'depth/rmse'.*'edge/odsF'"):
        Trainer(tiny_cfg(tmp_path, **{"eval.best_metric": "semseg/miou"}), progress=False)
    assert not (tmp_path / "data").exists()  # before any data was generated
    with pytest.raises(ValueError, match=r"'sal/maxF' is not a metric of this run's tasks"):
        Trainer(tiny_cfg(tmp_path, **{"eval.best_metric": "sal/maxF"}), progress=False)
    from ctal.engine.evaluation import check_best_metric
    check_best_metric("depth/rmse", ["semseg", "depth"])
    check_best_metric("delta_m", ["semseg"])


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path, capsys):
    """A second fresh run into the same output dir stops before building anything and says what
    is there; --resume auto continues it, --overwrite starts over, eval-only is unaffected."""
    import yaml
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 1, "train.save_images": 0, "train.max_steps_per_epoch": 1})
    out = tmp_path / "out"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = ["--config", str(cfg_file), "--no-progress"]
    train.main(run)
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    stamp = {p: p.stat().st_mtime_ns for p in (out / "last.pt", out / "best.pt")}
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*last\.pt \(epoch 1.*best\.pt \(epoch 1"
                                              r".*--resume auto.*--overwrite.*--output-dir"):
        train.main(run)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # untouched

    # --resume auto: continues (here: already at the last epoch, so it only evaluates)
    train.main(run + ["--resume", "auto"])
    assert "resumed from" in capsys.readouterr().err
    # --eval-only is unaffected
    train.main(run + ["--eval-only"])
    # --overwrite: a new run from epoch 0 replaces them
    train.main(run + ["--overwrite", "train.epochs=2"])
    assert checkpoint.load(out / "last.pt")["epoch"] == 2
    with pytest.raises(ValueError, match="--overwrite starts a fresh run"):
        train.main(run + ["--overwrite", "--resume", "auto"])
    # best.pt alone: --resume auto would start fresh, so it is refused too (without suggesting it)
    (out / "last.pt").unlink()
    with pytest.raises(FileExistsError, match=r"best\.pt \(epoch") as e:
        train.main(run + ["--resume", "auto"])
    assert "--resume auto" not in str(e.value)


def test_cli_prints_bad_input_without_a_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.epohcs=3"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "did you mean 'train.epochs'" in r.stderr


# --- training ----------------------------------------------------------------------------------

def test_exact_resume(tmp_path):
    """2 epochs straight == 1 epoch + resume from last.pt + 1 epoch, bit for bit."""
    full = Trainer(tiny_cfg(tmp_path / "a", **{"train.save_images": 0}), progress=False)
    full.fit()
    want = _weights(full)
    full.close()

    half = Trainer(tiny_cfg(tmp_path / "b", **{"train.epochs": 2, "train.save_images": 0}), progress=False)
    half.epochs = 1  # stop after the first epoch, schedule still built for 2
    half.fit()
    half.close()
    resumed = Trainer(tiny_cfg(tmp_path / "b", **{"train.save_images": 0}), progress=False)
    resumed.resume(tmp_path / "b" / "out" / "last.pt")
    assert resumed.start_epoch == 1
    resumed.fit()
    got = _weights(resumed)
    resumed.close()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_run_outputs_and_eval_only(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 1})
    out = tmp_path / "out"
    cfg_file = tmp_path / "cfg.yaml"
    import yaml
    cfg_file.write_text(yaml.safe_dump(cfg))
    metrics = train.main(["--config", str(cfg_file), "--no-progress"])
    assert {"semseg", "depth", "normals", "edge"} <= set(metrics)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"]["semseg"]["mIoU"] == pytest.approx(metrics["semseg"]["mIoU"])
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "images" / "pred_0.png").is_file() and (out / "images" / "affinity_0.png").is_file()
    again = train.main(["--config", str(cfg_file), "--no-progress", "--eval-only",
                        "--checkpoint", str(out / "last.pt")])
    assert again["depth"]["rmse"] == pytest.approx(metrics["depth"]["rmse"], rel=1e-5)
    assert json.loads((out / "eval_metrics.json").read_text())["metrics"]["depth"]["rmse"] == \
        pytest.approx(metrics["depth"]["rmse"], rel=1e-5)
    # Evaluating a checkpoint downloads no backbone weights (the checkpoint holds them all), and
    # overrides may sit between the flags.
    from ctal.models import backbones

    def no_download(*a, **k):
        raise AssertionError("eval-only must not fetch pretrained weights")

    monkeypatch.setattr(backbones, "_hrnet_timm_pretrained", no_download)
    third = train.main(["--config", str(cfg_file), "model.pretrained=true", "--eval-only",
                        "--no-progress", "--checkpoint", str(out / "last.pt")])
    assert third["depth"]["rmse"] == pytest.approx(metrics["depth"]["rmse"], rel=1e-5)
    # Another task order would load without a shape error and permute heads / fusion weights.
    with pytest.raises(ValueError, match=r"trained for the tasks \['semseg', 'depth', 'normals', 'edge'\]"):
        train.main(["--config", str(cfg_file), "--eval-only", "--no-progress", "--checkpoint",
                    str(out / "last.pt"), "data.tasks=[depth, semseg, normals, edge]"])


def test_uncertainty_weights_are_optimized_and_clipping_applies(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"loss.weighting": "uncertainty", "loss.weights": "null",
                                "train.grad_clip": 0.5, "train.epochs": 1, "train.save_images": 0})
    t = Trainer(cfg, progress=False)
    before = t.criterion.log_vars.detach().clone()
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert id(t.criterion.log_vars) in in_opt
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: calls.append(m) or real(p, m))
    t.train_epoch(0, max_steps=1)
    t.close()
    assert not torch.equal(before, t.criterion.log_vars.detach())
    assert calls == [0.5]


def test_bf16_autocast_step(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, **{"train.amp": "bf16", "train.save_images": 0}), progress=False)
    avg = t.train_epoch(0, max_steps=1)
    t.close()
    assert all(torch.isfinite(torch.tensor(v)) for v in avg.values())


def test_bad_settings_are_clear(tmp_path):
    with pytest.raises(ValueError, match="train.amp must be"):
        Trainer(tiny_cfg(tmp_path, **{"train.amp": "fp8"}), progress=False)
    with pytest.raises(ValueError, match="eval.baselines"):
        Trainer(tiny_cfg(tmp_path, **{"eval.best_metric": "delta_m"}), progress=False)
    with pytest.raises(ValueError, match="optim.name"):
        Trainer(tiny_cfg(tmp_path, **{"optim.name": "lamb"}), progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(2)}})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pt could not be read"):
        checkpoint.load(tmp_path / "bad.pt")


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed one can still be held by the previous run)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes(tmp_path):
    import yaml
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 1, "train.save_images": 0})
    # Generate the data first so both ranks only read it.
    from ctal.data import synthetic
    g = cfg["data"]["generate"]
    synthetic.ensure(cfg["data"]["root"], g["num_train"], g["num_val"], g["size"], progress=False, workers=0)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(ROOT / "train.py"), "--config", str(cfg_file),
                        "--no-progress", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # 8 samples, batch 2 per rank, 2 ranks: 2 steps per epoch, capped at 2.
    assert summary["steps"] == 2
    # The loss module's uncertainty weights are not DDP's: their gradients are averaged by the
    # trainer, so both processes keep the same values (and DWA sees the same epoch losses).
    script = tmp_path / "uncertainty_ranks.py"
    script.write_text(
        "import sys, torch, yaml\n"
        "from ctal.engine import Trainer\n"
        "cfg = yaml.safe_load(open(sys.argv[1]))\n"
        "cfg['loss'] = dict(cfg.get('loss') or {}, weighting='uncertainty', weights=None)\n"
        "cfg['optim']['lr'] = 0.05\n"
        "t = Trainer(cfg, device='cpu', progress=False)\n"
        "t.train_epoch(0, max_steps=2)\n"
        "open(f'{sys.argv[2]}/rank{t.dist.rank}.txt', 'w').write(repr(t.criterion.log_vars.tolist()))\n"
        "t.close()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(script), str(cfg_file), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    per_rank = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
    assert per_rank[0] == per_rank[1], per_rank
    assert per_rank[0] != repr([0.0] * 4)  # they did move


def test_short_synthetic_run_learns(tmp_path):
    """A few dozen steps on synthetic scenes beat the same model untrained, clearly."""
    cfg = tiny_cfg(tmp_path, **{
        "data.generate.num_train": 48, "data.generate.num_val": 16, "data.generate.size": "[32, 64]",
        "data.batch_size": 4, "data.tasks": "[semseg, depth]", "data.augment": "false",
        "train.epochs": 4, "train.max_steps_per_epoch": "null", "train.save_images": 0,
        "optim.lr": 2e-3, "loss.weights": "null"})
    torch.manual_seed(0)
    t = Trainer(cfg, progress=False)
    before = t.evaluate(progress=False)
    after = t.fit()
    t.close()
    assert after["depth"]["rmse"] < 0.8 * before["depth"]["rmse"], (before["depth"], after["depth"])
    assert after["semseg"]["pixel_acc"] > before["semseg"]["pixel_acc"] + 10, (before["semseg"], after["semseg"])


PAPER_CONFIGS = sorted(p.stem for p in cfglib.CONFIG_DIR.glob("*.yaml")
                       if not p.stem.startswith("_") and p.stem.split("_")[0] in ("nyuv2", "cityscapes", "pascal")
                       and cfglib.load(p.stem)["model"]["name"] in ("ctal", "m_ctal", "stl", "hps", "padnet",
                                                                    "papnet", "mti_net"))


def _random_batch(tasks, num_classes, B, H, W):
    from ctal.tasks import output_channels
    g = torch.Generator().manual_seed(0)
    t = {}
    for task in tasks:
        if task in ("semseg", "human_parts"):
            t[task] = torch.randint(0, num_classes[task], (B, H, W), generator=g)
        elif task == "normals":
            t[task] = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
        elif task == "depth":
            t[task] = torch.rand(B, 1, H, W, generator=g) + 0.5
        else:
            t[task] = (torch.rand(B, output_channels(task), H, W, generator=g) > 0.8).float()
    return torch.randn(B, 3, H, W, generator=g), t


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_and_steps(name):
    """Each paper config's model, loss and optimizer run one step (small input, random data)."""
    from ctal.engine.build import build_optimizer
    from ctal.losses import MultiTaskLoss
    from ctal.models import build_model, paper_setup
    cfg = cfglib.load(name)
    dataset = cfg["data"]["dataset"]
    setup = paper_setup(dataset)
    tasks = cfg["data"]["tasks"]
    m = dict(cfg["model"], pretrained=False)
    model_name = m.pop("name")
    size = (64, 64)
    model = build_model(model_name, tasks=tasks, num_classes=setup["num_classes"], input_size=size, **m)
    crit = MultiTaskLoss(tasks, **cfg["loss"])
    opt = build_optimizer(cfg, list(model.parameters()) + list(crit.parameters()))
    images, targets = _random_batch(tasks, setup["num_classes"], 2, *size)
    total, parts = crit(model(images), targets)
    assert set(parts) == set(tasks) and torch.isfinite(total)
    total.backward()
    opt.step()


def test_evaluation_at_original_resolution(tmp_path, monkeypatch):
    """With eval.original_resolution the network sees resized images but every prediction is
    scored against the targets as stored (here 32x64 scenes fed to the model at 32x32)."""
    from ctal.metrics import SegMeter
    cfg = tiny_cfg(tmp_path, **{"data.generate.size": "[32, 64]", "data.options": "{resize: [32, 32]}",
                                "eval.original_resolution": "true", "train.save_images": 0})
    t = Trainer(cfg, progress=False)
    assert t.val_set.size == (32, 32)
    seen = []
    real = SegMeter.update
    monkeypatch.setattr(SegMeter, "update", lambda self, p, g: seen.append((p.shape, g.shape)) or real(self, p, g))
    metrics = t.evaluate(progress=False)
    t.close()
    assert len(seen) == 3  # one update per val image
    assert all(p[-2:] == (32, 64) and g[-2:] == (32, 64) for p, g in seen)
    assert 0 <= metrics["semseg"]["pixel_acc"] <= 100
