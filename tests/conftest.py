"""Shared pytest setup for every test module.

- Without a CUDA device, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be in
  the environment before anything imports triton (Triton picks compiled vs interpreted kernels when
  ``@triton.jit`` runs), so it is set here, at conftest import, before test modules are collected.
  An explicit ``TRITON_INTERPRET`` in the environment always wins.
- ``CTAL_POISON=1``: kernel output buffers start as NaN (see ``ctal.kernels._common.poisoned`` and
  ``output_buffer`` in csrc/ops.cpp).
- ``--runslow`` enables tests marked ``slow`` (skipped by default); tests marked ``gpu`` are
  skipped without a CUDA device.
"""
from __future__ import annotations

import os
import sys


def _has_cuda() -> bool:
    try:
        import torch  # importing torch does not import triton
        return torch.cuda.is_available()
    except Exception:
        return False


if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ and not _has_cuda():
    sys.stderr.write("conftest: triton was imported before TRITON_INTERPRET could be set; "
                     "Triton tests may fail without a CUDA device\n")
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs (Triton launchers and the compiled extension) are NaN-filled before the kernels
# write them, so an element a kernel forgets to write fails the comparison with the reference.
os.environ.setdefault("CTAL_POISON", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (skipped unless --runslow)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow")
    has_cuda = _has_cuda()
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
