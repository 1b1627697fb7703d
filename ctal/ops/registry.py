"""The backend and stage registry of ``ctal.ops``. It imports no implementation: implementations
import it (through ``ctal.ops.backends``, which registers every one of them).

A *backend* computes the whole CTAL op ``y = M v`` with one *algorithm* (``quadratic``: forms the
affinities tile by tile or literally; ``linear``: the exact re-association, docs/design.md
section 2) in one *implementation* (``pytorch``, ``cpp``, ``triton``, ``cuda``). A *stage
implementation* computes one of the four stages of the literal pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Problem", "Backend", "register_backend", "backends", "check_backend", "register_stage", "stage_impl",
           "STAGES", "ALGORITHMS", "IMPLEMENTATION_RANK", "UNVERIFIED_ON_GPU"]

ALGORITHMS = ("quadratic", "linear")
# Preference among implementations of the same algorithm (higher wins).
IMPLEMENTATION_RANK = {"pytorch": 0, "cpp": 1, "triton": 2, "cuda": 3}
# Kernels not yet run against the reference on a GPU: reachable by name, never picked by
# ``auto``. A name leaves the set once its GPU tests pass and the results are committed under
# benchmarks/results/.
UNVERIFIED_ON_GPU = {"triton-fused", "triton-linear", "triton-staged", "cuda-linear", "cuda-fused"}
STAGES = ("affinity", "align", "diffuse", "propagate")


@dataclasses.dataclass(frozen=True)
class Problem:
    """The shape facts a backend decision depends on."""
    B: int
    T: int
    C: int
    H: int
    W: int
    dtype: torch.dtype
    device: torch.device

    @property
    def N(self) -> int:
        return self.H * self.W

    @classmethod
    def of(cls, x: Tensor) -> "Problem":
        B, T, C, H, W = x.shape
        return cls(B, T, C, H, W, x.dtype, x.device)


def _runs_everywhere(p: Problem) -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the whole op: ``fn(x, v, weight, bias) -> y``."""
    name: str
    algorithm: str  # one of ALGORITHMS
    implementation: str  # a key of IMPLEMENTATION_RANK
    fn: Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]
    # None when the backend can run the problem, else the reason it cannot. Must be plain Python
    # on the problem's fields (``torch.compile`` traces it).
    unsupported: Callable[[Problem], Optional[str]] = _runs_everywhere
    # False for the literal reference: ``auto`` uses it only when nothing else can run.
    auto_eligible: bool = True
    # True when the backend holds N x N matrices (then ``auto`` avoids it for huge N).
    materializes_nxn: bool = False
    # ``cost(problem, backward=False)``: the FLOPs its launches really perform (forward, or
    # forward plus backward), when that differs from its algorithm's minimum (padded tiles,
    # recomputed tiles); None = the algorithm's minimum, ``ctal.ops.flops``.
    cost: Optional[Callable[..., int]] = None
    # False when its backward accumulates with atomic adds (results vary in the last bits from run
    # to run): under ``torch.use_deterministic_algorithms`` ``auto`` does not pick it for a call
    # that will be differentiated, and the backend itself raises like PyTorch's own such ops.
    deterministic_backward: bool = True


_BACKENDS: dict[str, Backend] = {}
_STAGE_IMPLS: dict[str, dict[str, Callable]] = {s: {} for s in STAGES}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; ``ctal_attention(..., backend=backend.name)`` then runs it."""
    if backend.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {backend.algorithm!r}")
    if backend.implementation not in IMPLEMENTATION_RANK:
        raise ValueError(f"implementation must be one of {sorted(IMPLEMENTATION_RANK)}, "
                         f"got {backend.implementation!r}")
    _BACKENDS[backend.name] = backend


def backends() -> dict[str, Backend]:
    """All registered backends by name (including ones that cannot run on this machine)."""
    return dict(_BACKENDS)


def check_backend(name, *, stage: Optional[str] = None) -> str:
    """``name`` if it names a registered backend (``"auto"`` included for the whole op) or, with
    ``stage``, an implementation of that stage; else a ``ValueError`` listing the choices."""
    if stage is None:
        if name != "auto" and name not in _BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")
    elif name not in _STAGE_IMPLS[stage]:
        raise ValueError(f"{stage}: backend must be one of {sorted(_STAGE_IMPLS[stage])}, got {name!r}")
    return name


def register_stage(stage: str, name: str, fn: Callable) -> None:
    """Add an implementation ``name`` of one stage (``ctal.ops.<stage>(..., backend=name)``)."""
    if stage not in _STAGE_IMPLS:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _STAGE_IMPLS[stage][name] = fn


def stage_impl(stage: str, backend: str) -> Callable:
    return _STAGE_IMPLS[stage][check_backend(backend, stage=stage)]
