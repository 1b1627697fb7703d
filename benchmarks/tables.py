"""Benchmark result files and tables, shared by the op benchmark, the report and the ingest."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(folder: Path, kind: str, env: dict, results: list[dict], table: str,
                  quiet: bool = False) -> Path:
    """``<folder>/<kind>-<device>-<date>T<hhmm>.json`` (environment + results) and ``.md`` (the
    table). The start time is in the name, so a later run the same day (or one stopped early)
    never replaces an earlier run's results."""
    folder.mkdir(parents=True, exist_ok=True)
    slug = (env.get("gpu") or f"cpu{env['cpu_count']}").replace(" ", "-").lower()
    stem = folder / f"{kind}-{slug}-{env['date'][:16].replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    stem.with_suffix(".md").write_text(table)
    if not quiet:
        print(f"wrote {stem}.json and .md")
    return stem


def markdown(results: list[dict], env: dict) -> str:
    where = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} cores)"
    versions = f"torch {env['torch']}" + (f", Triton {env['triton']}" if env.get("triton") else "")
    lines = [f"CTAL op, {where}, {versions}, {env['date'][:10]}", "",
             "| shape (B,T,C,H,W) | backend | mode | dtype | median ms | TFLOP/s | peak MB "
             "| vs reference | vs compiled | of GEMM ceiling |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    ratio = lambda r, k, fmt: fmt.format(r[k]) if r.get(k) else ""  # noqa: E731
    for r in results:
        head = f"| {r['name']} {tuple(r['shape'])} | {r['backend']} | {r['mode']} | {r['dtype']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | | |")
            continue
        lines.append(f"{head} {r['median_ms']:.2f} | {r['tflops']:.3f} | {r['peak_mb']:.0f} | "
                     f"{ratio(r, 'speedup', '{:.1f}x')} | {ratio(r, 'speedup_vs_compiled', '{:.1f}x')} | "
                     f"{ratio(r, 'of_gemm_ceiling', '{:.0%}')} |")
    return "\n".join(lines) + "\n"


def add_ratios(results: list[dict]) -> None:
    """Speed-ups against ``reference`` and ``reference-compiled``, and the fraction of the GEMM
    ceiling for linear-algorithm rows, each only against a result of the same run, shape, mode
    and dtype."""
    def same(q, r, backend):
        return (q["backend"] == backend and q["name"] == r["name"] and q["mode"] == r["mode"]
                and q["dtype"] == r["dtype"] and q["status"] == "ok")
    for r in results:
        if r["status"] != "ok" or r["backend"] == "gemm-ceiling":
            continue
        for backend, key in (("reference", "speedup"), ("reference-compiled", "speedup_vs_compiled")):
            base = next((q for q in results if same(q, r, backend)), None)
            if base is not None:
                r[key] = base["median_ms"] / r["median_ms"]
        ceiling = next((q for q in results if r.get("algorithm") == "linear"
                        and q["backend"] == "gemm-ceiling" and q["name"] == r["name"]
                        and q["dtype"] == r["dtype"] and q["status"] == "ok"), None)
        if ceiling is not None:
            r["of_gemm_ceiling"] = r["tflops"] / ceiling["tflops"]
