"""The cost model behind ``backend="auto"``: FLOPs per algorithm and the decision among the
registered backends (docs/design.md section 4)."""
from __future__ import annotations

import dataclasses

import torch

from . import registry
from .registry import IMPLEMENTATION_RANK, Backend, Problem, backends

__all__ = ["flops", "backend_flops", "cuda_linear_flops", "cuda_fused_flops", "Decision", "decide",
           "NXN_MEMORY_LIMIT", "NXN_FLOP_WEIGHT", "TIE_RATIO"]

# Unfused quadratic backends hold a few B x N x N buffers; above this many bytes ``auto`` picks
# the linear form (or a fused kernel) even when quadratic has fewer FLOPs.
NXN_MEMORY_LIMIT = 2 * 1024 ** 3
# Unfused quadratic backends stream B x N x N buffers through memory several times per call and
# run at about half the FLOP rate of the linear form's GEMMs (the op benchmark's CPU results), so
# ``auto`` weighs their FLOPs twice.
NXN_FLOP_WEIGHT = 2.0
# Implementations of one algorithm whose counts differ only by tile or row padding (a few percent)
# do the same work as far as the model can tell: within this ratio of the fewest FLOPs, the
# better implementation (CUDA > Triton > C++ > PyTorch) wins.
TIE_RATIO = 1.05


def flops(algorithm: str, p: Problem, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the dominant products of one CTAL call: the algorithm's
    minimum (backends that do more declare their own ``cost``).

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


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def cuda_linear_flops(p: Problem, backward: bool = False) -> int:
    """FLOPs of cuda-linear's GEMMs as launched (csrc/linear.cpp, ``LinearGeom`` in
    csrc/ctal_ext.h). R = T C. The key operand runs over the row-padded pixel axis ``Lv = H Wp``
    (``Wp``: ``W`` rounded up to whole 16-byte vectors; ``Lv = N`` at the paper grids), the query
    operand over the ``N`` pixels. Forward: ``G_d = K_d V^T`` (9R x R x Lv) and ``Y = G^T Q``
    (R x 9R x N); with a bias, the rank-1 ``sumV b^T`` (R x N). Backward adds ``dG = Q dY^T``,
    ``dQ = G dY`` and ``dK = dG V`` (9R x R x N each), ``dV = sum_d dG_d^T K_d`` (R x 9R x Lv)
    and the bias terms ``dY b`` and ``sumV^T dY`` (R x N each). A ``Problem`` does not say whether
    there is a bias; its terms are counted (about 1 / (18 R) of the total)."""
    R, N = p.T * p.C, p.N
    vec = max(1, 16 // torch.empty((), dtype=p.dtype).element_size())
    Lv = p.H * _ceil(p.W, vec)
    macs = 9 * R * R * (Lv + N) + R * N
    if backward:
        macs += 9 * R * R * (3 * N + Lv) + 2 * R * N
    return 2 * p.B * macs


def cuda_fused_flops(p: Problem, backward: bool = False) -> int:
    """FLOPs of cuda-fused as launched (csrc/fused_cuda.cu): one block per 16 query pixels and
    batch item streams the keys in chunks of 32; operand tiles are zero-padded to ``Cp =
    ceil16(C)`` channels and ``Nk = ceil32(N)`` keys. Per block, task and key chunk the forward
    forms the similarity (16 x 32 x Cp on tensor cores), scatters it through the 3x3 stencil
    (16 x 32 x 9 multiply-adds) and multiplies the completed M chunk with the values (16 x Cp x
    32): 2 tile GEMMs and 1 stencil. The backward, in one pass, recomputes the similarity and
    stencil and forms dM, dw and the adjoint stencil, both sides of dn and dV: 5 tile GEMMs and 3
    stencils."""
    Cp, Nk = _ceil(p.C, 16), _ceil(p.N, 32)
    rows = p.B * _ceil(p.N, 16)  # query rows computed, padded to whole blocks
    gemm, stencil = Nk * Cp, 9 * Nk
    macs = rows * p.T * (2 * gemm + stencil)
    if backward:
        macs += rows * p.T * (5 * gemm + 3 * stencil)
    return 2 * macs


def backend_flops(b: Backend, p: Problem, backward: bool = False) -> int:
    """FLOPs of backend ``b``: its own count (``b.cost(p, backward=...)``) when it declares one,
    else its algorithm's minimum; the forward, or forward plus backward with ``backward=True``."""
    return b.cost(p, backward=backward) if b.cost is not None else flops(b.algorithm, p, backward)


@dataclasses.dataclass
class Decision:
    """What ``auto`` (or an explicit name) resolves to, and why. ``candidates[i]["gflops"]`` is
    the work each backend's launches really perform: the forward, or forward plus backward when
    ``backward`` (the inputs require grad)."""
    backend: str
    reason: str
    candidates: list[dict]
    backward: bool = False

    def __str__(self) -> str:
        what = "GFLOP fwd+bwd" if self.backward else "GFLOP fwd"
        lines = [f"backend: {self.backend} ({self.reason})"]
        for c in self.candidates:
            status = "ok" if c["unsupported"] is None else f"unavailable: {c['unsupported']}"
            lines.append(f"  {c['name']:<16} {c['algorithm']:<9} {c['implementation']:<7} "
                         f"{c['gflops']:10.3f} {what}  {status}")
        return "\n".join(lines)


def decide(p: Problem, backend: str = "auto", *, note: str = "", backward: bool = False) -> Decision:
    """Resolve ``backend`` for problem ``p`` (``note`` is appended to the error when a backend
    named explicitly cannot run ``p``). ``backward``: the call will be differentiated (its inputs
    require grad), so the FLOPs compared are forward plus backward; the kernels' backward passes
    cost from 2x (the algorithms' minimum) to far more than 2x their forward.

    ``auto``: among the backends that can run ``p`` (not the literal reference, not interpreted
    Triton, not kernels in ``UNVERIFIED_ON_GPU``), drop unfused quadratic ones whose ``B x N x N``
    buffers would exceed ``NXN_MEMORY_LIMIT``, then take the fewest FLOPs (each backend's own
    count of what its launches perform; those of unfused quadratic backends weighted by
    ``NXN_FLOP_WEIGHT``). Under ``torch.use_deterministic_algorithms`` a differentiated call
    skips backends whose backward uses atomic adds. Implementations of the fewest-FLOP algorithm within ``TIE_RATIO`` of
    that count tie, and the implementation rank CUDA > Triton > C++ > PyTorch breaks the tie.
    """
    table = backends()
    candidates = []
    for b in table.values():
        candidates.append(dict(name=b.name, algorithm=b.algorithm, implementation=b.implementation,
                               gflops=backend_flops(b, p, backward) / 1e9, unsupported=b.unsupported(p)))
    if registry.check_backend(backend) != "auto":
        why = table[backend].unsupported(p)
        if why is not None:
            raise RuntimeError(f"backend {backend!r} cannot run this problem: {why}{note}")
        return Decision(backend, "requested by name", candidates, backward)

    # Triton on CPU tensors means the (very slow) interpreter: a testing tool, never an auto choice.
    ok = [c for c in candidates if c["unsupported"] is None and table[c["name"]].auto_eligible
          and not (p.device.type == "cpu" and c["implementation"] == "triton")
          and c["name"] not in registry.UNVERIFIED_ON_GPU]
    ok = ok or [c for c in candidates if c["unsupported"] is None]
    if backward and torch.are_deterministic_algorithms_enabled():
        ok = [c for c in ok if table[c["name"]].deterministic_backward] or ok
    nxn_bytes = 3 * p.B * p.N * p.N * torch.empty((), dtype=p.dtype).element_size()
    note = ""
    if nxn_bytes > NXN_MEMORY_LIMIT:
        small = [c for c in ok if not table[c["name"]].materializes_nxn]
        if small and len(small) < len(ok):
            note = f"; unfused quadratic backends skipped (~{nxn_bytes / 2 ** 30:.1f} GiB of N x N buffers)"
        ok = small or ok

    def weighted(c):  # GFLOP as auto compares them
        return c["gflops"] * (NXN_FLOP_WEIGHT if table[c["name"]].materializes_nxn else 1.0)

    # Explicit loops, not min(key=...): under torch.compile with dynamic shapes each comparison
    # becomes a guard on the sizes (a size on the other side of it recompiles).
    fewest = ok[0]
    for c in ok[1:]:
        if weighted(c) < weighted(fewest):
            fewest = c
    best = fewest
    for c in ok:
        if c["algorithm"] != fewest["algorithm"] or weighted(c) > weighted(fewest) * TIE_RATIO:
            continue
        rank, best_rank = IMPLEMENTATION_RANK[c["implementation"]], IMPLEMENTATION_RANK[best["implementation"]]
        if rank > best_rank or (rank == best_rank and weighted(c) < weighted(best)):
            best = c
    if torch.compiler.is_compiling():  # the reason is for explain(); compiled code needs the name
        return Decision(best["name"], "", candidates, backward)
    what = "forward + backward " if backward else "forward "
    others = [weighted(c) for c in ok if c["algorithm"] != best["algorithm"]]
    other = "linear" if best["algorithm"] == "quadratic" else "quadratic"
    vs = f" vs {min(others):.3g} for {other}" if others else ""
    weight = (f"; unfused quadratic FLOPs counted x{NXN_FLOP_WEIGHT:g} for their N x N buffers"
              if any(table[c["name"]].materializes_nxn for c in ok) else "")
    tie = (f"; {best['name']} is within {100 * (TIE_RATIO - 1):.0f}% of the fewest ({fewest['name']}, "
           f"{weighted(fewest):.3g} GFLOP) and its implementation ranks higher" if best is not fewest else "")
    return Decision(best["name"], f"{best['algorithm']} needs the fewest {what}FLOPs ({weighted(best):.3g} "
                    f"GFLOP{vs}{weight}{tie}); {best['implementation']} is the best implementation of it "
                    f"on {p.device.type}{note}", candidates, backward)
