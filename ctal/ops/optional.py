"""Registers the backends that need optional pieces (Triton, the compiled extension).

Each loader registers its backends even when its piece is missing, with an ``unsupported``
reason (e.g. how to build the extension), so ``import ctal`` always works and
``ctal.ops.explain`` says why a backend cannot run.
"""
from __future__ import annotations


def load() -> None:
    from ctal.kernels import register_backends as register_triton  # kernels/__init__.py
    from . import extension  # ctal/ops/extension.py: the compiled csrc ops

    register_triton()
    extension.register_backends()
