"""The one-command GPU session (scripts/gpu_session.sh) rehearsed on the CPU: its dry run, its
deadline, the in-place import shim, the correctness plan and the ingestion of what it returns."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

from benchmarks import gpu_check, ingest

SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def _session(out: Path, timeout: float, **env) -> tuple[subprocess.CompletedProcess, float]:
    full = dict(os.environ, GPU_SESSION_DRY_RUN="1", OUT=str(out), PY=sys.executable)
    full.update(env)
    for k in ("TRITON_INTERPRET", "CTAL_POISON", "CTAL_EXT_PATH", "KEEP_WORK"):
        full.pop(k, None)  # the script sets what it needs; the test run's settings must not leak
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - t0


def _members(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _steps(members) -> list[dict]:
    return [json.loads(line) for line in members["gpu-session/steps.jsonl"].decode().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session-out")
    proc, seconds = _session(out, timeout=300)
    return proc, out, seconds


def _interpreter_problem():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = ("from ctal.kernels import _common as c; import sys; "
            "print(c.TRITON_IMPORT_ERROR or c.interpreter_reason() or '')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    return out.stdout.strip()


def test_dry_run_runs_the_plan_and_leaves_tarball_and_summary(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # Only these come back from the device tool's $OUT (it returns at most 8 files).
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.tar.gz", "summary.md"]
    members = _members(out / "gpu-session.tar.gz")
    for name in ("steps.jsonl", "versions.json", "session.json", "ext.json", "correctness.jsonl",
                 "ops.jsonl", "train.jsonl", "summary.md", "tests/gpu-tests.xml", "logs/versions.log"):
        assert f"gpu-session/{name}" in members, sorted(members)
    assert any(n.startswith("gpu-session/ops/") and Path(n).name.startswith("ops-") and n.endswith(".json")
               for n in members)
    steps = {s["step"]: s for s in _steps(members)}
    order = ["versions", "extension", "triton-correctness", "ops", "cuda-correctness", "ext-tests",
             "sanitize-memcheck", "sanitize-racecheck", "train-smoke", "ops-compiled", "gpu-tests"]
    assert [s for s in steps if s in order] == order
    for name in ("versions", "triton-correctness", "ops", "train-smoke", "gpu-tests"):
        assert steps[name]["status"] == "ok", steps[name]
    assert steps["extension"]["status"] in ("ok", "unavailable")
    for name in ("cuda-correctness", "ext-tests", "sanitize-memcheck", "sanitize-racecheck", "ops-compiled"):
        assert steps[name]["status"] == "skipped" and "dry run" in steps[name]["note"]
    cases = [json.loads(line) for line in members["gpu-session/correctness.jsonl"].decode().splitlines()]
    assert len(cases) == 6 and {c["backend"] for c in cases} == set(gpu_check.GROUPS["triton"])
    summary = (out / "summary.md").read_text()
    assert summary == members["gpu-session/summary.md"].decode()
    assert "| step | status | seconds |" in summary and "| triton-correctness | ok |" in summary
    if not _interpreter_problem():
        assert all(c["status"] == "pass" for c in cases), cases
        assert "Passed correctness: triton-fused, triton-linear, triton-staged" in summary
    train = [json.loads(line) for line in members["gpu-session/train.jsonl"].decode().splitlines()]
    assert [t["status"] for t in train] == ["ok", "ok"] and all(t["finite"] for t in train)


def test_deadline_cuts_a_step_and_still_returns_everything(tmp_path):
    # A python that hangs in the correctness step: the deadline must stop it (SIGINT, then the
    # steps after it are skipped) and the tarball and summary must still be written.
    slow = tmp_path / "slowpy"
    slow.write_text("#!/usr/bin/env bash\n"
                    'for a in "$@"; do [ "$a" = correctness ] && exec "$REAL_PY" -c '
                    '"import time; print(\'hanging\', flush=True); time.sleep(600)"; done\n'
                    'exec "$REAL_PY" "$@"\n')
    slow.chmod(0o755)
    out = tmp_path / "out"
    proc, seconds = _session(out, timeout=120, PY=str(slow), REAL_PY=sys.executable,
                             DEADLINE="16", RESERVE="3", MIN_STEP="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert seconds < 16 + 15, seconds  # the deadline holds (plus the last summary and tarball)
    steps = _steps(_members(out / "gpu-session.tar.gz"))
    by_name = {s["step"]: s for s in steps}
    assert by_name["versions"]["status"] == "ok"
    assert by_name["triton-correctness"]["status"] == "cut", steps
    assert "deadline" in by_name["triton-correctness"]["note"]
    later = steps[steps.index(by_name["triton-correctness"]) + 1:]
    assert later and all(s["status"] in ("skipped", "cut") for s in later), later
    summary = (out / "summary.md").read_text()
    assert "| triton-correctness | cut |" in summary


STUB_PY = r"""#!/usr/bin/env bash
# Stands in for the GPU machine's python3: answers as a CUDA machine whose prebuilt extension does
# not fit, logs every call, and fakes each tool's output files; the summary and the small helpers
# run for real.
echo "$*" >> "$STUB_LOG"
arg() {  # arg FLAG ARGS...: the value after FLAG
    local want=$1; shift
    while [ $# -gt 0 ]; do [ "$1" = "$want" ] && { echo "$2"; return; }; shift; done
}
case "$*" in
    *torch.cuda.is_available*) exit 0 ;;
    *get_device_capability*) echo 9.0 ;;
    *"benchmarks.gpu_session "*|*"gpu_check fastest"*|*"gpu_check sick"*|*"gpu_check versions"*)
        exec "$REAL_PY" "$@" ;;
    *"gpu_check ext"*--no-stamp*) echo "export CTAL_EXT_PATH=$(arg --so "$@")" > "$(arg --env-file "$@")" ;;
    *"gpu_check ext"*) exit 3 ;;
    *"setup.py build_ext"*)
        echo "build: arch=$CTAL_CUDA_ARCH_LIST jobs=$MAX_JOBS" >> "$STUB_LOG"
        lib=$(arg --build-lib "$@"); mkdir -p "$lib/ctal"; sleep 2; touch "$lib/ctal/_C.stub.so" ;;
    *"gpu_check correctness"*)
        echo "correctness: CTAL_POISON=$CTAL_POISON" >> "$STUB_LOG"
        for b in triton-linear triton-fused; do
            printf '{"backend": "%s", "status": "pass", "id": "%s/x", "mode": "bf16", "worst": 1e-3}\n' \
                "$b" "$b" >> "$(arg --jsonl "$@")"
        done ;;
    *benchmarks.bench_ops*)
        out=$(arg --out "$@"); mkdir -p "$out"
        echo '{"env": {"date": "2026-01-01T00:00:00+00:00", "torch": "x", "cpu_count": 16, "gpu": "Stub GPU"},
               "results": [{"name": "nyuv2", "shape": [8, 3, 128, 72, 96], "backend": "triton-linear",
               "mode": "fwdbwd", "dtype": "bf16", "status": "ok", "median_ms": 1.0, "tflops": 1.0,
               "peak_mb": 1.0}]}' > "$out/ops-stub-gpu-2026-01-01T0000.json" ;;
esac
exit 0
"""


def test_gpu_plan_with_a_stub_python(tmp_path):
    """The GPU branch of the script (which CI cannot run) with a stand-in python: the prebuild
    does not fit, so the extension is built in the background while Triton is checked and timed,
    and the CUDA steps follow once it is there."""
    stub = tmp_path / "python3"
    stub.write_text(STUB_PY)
    stub.chmod(0o755)
    sanitizer = tmp_path / "bin" / "compute-sanitizer"
    sanitizer.parent.mkdir()
    sanitizer.write_text('#!/usr/bin/env bash\necho "sanitizer $*" >> "$STUB_LOG"\n')
    sanitizer.chmod(0o755)
    log = tmp_path / "calls.log"
    out = tmp_path / "out"
    proc, _ = _session(out, timeout=120, GPU_SESSION_DRY_RUN="0", PY=str(stub), REAL_PY=sys.executable,
                       STUB_LOG=str(log), PATH=f"{sanitizer.parent}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    calls = log.read_text().splitlines()

    def first(text):
        return next(i for i, c in enumerate(calls) if text in c)

    steps = {s["step"]: s["status"] for s in _steps(_members(out / "gpu-session.tar.gz"))}
    assert steps["extension"] == "unavailable" and steps["ext-build"] == "ok", steps
    for name in ("triton-correctness", "ops-nyuv2", "ops-cityscapes-pascal", "ext-check-built",
                 "cuda-correctness", "ops-cuda", "ext-tests", "sanitize-memcheck", "sanitize-racecheck",
                 "train-smoke", "ops-compiled", "gpu-tests", "other-tests"):
        assert steps.get(name) == "ok", (name, steps)
    assert "build: arch=9.0 jobs=" in log.read_text()
    assert "correctness: CTAL_POISON=1" in log.read_text()
    # Triton is checked while the build runs; the CUDA backends join once it is done.
    assert first("setup.py build_ext") < first("--backends triton ") < first("--shapes nyuv2 --modes")
    ops_nyuv2 = calls[first("--shapes nyuv2 --modes")]
    assert "--inprocess" in ops_nyuv2 and "cuda-" not in ops_nyuv2 and "--dtypes bf16,tf32,fp32" in ops_nyuv2
    assert first("--shapes nyuv2 --modes") < first("--no-stamp") < first("--backends cuda ")
    assert "--backends cuda-linear,cuda-fused" in calls[first("--shapes nyuv2,cityscapes,pascal-swin")]
    assert "tests/ops/test_extension.py" in calls[first("-m pytest")]
    assert sum("sanitizer --tool" in c for c in calls) == 2
    train = calls[first("benchmarks.bench_train")]
    assert "--backends reference,auto,triton-linear" in train
    assert "--amp bf16" in train and "--steps 20" in train
    assert "-m gpu" in calls[first("-m gpu")] and '-m not gpu' in calls[first("-m not gpu")]
    summary = (out / "summary.md").read_text()  # rendered from the stub's files
    assert "| triton-linear | 2/2 pass | bf16 1.0e-03 | 1.00 ms, 1 MB |" in summary
    assert "Passed correctness: triton-fused, triton-linear" in summary


def test_ingest_round_trips_a_dry_run(dry_run, tmp_path, capsys):
    _, out, _ = dry_run
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BENCHMARKS:START -->\nold\n<!-- BENCHMARKS:END -->\noutro\n")
    results = tmp_path / "results"
    got = ingest.main([str(out / "gpu-session.tar.gz"), "--results-dir", str(results),
                       "--readme", str(readme)])
    names = sorted(p.name for p in results.iterdir())
    for kind in ("ops", "train", "gpucheck"):
        assert any(n.startswith(f"{kind}-") and n.endswith(".json") for n in names), names
        assert any(n.startswith(f"{kind}-") and n.endswith(".md") for n in names), names
    text = readme.read_text()
    assert "old" not in text and "| triton-linear |" in text and "Training step" in text
    record = json.loads(next(results.glob("gpucheck-*.json")).read_text())
    assert len(record["correctness"]) == 6 and record["env"]["dry_run"] is True
    printed = capsys.readouterr().out
    assert f"passed correctness: {', '.join(got['passed']) or 'none'}" in printed
    if not _interpreter_problem():
        assert got["passed"] == ["triton-fused", "triton-linear", "triton-staged"]
    # The unpacked folder works too, and a dry run never lands in the committed results.
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / "gpu-session.tar.gz") as tar:
        tar.extractall(unpacked)
    again = ingest.main([str(unpacked), "--results-dir", str(tmp_path / "again"), "--no-readme"])
    assert again["passed"] == got["passed"]
    with pytest.raises(SystemExit, match="dry run"):
        ingest.main([str(out / "gpu-session.tar.gz"), "--no-readme"])
    with pytest.raises(SystemExit, match="no GPU session"):
        ingest.main([str(tmp_path / "again"), "--results-dir", str(tmp_path / "x"), "--no-readme"])


def _inplace(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "scripts" / "inplace"), str(ROOT),
                                                        env.pop("extra_path", "")]), **env)
    full.pop("CTAL_EXT_PATH", None) if "CTAL_EXT_PATH" not in env else None
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True)


def test_inplace_shim_maps_kernels_and_loads_the_extension_from_its_path(tmp_path):
    out = _inplace("import ctal.kernels._common as c, ctal; print(c.__file__); print(ctal.__file__)",
                   tmp_path)
    assert out.returncode == 0, out.stderr
    kernels, ctal = out.stdout.split()
    assert Path(kernels) == ROOT / "kernels" / "_common.py" and Path(ctal) == ROOT / "ctal" / "__init__.py"
    out = _inplace("import ctal._C", tmp_path, CTAL_EXT_PATH=str(tmp_path / "missing.so"))
    assert out.returncode != 0 and "CTAL_EXT_PATH" in out.stderr and "does not exist" in out.stderr
    # An environment's own sitecustomize still runs after the shim's.
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE'] = 'ran'\n")
    out = _inplace("import os; print(os.environ.get('OTHER_SITECUSTOMIZE'))", tmp_path, extra_path=str(other))
    assert out.stdout.strip() == "ran", out.stderr


def test_correctness_plan_is_small_and_ordered_by_value():
    cases = gpu_check.plan_cases(gpu_check.expand_backends("triton,cuda"), tiny=False)
    assert len(cases) <= 50 and len({c["id"] for c in cases}) == len(cases)
    assert [c["index"] for c in cases] == list(range(len(cases)))
    # Every backend's most valuable case first: the NYUv2 grid in exact fp32 (cuda-fused, which
    # refuses that grid, starts at Cityscapes).
    first = cases[:5]
    assert {c["backend"] for c in first} == set(gpu_check.PLANS)
    assert all(c["shape_name"] == "nyuv2" and c["mode"] == "fp32"
               for c in first if c["backend"] != "cuda-fused")
    for b in ("triton-linear", "triton-fused", "cuda-linear"):
        modes = {c["mode"] for c in cases if c["backend"] == b and c["shape_name"] == "nyuv2"}
        assert modes == {"fp32", "tf32", "bf16"}, (b, modes)
        assert {c["shape_name"] for c in cases if c["backend"] == b} >= {"cityscapes", "odd-a", "odd-b"}
    tiny = gpu_check.plan_cases(["triton-linear"], tiny=True)
    assert all(c["mode"] in ("fp32", "fp64") for c in tiny)  # the interpreter has no 16-bit dots
    assert gpu_check.expand_backends("triton,linear,triton-fused") == gpu_check.GROUPS["triton"] + ["linear"]


def test_fastest_picks_the_fastest_backend_that_passed(tmp_path, capsys):
    ops = tmp_path / "ops"
    ops.mkdir()
    rows = [("reference", 50.0), ("triton-linear", 2.0), ("cuda-linear", 1.0), ("triton-fused", 3.0),
            ("linear", 0.5)]
    (ops / "ops-x.json").write_text(json.dumps({"env": {}, "results": [
        dict(name="nyuv2", backend=b, mode="fwdbwd", dtype="bf16", status="ok", median_ms=ms)
        for b, ms in rows]}))
    corr = tmp_path / "c.jsonl"
    corr.write_text("\n".join(json.dumps(r) for r in [
        dict(backend="triton-linear", status="pass"), dict(backend="cuda-linear", status="pass"),
        dict(backend="cuda-linear", status="fail"), dict(backend="triton-fused", status="pass")]) + "\n")
    gpu_check.main(["fastest", "--ops", str(ops), "--correctness", str(corr)])
    assert capsys.readouterr().out.strip() == "triton-linear"  # cuda-linear failed a case


def test_extension_check_reports_missing_and_stale_prebuilds(tmp_path, capsys):
    import sysconfig
    rc = gpu_check.main(["ext", "--dir", str(tmp_path), "--json", str(tmp_path / "e.json")])
    record = json.loads((tmp_path / "e.json").read_text())
    assert rc == 3 and record["status"] == "missing"
    so = tmp_path / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    so.write_bytes(b"not an extension")
    rc = gpu_check.main(["ext", "--dir", str(tmp_path), "--json", str(tmp_path / "e.json"),
                         "--env-file", str(tmp_path / "e.env")])
    reasons = " ".join(json.loads((tmp_path / "e.json").read_text())["reasons"])
    assert rc == 3 and "stamp.json is missing" in reasons
    Path(str(so) + ".stamp.json").write_text(json.dumps(dict(torch="0.0.0", sha256="0", sources_sha256="0",
                                                             arch="9.0")))
    rc = gpu_check.main(["ext", "--dir", str(tmp_path), "--json", str(tmp_path / "e.json"),
                         "--env-file", str(tmp_path / "e.env")])
    reasons = " ".join(json.loads((tmp_path / "e.json").read_text())["reasons"])
    assert rc == 3 and "torch 0.0.0" in reasons and "stale" in reasons and "differs" in reasons
    assert not (tmp_path / "e.env").exists()
    capsys.readouterr()


def test_correctness_workers_survive_a_crash_and_a_hang(tmp_path, monkeypatch):
    # The first worker process dies at once, the second hangs; each loses only its own case,
    # which is recorded, and a fresh worker runs the rest.
    state = tmp_path / "starts"
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'n=$(cat "{state}" 2>/dev/null || echo 0); echo $((n + 1)) > "{state}"\n'
                    'case $n in 0) exit 9 ;; 1) exec sleep 600 ;; esac\n'
                    f'exec "{sys.executable}" "$@"\n')
    stub.chmod(0o755)
    monkeypatch.setattr(gpu_check.sys, "executable", str(stub))
    jsonl = tmp_path / "c.jsonl"
    rc = gpu_check.main(["correctness", "--tiny", "--backends", "linear,quadratic", "--jsonl", str(jsonl),
                         "--case-timeout", "3", "--logs", str(tmp_path)])
    by_index = {r["index"]: r for r in gpu_check.read_jsonl(jsonl)}
    assert [by_index[i]["status"] for i in range(4)] == ["crashed", "timeout", "pass", "pass"], by_index
    assert "exit 9" in by_index[0]["error"] and "3s" in by_index[1]["error"]
    assert rc == 1  # a crashed case is a failure
