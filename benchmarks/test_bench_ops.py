"""pytest-benchmark view of the CPU op benchmark (not part of the default test run):

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-enable

Reference vs linear, forward+backward, T=3, C=128, B=1, grids up to 72x96. The printed ratio
compares the two medians of this same run. Peak memory per backend comes from
``python -m benchmarks.bench_ops`` (one subprocess per case).
"""
from __future__ import annotations

import pytest
import torch

from ctal import ops

GRIDS = [(18, 24), (36, 48), (72, 96)]
_medians: dict = {}


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("backend", ["linear", "reference"])
def test_ctal_fwd_bwd(benchmark, backend, grid):
    H, W = grid
    torch.manual_seed(0)
    x, v = (torch.randn(1, 3, 128, H, W, requires_grad=True) for _ in range(2))
    w = torch.randn(H * W, 3, 3, 3, requires_grad=True)
    b = torch.randn(H * W, requires_grad=True)

    def step():
        ops.ctal_attention(x, v, w, b, backend=backend).sum().backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _medians[(backend, grid)] = benchmark.stats.stats.median
        if ("linear", grid) in _medians and ("reference", grid) in _medians:
            ratio = _medians[("reference", grid)] / _medians[("linear", grid)]
            print(f"\n{H}x{W}: linear is {ratio:.1f}x faster than reference (fwd+bwd)")
