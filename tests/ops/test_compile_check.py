"""The static kernel report (kernels/compile_check.py): its SASS analysis on hand-written SASS, and
one small CI run of the tool checking that Triton's JIT specialization really reaches the compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ctal.kernels import compile_check as cc

# Two nested loops; the inner one (0x0040-0x0090) holds 2 HGMMA 64x64x8 TF32 in 6 instructions.
SASS = """
	code for sm_90a
		Function : demo_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x0 */
        /*0010*/                   S2R R0, SR_TID.X ;                         /* 0x0 */
        /*0020*/                   FFMA R2, R0, R0, R1 ;                      /* 0x0 */
        /*0030*/                   IADD3 R3, R0, 0x1, RZ ;                    /* 0x0 */
        /*0040*/                   WARPGROUP.ARRIVE ;                         /* 0x0 */
        /*0050*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], R24 ;  /* 0x0 */
        /*0060*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR8], R24, gsb0 ;  /* 0x0 */
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;            /* 0x0 */
        /*0080*/                   ISETP.GE.AND P0, PT, R3, 0x4, PT ;         /* 0x0 */
        /*0090*/              @!P0 BRA 0x40 ;                                 /* 0x0 */
        /*00a0*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;     /* 0x0 */
        /*00b0*/              @!P1 BRA 0x20 ;                                 /* 0x0 */
        /*00c0*/                   EXIT ;                                     /* 0x0 */
        /*00d0*/                   BRA 0xd0;                                  /* 0x0 */
		Function : fma_kernel
        /*0000*/                   FFMA R2, R0, R0, R1 ;                      /* 0x0 */
        /*0010*/                   FFMA R2, R0, R2, R1 ;                      /* 0x0 */
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;                    /* 0x0 */
        /*0030*/              @P0 BRA 0x0 ;                                   /* 0x0 */
"""


def test_sass_main_loop_and_utilization_estimate():
    funcs = cc.sass_functions(SASS)
    assert set(funcs) == {"demo_kernel", "fma_kernel"}
    demo = funcs["demo_kernel"]
    assert cc._loops(demo) == [(0x20, 0xb0), (0x40, 0x90)]  # the self-branch after EXIT is no loop
    rep = cc.main_loop(demo, num_warps=8)
    assert rep["loops"] == 2 and rep["innermost_loops"] == 1 and rep["total_tc_instructions"] == 3
    ml = rep["main_loop"]
    assert (ml["first"], ml["last"]) == (0x40, 0x90)
    assert ml["instructions"] == 6 and ml["tc_instructions"] == 2 and ml["tc_kinds"] == {"HGMMA.tf32": 2}
    # 8 warps = 2 warpgroups, each HGMMA 64x64x8 once per warpgroup: 2 * 2 * 32768 multiply-adds
    # at 1024 per clock = 128 tensor cycles; 6 instructions * 8 warps / 4 schedulers = 12 cycles.
    assert ml["tc_macs"] == 2 * 2 * 64 * 64 * 8 and ml["tc_cycles"] == 128 and ml["issue_cycles"] == 12
    assert ml["util"] == 1.0 and ml["pipe"] == "tensor"
    # HMMA m16n8k16 bf16 counts once per warp: 4 warps * 2048 multiply-adds / 2048 per clock.
    mix = cc.instruction_mix([(0, "HMMA.16816.F32.BF16", "")] + [(i, "IADD3", "") for i in range(1, 8)], 4)
    assert mix["tc_cycles"] == 4 and mix["issue_cycles"] == 8 and mix["util"] == 0.5
    fma = cc.main_loop(funcs["fma_kernel"], num_warps=4)["main_loop"]
    assert fma["pipe"] == "fp32" and fma["ffma"] == 2 and fma["util"] == pytest.approx(2 / 4)


def test_parse_shape():
    assert cc.parse_shape("2x3x16x5x7") == ("2x3x16x5x7", (2, 3, 16, 5, 7))
    with pytest.raises(SystemExit, match="unknown shape"):
        cc.parse_shape("no-such-shape")


def test_static_report_applies_the_jit_specialization(tmp_path):
    """One small configuration through the CLI, as CI runs it: N = 32 is divisible by 16, H = 4 and
    W = 8 are not, so the JIT marks N (and the pointers) and not H or W in the kernels' compiled
    signatures."""
    why = cc.missing_tools()
    if why is not None:
        pytest.skip(why)
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ctal.kernels.compile_check", "--arch", "90", "--shapes", "1x2x16x4x8",
           "--dtypes", "tf32", "--backends", "triton-staged", "triton-linear", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    recs = report["triton"]
    assert recs and not [r for r in recs if r.get("error")]
    assert {r["backend"] for r in recs} == {"triton-staged", "triton-linear"}
    for r in recs:
        assert r["spec"] == "jit", r["spec"]  # Triton's own specialization, no fallback
        assert isinstance(r["regs"], int) and 0 < r["regs"] <= 255 and r["local"] >= 0
        assert r["shared"] >= 0 and r["options"]["num_warps"] in (1, 2, 4, 8, 16)
        ml = r["main_loop"]
        assert ml is None or ml["instructions"] > 0
        # What the compiler was told (the TTIR signature) matches the JIT's attributes.
        told = set(r["ttir_divisibility"])
        assert told == {n for n, a in r["attrs"].items() if any("divisibility" in s for s in a)}
        ptrs = [n for n in told if n.endswith("_ptr")]
        assert ptrs, r["kernel"]  # every kernel has 16-byte aligned pointers
        assert "H" not in told and "W" not in told
        if "N" in r["args"]:
            assert "N" in told, (r["kernel"], told)
    # TF32 GEMM kernels: tensor-core instructions in the main loop, and a utilization estimate.
    gemm = [r for r in recs if r["kernel"].startswith(("linear_state", "affinity_fwd", "propagate"))]
    assert gemm and all(r["main_loop"]["tc_instructions"] > 0 and 0 < r["main_loop"]["util"] <= 1
                        for r in gemm)
    # FLOPs: each backend's launches do at least its algorithm's minimum.
    rows = {(f["backend"]): f for f in report["flops"]}
    assert set(rows) >= {"triton-linear", "triton-fused", "cuda-linear", "cuda-fused"}
    for f in rows.values():
        assert f["ratio_fwd"] >= 1 and f["ratio_fwdbwd"] >= 1 and f["roofline_ms_fwdbwd"] > 0
    assert "compiled" in proc.stdout and ": ok" in proc.stdout


KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def broken_fwd_kernel(x_ptr, n):
    offs = tl.arange(0, 3)  # not a power of two: does not compile
    tl.store(x_ptr + offs, 1.0, mask=offs < n)


@triton.jit
def good_fwd_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, 1.0, mask=offs < n)
'''

DRIVER = '''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import demo_kernels as k
from ctal.kernels import compile_check as cc

def run(name, *shape_and_dtype):
    x = torch.empty(64, device="meta")
    k.broken_fwd_kernel[(1,)](x, 48)
    k.good_fwd_kernel[(1,)](x, 48, BLOCK=64)

cc._run_backend = run
recs = cc.check(90, ["fp32"], ["1x1x16x4x4"], None, ["triton-staged"], verbose=False)
print(json.dumps([dict(kernel=r["kernel"], error=r.get("error"), regs=r.get("regs")) for r in recs]))
'''


def test_a_kernel_that_does_not_compile_is_an_error_row_and_the_run_goes_on(tmp_path):
    why = cc.missing_tools()
    if why is not None:
        pytest.skip(why)
    (tmp_path / "demo_kernels.py").write_text(KERNELS)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    broken, good = json.loads(proc.stdout.strip().splitlines()[-1])
    assert broken["kernel"] == "broken_fwd_kernel" and "compile failed" in broken["error"]
    assert good["kernel"] == "good_fwd_kernel" and good["error"] is None and good["regs"] > 0
