"""The benchmark harness itself runs end to end (tiny shape, results not written)."""
from __future__ import annotations


import pytest

from benchmarks import bench_ops
from benchmarks.shapes import resolve
from tests.helpers import ROOT


def test_bench_ops_tiny(tmp_path):
    results = bench_ops.main(["--shapes", "tiny", "--backends", "reference,linear", "--modes",
                              "fwdbwd", "--repeats", "2", "--out", str(tmp_path)])
    assert {r["backend"] for r in results} == {"reference", "linear"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in results), results
    assert results[0]["speedup"] == 1.0
    assert list(tmp_path.glob("ops-*.json")) and list(tmp_path.glob("ops-*.md"))


def test_triton_backends_and_gemm_ceiling(tmp_path):
    why = bench_ops_triton_reason()
    if why:
        pytest.skip(why)
    # Triton under the interpreter on CPU (conftest sets TRITON_INTERPRET=1; the case subprocesses
    # inherit it). The GEMM ceiling is measured once per shape and dtype and gives linear rows a
    # fraction; every ratio is against this run's reference.
    results = bench_ops.main(["--shapes", "tiny", "--backends",
                              "reference,triton-fused,triton-linear,gemm-ceiling", "--modes",
                              "fwd,fwdbwd", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert all(r["status"] == "ok" for r in results), results
    assert [r["mode"] for r in results if r["backend"] == "gemm-ceiling"] == ["fwd"]
    linear = [r for r in results if r["backend"] == "triton-linear"]
    assert len(linear) == 2 and all(r["of_gemm_ceiling"] > 0 and r["speedup"] > 0 for r in linear)
    fused = [r for r in results if r["backend"] == "triton-fused"]
    assert all("of_gemm_ceiling" not in r for r in fused)
    assert "of GEMM ceiling" in (next(tmp_path.glob("ops-*.md"))).read_text()


def test_unsupported_and_bad_dtype_are_reported(tmp_path):
    r = bench_ops.run_case(dict(name="tiny", shape=[1, 2, 8, 5, 7], backend="cuda-linear", mode="fwd",
                                dtype="fp32", device="cpu", repeats=1, warmup=0), 120)
    assert r["status"] == "unsupported" and r["error"]
    with pytest.raises(SystemExit, match="tf32"):
        bench_ops.main(["--device", "cpu", "--shapes", "tiny", "--dtypes", "tf32", "--out", ""])
    with pytest.raises(SystemExit, match="--dtypes"):
        bench_ops.main(["--device", "cpu", "--shapes", "tiny", "--dtypes", "fp8", "--out", ""])


def bench_ops_triton_reason():
    import torch
    from ctal.ops import backends
    from ctal.ops import Problem
    return backends()["triton-linear"].unsupported(Problem(1, 2, 8, 5, 7, torch.float32, torch.device("cpu")))


def test_failures_are_results():
    r = bench_ops.run_case(dict(name="tiny", shape=[1, 1, 1, 1, 1], backend="no-such-backend",
                                mode="fwd", dtype="fp32", device="cpu", repeats=1, warmup=0), 120)
    assert r["status"] == "error" and "backend must be" in r["error"]


def test_shape_registry():
    assert resolve(["nyuv2"]) == {"nyuv2": (8, 3, 128, 72, 96)}
    assert len(resolve(["paper"])) == 4


def test_report_renders_table_plots_and_readme(tmp_path):
    from benchmarks import report
    bench_ops.main(["--shapes", "sweep-9x12,sweep-18x24", "--backends", "reference,linear", "--modes", "fwd",
                    "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    (newest,) = report.newest_per_device(tmp_path)
    pngs = report.plot(newest)
    assert {p.name.rsplit("-", 1)[1] for p in pngs} == {"time.png", "memory.png"}
    section = report.readme_section([newest])
    assert "| reference |" in section and newest.name in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    report.update_readme(section, readme)
    text = readme.read_text()
    assert "old table" not in text and "| linear |" in text and text.endswith("outro\n")
    assert "Training step" not in section  # no training results in this folder yet


def test_bench_train_tiny_and_its_readme_table(tmp_path):
    from benchmarks import bench_train, report
    results = bench_train.main(["--datasets", "tiny", "--models", "ctal", "--backends", "reference,linear",
                                "--steps", "1", "--batch", "1", "--device", "cpu", "--out", str(tmp_path)])
    bench_ops.main(["--shapes", "tiny", "--backends", "linear", "--modes", "fwd", "--repeats", "1",
                    "--warmup", "0", "--out", str(tmp_path)])
    (train,) = report.newest_per_device(tmp_path, "train")
    section = report.readme_section(report.newest_per_device(tmp_path))
    assert "Training step" in section and train.name in section and "| tiny | ctal | linear |" in section
    assert [r["status"] for r in results] == ["ok", "ok"], results
    assert results[1]["resolved_backend"] == "linear" and results[1]["images_per_s"] > 0
    assert "speedup" in results[1] and list(tmp_path.glob("train-*.json"))


def test_deadline_and_jsonl_stream(tmp_path):
    import json
    import time
    # A deadline already past: every case is recorded as skipped, none is started.
    stream = tmp_path / "ops.jsonl"
    results = bench_ops.main(["--shapes", "tiny", "--backends", "reference,linear", "--modes", "fwd,fwdbwd",
                              "--out", str(tmp_path), "--jsonl", str(stream), "--deadline", str(time.time())])
    assert [r["status"] for r in results] == ["skipped (deadline)"] * 4
    assert [json.loads(line)["backend"] for line in stream.read_text().splitlines()] == \
        ["reference", "linear"] * 2
    assert "skipped (deadline)" in next(tmp_path.glob("ops-*.md")).read_text()


def test_inprocess_case_runner():
    case = dict(name="tiny", shape=[1, 2, 8, 5, 7], backend="linear", mode="fwdbwd", dtype="fp32",
                device="cpu", repeats=2, warmup=0)
    result, healthy = bench_ops.run_case_inprocess(case)
    assert healthy and result["status"] == "ok" and result["median_ms"] > 0 and result["timer"] == "wall"
    result, healthy = bench_ops.run_case_inprocess(dict(case, backend="no-such-backend"))
    assert healthy and result["status"] == "error" and "backend must be" in result["error"]


def test_bench_train_bf16_autocast_records_a_finite_loss(tmp_path):
    import json
    from benchmarks import bench_train
    stream = tmp_path / "train.jsonl"
    (r,) = bench_train.main(["--datasets", "tiny", "--models", "ctal", "--backends", "linear", "--steps", "1",
                             "--batch", "1", "--device", "cpu", "--amp", "bf16", "--out", str(tmp_path),
                             "--jsonl", str(stream)])
    assert r["status"] == "ok", r
    assert r["amp"] == "bf16" and r["finite"] is True and r["loss"] > 0
    assert json.loads(stream.read_text())["loss"] == r["loss"]
    assert "bf16 autocast" in next(tmp_path.glob("train-*.md")).read_text()


def test_report_rewrites_a_given_readme(tmp_path):
    from benchmarks import report
    env = dict(date="2026-01-02T03:04:05+00:00", torch="x", triton=None, cpu="cpu", cpu_count=2, python="3")
    rows = [dict(name="tiny", shape=[1, 2, 8, 5, 7], backend=b, mode="fwd", dtype="fp32", status="ok",
                 median_ms=ms, tflops=0.1, peak_mb=1.0, algorithm="linear") for b, ms in
            (("reference", 2.0), ("linear", 1.0))]
    bench_ops.write_results(tmp_path, "ops", env, rows, bench_ops.markdown(rows, env), quiet=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.START}\nold\n{report.END}\nb\n")
    report.main(["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| linear | fwd | fp32 | 1.00 |" in text and "| 2.0x |" in text


def test_shell_scripts_parse():
    """The install and GPU scripts are not run in CI as such (the GPU session runs as a dry run in
    tests/benchmarks/test_gpu_session.py; the prebuild downloads torch): at least they must parse."""
    import subprocess
    root = ROOT
    for script in ("scripts/install.sh", "scripts/gpu_session.sh", "scripts/gpu_prebuild.sh", ".ci/run"):
        proc = subprocess.run(["bash", "-n", str(root / script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)
