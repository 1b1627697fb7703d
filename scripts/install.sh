#!/usr/bin/env bash
# Creates ./.venv if missing, installs the pinned CI dependencies, then ctal itself (editable;
# setup.py compiles the C++/CUDA extension when a compiler is present). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -r requirements-ci.txt
# No build isolation: the extension must build against the torch installed above.
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
