"""The Triton kernels at the tile sizes, warps and branches a GPU launches, in the interpreter.

The other interpreter tests cap tiles at 32 (cheap, and tiny shapes still span several tiles), so
the GPU configurations (64/128-wide tiles, BLOCK_C = 128, the wide-channel branch of
``fused_tiles``) would otherwise run nowhere without a GPU. ``CTAL_GPU_TILES=1`` keeps them; it is
read when the kernels are imported, hence a separate process. Each case runs the whole op and its
four gradients against the float64 reference, with grids of two pixel tiles (N = 99, 72 > 64) and a
partly filled channel tile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

pytest.importorskip("triton")

WORKER = r"""
import json, sys, torch
from ctal import ops
from ctal.kernels import _common
from ctal.ops import reference
from tests.helpers import problem, reference64, rel_err, run
assert _common.GPU_TILES and _common.tile(128) == 128, "GPU tiles are not in effect"
torch.manual_seed(0)
backend, shape, bias = sys.argv[1], tuple(int(s) for s in sys.argv[2].split("x")), sys.argv[3] == "bias"
x, v, w, b = problem(*shape, dtype=torch.float32, bias=bias)
dy = torch.randn_like(x)
y, g = run(lambda *a: ops.ctal_attention(*a, backend=backend), (x, v, w, b), dy)
ry, rg = reference64(reference.ctal_attention, (x, v, w, b), dy)
errs = dict(y=rel_err(y, ry), **{f"d{n}": rel_err(a, c) for n, a, c in zip(("x", "v", "weight", "bias"), g, rg)})
print(json.dumps(errs))
"""

# (backend, (B, T, C, H, W), bias): C = 16 takes the narrow tiles, C = 72 the wide-channel
# branch (BLOCK_C = 128, 32-wide query/key tiles) with 56 channels of the tile masked off.
CASES = [(name, shape, bias) for name in ("triton-fused", "triton-linear", "triton-staged")
         for shape, bias in [((2, 2, 16, 9, 11), True), ((1, 2, 72, 9, 8), False)]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs these tiles natively (test_triton.py)")
@pytest.mark.parametrize("backend,shape,bias", CASES,
                         ids=[f"{n}-{'x'.join(map(str, s))}-{'bias' if b else 'nobias'}" for n, s, b in CASES])
def test_gpu_tile_configuration_matches_reference(backend, shape, bias):
    env = dict(os.environ, TRITON_INTERPRET="1", CTAL_GPU_TILES="1", CTAL_POISON="1")
    proc = subprocess.run([sys.executable, "-c", WORKER, backend, "x".join(map(str, shape)),
                           "bias" if bias else "nobias"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errs) == {"y", "dx", "dv", "dweight"} | ({"dbias"} if bias else set())
    bad = {k: e for k, e in errs.items() if not e < 1e-5}
    assert not bad, f"{backend} at GPU tiles: relative errors {bad}"
