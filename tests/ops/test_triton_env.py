"""The environment the Triton tests need. Kept apart from test_triton.py, whose module-level skips
(no CUDA device and no working interpreter) must never hide the interpreter tests in CI."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton wheels are Linux-only")
def test_triton_interpreter_runs_the_kernels_with_the_pinned_triton():
    """CI pins a Triton (>= 3.8) whose interpreter runs our kernels on CPU: conftest.py set
    TRITON_INTERPRET before triton was imported, and the one-program probe kernel runs."""
    import triton

    from ctal.kernels import _common
    version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    if CUDA or version < (3, 8):
        pytest.skip("checked for interpreted Triton >= 3.8")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert _common.INTERPRET
    assert _common.interpreter_reason() is None
