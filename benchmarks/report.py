"""Render the newest op-benchmark results: markdown table, PNG plots, README section.

    python -m benchmarks.report                 # newest benchmarks/results/ops-*.json per device
    python -m benchmarks.report --no-readme     # only print the table and write the plots

Plots (written next to the JSON): median time and peak memory against N = H*W for every backend,
log-log, one line per backend and mode, from the shapes of one run that share B, T and C
(e.g. the ``sweep`` group). The README section between the BENCHMARKS markers is replaced by the
table of the newest op result file of each device, with device, versions and date, followed by
the newest training-throughput table (``bench_train``) of each device.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.tables import RESULTS, add_ratios, markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"


def newest_per_device(folder: Path = RESULTS, kind: str = "ops") -> list[Path]:
    """The newest ``<kind>-<device>-<date>.json`` of each device (by the date inside the file)."""
    best: dict[str, tuple[str, Path]] = {}
    for p in folder.glob(f"{kind}-*.json"):
        data = json.loads(p.read_text())
        env = data["env"]
        device = env.get("gpu") or f"cpu{env.get('cpu_count')}"
        if device not in best or env["date"] > best[device][0]:
            best[device] = (env["date"], p)
    return [p for _, p in sorted(best.values(), key=lambda x: x[0], reverse=True)]


def plot(path: Path) -> list[Path]:
    """Time and memory vs N (log-log) per backend/mode for the shapes of ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    series = defaultdict(list)
    for r in data["results"]:
        if r["status"] != "ok":
            continue
        B, T, C, H, W = r["shape"]
        series[(r["backend"], r["mode"], r["dtype"], B, T, C)].append((H * W, r["median_ms"], r["peak_mb"]))
    written = []
    for metric, col, label in (("time", 1, "median ms"), ("memory", 2, "peak extra MB")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (backend, mode, dtype, B, T, C), pts in sorted(series.items()):
            pts = sorted(pts)
            if len(pts) < 2 or (metric == "memory" and backend == "gemm-ceiling"):
                continue  # the ceiling is a time reference; its inputs are not CTAL's memory
            ax.plot([p[0] for p in pts], [max(p[col], 1e-3) for p in pts], marker="o",
                    label=f"{backend} {mode} ({dtype}, B={B} T={T} C={C})")
        if not ax.lines:
            plt.close(fig)
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N = H x W")
        ax.set_ylabel(label)
        env = data["env"]
        ax.set_title(f"CTAL op {metric}: {env.get('gpu') or 'CPU'}, torch {env['torch']}, {env['date'][:10]}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        out = path.with_name(path.stem + f"-{metric}.png")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


def _link(p: Path) -> str:
    """``p`` as the README links it: relative to the repository root when inside it."""
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(p.resolve())


def readme_section(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        data = json.loads(p.read_text())
        add_ratios(data["results"])  # also fills ratios that files from older versions lack
        parts.append(markdown(data["results"], data["env"]))
        parts.append(f"Source: `{_link(p)}`; regenerate with "
                     f"`python -m benchmarks.bench_ops` then `python -m benchmarks.report`.\n")
        for png in sorted(p.parent.glob(p.stem + "-*.png")):
            parts.append(f"![{png.stem}]({_link(png)})\n")
    for p in newest_per_device(paths[0].parent, "train") if paths else []:
        parts.append(p.with_suffix(".md").read_text())
        parts.append(f"Source: `{_link(p)}`; regenerate with "
                     f"`python -m benchmarks.bench_train`.\n")
    return "\n".join(parts) if parts else "No results yet: run `python -m benchmarks.bench_ops`.\n"


def update_readme(section: str, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to update")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section}{END}{tail}")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md")
    ap.add_argument("--readme", help="rewrite this file's BENCHMARKS section instead of README.md "
                    "(also for a --results folder other than benchmarks/results)")
    args = ap.parse_args(argv)
    paths = newest_per_device(Path(args.results))
    for p in paths:
        plot(p)
    section = readme_section(paths)
    print(section)
    if args.no_readme:
        return section
    if args.readme:
        update_readme(section, Path(args.readme))
    elif Path(args.results).resolve() != RESULTS.resolve():
        # The README shows the committed results; a scratch folder would leave it pointing at
        # files nobody else has (and drop the training table kept under benchmarks/results).
        print(f"README.md left as it is: {args.results} is not {RESULTS.relative_to(ROOT)}")
    else:
        update_readme(section)
    return section


if __name__ == "__main__":
    main()
