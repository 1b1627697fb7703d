"""The compiled linear form (csrc/linear.cpp): what its key layout adds to the backend contract of
tests/ops/test_conformance.py. The row pitch Wp is W rounded up to a whole number of 16-byte
vectors (ctal_ext.h): when W already is one, v itself is the value operand and dV is written in
place; otherwise a padded value copy and a padded dV buffer are used. Both paths run here on the
CPU (the host code is the one cuda-linear runs), for each dtype's vector width."""
from __future__ import annotations

import pytest
import torch

from ctal import ops
from ctal.ops import extension, linear, reference
from tests.helpers import assert_close, problem, reference64, run

pytestmark = pytest.mark.skipif(not extension.is_built(), reason=extension.build_error() or "")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _vector(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: the row pitch is a multiple of this."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def _shapes(dtype: torch.dtype) -> list[tuple[str, tuple[int, int, int, int, int]]]:
    k = _vector(dtype)
    return [("aligned", (2, 2, 3, 5, 2 * k)),     # Wp == W: v is the operand, dV in place
            ("aligned-1row", (1, 3, 4, 1, k)),
            ("padded", (2, 3, 4, 4, 2 * k + 1)),  # Wp = W + k - 1
            ("padded-1col", (1, 2, 5, 6, 1)),
            ("padded-k-1", (1, 1, 3, 3, k - 1))]


CASES = [pytest.param(dtype, shape, id=f"{str(dtype)[6:]}-{name}")
         for dtype in (torch.float64, torch.float32) for name, shape in _shapes(dtype)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype,shape", CASES)
def test_cpp_matches_reference_on_aligned_and_padded_rows(dtype, shape, bias):
    x, v, w, b = problem(*shape, dtype=dtype, bias=bias, seed=sum(shape))
    # Zero-norm pixels on the grid's corners and last column: the key copies' edges.
    x[:, :, :, 0, 0] = 0
    x[:, :, :, -1, -1] = 0
    dy = torch.randn_like(x)
    y, grads = run(lambda *a: ops.ctal_attention(*a, backend="cpp"), (x, v, w, b), dy)
    ref_y, ref_grads = reference64(reference.ctal_attention, (x, v, w, b), dy)
    assert_close(y, ref_y, TOL[dtype], "y")
    for name, got, want in zip(("x", "v", "weight", "bias"), grads, ref_grads):
        assert got.shape == want.shape, name
        assert_close(got, want, TOL[dtype], name)


@pytest.mark.parametrize("dtype,shape", CASES)
def test_saved_g_has_the_documented_row_order(dtype, shape):
    """G (B, 9TC, TC) rows are (shift d, task t, channel c): the GEMM per stencil row writes the
    block of its three shifts. The PyTorch linear form builds each shift's rows separately."""
    x, v, w, b = problem(*shape, dtype=dtype, seed=7)
    _, g = torch.ops.ctal_ext.linear_fwd(x, v, w, b)
    _, want = linear.forward(x.double(), v.double(), w.double(), b.double())
    assert g.shape == want.shape and g.dtype == dtype
    assert_close(g, want, TOL[dtype], "G")


def test_backward_accepts_the_forwards_g_only():
    """The backward rebuilds what it needs from x, v and weight: with G from the PyTorch linear
    form it returns the PyTorch linear form's gradients."""
    x, v, w, b = problem(2, 2, 3, 4, 5, seed=3)
    dy = torch.randn_like(x)
    _, g = linear.forward(x, v, w, b)
    got = torch.ops.ctal_ext.linear_bwd(dy, x, v, w, b, g)
    want = linear.backward(dy, x, v, w, b, g)
    for name, a, e in zip(("x", "v", "weight", "bias"), got, want):
        assert_close(a, e, 1e-10, name)
