"""Backend registry, custom-op registration and the cost model behind ``backend="auto"``.

A *backend* computes the whole CTAL op ``y = M v`` with one *algorithm* (``quadratic``: forms
affinities tile by tile or literally; ``linear``: the exact re-association of docs/design.md section 2) in one
*implementation* (``pytorch``, ``cpp``, ``triton``, ``cuda``). ``auto`` first picks the algorithm
with the fewest FLOPs for the shapes, then the best implementation available for the device.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from . import linear, quadratic, reference
from .validate import first_order_only

# Preference among implementations of the same algorithm (higher wins).
IMPLEMENTATION_RANK = {"pytorch": 0, "cpp": 1, "triton": 2, "cuda": 3}
# Kernels that have not yet been run against the reference on a GPU (no session so far had
# one): reachable by name, never picked by ``auto``. Remove a name once its GPU tests pass and
# the results are committed under benchmarks/results/.
UNVERIFIED_ON_GPU = {"triton-fused", "triton-linear", "triton-staged", "cuda-linear", "cuda-fused"}
# Unfused quadratic backends hold a few B x N x N buffers; above this many bytes ``auto`` picks
# the linear form (or a fused kernel) even when quadratic has fewer FLOPs.
NXN_MEMORY_LIMIT = 2 * 1024 ** 3
# Unfused quadratic backends stream B x N x N buffers through memory several times per call and
# reached about half the FLOP rate of the linear form's GEMMs on the same machine (0.04-0.10 vs
# 0.10-0.17 TFLOP/s, benchmarks/results/ops-cpu2-2026-11-25.md), so ``auto`` weighs their FLOPs
# twice. Without it, auto chose ``quadratic`` at the Cityscapes shape (1.09x fewer FLOPs than
# linear) and the training step ran at 0.87x the reference, against 1.36x for ``cpp``.
NXN_FLOP_WEIGHT = 2.0


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


def flops(algorithm: str, p: Problem, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the dominant products of one CTAL call.

    quadratic: T Gram matrices (N*N*C each), the grouped 3x3 conv (N*N*9T), M times V (N*N*T*C).
    linear: G = K~^T V and Y = Q~ G, each (9TC) x (TC) x N.
    Backward costs twice the forward's products for both algorithms.
    """
    N, T, C = p.N, p.T, p.C
    if algorithm == "quadratic":
        f = 2 * p.B * (T * N * N * C + 9 * T * N * N + T * C * N * N)
    elif algorithm == "linear":
        f = 2 * p.B * 2 * (9 * T * C) * (T * C) * N
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return f * 3 if backward else f


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    algorithm: str  # "quadratic" | "linear"
    implementation: str  # "pytorch" | "cpp" | "triton" | "cuda"
    fn: Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]
    # Returns None when the backend can run the problem, else the reason it cannot.
    unsupported: Callable[[Problem], Optional[str]] = lambda p: None
    # False for the literal reference: ``auto`` uses it only when nothing else can run.
    auto_eligible: bool = True
    # True when the backend holds N x N matrices (then ``auto`` avoids it for huge N).
    materializes_nxn: bool = False
    # Its own FLOP count when it does more work than its algorithm's minimum (e.g. a fused
    # kernel that recomputes the stencil as 9T shifted dot products); None = ``flops(algorithm)``.
    cost: Optional[Callable[[Problem], int]] = None

    def flops(self, p: Problem) -> int:
        return self.cost(p) if self.cost is not None else flops(self.algorithm, p)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    if backend.algorithm not in ("quadratic", "linear"):
        raise ValueError(f"algorithm must be 'quadratic' or 'linear', got {backend.algorithm!r}")
    if backend.implementation not in IMPLEMENTATION_RANK:
        raise ValueError(f"implementation must be one of {sorted(IMPLEMENTATION_RANK)}")
    _BACKENDS[backend.name] = backend


def backends() -> dict[str, Backend]:
    """All registered backends by name (including ones that cannot run on this machine)."""
    _load_optional_backends()
    return dict(_BACKENDS)


_OPTIONAL_LOADED = False


def _load_optional_backends() -> None:
    """Import the Triton and compiled-extension backends once, if they are installed."""
    global _OPTIONAL_LOADED
    if _OPTIONAL_LOADED:
        return
    _OPTIONAL_LOADED = True
    from . import optional
    optional.load()


@dataclasses.dataclass
class Decision:
    """What ``auto`` (or an explicit name) resolves to, and why."""
    backend: str
    reason: str
    candidates: list[dict]

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.reason})"]
        for c in self.candidates:
            status = "ok" if c["unsupported"] is None else f"unavailable: {c['unsupported']}"
            lines.append(f"  {c['name']:<16} {c['algorithm']:<9} {c['implementation']:<7} "
                         f"{c['gflops']:10.3f} GFLOP  {status}")
        return "\n".join(lines)


def decide(p: Problem, backend: str = "auto", *, note: str = "") -> Decision:
    """Resolve ``backend`` for problem ``p`` (``note`` is appended to the error when a backend
    named explicitly cannot run ``p``).

    ``auto``: among the backends that can run ``p`` (not the literal reference, not interpreted
    Triton, not kernels in ``UNVERIFIED_ON_GPU``), drop unfused quadratic ones whose ``B x N x N``
    buffers would exceed ``NXN_MEMORY_LIMIT``, then take the fewest FLOPs (each backend's own
    count; those of unfused quadratic backends weighted by ``NXN_FLOP_WEIGHT``), breaking ties
    (same algorithm, same work) by the implementation rank CUDA > Triton > C++ > PyTorch.
    """
    table = backends()
    candidates = []
    for b in table.values():
        candidates.append(dict(name=b.name, algorithm=b.algorithm, implementation=b.implementation,
                               gflops=b.flops(p) / 1e9, unsupported=b.unsupported(p)))
    if backend != "auto":
        if backend not in table:
            raise ValueError(f"backend must be 'auto' or one of {sorted(table)}, got {backend!r}")
        why = table[backend].unsupported(p)
        if why is not None:
            raise RuntimeError(f"backend {backend!r} cannot run this problem: {why}{note}")
        return Decision(backend, "requested by name", candidates)

    # Triton on CPU tensors means the (very slow) interpreter: a testing tool, never an auto choice.
    ok = [c for c in candidates if c["unsupported"] is None and table[c["name"]].auto_eligible
          and not (p.device.type == "cpu" and c["implementation"] == "triton")
          and c["name"] not in UNVERIFIED_ON_GPU]
    ok = ok or [c for c in candidates if c["unsupported"] is None]
    nxn_bytes = 3 * p.B * p.N * p.N * torch.empty((), dtype=p.dtype).element_size()
    note = ""
    if nxn_bytes > NXN_MEMORY_LIMIT:
        small = [c for c in ok if not table[c["name"]].materializes_nxn]
        if small and len(small) < len(ok):
            note = f"; unfused quadratic backends skipped (~{nxn_bytes / 2 ** 30:.1f} GiB of N x N buffers)"
        ok = small or ok
    def weighted(c):  # GFLOP as auto compares them
        return c["gflops"] * (NXN_FLOP_WEIGHT if table[c["name"]].materializes_nxn else 1.0)

    # An explicit loop, not min(key=...): under torch.compile with dynamic shapes each comparison
    # becomes a guard on the sizes (a size on the other side of it recompiles).
    best = ok[0]
    for c in ok[1:]:
        if weighted(c) < weighted(best) or (
                weighted(c) == weighted(best)
                and IMPLEMENTATION_RANK[c["implementation"]] > IMPLEMENTATION_RANK[best["implementation"]]):
            best = c
    if torch.compiler.is_compiling():  # the reason is for explain(); compiled code needs the name
        return Decision(best["name"], "", candidates)
    others = [weighted(c) for c in ok if c["algorithm"] != best["algorithm"]]
    other = "linear" if best["algorithm"] == "quadratic" else "quadratic"
    vs = f" vs {min(others):.3g} for {other}" if others else ""
    weight = (f"; unfused quadratic FLOPs counted x{NXN_FLOP_WEIGHT:g} for their N x N buffers"
              if table[best["name"]].materializes_nxn or any(table[c["name"]].materializes_nxn for c in ok)
              else "")
    return Decision(best["name"], f"{best['algorithm']} needs the fewest FLOPs ({weighted(best):.3g} "
                    f"GFLOP{vs}{weight}); {best['implementation']} is the best implementation of it "
                    f"on {p.device.type}{note}", candidates)


# --- PyTorch algorithms with explicit backward, as opaque custom ops --------------------------
# Each algorithm module has ``forward(x, v, w, b) -> (y, saved)`` and
# ``backward(dy, x, v, w, b, saved) -> (dx, dv, dw, db)``; ``saved`` is a by-product forward
# already computed (G for linear, M for quadratic) that backward reuses.

def explicit_op(name: str, module, saved_shape: Callable[[Tensor], tuple]) -> Callable:
    """Register ``ctal::<name>_fwd`` / ``ctal::<name>_bwd`` (fake + autograd) and return the
    ``(x, v, weight, bias) -> y`` entry point. Kernel backends reuse this for their own bodies."""

    @torch.library.custom_op(f"ctal::{name}_fwd", mutates_args=())
    def fwd(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y, saved = module.forward(x, v, weight, bias)
        return y.contiguous(), saved.contiguous()

    @fwd.register_fake
    def _(x, v, weight, bias):
        return x.new_empty(x.shape), x.new_empty(saved_shape(x))

    @torch.library.custom_op(f"ctal::{name}_bwd", mutates_args=())
    def bwd(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
            saved: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dx, dv, dw, db = module.backward(dy, x, v, weight, bias, saved)
        if db is None:  # custom ops cannot return None; setup below drops it again
            db = weight.new_zeros(weight.shape[0])
        return dx.contiguous(), dv.contiguous(), dw.contiguous(), db

    @bwd.register_fake
    def _(dy, x, v, weight, bias, saved):
        return x.new_empty(x.shape), v.new_empty(v.shape), weight.new_empty(weight.shape), \
            weight.new_empty(weight.shape[0])

    def setup(ctx, inputs, output):
        x, v, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, v, weight, bias, output[1])

    def backward(ctx, dy, dsaved):
        first_order_only(name)
        # ``saved`` is internal; nothing downstream differentiates through it.
        x, v, weight, bias, saved = ctx.saved_tensors
        dx, dv, dw, db = bwd(dy.contiguous(), x, v, weight, bias if ctx.has_bias else None, saved)
        return dx, dv, dw, (db if ctx.has_bias else None)

    fwd.register_autograd(backward, setup_context=setup)

    def attention(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return fwd(x, v, weight, bias)[0]

    attention.__name__ = f"{name}_attention"
    return attention


def _linear_saved(x):
    B, T, C = x.shape[:3]
    return (B, 9 * T * C, T * C)


def _quadratic_saved(x):
    B, N = x.shape[0], x.shape[3] * x.shape[4]
    return (B, N, N)


linear_attention = explicit_op("linear", linear, _linear_saved)
quadratic_attention = explicit_op("quadratic", quadratic, _quadratic_saved)

register_backend(Backend("reference", "quadratic", "pytorch", reference.ctal_attention,
                         auto_eligible=False, materializes_nxn=True))
register_backend(Backend("quadratic", "quadratic", "pytorch", quadratic_attention, materializes_nxn=True))
register_backend(Backend("linear", "linear", "pytorch", linear_attention))


# --- the four stages (affinity, align, diffuse, propagate): implementations by name ------------

STAGES = ("affinity", "align", "diffuse", "propagate")
_STAGE_IMPLS: dict[str, dict[str, Callable]] = {s: {} for s in STAGES}


def register_stage(stage: str, name: str, fn: Callable) -> None:
    if stage not in _STAGE_IMPLS:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _STAGE_IMPLS[stage][name] = fn


def stage_impl(stage: str, backend: str) -> Callable:
    _load_optional_backends()
    impls = _STAGE_IMPLS[stage]
    if backend not in impls:
        raise ValueError(f"{stage}: backend must be one of {sorted(impls)}, got {backend!r}")
    return impls[backend]


for _stage in STAGES:
    register_stage(_stage, "reference", getattr(reference, _stage))
