#!/usr/bin/env bash
# Builds ctal._C on this (CPU) machine for the GPU machine's stack, so the GPU session spends no
# device time compiling:
#
#   scripts/gpu_prebuild.sh                      # Python 3.12 and 3.11, torch 2.11.0 (CUDA 13.0), sm_90
#   PY_VERSIONS=3.12 ARCH="9.0" scripts/gpu_prebuild.sh
#
# For each Python version: a venv .venv-gpu-build/cpXY (git-ignored) with torch from PyPI (PyPI's
# torch 2.11.0 Linux wheel is the +cu130 build, the GPU machine's), a build of csrc/ for ARCH only
# with this machine's nvcc, stripped, into build/gpu/_C<EXT_SUFFIX>, next to a stamp
# (<file>.stamp.json: torch version, arch, Python, sha256 of the file and of csrc/ + setup.py).
# scripts/gpu_session.sh checks the stamp against its own torch, GPU and checkout before using the
# file, and builds on the GPU machine only when it does not fit. Each build is then imported in
# its venv through the in-place shim, as the GPU session will, and runs the C++ op on the CPU.
# The venvs are kept: a rerun reuses them and rebuilds only what changed.
#
# Env: PY_VERSIONS (default "3.12 3.11": the GPU image has been seen with 3.12; 3.11 is what this
# project's own machines run), TORCH_SPEC (torch==2.11.0), ARCH (9.0, TORCH_CUDA_ARCH_LIST
# syntax), DEST (build/gpu), MAX_JOBS (all cores), PYTHON_3_12 / PYTHON_3_11 (interpreters).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY_VERSIONS=${PY_VERSIONS:-"3.12 3.11"}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
ARCH=${ARCH:-9.0}
DEST=${DEST:-build/gpu}
JOBS=${MAX_JOBS:-$(nproc)}

die() { echo "gpu_prebuild: $*" >&2; exit 1; }

find_python() {  # find_python 3.12 -> a path to that interpreter
    local v=$1 var="PYTHON_${1/./_}" cand
    for cand in "${!var:-}" "python$v" "$HOME/.pyenv/versions/$v"*/bin/"python$v" \
                /usr/bin/"python$v" /usr/local/bin/"python$v"; do
        [ -n "$cand" ] || continue
        if "$cand" -c "import sys, venv; assert sys.version_info[:2] == tuple(map(int, '$v'.split('.')))" \
            >/dev/null 2>&1; then
            command -v "$cand" || echo "$cand"
            return 0
        fi
    done
    return 1
}

command -v nvcc >/dev/null || die "nvcc is not on PATH (the CUDA kernels need it)"
NVCC_CUDA=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
mkdir -p "$DEST"
for V in $PY_VERSIONS; do
    T0=$SECONDS
    TAG=cp${V/./}
    VENV=.venv-gpu-build/$TAG
    PY=$(find_python "$V") || die "no Python $V found: install it (e.g. pyenv install $V) or set PYTHON_${V/./_}"
    echo "== Python $V ($PY): venv $VENV"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # torch's own dependencies (the CUDA 13 runtime packages) come along: importing torch needs
    # them, and their headers (cuBLAS, ...) are what setup.py compiles against.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" ninja pybind11 \
        "setuptools<82" wheel numpy
    TORCH_CUDA=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
    [ -n "$TORCH_CUDA" ] || die "$TORCH_SPEC in $VENV is a CPU-only build"
    [ "${TORCH_CUDA%%.*}" = "${NVCC_CUDA%%.*}" ] || \
        die "$TORCH_SPEC is built with CUDA $TORCH_CUDA but nvcc here is $NVCC_CUDA (the major versions must match)"
    T1=$SECONDS
    echo "== build for sm $ARCH with $JOBS jobs (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), nvcc $NVCC_CUDA)"
    # build_ext alone: no install, no wheel; objects stay in build/gpu-build/<tag> for a rerun.
    CTAL_CUDA_ARCH_LIST=$ARCH CTAL_FORCE_CUDA=1 MAX_JOBS=$JOBS "$VENV/bin/python" setup.py -q build_ext \
        --build-lib "build/gpu-build/$TAG/lib" --build-temp "build/gpu-build/$TAG/temp"
    SUFFIX=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    BUILT=build/gpu-build/$TAG/lib/ctal/_C$SUFFIX
    [ -f "$BUILT" ] || die "the build left no $BUILT"
    OUTFILE=$DEST/_C$SUFFIX
    strip --strip-unneeded -o "$OUTFILE" "$BUILT"
    BUILD_S=$((SECONDS - T1))
    # Machine code for each requested arch must be inside (cuobjdump: the toolkit's or Triton's).
    CUOBJDUMP=$(command -v cuobjdump || ls "$VENV"/lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -n 1)
    if [ -n "$CUOBJDUMP" ]; then
        CUBINS=$("$CUOBJDUMP" --list-elf "$OUTFILE")
        for A in ${ARCH//;/ }; do
            A=${A%+PTX}
            grep -q "sm_${A/./}\." <<< "$CUBINS" || die "$OUTFILE holds no sm_${A/./} code: $CUBINS"
        done
    fi
    PYTHONPATH="$ROOT/scripts/inplace:$ROOT" "$VENV/bin/python" -m benchmarks.gpu_check stamp \
        --so "$OUTFILE" --arch "$ARCH" --build-seconds "$BUILD_S" >/dev/null
    # The GPU session's own check, minus the GPU: stamp, import through the shim, one C++ op call.
    CHECK=("$VENV/bin/python" -m benchmarks.gpu_check ext --dir "$DEST")
    PYTHONPATH="$ROOT/scripts/inplace:$ROOT" "${CHECK[@]}" >/dev/null \
        || die "$OUTFILE does not pass its own check; see: PYTHONPATH=scripts/inplace:. ${CHECK[*]}"
    echo "== $OUTFILE: $(du -h "$OUTFILE" | cut -f1) (unstripped $(du -h "$BUILT" | cut -f1)); build ${BUILD_S}s, all $((SECONDS - T0))s"
done
echo "prebuilt for the GPU session (carry \"$DEST\"):"
ls -l "$DEST"
