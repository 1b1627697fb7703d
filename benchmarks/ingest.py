"""Turn what a GPU session returned into committed results:

    python -m benchmarks.ingest /work/.device/.../gpu-session.tar.gz     # or the unpacked folder

writes, under ``benchmarks/results/`` (``--results-dir``), tagged with the device and the date:
``ops-<device>-<date>.json/.md`` (every op timing of the session, ratios recomputed across its
runs), ``train-<device>-<date>.json/.md`` (the training smoke) and ``gpucheck-<device>-<date>.json/.md``
(versions, the extension, every correctness case, test totals, the step table: the session's
summary); draws the plots the report draws and rewrites the README's benchmark section
(``--readme``, ``--no-readme``); prints the backends that passed correctness, i.e. the names to
drop from ``ctal.ops.registry.UNVERIFIED_ON_GPU``. Then review and commit the files it lists.

A dry run's session (a CPU) is refused for the default results folder: it would put CPU numbers
where the committed results are.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks import bench_ops, bench_train, gpu_session, report
from benchmarks.tables import RESULTS, add_ratios, write_results


def _extract(path: Path, into: Path) -> Path:
    """The session folder of a tarball or folder (the one holding steps.jsonl)."""
    if path.is_file():
        with tarfile.open(path) as tar:
            for m in tar.getmembers():  # a session tarball holds plain files and folders only
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise SystemExit(f"{path}: unexpected member {m.name!r}; not a gpu-session tarball")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:
                tar.extractall(into)
        path = into
    for cand in (path, path / "gpu-session", *sorted(path.glob("*/"))):
        if (cand / "steps.jsonl").exists() or (cand / "session.json").exists():
            return cand
    raise SystemExit(f"{path} holds no GPU session (no steps.jsonl); give the gpu-session.tar.gz "
                     "that scripts/gpu_session.sh left in $OUT, or its unpacked folder")


def ingest(path: Path, results_dir: Path, readme: Path | None, allow_dry_run: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = _extract(Path(path), Path(tmp))
        s = gpu_session.load(folder)
        summary = gpu_session.summary_markdown(folder)
    meta, versions = s["meta"], s["versions"]
    if meta.get("dry_run") and not allow_dry_run and results_dir.resolve() == RESULTS.resolve():
        raise SystemExit("this is a dry run's session (CPU): it is not ingested into benchmarks/results "
                         "(use --results-dir elsewhere, or --allow-dry-run)")
    env = dict(s["ops_env"] or s["train_env"] or {})
    if not env:  # nothing was timed: name the files after the versions step
        env = dict(date=versions.get("date") or meta.get("started", "unknown-date"),
                   python=versions.get("python"), torch=versions.get("torch"),
                   triton=versions.get("triton"), cpu=versions.get("machine"),
                   cpu_count=versions.get("cpu_count"))
        if versions.get("gpu"):
            env["gpu"] = versions["gpu"]
    env.update(source="scripts/gpu_session.sh", dry_run=bool(meta.get("dry_run")))
    for k in ("capability", "nvidia_smi", "numpy"):
        if versions.get(k):
            env[k] = versions[k]
    written = []
    if s["ops"]:
        ops = [dict(r) for r in s["ops"]]
        add_ratios(ops)  # across the session's op runs (the CUDA backends may be a later run)
        stem = write_results(results_dir, "ops", env, ops, bench_ops.markdown(ops, env), quiet=True)
        written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
        written += report.plot(stem.with_suffix(".json"))
    if s["train"]:
        train = [dict(r) for r in s["train"]]
        bench_train.add_speedups(train)
        tenv = dict(s["train_env"] or env, source=env["source"], dry_run=env["dry_run"])
        table = bench_train.markdown(train, tenv, train[0].get("batch", 0), train[0].get("amp"))
        stem = write_results(results_dir, "train", tenv, train, table, quiet=True)
        written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
    passed = gpu_session.passed_backends(s["correctness"])
    record = dict(env=env, versions=versions, extension=s["ext"], extension_built=s["ext_built"],
                  steps=s["steps"],
                  correctness=s["correctness"], passed=passed,
                  tests=s["tests"])
    stem = write_results(results_dir, "gpucheck", env, [], summary, quiet=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if readme is not None:
        section = report.readme_section(report.newest_per_device(results_dir))
        report.update_readme(section, readme)
        written.append(readme)
    by_backend = gpu_session.correctness_by_backend(s["correctness"])
    return dict(written=written, passed=passed, env=env,
                failed=sorted(b for b, c in by_backend.items() if c["failing"]),
                unchecked=sorted(b for b, c in by_backend.items()
                                 if not c["failing"] and not c["counts"].get("pass")))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="gpu-session.tar.gz or its unpacked folder")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--readme", default=str(report.README), help="the README whose benchmark section "
                    "is rewritten (default: the repository's)")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--allow-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = ingest(Path(args.path), Path(args.results_dir), None if args.no_readme else Path(args.readme),
                 args.allow_dry_run)
    where = out["env"].get("gpu") or f"CPU ({out['env'].get('cpu_count')} cores)"
    print(f"session on {where}, {str(out['env'].get('date', ''))[:10]}; wrote:")
    for p in out["written"]:
        print(f"  {report._link(Path(p))}")
    print(f"passed correctness: {', '.join(out['passed']) or 'none'}")
    if out["failed"]:
        print(f"FAILED correctness: {', '.join(out['failed'])}")
    if out["unchecked"]:
        print(f"no passing case (unsupported / not run): {', '.join(out['unchecked'])}")
    if out["passed"] and not out["env"].get("dry_run"):
        print("these can leave ctal.ops.registry.UNVERIFIED_ON_GPU: " + ", ".join(out["passed"]))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
