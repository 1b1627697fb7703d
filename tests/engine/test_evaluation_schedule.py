"""The evaluation schedule (eval.every, eval.final_epochs), its bookkeeping and resume, and the
evaluation options of a run (eval.depth_average, 2-channel saliency)."""
from __future__ import annotations

import json

import pytest
import torch

from ctal import config as cfglib
from ctal.engine import Trainer, checkpoint
from ctal.engine.evaluation import evaluation_due
from ctal.engine.images import save_run_images
from ctal.engine.trainer import RESUME_MAY_CHANGE
from tests.helpers import tiny_cfg

# the cheapest run that trains and evaluates: HPS, two tasks (no edges: their matcher is slow)
FAST = {"train.save_images": 0, "train.max_steps_per_epoch": 1, "data.tasks": "[semseg, depth]",
        "loss.weights": "null", "model.name": "hps"}


def _evaluated(history) -> list:
    return [h["epoch"] for h in history if h["evaluated"]]


def test_evaluation_due():
    due = lambda epochs, every, final: [e for e in range(1, epochs + 1)  # noqa: E731
                                        if evaluation_due(e, epochs, every, final)]
    assert due(3, 1, 0) == [1, 2, 3]
    assert due(3, 2, 0) == [2, 3]                      # the last epoch always
    assert due(10, 4, 3) == [4, 8, 9, 10]              # every 4th, and each of the last 3
    assert due(10, 100, 0) == [10]
    assert due(5, 2, 5) == [1, 2, 3, 4, 5]


def test_schedule_keys_have_defaults_and_the_old_key_names_the_new_one(tmp_path):
    cfg = cfglib.with_defaults(tiny_cfg(tmp_path))
    assert (cfg["eval"]["every"], cfg["eval"]["final_epochs"], cfg["eval"]["depth_average"]) == (1, 0, "pixel")
    with pytest.raises(cfglib.ConfigError, match=r"unknown config key 'train\.eval_every'; it is 'eval\.every' now"):
        cfglib.validate(tiny_cfg(tmp_path, **{"train.eval_every": 2}))
    with pytest.raises(cfglib.ConfigError, match=r"eval\.final_epochs must be an integer >= 0, got -1"):
        cfglib.validate(tiny_cfg(tmp_path, **{"eval.final_epochs": -1}))
    with pytest.raises(cfglib.ConfigError, match=r"eval\.depth_average must be one of 'pixel', 'image'"):
        cfglib.validate(tiny_cfg(tmp_path, **{"eval.depth_average": "batch"}))
    assert {"eval.every", "eval.final_epochs", "eval.depth_average"} <= set(RESUME_MAY_CHANGE)


def test_every_k_epochs_and_the_last_and_resume_keeps_the_schedule(tmp_path, monkeypatch):
    """3 epochs, eval.every=2: evaluated after epochs 2 and 3, recorded in the history and
    metrics.json; best.pt is one of them. A run evaluating only the last epoch, stopped after
    epoch 1 and resumed, trains the same weights (evaluation leaves the random streams alone) and
    scores epoch 3 the same."""
    a = Trainer(tiny_cfg(tmp_path / "a", **FAST, **{"train.epochs": 3, "eval.every": 2}), progress=False)
    a.fit()
    a.close()
    out = tmp_path / "a" / "out"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["evaluated_epochs"] == [2, 3] == _evaluated(summary["history"])
    assert [("metrics" in h) for h in summary["history"]] == [False, True, True]
    assert summary["best"]["epoch"] in (2, 3)
    assert checkpoint.load(out / "best.pt")["epoch"] == summary["best"]["epoch"]
    want = {k: v.clone() for k, v in a.model.state_dict().items()}

    cfg_b = tiny_cfg(tmp_path / "b", **FAST, **{"train.epochs": 3, "eval.every": 5})
    b = Trainer(cfg_b, progress=False)
    real = Trainer.train_epoch

    def killed_in_epoch_2(self, epoch, *args, **kw):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, *args, **kw)

    monkeypatch.setattr(Trainer, "train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    b.close()
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path / "b" / "out" / "last.pt")
    assert saved["epoch"] == 1 and saved["best"] is None and _evaluated(saved["history"]) == []
    r = Trainer(cfg_b, progress=False)
    r.resume(tmp_path / "b" / "out" / "last.pt")
    r.fit()
    r.close()
    got = checkpoint.load(tmp_path / "b" / "out" / "last.pt")
    assert _evaluated(got["history"]) == [3] and got["best"]["epoch"] == 3
    assert got["history"][2]["metrics"] == summary["history"][2]["metrics"]
    for k, v in want.items():
        assert torch.equal(got["model"][k], v), k


def test_final_epochs_and_resume_with_stubbed_training(tmp_path, monkeypatch):
    """every=4, final_epochs=2 over 6 epochs: evaluated after 4, 5 and 6, also across a stop after
    epoch 3 and a resume; the best checkpoint is the best evaluated epoch."""
    stop_at = [3]
    scores = iter([50.0, 40.0, 30.0])  # the first evaluation is the best

    def train_epoch(self, epoch, max_steps=None):
        if epoch in stop_at:
            raise KeyboardInterrupt
        return {t: 1.0 for t in self.tasks}

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(Trainer, "evaluate", lambda self, progress=None: {"semseg": {"mIoU": next(scores)}})
    cfg = tiny_cfg(tmp_path, **FAST, **{"train.epochs": 6, "eval.every": 4, "eval.final_epochs": 2})
    t = Trainer(cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    t.close()
    saved = checkpoint.load(tmp_path / "out" / "last.pt")
    assert saved["epoch"] == 3 and _evaluated(saved["history"]) == []
    stop_at.clear()
    r = Trainer(cfg, progress=False)
    r.resume(tmp_path / "out" / "last.pt")
    r.fit()
    r.close()
    assert _evaluated(r.history) == [4, 5, 6]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["evaluated_epochs"] == [4, 5, 6]
    assert r.best["epoch"] == 4 and checkpoint.load(tmp_path / "out" / "best.pt")["epoch"] == 4


def test_two_channel_saliency_and_image_wise_depth_in_a_run(tmp_path):
    """A model with 2 saliency channels trains, evaluates (maxF from softmax channel 1) and draws
    its predictions; eval.depth_average=image reports per-image depth errors."""
    cfg = tiny_cfg(tmp_path, **{**FAST, "data.tasks": "[semseg, depth, sal]", "model.sal_channels": 2,
                                "eval.depth_average": "image"})
    t = Trainer(cfg, progress=False)
    assert t.model.num_outputs["sal"] == 2
    losses = t.train_epoch(0, max_steps=1)
    assert losses["sal"] > 0
    metrics = t.evaluate(progress=False)
    assert 0 <= metrics["sal"]["maxF"] <= 100
    assert (metrics["depth"]["images"], metrics["depth"]["skipped_images"]) == (3, 0)
    written = save_run_images(t.model, t.val_set, tmp_path / "images", 1, t.device)
    t.close()
    assert written[0].is_file()


def test_checkpoint_with_the_old_key_name_still_resumes(tmp_path, monkeypatch):
    """A checkpoint written when the schedule was ``train.eval_every`` resumes: its stored config
    is read with the key under its new name (``cfglib.migrate``), so nothing counts as changed."""
    assert cfglib.migrate({"train": {"eval_every": 2, "epochs": 3}}) == {"train": {"epochs": 3}, "eval": {"every": 2}}
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch, max_steps=None: {t: 1.0 for t in self.tasks})
    monkeypatch.setattr(Trainer, "evaluate", lambda self, progress=None: {"semseg": {"mIoU": 1.0}})
    cfg = tiny_cfg(tmp_path, **FAST, **{"train.epochs": 1, "eval.every": 2})
    t = Trainer(cfg, progress=False)
    t.fit()
    t.close()
    path = tmp_path / "out" / "last.pt"
    state = checkpoint.load(path)
    stored = state["config"]
    stored["train"]["eval_every"] = stored["eval"].pop("every")  # as an older ctal wrote it
    checkpoint.save(path, state)
    more = tiny_cfg(tmp_path, **FAST, **{"train.epochs": 2, "eval.every": 2})
    r = Trainer(more, progress=False)
    r.resume(path)
    r.fit()
    r.close()
    assert _evaluated(r.history) == [1, 2] and not any("eval" in k for res in r.resumes for k in res.get("changes", {}))
