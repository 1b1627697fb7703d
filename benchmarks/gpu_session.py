"""Reads the folder a GPU session (scripts/gpu_session.sh) fills and renders its summary.md:

    python -m benchmarks.gpu_session summary WORK --out WORK/summary.md

The folder holds ``steps.jsonl`` (one line per step: name, status, seconds), ``versions.json``,
``ext.json``, ``correctness.jsonl`` (one line per case), ``ops/<run>/`` and ``train/`` (bench_ops /
bench_train JSON), ``tests/*.xml`` (pytest JUnit) and ``logs/``. Standard library only: the
summary must be written even where torch does not import.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.bench_ops import add_ratios
from benchmarks.gpu_check import MODES, read_jsonl

KERNEL_PREFIXES = ("triton-", "cuda-")


def load(folder: Path) -> dict:
    """Everything a session folder holds, parsed; missing parts are empty."""
    folder = Path(folder)

    def js(name):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}

    def runs(kind):  # one folder per benchmark run; in the order they ran
        found = []
        for p in (folder / kind).rglob(f"{kind}-*.json"):
            try:
                data = json.loads(p.read_text())
            except ValueError:  # rewritten at the moment the session was stopped
                continue
            found.append((data.get("env", {}).get("date", ""), str(p), data))
        return [d for _, _, d in sorted(found, key=lambda t: t[:2])]

    ops, ops_env = [], {}
    for data in runs("ops"):
        ops_env = ops_env or data.get("env", {})
        ops += data.get("results", [])
    add_ratios(ops)  # across the session's op runs (the CUDA backends may be timed in a later one)
    train, train_env = [], {}
    for data in runs("train"):
        train_env = train_env or data.get("env", {})
        train += data.get("results", [])
    return dict(steps=read_jsonl(folder / "steps.jsonl"), versions=js("versions.json"),
                ext=js("ext.json"), ext_built=js("ext-built.json"),
                correctness=read_jsonl(folder / "correctness.jsonl"),
                ops=ops, ops_env=ops_env, train=train, train_env=train_env,
                tests={p.stem: junit(p) for p in sorted((folder / "tests").glob("*.xml"))},
                meta=js("session.json"))


def junit(path: Path) -> dict:
    """Totals and the failing test ids of one pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return dict(error=f"unreadable: {exc}")
    totals = dict(tests=0, failures=0, errors=0, skipped=0, time=0.0)
    failing = []
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in ("tests", "failures", "errors", "skipped"):
            totals[k] += int(suite.get(k, 0))
        totals["time"] += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
                failing.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    totals["failing"] = failing
    return totals


def correctness_by_backend(cases: list[dict]) -> dict[str, dict]:
    """Per backend: counts by status, the worst relative error per mode, failing case ids."""
    out: dict[str, dict] = {}
    for r in cases:
        b = out.setdefault(r["backend"], dict(counts={}, worst={}, failing=[]))
        b["counts"][r["status"]] = b["counts"].get(r["status"], 0) + 1
        if "worst" in r:
            b["worst"][r["mode"]] = max(b["worst"].get(r["mode"], 0.0), r["worst"])
        if r["status"] not in ("pass", "unsupported", "skipped"):
            b["failing"].append(r)
    return out


def passed_backends(cases: list[dict]) -> list[str]:
    """Backends with at least one passing case and no failing, erroring or crashed one."""
    return sorted(b for b, s in correctness_by_backend(cases).items()
                  if s["counts"].get("pass") and not s["failing"])


def _fmt_err(x) -> str:
    return "" if x is None else ("inf" if x == float("inf") else f"{x:.1e}")


def _timing(ops: list[dict], backend: str, shape: str, dtype: str) -> dict | None:
    return next((r for r in ops if r["backend"] == backend and r.get("name") == shape
                 and r.get("dtype") == dtype and r.get("mode") == "fwdbwd"), None)


def backend_rows(s: dict) -> list[str]:
    """One table row per backend: correctness and the forward+backward timing at the first
    timed shape (NYUv2 on a GPU) per dtype."""
    corr = correctness_by_backend(s["correctness"])
    ops = [r for r in s["ops"] if r.get("mode") == "fwdbwd"]
    shape = "nyuv2" if any(r.get("name") == "nyuv2" for r in ops) else (ops[0]["name"] if ops else "")
    dtypes = [d for d in ("fp32", "tf32", "bf16", "fp16") if any(r.get("dtype") == d for r in ops)]
    names = []
    for r in ops:
        if r["backend"] not in names:
            names.append(r["backend"])
    names += [b for b in corr if b not in names]
    head = ["backend", "correctness", "worst rel. error"] + [f"{shape} fwd+bwd {d}" for d in dtypes]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        c = corr.get(name)
        if c is None:
            verdict = "not checked"
        else:
            total = sum(c["counts"].values())
            verdict = ("**FAIL** " if c["failing"] else "") + f"{c['counts'].get('pass', 0)}/{total} pass"
            extra = [f"{n} {k}" for k, n in sorted(c["counts"].items()) if k != "pass"]
            verdict += f" ({', '.join(extra)})" if extra else ""
        worst = ", ".join(f"{m} {_fmt_err(e)}" for m, e in sorted(c["worst"].items())) if c else ""
        cells = [name, verdict, worst]
        for d in dtypes:
            r = _timing(ops, name, shape, d)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["status"].split(":")[0][:40])
            else:
                cell = f"{r['median_ms']:.2f} ms, {r['peak_mb']:.0f} MB"
                if r.get("speedup"):
                    cell += f", {r['speedup']:.1f}x ref"
                if r.get("of_gemm_ceiling"):
                    cell += f", {r['of_gemm_ceiling']:.0%} of GEMM"
                cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def summary_markdown(folder: Path) -> str:
    s = load(folder)
    v, meta = s["versions"], s["meta"]
    where = v.get("gpu") or ("CPU dry run" if meta.get("dry_run") else "no GPU")
    lines = [f"# GPU session: {where}", ""]
    facts = [f"{k} {v[k]}" for k in ("python", "torch", "triton", "numpy") if v.get(k)]
    if v.get("nvidia_smi"):
        facts.append(f"nvidia-smi: {v['nvidia_smi']}")
    if v.get("nvcc"):
        facts.append(v["nvcc"])
    if meta:
        facts.append(f"deadline {meta.get('deadline')} s, started {meta.get('started', '?')}")
    lines += [", ".join(facts) or "versions: not recorded", ""]
    for what, e in (("Extension", s["ext"]), ("Extension built here", s["ext_built"])):
        if e:
            lines += [f"{what}: **{e.get('status')}** `{e.get('path', '')}`"
                      + (f" ({'; '.join(e.get('reasons', []))})" if e.get("reasons") else ""), ""]

    lines += ["## Steps", "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for st in s["steps"]:
        lines.append(f"| {st.get('step')} | {st.get('status')} | {st.get('seconds', 0):.0f} | "
                     f"{st.get('note', '')} |")
    if not s["steps"]:
        lines.append("| (none recorded) | | | |")
    total = sum(st.get("seconds", 0) for st in s["steps"])
    lines += ["", f"{len(s['steps'])} steps, {total:.0f} s in steps.", ""]

    lines += ["## Backends", "", "Correctness: forward and the gradients of x, v, weight, bias "
              "against `reference` in float64; tolerances " + ", ".join(
                  f"{m} {tol:g}" for m, (_, tol) in MODES.items()) + ". Timing: forward+backward, "
              "median of CUDA-event spans (wall clock on a CPU), peak extra memory.", ""]
    lines += backend_rows(s) + [""]
    passed = passed_backends(s["correctness"])
    lines += [f"Passed correctness: {', '.join(passed) if passed else 'none'}", ""]
    failing = [r for b in correctness_by_backend(s["correctness"]).values() for r in b["failing"]]
    if failing:
        lines += ["### Failing correctness cases", ""]
        for r in failing[:40]:
            errs = ", ".join(f"{k} {_fmt_err(e)}" for k, e in r.get("errors", {}).items())
            lines.append(f"- `{r['id']}` {r['status']}: {errs or r.get('error', '')}"[:400])
        lines.append("")

    if s["train"]:
        lines += ["## Training smoke", "",
                  "| dataset | model | backend | amp | status | step ms | images/s | peak MB | last loss "
                  "| finite |",
                  "|---|---|---|---|---|---:|---:|---:|---:|---|"]
        for r in s["train"]:
            name = r["backend"] + (f" ({r['resolved_backend']})" if r.get("resolved_backend")
                                   and r["resolved_backend"] != r["backend"] else "")
            if r["status"] == "ok":
                lines.append(f"| {r['dataset']} | {r['model']} | {name} | {r.get('amp') or 'fp32'} | ok | "
                             f"{r['step_ms']:.1f} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} | "
                             f"{r.get('loss', float('nan')):.4g} | {r.get('finite')} |")
            else:
                lines.append(f"| {r['dataset']} | {r['model']} | {name} | {r.get('amp') or 'fp32'} | "
                             f"{r['status']} {r.get('error', '')[:80]} | | | | | |")
        lines.append("")

    if s["tests"]:
        lines += ["## Tests", "", "| run | passed | failed | errors | skipped | seconds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, t in s["tests"].items():
            if "error" in t:
                lines.append(f"| {name} | {t['error']} | | | | |")
                continue
            lines.append(f"| {name} | {t['passed']} | {t['failures']} | {t['errors']} | {t['skipped']} | "
                         f"{t['time']:.0f} |")
        bad = [f for t in s["tests"].values() for f in t.get("failing", [])]
        if bad:
            lines += ["", "Failing tests:", ""] + [f"- {f}" for f in bad[:30]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("summary")
    p.add_argument("folder")
    p.add_argument("--out")
    args = ap.parse_args(argv)
    text = summary_markdown(Path(args.folder))
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
