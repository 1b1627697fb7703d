"""The cost model behind ``backend="auto"``: FLOPs per algorithm and the decision among the
registered backends (docs/design.md section 4)."""
from __future__ import annotations

import dataclasses

import torch

from . import registry
from .registry import IMPLEMENTATION_RANK, Backend, Problem, backends

__all__ = ["flops", "backend_flops", "Decision", "decide", "NXN_MEMORY_LIMIT", "NXN_FLOP_WEIGHT"]

# Unfused quadratic backends hold a few B x N x N buffers; above this many bytes ``auto`` picks
# the linear form (or a fused kernel) even when quadratic has fewer FLOPs.
NXN_MEMORY_LIMIT = 2 * 1024 ** 3
# Unfused quadratic backends stream B x N x N buffers through memory several times per call and
# run at about half the FLOP rate of the linear form's GEMMs (the op benchmark's CPU results), so
# ``auto`` weighs their FLOPs twice.
NXN_FLOP_WEIGHT = 2.0


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


def backend_flops(b: Backend, p: Problem) -> int:
    """Forward FLOPs of backend ``b``: its own count when it does more than its algorithm's minimum."""
    return b.cost(p) if b.cost is not None else flops(b.algorithm, p)


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
                               gflops=backend_flops(b, p) / 1e9, unsupported=b.unsupported(p)))
    if registry.check_backend(backend) != "auto":
        why = table[backend].unsupported(p)
        if why is not None:
            raise RuntimeError(f"backend {backend!r} cannot run this problem: {why}{note}")
        return Decision(backend, "requested by name", candidates)

    # Triton on CPU tensors means the (very slow) interpreter: a testing tool, never an auto choice.
    ok = [c for c in candidates if c["unsupported"] is None and table[c["name"]].auto_eligible
          and not (p.device.type == "cpu" and c["implementation"] == "triton")
          and c["name"] not in registry.UNVERIFIED_ON_GPU]
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
              if any(table[c["name"]].materializes_nxn for c in ok) else "")
    return Decision(best["name"], f"{best['algorithm']} needs the fewest FLOPs ({weighted(best):.3g} "
                    f"GFLOP{vs}{weight}); {best['implementation']} is the best implementation of it "
                    f"on {p.device.type}{note}", candidates)
