"""Building a run: optimizer and schedule defaults, single-task checkpoints resolved before the
model is built, defaults read from the schema only (import structure: tests/test_import_graph.py)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ctal import config as cfglib
from ctal.engine import build, checkpoint
from tests.helpers import ROOT

ENGINE = ROOT / "ctal" / "engine"


def test_optimizer_and_schedule_defaults():
    params = [torch.nn.Parameter(torch.zeros(2))]

    def group(**optim):
        return build.build_optimizer({"optim": optim}, params).param_groups[0]

    assert group(name="adam", lr=1.0)["weight_decay"] == 0.0
    assert group(name="adamw", lr=1.0)["weight_decay"] == 0.01
    assert group(name="adamw", lr=1.0, weight_decay=0.5)["weight_decay"] == 0.5
    g = group(name="sgd", lr=1.0)
    assert (g["weight_decay"], g["momentum"], g["nesterov"]) == (0.0, 0.9, False)
    opt = build.build_optimizer({"optim": {"name": "adam", "lr": 1.0}}, params)
    sched = build.build_scheduler({}, opt, 4)  # no schedule section: constant
    assert [f(3) for f in sched.lr_lambdas] == [1.0]
    sched = build.build_scheduler({"schedule": {"name": "poly"}}, opt, 10)
    assert sched.lr_lambdas[0](5) == pytest.approx(0.5 ** 0.9)
    with pytest.raises(cfglib.ConfigError, match="schedule.step_size is required"):
        build.build_scheduler({"schedule": {"name": "step"}}, opt, 4)


def test_single_task_checkpoints_are_read_before_the_model_is_built(monkeypatch):
    """``model.single_task_weights`` paths reach the model as state dicts (one read per file);
    state dicts pass as they are, and the config keeps its paths."""
    reads, seen = [], {}

    def load_model_state(src):
        reads.append(os.fspath(src))
        return {"w": torch.zeros(1)}

    monkeypatch.setattr(checkpoint, "load_model_state", load_model_state, raising=False)
    monkeypatch.setattr(build, "build_model", lambda name, **kw: seen.update(kw, name=name) or "model")
    given = {"w": torch.ones(1)}
    cfg = {"model": {"name": "cross_stitch", "alpha": 0.9,
                     "single_task_weights": {"semseg": "a.pt", "depth": Path("a.pt"), "normals": given}}}
    data = SimpleNamespace(tasks=["semseg", "depth", "normals"], num_classes={"semseg": 13}, size=(8, 8))
    assert build.model_for(cfg, data) == "model"
    assert reads == ["a.pt"]
    weights = seen["single_task_weights"]
    assert weights["semseg"] is weights["depth"] and torch.equal(weights["semseg"]["w"], torch.zeros(1))
    assert weights["normals"] is given
    assert seen["name"] == "cross_stitch" and seen["alpha"] == 0.9 and seen["input_size"] == (8, 8)
    assert cfg["model"]["single_task_weights"]["semseg"] == "a.pt"
    seen.clear()
    build.model_for({"model": {"name": "ctal", "pretrained": True, "weights": "w.pt"}}, data,
                    load_pretrained=False)
    assert seen["pretrained"] is False and "weights" not in seen


def test_engine_reads_config_defaults_from_the_schema():
    """No ``cfg.get("key", default)`` / ``cfg.get("key") or ...`` in the engine for a key (or
    section) whose default the schema declares: one place holds each default."""
    names = {k.rsplit(".", 1)[-1] for k in cfglib.defaults()}
    found = []
    for path in sorted(ENGINE.glob("*.py")):
        for m in re.finditer(r"""\.get\(\s*["'](\w+)["']\s*(,|\)\s*or\b)""", path.read_text()):
            if m.group(1) in names:
                found.append(f"{path.name}: {m.group(0)}")
    assert not found
