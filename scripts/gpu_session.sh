#!/usr/bin/env bash
# One GPU session in ONE command under a hard deadline: every check of the Triton and CUDA
# kernels, their timings and a training smoke, most valuable first, so whatever the deadline cuts
# is the least valuable part.
#
#   scripts/gpu_session.sh                          # on the GPU machine (DEADLINE=540 s by default)
#   GPU_SESSION_DRY_RUN=1 OUT=/tmp/s scripts/gpu_session.sh   # the same plan on a CPU (CI)
#
# With the device tool (README, "GPU session"): prebuild here with scripts/gpu_prebuild.sh, then
#   run(command="scripts/gpu_session.sh", carry=["build/gpu"], timeout_s=600)
# and `python -m benchmarks.ingest <files_at>/gpu-session.tar.gz` here.
#
# Steps: versions; the extension (the prebuilt build/gpu/_C<EXT_SUFFIX> if its stamp fits this
# torch, GPU and checkout and it runs, else a build in the background for this GPU's arch with
# all cores); Triton correctness against the fp64 reference; op timing (CUDA events, fwd+bwd,
# peak memory) at NYUv2 in bf16/TF32/fp32 and Cityscapes/PASCAL in bf16 for every backend that
# runs plus the GEMM ceiling; CUDA-backend correctness; the extension's tests; compute-sanitizer
# memcheck and racecheck in fp32 and bf16; M-CTAL training smoke (NYUv2 grid, bf16 autocast, 20
# steps: reference, auto, fastest verified kernel backend); torch.compile(reference) timing if
# time is left; then the GPU test files until the deadline.
#
# Every step runs under `timeout -s INT` with what is left of the deadline (pytest still writes
# its summary and JUnit XML; the benchmarks write what they measured), results stream as JSON
# lines, and after every step $OUT/gpu-session.tar.gz (all logs, JSON, XML) and $OUT/summary.md
# are rewritten, so a run stopped at any point returns everything done until then. Nothing else
# is written to $OUT (the device tool returns at most 8 files).
#
# The checkout runs in place (no pip install): scripts/inplace/sitecustomize.py maps kernels/ to
# ctal.kernels and loads ctal._C from CTAL_EXT_PATH. Env: PY (python3: the interpreter that has
# torch there), DEADLINE (seconds from start), OUT (default build/gpu-session-out), KEEP_WORK=1
# (keep the unpacked session folder), GPU_SESSION_DRY_RUN=1 (CPU: tiny shapes, Triton under
# TRITON_INTERPRET=1, GPU-only steps reported as skipped). Exit status: 0 when no step failed
# (steps cut by the deadline or skipped do not count), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
DRY=${GPU_SESSION_DRY_RUN:-0}
DEADLINE=${DEADLINE:-540}
RESERVE=${RESERVE:-8}    # seconds kept for the last summary and tarball
MIN_STEP=${MIN_STEP:-5}  # a step with less time than this left is skipped, not started
OUT=${OUT:-$ROOT/build/gpu-session-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_session: cannot create OUT=$OUT" >&2; exit 2; }
BASE=$(mktemp -d "${TMPDIR:-/tmp}/ctal-gpu-session.XXXXXX")
WORK=$BASE/gpu-session
mkdir -p "$WORK/logs" "$WORK/ops" "$WORK/train" "$WORK/tests"
START=$(date +%s)
export PYTHONPATH="$ROOT/scripts/inplace:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CTAL_INPLACE_ROOT=$ROOT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset CTAL_EXT_PATH
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
fi
# A step's Python must see SIGINT (to write its results); a shell started in the background has
# it ignored, and ignored signals are inherited. coreutils env can reset it.
SIGDFL=()
env --default-signal=INT true 2>/dev/null && SIGDFL=(env --default-signal=INT)
FAILED=0
BUILD_PID=

elapsed() { echo $(( $(date +%s) - START )); }
jstr() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/ }"; }

refresh() {  # summary.md and the tarball, each replaced atomically in $OUT
    "$PY" -m benchmarks.gpu_session summary "$WORK" --out "$WORK/summary.md" 2>>"$WORK/logs/summary.log" \
        || { echo "# GPU session (the summary renderer failed; raw steps below)"; echo '```';
             cat "$WORK/steps.jsonl" 2>/dev/null; echo '```'; } > "$WORK/summary.md"
    cp "$WORK/summary.md" "$OUT/.summary.md.part" && mv -f "$OUT/.summary.md.part" "$OUT/summary.md"
    tar -czf "$OUT/.gpu-session.tar.gz.part" -C "$BASE" gpu-session 2>/dev/null \
        && mv -f "$OUT/.gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
}

record() {  # record STEP STATUS SECONDS NOTE: one JSON line, flushed, and a line on stdout
    local step=$1 status=$2 secs=$3 note=${4:-}
    printf '{"step": %s, "status": %s, "seconds": %s, "at": %s, "note": %s}\n' "$(jstr "$step")" \
        "$(jstr "$status")" "$secs" "$(elapsed)" "$(jstr "$note")" >> "$WORK/steps.jsonl"
    printf '[%4ss] %-22s %-8s %6ss  %s\n' "$(elapsed)" "$step" "$status" "$secs" "$note"
    [ "$status" = failed ] && FAILED=1
    refresh
}

skip() { record "$1" skipped 0 "$2"; }

plan() {  # plan STEP CAP: sets LIMIT (seconds) and DL (Unix time a tool should stop by); 1 = no time
    local left=$(( DEADLINE - $(elapsed) - RESERVE ))
    LIMIT=$(( $2 < left ? $2 : left ))
    DL=$(( $(date +%s) + LIMIT - 3 ))
    if (( LIMIT < MIN_STEP )); then skip "$1" "deadline: ${left}s left"; return 1; fi
}

run() {  # run STEP CMD...: under the LIMIT of the last plan; log in logs/STEP.log
    local step=$1; shift
    local t0 rc status note=""
    t0=$(date +%s%N)
    echo "== $step (limit ${LIMIT}s): $*" >> "$WORK/logs/$step.log"
    "${SIGDFL[@]}" timeout -s INT -k 10 "$LIMIT" "$@" >> "$WORK/logs/$step.log" 2>&1
    rc=$?
    local secs=$(( ($(date +%s%N) - t0) / 10000000 ))
    secs=$(( secs / 100 )).$(printf '%02d' $(( secs % 100 )))
    if [ $rc = 0 ]; then
        status=ok
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
        status=cut; note="deadline: stopped after ${LIMIT}s"
    elif [ $rc = "${UNAVAILABLE_RC:-none}" ]; then  # a step's own "nothing usable here"
        status=unavailable
    else
        status=failed; note="exit $rc: $(grep -v '^\s*$' "$WORK/logs/$step.log" | tail -n 1 | cut -c1-160)"
    fi
    record "$step" "$status" "$secs" "${NOTE:-}${NOTE:+${note:+; }}$note"
    NOTE=
    return $rc
}

cleanup() {
    if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; then
        local pid
        pid=$(cat "$BASE/ext-build.pid" 2>/dev/null)
        [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null
    fi
    [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$BASE"
}
trap cleanup EXIT

# --- the plan ----------------------------------------------------------------------------------
printf '{"deadline": %s, "dry_run": %s, "started": "%s", "out": %s, "python": %s}\n' "$DEADLINE" \
    "$([ "$DRY" = 1 ] && echo true || echo false)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(jstr "$OUT")" \
    "$(jstr "$PY")" > "$WORK/session.json"
echo "GPU session: deadline ${DEADLINE}s, dry run $DRY, results in $OUT (work folder $WORK)"
NOTE=

# 1. Versions: python, torch, triton, numpy, driver, GPU.
plan versions 60 && run versions "$PY" -m benchmarks.gpu_check versions --out "$WORK/versions.json"
CUDA=0
[ "$DRY" != 1 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null && CUDA=1
if [ "$DRY" != 1 ] && [ "$CUDA" != 1 ]; then
    record cuda-device failed 0 "$PY sees no CUDA device: the GPU steps are skipped (GPU_SESSION_DRY_RUN=1 \
runs the CPU plan)"
fi
gpu_skip() {  # gpu_skip STEP...: the steps that need a GPU, skipped in a dry run or without one
    local step
    for step in "$@"; do
        skip "$step" "$([ "$DRY" = 1 ] && echo 'dry run: needs a GPU' || echo 'no CUDA device')"
    done
}
NPROC=$(nproc)

# 2. The extension: the prebuilt one if it fits, else the checkout's own build, else build it in
# the background (this GPU's arch only, all cores, niced below the Triton JIT).
EXT=0
start_build() {
    local arch left=$(( DEADLINE - $(elapsed) - RESERVE ))
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "building ctal._C for sm $arch with $NPROC jobs in the background" >> "$WORK/logs/ext-build.log"
    BUILD_T0=$(date +%s)
    # timeout leads its own process group: cleanup ends the whole build (ninja, nvcc) through it.
    ( CTAL_CUDA_ARCH_LIST=$arch CTAL_FORCE_CUDA=1 MAX_JOBS=$NPROC nice -n 5 \
        timeout -s TERM -k 10 "$left" "$PY" setup.py build_ext --build-lib "$BASE/ext-build" \
        --build-temp "$BASE/ext-temp" >> "$WORK/logs/ext-build.log" 2>&1 &
      echo $! > "$BASE/ext-build.pid"
      wait $!
      echo $? > "$BASE/ext-build.rc" ) &
    BUILD_PID=$!
}
wait_build() {  # once the build is needed: wait for it (within the deadline) and check its result
    [ -n "$BUILD_PID" ] || return 1
    local left
    while kill -0 "$BUILD_PID" 2>/dev/null; do
        left=$(( DEADLINE - $(elapsed) - RESERVE ))
        (( left > MIN_STEP )) || break
        sleep 2
    done
    if kill -0 "$BUILD_PID" 2>/dev/null; then
        record ext-build cut $(( $(date +%s) - BUILD_T0 )) "deadline: the build was still running"
        BUILD_PID=
        return 1
    fi
    local rc
    rc=$(cat "$BASE/ext-build.rc" 2>/dev/null || echo 1)
    BUILD_PID=
    if [ "$rc" != 0 ]; then
        record ext-build failed $(( $(date +%s) - BUILD_T0 )) "exit $rc: $(tail -n 1 "$WORK/logs/ext-build.log" | cut -c1-160)"
        return 1
    fi
    record ext-build ok $(( $(date +%s) - BUILD_T0 )) "built on this machine"
    local so
    so=$(ls "$BASE"/ext-build/ctal/_C*.so 2>/dev/null | head -n 1)
    if plan ext-check-built 90 && UNAVAILABLE_RC=3 run ext-check-built "$PY" -m benchmarks.gpu_check ext \
            --so "$so" --no-stamp --json "$WORK/ext-built.json" --env-file "$BASE/ext.env"; then
        # shellcheck disable=SC1091
        source "$BASE/ext.env"
        EXT=1
    fi
}
if plan extension 90; then
    UNAVAILABLE_RC=3 run extension "$PY" -m benchmarks.gpu_check ext --dir "$ROOT/build/gpu" \
        --json "$WORK/ext.json" --env-file "$BASE/ext.env" --checkout-fallback
    if [ -f "$BASE/ext.env" ]; then
        # shellcheck disable=SC1091
        source "$BASE/ext.env"
        EXT=1
    elif [ "$CUDA" = 1 ]; then
        start_build
    else
        skip ext-build "$([ "$DRY" = 1 ] && echo 'dry run' || echo 'no CUDA device'): the GPU build is skipped"
    fi
fi

# 3. Triton correctness on the GPU against the fp64 reference (JIT-bound: several workers).
if [ "$DRY" = 1 ]; then
    CHECK=(--tiny --jobs 1)
else
    JOBS=$(( NPROC / 2 ))
    [ -z "$BUILD_PID" ] || JOBS=$(( NPROC / 4 ))  # the build has the other cores
    (( JOBS >= 1 )) || JOBS=1
    CHECK=(--jobs "$JOBS")
fi
if [ "$CUDA" = 1 ] || [ "$DRY" = 1 ]; then
    plan triton-correctness 200 && CTAL_POISON=1 run triton-correctness "$PY" -m benchmarks.gpu_check \
        correctness --backends triton --run triton --jsonl "$WORK/correctness.jsonl" --logs "$WORK/logs" "${CHECK[@]}"
else
    gpu_skip triton-correctness
fi

# 4. Op timing: fwd+bwd, CUDA events, peak memory; every backend that runs + the GEMM ceiling.
# Each bench_ops run writes to its own folder (its files are named after the minute it starts).
# The cases share one process, so a backend that hung or crashed a correctness worker is left out.
KERNELS=triton-staged,triton-fused,triton-linear
[ "$EXT" = 1 ] && [ "$CUDA" = 1 ] && KERNELS=$KERNELS,cuda-linear,cuda-fused
SICK=$("$PY" -m benchmarks.gpu_check sick --correctness "$WORK/correctness.jsonl" 2>/dev/null)
for b in ${SICK//,/ }; do
    KERNELS=$(sed -e "s/\(^\|,\)$b\(,\|$\)/\1/; s/,,/,/; s/^,//; s/,$//" <<< "$KERNELS")
    echo "ops: leaving out $b (it hung or crashed in the correctness step)" >> "$WORK/logs/ops.log"
done
CUDA_TIMED=$([ "$EXT" = 1 ] && echo 1 || echo 0)
if [ "$DRY" = 1 ]; then
    plan ops 90 && run ops "$PY" -m benchmarks.bench_ops --device cpu --shapes tiny --modes fwdbwd \
        --dtypes fp32 --backends reference,linear,triton-linear,gemm-ceiling --repeats 2 --warmup 1 \
        --out "$WORK/ops/ops" --jsonl "$WORK/ops.jsonl" --deadline "$DL"
elif [ "$CUDA" = 1 ]; then
    plan ops-nyuv2 200 && run ops-nyuv2 "$PY" -m benchmarks.bench_ops --inprocess --shapes nyuv2 \
        --modes fwdbwd --dtypes bf16,tf32,fp32 --backends reference,quadratic,linear,$KERNELS,gemm-ceiling \
        --repeats 10 --warmup 2 --timeout 120 --out "$WORK/ops/ops-nyuv2" --jsonl "$WORK/ops.jsonl" --deadline "$DL"
    plan ops-cityscapes-pascal 90 && run ops-cityscapes-pascal "$PY" -m benchmarks.bench_ops --inprocess \
        --shapes cityscapes,pascal-swin --modes fwdbwd --dtypes bf16 \
        --backends reference,quadratic,linear,$KERNELS,gemm-ceiling --repeats 10 --warmup 2 --timeout 60 \
        --out "$WORK/ops/ops-cityscapes-pascal" --jsonl "$WORK/ops.jsonl" --deadline "$DL"
else
    gpu_skip ops
fi

# 5. The CUDA extension: correctness, its tests, compute-sanitizer (fp32 and bf16: the WMMA paths).
if [ "$CUDA" = 1 ]; then
    [ "$EXT" = 1 ] || wait_build
    if [ "$EXT" = 1 ]; then
        plan cuda-correctness 120 && CTAL_POISON=1 run cuda-correctness "$PY" -m benchmarks.gpu_check \
            correctness --backends cuda --run cuda --jsonl "$WORK/correctness.jsonl" --logs "$WORK/logs" \
            --jobs 4
        if [ "$CUDA_TIMED" = 0 ]; then
            # Ratios against the reference timed in step 4 (the summary and ingest merge runs).
            plan ops-cuda 90 && run ops-cuda "$PY" -m benchmarks.bench_ops --inprocess \
                --shapes nyuv2,cityscapes,pascal-swin --modes fwdbwd --dtypes bf16 \
                --backends cuda-linear,cuda-fused --repeats 10 --warmup 2 --timeout 60 \
                --out "$WORK/ops/ops-cuda" --jsonl "$WORK/ops.jsonl" --deadline "$DL"
        fi
        plan ext-tests 120 && run ext-tests "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra \
            --junitxml="$WORK/tests/ext-tests.xml" tests/ops/test_extension.py \
            tests/ops/test_extension_linear.py tests/ops/test_extension_fused.py
        for tool in memcheck racecheck; do
            extra=(); [ $tool = racecheck ] && extra=(--racecheck-report all)
            if ! command -v compute-sanitizer >/dev/null; then
                skip sanitize-$tool "compute-sanitizer is not on PATH"
            # Without the caching allocator every tensor is its own allocation, so memcheck also
            # sees a read past a tensor's end that would land inside a cached block.
            elif plan sanitize-$tool 100; then
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 run sanitize-$tool compute-sanitizer --tool $tool \
                    "${extra[@]}" --error-exitcode 1 "$PY" -m benchmarks.gpu_check sanitize-case --dtypes fp32,bf16
            fi
        done
    else
        for step in cuda-correctness ext-tests sanitize-memcheck sanitize-racecheck; do
            skip $step "no working extension (see ext-build)"
        done
    fi
else
    gpu_skip cuda-correctness ext-tests sanitize-memcheck sanitize-racecheck
fi

# 6. Training smoke: M-CTAL at the NYUv2 grid, bf16 autocast; reference vs auto vs the fastest
# kernel backend that passed its correctness cases.
if [ "$DRY" = 1 ]; then
    FAST=$("$PY" -m benchmarks.gpu_check fastest --ops "$WORK/ops" --correctness "$WORK/correctness.jsonl" \
        --shape tiny --dtype fp32 2>>"$WORK/logs/fastest.log")
    # An interpreted kernel inside a whole model is too slow for CI: reference and auto only.
    plan train-smoke 90 && NOTE="fastest verified kernel backend: ${FAST:-none} (dry run: not trained)" \
        run train-smoke "$PY" -m benchmarks.bench_train --device cpu --datasets tiny --models m_ctal \
        --backends reference,auto --steps 1 --batch 1 --timeout 80 \
        --out "$WORK/train" --jsonl "$WORK/train.jsonl" --deadline "$DL"
elif [ "$CUDA" = 1 ]; then
    FAST=$("$PY" -m benchmarks.gpu_check fastest --ops "$WORK/ops" --correctness "$WORK/correctness.jsonl" \
        --shape nyuv2 --dtype bf16 2>>"$WORK/logs/fastest.log")
    plan train-smoke 150 && NOTE="fastest verified kernel backend: ${FAST:-none}" run train-smoke \
        "$PY" -m benchmarks.bench_train --datasets nyuv2 --models m_ctal \
        --backends "reference,auto${FAST:+,$FAST}" --amp bf16 --steps 20 --batch 8 --timeout 100 \
        --out "$WORK/train" --jsonl "$WORK/train.jsonl" --deadline "$DL"
else
    gpu_skip train-smoke
fi

# 7. torch.compile(reference), only with time to spare (its compile alone takes a while).
if [ "$CUDA" = 1 ] && (( DEADLINE - $(elapsed) > 240 )); then
    plan ops-compiled 100 && run ops-compiled "$PY" -m benchmarks.bench_ops --shapes nyuv2 --modes fwdbwd \
        --dtypes bf16 --backends reference-compiled --repeats 10 --warmup 2 --timeout 95 \
        --out "$WORK/ops/ops-compiled" --jsonl "$WORK/ops.jsonl" --deadline "$DL"
elif [ "$CUDA" = 1 ]; then
    skip ops-compiled "under 240 s left"
else
    gpu_skip ops-compiled
fi

# 8. The GPU test files, GPU-marked tests first, until the deadline. (The dry run collects and
# skips the GPU-marked ones: it checks the files import and the JUnit XML comes back.)
TEST_FILES=(tests/ops/test_conformance.py tests/ops/test_triton.py tests/ops/test_triton_linear.py
    tests/ops/test_triton_fused.py tests/ops/test_ops.py tests/ops/test_module.py tests/ops/test_extension.py
    tests/ops/test_extension_linear.py tests/ops/test_extension_fused.py)
if [ "$CUDA" = 1 ] || [ "$DRY" = 1 ]; then
    plan gpu-tests 400 && run gpu-tests "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu \
        --junitxml="$WORK/tests/gpu-tests.xml" "${TEST_FILES[@]}"
else
    gpu_skip gpu-tests
fi
if [ "$CUDA" = 1 ]; then
    plan other-tests 400 && run other-tests "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra \
        -m "not gpu" --junitxml="$WORK/tests/other-tests.xml" "${TEST_FILES[@]}"
else
    skip other-tests "$([ "$DRY" = 1 ] && echo 'dry run: CI runs them on the CPU' || echo 'no CUDA device')"
fi

[ -z "$BUILD_PID" ] || record ext-build cut $(( $(date +%s) - BUILD_T0 )) "never needed before the deadline"
refresh
echo
cat "$WORK/summary.md"
echo
echo "gpu_session: $(elapsed)s of ${DEADLINE}s; $OUT/gpu-session.tar.gz and $OUT/summary.md"
exit $FAILED
