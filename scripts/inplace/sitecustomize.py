"""Run the ctal checkout in place, without ``pip install`` (scripts/gpu_session.sh and
scripts/gpu_prebuild.sh put this folder first on PYTHONPATH; nothing else should).

An installed ctal maps the top-level ``kernels/`` folder to ``ctal.kernels`` (setup.py's
``package_dir``); a bare checkout on PYTHONPATH has no ``ctal/kernels``. The finder below supplies
that mapping, and loads ``ctal._C`` from ``CTAL_EXT_PATH`` when it is set (a prebuilt or freshly
built extension kept outside ``ctal/``). Python imports ``sitecustomize`` once at start-up, so
every interpreter the scripts start, pytest's and the benchmarks' case subprocesses included,
sees the same package. Another ``sitecustomize`` later on the path still runs.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.environ.get("CTAL_INPLACE_ROOT") or os.path.dirname(os.path.dirname(_HERE))


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ctal.kernels":
            folder = os.path.join(_ROOT, "kernels")
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        if name == "ctal._C":
            so = os.environ.get("CTAL_EXT_PATH")  # read at import time, not at start-up
            if so:
                if not os.path.isfile(so):
                    raise ImportError(f"CTAL_EXT_PATH={so} does not exist", name=name)
                loader = importlib.machinery.ExtensionFileLoader(name, so)
                return importlib.util.spec_from_file_location(name, so, loader=loader)
        return None


sys.meta_path.insert(0, _CheckoutFinder())


def _chain() -> None:
    """Run the next ``sitecustomize`` on the path (an environment's own), which this file hides."""
    others = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_chain()
