"""What is specific to ``triton-linear`` (kernels/linear.py, kernels/linear_plan.py); the backend
contract (forward and gradients against the reference, odd shapes, strided inputs, gradcheck,
opcheck, torch.compile) is tests/ops/test_conformance.py.

Here: the FLOP count ``auto`` uses equals the work the launches really do (read off the grids
and tiles of intercepted launches), it stays within 1.1x of the linear form's minimum at the
paper shapes, and every config of the autotune set computes the op correctly at the GPU's tile
sizes (in the interpreter, since the autotuner cannot benchmark there).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ctal import ops
from ctal.kernels import linear_plan
from tests.helpers import ROOT, triton_device

DEV = triton_device()
CUDA = DEV == "cuda"

from ctal.kernels import _common, linear  # noqa: E402


PAPER = {"nyuv2": (8, 3, 128, 72, 96), "cityscapes": (8, 2, 128, 32, 64),
         "cityscapes-t3": (8, 3, 128, 32, 64), "pascal": (8, 5, 128, 16, 16)}


def _problem(shape, dtype=torch.float32):
    return ops.Problem(*shape, dtype, torch.device(DEV))


class _Recorder:
    """Stands in for a kernel: records each launch's grid and arguments by name."""

    def __init__(self, kernel, seen):
        self.names, self.seen, self.kernel = kernel.arg_names, seen, kernel.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(dict(kernel=self.kernel, grid=grid, **dict(zip(self.names, args)),
                                  **kwargs))
        return launch


def _macs(launch) -> int:
    """Multiply-adds a launch performs: its grid times its output tile times its K extent."""
    g, CP, T = launch["grid"], launch["CP"], launch["T"]
    R = T * CP
    programs = g[0] * g[1] * g[2]
    if launch["kernel"] == "linear_state_fwd_kernel":  # K: the Kp padded pixels
        return programs * launch["BLOCK_M"] * launch["BLOCK_N"] * launch["Kp"]
    if launch["kernel"] == "linear_out_fwd_kernel":  # K: the P = 9 R stacked rows
        return programs * launch["BLOCK_M"] * launch["BLOCK_N"] * 9 * R
    assert launch["kernel"] == "linear_bwd_kernel"  # two K = R dots per shift, CP x BN each
    return programs * 9 * 2 * CP * launch["BLOCK_N"] * R


@pytest.mark.parametrize("shape", [(2, 3, 20, 5, 7), (1, 2, 40, 9, 17), (1, 1, 3, 1, 9)])
def test_flops_are_the_launched_work(monkeypatch, shape):
    """``linear_plan.flops`` (``auto``'s cost of triton-linear) against the grids and tile
    constexprs the launchers really use, forward and forward + backward, at shapes padded in
    channels, row pitch and pixel count."""
    seen: list = []
    # the explicit-config launch path (a Recorder cannot be autotuned)
    monkeypatch.setattr(linear, "INTERPRET", True)
    for name in ("linear_state_fwd_kernel", "linear_out_fwd_kernel", "linear_bwd_kernel"):
        monkeypatch.setattr(linear, name, _Recorder(getattr(linear, name), seen))
    B, T, C, H, W = shape
    x, v, dy = (torch.randn(B, T, C, H, W, device=DEV) for _ in range(3))
    w, b = torch.randn(H * W, T, 3, 3, device=DEV), torch.randn(H * W, device=DEV)
    y, g, gp, nrm = linear.forward(x, v, w, b)
    n_fwd = len(seen)
    linear.backward(dy, x, v, w, b, g, gp, nrm)
    assert [s["kernel"] for s in seen] == ["linear_state_fwd_kernel", "linear_out_fwd_kernel"] * 2 \
        + ["linear_bwd_kernel"] and n_fwd == 2
    kind = linear_plan.dot_kind(x.dtype, _common.input_precision(x.dtype) == "tf32")
    tiles = linear_plan.linear_tiles(T, C, kind)
    lay = linear_plan.linear_layout(T, C, H, W)
    for s in seen:  # the launchers use linear_tiles, and the grids cover the padded extents
        kind = {"linear_state_fwd_kernel": "state", "linear_out_fwd_kernel": "out",
                "linear_bwd_kernel": "bwd"}[s["kernel"]]
        assert all(s[k] == v for k, v in tiles[kind].items() if k != "BLOCK_C"), (kind, s)
        assert s["BLOCK_K"] == linear_plan.interpreter_config()["BLOCK_K"]
    state, out, _, _, bwd = seen
    assert state["grid"] == (lay["P"] // state["BLOCK_M"], lay["R"] // state["BLOCK_N"], B)
    assert out["grid"] == (lay["Kp"] // out["BLOCK_M"], lay["R"] // out["BLOCK_N"], B)
    assert bwd["grid"] == (lay["Kp"] // bwd["BLOCK_N"], T, B) and bwd["CP"] == lay["CP"]
    p = _problem(shape)
    assert linear_plan.flops(p) == 2 * sum(_macs(s) for s in seen[:n_fwd])
    assert linear_plan.flops(p, backward=True) == 2 * sum(_macs(s) for s in seen)
    assert linear_plan.flops(p) >= ops.flops("linear", p)


@pytest.mark.parametrize("name", list(PAPER))
def test_flops_at_paper_shapes_within_10_percent_of_the_linear_form(name):
    p = _problem(PAPER[name])
    for backward in (False, True):
        ratio = linear_plan.flops(p, backward=backward) / ops.flops("linear", p, backward=backward)
        assert 1.0 <= ratio <= 1.1, (name, backward, ratio)


@pytest.mark.parametrize("kind", ["tensor", "fp32", "fp64"])
@pytest.mark.parametrize("T,C", [(3, 128), (5, 128), (3, 64), (3, 20), (1, 3), (7, 16)])
def test_tiles_divide_the_padded_extents(T, C, kind):
    """Every kernel runs mask-free K loops and full output tiles over the padded operands, with
    the tiles of each kind of dot unit."""
    lay = linear_plan.linear_layout(T, C, 7, 9)
    t = linear_plan.linear_tiles(T, C, kind)
    assert lay["CP"] >= C and lay["R"] == T * lay["CP"] and lay["Wp"] % 16 == 0
    assert lay["CP"] % t["state"]["BLOCK_M"] == 0 and lay["R"] % t["state"]["BLOCK_N"] == 0
    assert lay["Kp"] % t["out"]["BLOCK_M"] == 0 and lay["R"] % t["out"]["BLOCK_N"] == 0
    assert lay["Kp"] % t["bwd"]["BLOCK_N"] == 0 and t["bwd"]["BLOCK_C"] == lay["CP"]
    for cfg in linear_plan.CONFIGS + [linear_plan.interpreter_config()]:
        assert lay["Kp"] % cfg["BLOCK_K"] == 0


WORKER = r"""
import json, sys, torch
from ctal import ops
from ctal.kernels import _common, linear, linear_plan
from ctal.ops import reference
from tests.helpers import problem, reference64, rel_err, run
assert _common.GPU_TILES and _common.tile(128) == 128, "GPU tiles are not in effect"
torch.manual_seed(0)
shape = tuple(int(s) for s in sys.argv[1].split("x"))
bias, kind = sys.argv[2] == "bias", sys.argv[3]
# The interpreter's dots are exact: run them with the tiles a GPU uses for this kind of dot unit.
linear._tiles = lambda x: linear_plan.linear_tiles(x.shape[1], x.shape[2], kind)
dtype = torch.float64 if kind == "fp64" else torch.float32
x, v, w, b = problem(*shape, dtype=dtype, bias=bias)
dy = torch.randn_like(x)
y, g = run(lambda *a: ops.ctal_attention(*a, backend="triton-linear"), (x, v, w, b), dy)
ry, rg = reference64(reference.ctal_attention, (x, v, w, b), dy)
errs = dict(y=rel_err(y, ry), **{f"d{n}": rel_err(a, c)
                                 for n, a, c in zip(("x", "v", "weight", "bias"), g, rg)})
print(json.dumps(dict(config=linear_plan.interpreter_config(), errs=errs)))
"""


@pytest.mark.skipif(CUDA, reason="a GPU autotunes over the set (test_triton.py checks the results)")
@pytest.mark.parametrize("config", range(len(linear_plan.CONFIGS)))
@pytest.mark.parametrize("shape,bias,kind", [((1, 2, 72, 5, 9), True, "tensor"),
                                             ((2, 1, 20, 3, 17), False, "fp32"),
                                             ((1, 2, 72, 3, 5), True, "fp64")],
                         ids=["1x2x72x5x9-bias-tensor", "2x1x20x3x17-nobias-fp32",
                              "1x2x72x3x5-bias-fp64"])
def test_each_autotune_config_matches_reference_at_gpu_tiles(config, shape, bias, kind):
    """Each config of the autotune set (``BLOCK_K``, warps, stages) at the GPU's tile sizes of
    each kind of dot unit (``linear_plan.dot_kind``), in the interpreter (``CTAL_GPU_TILES=1``,
    ``CTAL_LINEAR_CONFIG`` picks the config): forward and the four gradients against the float64
    reference. C = 72 pads 56 channels of a 128 block and takes ``BLOCK_K`` = 64 or 32 in every
    K loop; C = 20 (32-channel block) caps ``BLOCK_K`` at the block; W = 9, 17 and 5 pad the row
    pitch to 16 and 32."""
    env = dict(os.environ, TRITON_INTERPRET="1", CTAL_GPU_TILES="1", CTAL_POISON="1",
               CTAL_LINEAR_CONFIG=str(config))
    proc = subprocess.run([sys.executable, "-c", WORKER, "x".join(map(str, shape)),
                           "bias" if bias else "nobias", kind], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"] == linear_plan.CONFIGS[config]
    errs = out["errs"]
    assert set(errs) == {"y", "dx", "dv", "dweight"} | ({"dbias"} if bias else set())
    bad = {k: e for k, e in errs.items() if not e < (1e-10 if kind == "fp64" else 1e-5)}
    assert not bad, f"config {linear_plan.CONFIGS[config]}: relative errors {bad}"
