"""Collect single-task results into the baselines JSON that multitask runs compare with
(``eval.baselines``; delta_m, docs/evaluation_protocol.md).

    python scripts/make_baselines.py --out outputs/nyud_mt_baselines_resnet50.json \
        outputs/nyud_mt_stl_resnet_semseg/metrics.json outputs/nyud_mt_stl_resnet_depth/metrics.json

Each input is a ``metrics.json`` written by ``train.py`` (its ``best`` entry is used, i.e. the
checkpoint the run selected; ``--use final`` takes the last evaluation instead) or an
``eval_metrics.json`` from ``train.py --eval-only``. ``TASK=PATH`` takes only that task from the
file (needed when one file holds several tasks and another file should provide one of them).
Every task must come from exactly one file; the headline metrics of the protocol are stored
(semseg / human_parts mIoU, depth RMSE, normals mean angle, saliency maxF, edge odsF) unless
``--all-metrics`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctal.metrics import DEFAULT_DELTA_METRICS, save_baselines  # noqa: E402


def read_metrics(path: Path, use: str = "best") -> dict:
    """``{task: {metric: value}}`` from a train.py ``metrics.json`` / ``eval_metrics.json``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    data = json.loads(path.read_text())
    if use == "best" and isinstance(data.get("best"), dict) and isinstance(data["best"].get("metrics"), dict):
        return data["best"]["metrics"]
    if isinstance(data.get("metrics"), dict):
        return data["metrics"]
    raise ValueError(f"{path}: neither a train.py metrics.json nor an eval_metrics.json (no 'metrics')")


def collect(inputs: list[str], use: str = "best") -> tuple[dict, dict]:
    """Merge the inputs into ``{task: metrics}``; returns it and ``{task: source path}``."""
    merged, sources = {}, {}
    for item in inputs:
        task, sep, path = item.partition("=")
        if not sep:
            task, path = None, item
        metrics = read_metrics(Path(path), use)
        if task is not None:
            if task not in metrics:
                raise KeyError(f"{path} has no results for {task!r} (it has {sorted(metrics)})")
            metrics = {task: metrics[task]}
        for t, vals in metrics.items():
            if t in merged:
                raise ValueError(f"task {t!r} appears in both {sources[t]} and {path}; "
                                 f"pick one with {t}=PATH")
            merged[t], sources[t] = vals, path
    return merged, sources


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="metrics.json files, or TASK=metrics.json")
    ap.add_argument("--out", required=True, help="baselines JSON to write")
    ap.add_argument("--use", choices=("best", "final"), default="best",
                    help="the run's selected (best) evaluation or its final one")
    ap.add_argument("--all-metrics", action="store_true", help="store every metric, not only the headline ones")
    args = ap.parse_args(argv)
    merged, sources = collect(args.inputs, args.use)
    keys = {t: tuple(v) for t, v in merged.items()} if args.all_metrics else DEFAULT_DELTA_METRICS
    missing = [f"{t}/{k}" for t, vals in merged.items() for k in keys.get(t, ()) if k not in vals]
    if missing:
        raise KeyError(f"the single-task results lack {missing}")
    save_baselines(args.out, merged, keys=keys, sources=sources, selection=args.use)
    print(f"wrote {args.out}: " + ", ".join(f"{t} <- {s}" for t, s in sources.items()))
    return merged


if __name__ == "__main__":
    main()
