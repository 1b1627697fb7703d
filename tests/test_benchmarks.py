"""The benchmark harness itself runs end to end (tiny shape, results not written)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_ops  # noqa: E402
from benchmarks.shapes import resolve  # noqa: E402


def test_bench_ops_tiny(tmp_path):
    results = bench_ops.main(["--shapes", "tiny", "--backends", "reference,linear", "--modes",
                              "fwdbwd", "--repeats", "2", "--out", str(tmp_path)])
    assert {r["backend"] for r in results} == {"reference", "linear"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in results), results
    assert results[0]["speedup"] == 1.0
    assert list(tmp_path.glob("ops-*.json")) and list(tmp_path.glob("ops-*.md"))


def test_failures_are_results():
    r = bench_ops.run_case(dict(name="tiny", shape=[1, 1, 1, 1, 1], backend="no-such-backend",
                                mode="fwd", dtype="fp32", device="cpu", repeats=1, warmup=0), 120)
    assert r["status"] == "error" and "backend must be" in r["error"]


def test_shape_registry():
    assert resolve(["nyuv2"]) == {"nyuv2": (8, 3, 128, 72, 96)}
    assert len(resolve(["paper"])) == 4
