"""Nothing lost, nothing silent: checkpoints (verified, atomic, cleaned up, readable), resume
(what may change and what is refused), evaluation errors, divergence and the command line's
one-line errors. Data-folder safety is in test_synthetic.py, the AMP policy in test_amp.py,
task-order records in test_module.py / test_models.py."""
from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctal import config as cfglib
from ctal.engine import Trainer, checkpoint
from ctal.engine.build import LRFactor
from ctal.engine.trainer import config_changes
from tests.helpers import tiny_cfg

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch tiny run (cosine schedule); tests copy its output dir before changing it."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(tmp, **{"train.save_images": 0, "train.max_steps_per_epoch": 1})
    t = Trainer(cfg, progress=False)
    t.fit()
    t.close()
    return tmp, cfg


def _copy(run, tmp_path) -> Path:
    src, _ = run
    shutil.copytree(src / "out", tmp_path / "out")
    return tmp_path / "out" / "last.pt"


def _trainer(run, tmp_path, **over) -> Trainer:
    src, _ = run
    cfg = tiny_cfg(src, **{"train.save_images": 0, "train.max_steps_per_epoch": 1,
                           "output_dir": str(tmp_path / "out"), **over})
    return Trainer(cfg, progress=False)


# --- checkpoints -------------------------------------------------------------------------------

def test_corrupted_checkpoint_is_refused_naming_the_file(finished_run, tmp_path):
    last = _copy(finished_run, tmp_path)
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x04  # one bit inside the weights
    last.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"last\.pt is damaged: entry .* fails its CRC"):
        checkpoint.load(last)
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 3})
    with pytest.raises(checkpoint.CheckpointError, match="last.pt"):
        t.resume(last)
    t.close()
    last.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"last\.pt could not be read .*damaged, truncated"):
        checkpoint.load(last)


def test_checkpoint_cleans_stale_temp_files_and_follows_the_umask(tmp_path):
    stale = tmp_path / ".last.pt.4242.tmp"  # left by a writer killed mid-write
    stale.write_bytes(b"x" * 1000)
    older = tmp_path / "last.pt.abc123.tmp"  # the temp name of earlier versions
    older.write_bytes(b"x")
    other = tmp_path / ".best.pt.4242.tmp"  # another checkpoint's: its own save cleans it
    other.write_bytes(b"y")
    old = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "last.pt", {"model": {}})
    finally:
        os.umask(old)
    assert not stale.exists() and not older.exists() and other.exists()
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o644


def test_kill_during_save_leaves_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(3)}})
    code = ("import os, signal, torch\n"
            "from ctal.engine import checkpoint\n"
            "real = torch.save\n"
            "def dying(obj, f, *a, **k):\n"
            "    f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "torch.save = dying\n"
            "checkpoint.save(%r, {'model': {'w': torch.zeros(3)}})\n" % str(path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == -9
    assert list(tmp_path.glob(".last.pt.*.tmp"))  # what a kill leaves
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    checkpoint.save(path, {"model": {"w": torch.full((3,), 2.0)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# --- resume ------------------------------------------------------------------------------------

def test_lr_factor_closed_forms():
    cos = LRFactor("cosine", 4, base_lr=1.0, min_lr=0.1)
    assert [round(cos(e), 12) for e in range(5)] == \
        [round(0.1 + 0.9 * (1 + math.cos(math.pi * e / 4)) / 2, 12) for e in range(5)]
    assert LRFactor("poly", 10, 1.0, power=0.9)(5) == pytest.approx(0.5 ** 0.9)
    assert LRFactor("step", 10, 1.0, step_size=3, gamma=0.5)(7) == 0.25
    assert LRFactor("none", 10, 1.0)(7) == 1.0


def test_resume_with_more_epochs_replans_the_schedule(finished_run, tmp_path):
    """A finished 2-epoch cosine run ends at lr 0; extending it to 4 epochs continues on a
    4-epoch cosine, so the extra epochs train (and change the weights)."""
    last = _copy(finished_run, tmp_path)
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 4})
    t.resume(last)
    lr = t.cfg["optim"]["lr"]
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * 2 / 4)) / 2)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    t.close()
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    s = checkpoint.load(last)
    assert s["epoch"] == 4 and s["config"]["train"]["epochs"] == 4
    assert len(s["resumes"]) == 1 and s["resumes"][0]["epoch"] == 2
    assert s["resumes"][0]["changed"]["train.epochs"] == [2, 4]  # (output_dir moved too: a copy)
    assert [h["lr"] for h in s["history"]][2:] == pytest.approx(
        [lr * (1 + math.cos(math.pi * e / 4)) / 2 for e in (3, 4)])


@pytest.mark.parametrize("override, key", [({"optim.lr": 0.05}, "optim.lr"),
                                           ({"loss.weighting": "dwa"}, "loss.weighting"),
                                           ({"data.batch_size": 1}, "data.batch_size"),
                                           ({"seed": 7}, "seed")])
def test_resume_refuses_settings_it_cannot_apply(finished_run, tmp_path, override, key):
    last = _copy(finished_run, tmp_path)
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 3, **override})
    with pytest.raises(cfglib.ConfigError, match=rf"cannot resume .*last\.pt.*{key} \(checkpoint .*, now "
                                                 rf".*Resume with the checkpoint's values"):
        t.resume(last)
    t.close()


def test_resume_with_another_optimizer_is_refused_up_front(finished_run, tmp_path):
    last = _copy(finished_run, tmp_path)
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 3, "optim.name": "sgd"})
    with pytest.raises(cfglib.ConfigError, match=r"optim\.name \(checkpoint 'adam', now 'sgd'\)"):
        t.resume(last)
    # a checkpoint whose config does not say (hand-made or edited): the optimizer state does
    s = checkpoint.load(last)
    s["config"] = t.cfg
    checkpoint.save(tmp_path / "edited.pt", s)
    with pytest.raises(cfglib.ConfigError, match=r"state of a Adam optimizer.*this run builds SGD"):
        t.resume(tmp_path / "edited.pt")
    t.close()


def test_resume_cannot_shrink_below_the_epochs_done(finished_run, tmp_path):
    last = _copy(finished_run, tmp_path)
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 1})
    with pytest.raises(cfglib.ConfigError, match=r"trained 2 epochs, more than train.epochs=1"):
        t.resume(last)
    t.close()


def test_resume_of_a_config_without_the_schema_defaults(finished_run, tmp_path):
    """A checkpoint's config as the run's file had it (keys left out, e.g. written before those
    keys had schema defaults) resumes: a key left out compares as its default."""
    last = _copy(finished_run, tmp_path)
    s = checkpoint.load(last)
    written = tiny_cfg(finished_run[0], **{"train.save_images": 0, "train.max_steps_per_epoch": 1})
    del written["eval"]["every"]  # 1, the default
    assert "momentum" not in written["optim"] and s["config"]["optim"]["momentum"] == 0.9
    s["config"] = written
    checkpoint.save(last, s)
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 3})
    t.resume(last)
    t.close()
    assert t.cfg["optim"]["momentum"] == 0.9 and t.cfg["eval"]["every"] == 1
    assert sorted(t.resumes[-1]["changed"]) == ["output_dir", "train.epochs"]
    # a value the checkpoint's run did not have is still refused, default or not
    t = _trainer(finished_run, tmp_path, **{"train.epochs": 3, "optim.momentum": 0.5})
    with pytest.raises(cfglib.ConfigError, match=r"optim\.momentum \(checkpoint 0\.9, now 0\.5\)"):
        t.resume(last)
    t.close()


def test_config_changes_lists_dotted_keys():
    assert config_changes({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 1, "c": 3}, "e": 0}) == \
        {"a.c": (2, 3), "d": (1, None), "e": (None, 0)}


def test_error_during_evaluation_loses_no_training(tmp_path, monkeypatch):
    """The epoch's training is saved before evaluation; resume evaluates what was missed and the
    finished run equals an uninterrupted one."""
    # (no edge task: pyEdgeEval's matcher draws from a process-wide random stream, so its oisF/AP
    # depend on what the process matched before, not only on the model)
    over = {"train.save_images": 0, "train.max_steps_per_epoch": 1, "data.tasks": "[semseg, depth, normals]"}
    cfg = tiny_cfg(tmp_path / "a", **over)
    ref = Trainer(cfg, progress=False)
    ref.fit()
    ref.close()
    want = checkpoint.load(tmp_path / "a" / "out" / "last.pt")

    cfg_b = tiny_cfg(tmp_path / "b", **over)
    t = Trainer(cfg_b, progress=False)
    calls = []
    real = Trainer.evaluate

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("validation crashed")
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "evaluate", failing)
    with pytest.raises(RuntimeError, match="validation crashed"):
        t.fit()
    t.close()
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path / "b" / "out" / "last.pt")
    assert saved["epoch"] == 2 and saved["pending_eval"] is True
    r = Trainer(cfg_b, progress=False)
    r.resume(tmp_path / "b" / "out" / "last.pt")
    r.fit()
    r.close()
    got = checkpoint.load(tmp_path / "b" / "out" / "last.pt")
    assert got["pending_eval"] is False
    for h, w in zip(got["history"], want["history"]):
        assert h["metrics"] == w["metrics"], (h, w)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k


# --- divergence --------------------------------------------------------------------------------

def test_divergence_names_the_loss_and_the_parameters(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, **{"train.save_images": 0}), progress=False)
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"training diverged: non-finite loss .* parameter tensor\(s\) "
                                                 r"are no longer finite.*Lower optim.lr"):
        t.train_epoch(0, max_steps=1)
    t.close()


# --- the command line --------------------------------------------------------------------------

def _cli(args, cwd, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CTAL_TRACEBACK", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config", "no_such_config"], r"config 'no_such_config' not found"),
    (["--config", "{broken}"], r"broken\.yaml is not valid YAML"),
    (["--config", "{loop}"], r"base: chain loops back to itself"),
    (["evl.best_metric=x"], r"unknown key 'evl'; did you mean 'eval'\?"),
    (["model.name=ctall"], r"model.name 'ctall' is unknown; did you mean 'ctal'"),
    (["data.tasks=[semseg, dpeth]"], r"data.tasks entry 'dpeth' is unknown; did you mean 'depth'\?"),
    (["model.ctal_backend=trition-linear"], r"model.ctal_backend 'trition-linear' is unknown"),
    (["optim.lr=.inf"], r"optim.lr must be a finite number > 0, got inf"),
    (["--max-steps-per-epoch", "-1"], r"--max-steps-per-epoch: expected an integer >= 1, got -1"),
    (["--checkpoint", "x.pt"], r"--checkpoint names the weights for --eval-only"),
    (["--eval-only", "--resume", "auto"], r"--eval-only .* does not resume"),
    (["--eval-only", "--checkpoint", "missing.pt"], r"--eval-only: no checkpoint missing.pt"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:999"],
     r"device 'cuda(:999)?'"),
    (["--output-dir", "{file}"], r"output dir .* exists and is not a directory"),
    (["data.dataset=nyuv2", "data.generate=null"], r"nyuv2: no folder .*data/train/image; expected the layout"),
])
def test_cli_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\nname: x\n")
    (tmp_path / "a_file").write_text("")
    sub = {"{broken}": str(tmp_path / "broken.yaml"), "{loop}": str(tmp_path / "loop.yaml"),
           "{file}": str(tmp_path / "a_file")}
    r = _cli([sub.get(a, a) for a in args] + [f"data.root={tmp_path / 'data'}"], tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("train.py: error: "), r.stderr  # argparse puts its usage above
    assert __import__("re").search(message, r.stderr), r.stderr
    assert not (tmp_path / "data").exists()  # nothing generated
    assert not (tmp_path / "outputs").exists()


def test_cli_read_only_output_dir_is_refused_before_training(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = _cli(["--output-dir", str(ro / "run"), f"data.root={tmp_path / 'data'}"], tmp_path)
    finally:
        ro.chmod(0o700)
    assert r.returncode != 0 and "is not writable" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()


def test_overrides_may_name_a_section_the_config_leaves_out():
    cfg = cfglib.apply_overrides({"name": "x", "eval": None}, ["eval.best_metric=depth/rmse",
                                                               "schedule.name=poly"])
    assert cfg["eval"] == {"best_metric": "depth/rmse"} and cfg["schedule"] == {"name": "poly"}
