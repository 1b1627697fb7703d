#!/usr/bin/env bash
# The GPU validation a session with a CUDA machine runs, in two calls that each fit in 10 minutes
# on an H100 (torch 2.11 / Triton 3.6 preinstalled, no network):
#
#   scripts/gpu_session.sh check   # build ctal._C for this GPU, GPU tests, compute-sanitizer
#   scripts/gpu_session.sh bench   # build, op benchmarks (paper shapes), M-CTAL training throughput
#
# With the device tool: run(command="scripts/gpu_session.sh check", timeout_s=600), the same
# with bench; the files come back from $OUT.
#
# Everything it writes goes to $RESULTS (default $OUT when set, else benchmarks/results/gpu):
# logs, the pytest JUnit XML, and the ops-*/train-* JSON + markdown that
# `python -m benchmarks.report` turns into the README table. Each step has its own time limit so a
# slow step cannot eat the others' output. After a green `check`, remove the validated backend
# names from ctal.ops.dispatch.UNVERIFIED_ON_GPU and commit the results under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: scripts/gpu_session.sh check|bench}
PY=${PY:-python3}
RESULTS=${RESULTS:-${OUT:-benchmarks/results/gpu}}
DEADLINE=${DEADLINE:-570}  # seconds from start; each step's limit is cut to what is left
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
# $OUT returns at most 8 files: `check` keeps its logs there, `bench` only its results.
LOGS=$RESULTS
[ "$STAGE" = bench ] && LOGS=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS - 10))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then echo "== $name: skipped, ${left}s left before the deadline"; return 124; fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$LOGS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    return $rc
}

build() {
    # The GPU's own architecture only (halves nvcc time; CTAL_CUDA_ARCH_LIST overrides); ninja
    # with every core.
    local arch=${CTAL_CUDA_ARCH_LIST:-}
    [ -n "$arch" ] || arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
    CTAL_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) step build 360 \
        $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
    $PY -c "from ctal.ops import extension as e; assert e.with_cuda(), 'ctal._C built without CUDA'" || exit 1
}

case $STAGE in
check)
    build
    { $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|timm|torchvision) ";
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$RESULTS/versions.txt"
    step gpu-tests 330 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
        --junitxml="$RESULTS/gpu-tests.xml" \
        tests/test_triton.py tests/test_extension.py tests/test_ops.py tests/test_module.py
    step sanitize 150 make sanitize PY=$PY
    ;;
bench)
    build
    # Every backend and both pseudo-backends, exact fp32, forward+backward, the four paper shapes;
    # then TF32 and bf16 at the NYUv2 shape. The JSON is rewritten after every case, so a step cut
    # by its limit still returns what it measured.
    step bench-ops-fp32 240 $PY -m benchmarks.bench_ops --shapes paper --modes fwdbwd --dtypes fp32 \
        --repeats 10 --timeout 90 --out "$RESULTS"
    step bench-ops-mixed 100 $PY -m benchmarks.bench_ops --shapes nyuv2 --modes fwdbwd \
        --dtypes tf32,bf16 --repeats 10 --timeout 60 --out "$RESULTS/mixed"
    step bench-train 180 $PY -m benchmarks.bench_train --datasets nyuv2 --models m_ctal \
        --backends reference,linear,triton-linear,cuda-linear --steps 5 --timeout 80 --out "$RESULTS"
    ;;
*)
    echo "unknown stage $STAGE (check | bench)"; exit 2 ;;
esac
