"""CrossTaskAffinity: the module equals the hand-composed stages, for every backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ctal
from ctal import ops
from tests.helpers import fast_cpu_backends, rel_err

BACKENDS = fast_cpu_backends(include_reference=True)


def _by_hand(mod, x):
    """gamma * M v + (1 - gamma) x with M built stage by stage."""
    H, W = mod.size
    v = torch.stack([F.conv2d(x[:, i], mod.proj[t].weight, mod.proj[t].bias, padding=1)
                     for i, t in enumerate(mod.tasks)], 1)
    m = ops.diffuse(ops.align(ops.affinity(x), (H, W)), mod.weight, mod.bias)
    return mod.gamma * ops.propagate(m, v) + (1 - mod.gamma) * x


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_equals_stage_composition(backend):
    torch.manual_seed(0)
    mod = ctal.CrossTaskAffinity(["semseg", "depth", "normals"], 5, (5, 7), backend=backend).double()
    x = torch.randn(2, 3, 5, 7 * 1, 7, dtype=torch.float64)[:, :, :, :5]  # non-contiguous
    out = mod(x)
    assert rel_err(out, _by_hand(mod, x)) < 1e-10


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_module_gradients_match_reference(backend):
    torch.manual_seed(1)
    ref = ctal.CrossTaskAffinity(3, 4, (3, 5), backend="reference").double()
    alt = ctal.CrossTaskAffinity(3, 4, (3, 5), backend=backend).double()
    alt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64)
    xr, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    ref(xr).backward(g)
    alt(xa).backward(g)
    assert rel_err(xa.grad, xr.grad) < 1e-10
    for (name, pr), pa in zip(ref.named_parameters(), alt.parameters()):
        assert rel_err(pa.grad, pr.grad) < 1e-10, name  # projections, fusion weight and bias


def test_dict_input_round_trip():
    mod = ctal.CrossTaskAffinity(["a", "b"], 3, (4, 4))
    feats = {"a": torch.randn(1, 3, 4, 4), "b": torch.randn(1, 3, 4, 4)}
    out = mod(feats)
    assert set(out) == {"a", "b"} and out["a"].shape == (1, 3, 4, 4)
    stacked = mod(torch.stack([feats["a"], feats["b"]], 1))
    assert torch.allclose(out["b"], stacked[:, 1])


def test_parameter_shapes_match_grouped_conv():
    mod = ctal.CrossTaskAffinity(4, 8, (6, 9))
    conv = torch.nn.Conv2d(54 * 4, 54, 3, padding=1, groups=54)
    assert mod.weight.shape == conv.weight.shape and mod.bias.shape == conv.bias.shape
    # Same init distribution as the conv: kaiming-uniform with fan_in = T * 9, i.e. uniform on
    # +-1/sqrt(fan_in) for the weight and the bias (std bound/sqrt(3)).
    bound = 1 / (4 * 9) ** 0.5
    for t in (mod.weight, mod.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
        assert abs(float(t.detach().std()) - bound / 3 ** 0.5) < 0.1 * bound


def test_module_errors():
    mod = ctal.CrossTaskAffinity(["a", "b"], 3, (4, 4))
    with pytest.raises(ValueError, match="input grid 5x4 differs from the 4x4 grid"):
        mod(torch.randn(1, 2, 3, 5, 4))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        mod({"a": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match=r"unexpected \['c'\]"):
        mod({"a": torch.randn(1, 3, 4, 4), "b": torch.randn(1, 3, 4, 4), "c": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="features of task 'b' have shape"):
        mod({"a": torch.randn(1, 3, 4, 4), "b": torch.randn(2, 3, 4, 4)})
    with pytest.raises(ValueError, match="features of task 'a' must be a"):
        mod({"a": torch.randn(3, 4, 4), "b": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="expected 2 tasks x 3 channels"):
        mod(torch.randn(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"size must be an \(H, W\) pair"):
        ctal.CrossTaskAffinity(2, 3, (4,))
    with pytest.raises(ValueError, match="backend must be"):
        ctal.CrossTaskAffinity(2, 3, (4, 4), backend="nope")
    with pytest.raises(ValueError, match="distinct"):
        ctal.CrossTaskAffinity(["a", "a"], 3, (4, 4))
    with pytest.raises(ValueError, match="tasks must be a list of task names"):
        ctal.CrossTaskAffinity("depth", 3, (4, 4))  # not the five tasks d, e, p, t, h
    with pytest.raises(ValueError, match="channels must be a positive int"):
        ctal.CrossTaskAffinity(2, True, (4, 4))
    for gamma in (-1, 2, float("nan"), float("inf"), "abc", True):
        with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
            ctal.CrossTaskAffinity(2, 3, (4, 4), gamma=gamma)


def test_state_dict_records_the_grid():
    """Fusion weights of a 5x6 grid have the shape of a 6x5 grid's: loading them there must fail
    with the reason, not put every kernel on the wrong pixel."""
    a = ctal.CrossTaskAffinity(["a", "b"], 4, (5, 6))
    b = ctal.CrossTaskAffinity(["a", "b"], 4, (6, 5))
    with pytest.raises(ValueError, match="trained on a 5x6 feature grid, this module is built for 6x5"):
        b.load_state_dict(a.state_dict())
    c = ctal.CrossTaskAffinity(["a", "b"], 4, (5, 6))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weight, a.weight)
    # a state dict saved before the grid was recorded still loads strictly
    old = {k: v for k, v in a.state_dict().items() if k != "grid_size"}
    c.load_state_dict(old)
    # the recorded grid follows resample, and module.half() leaves it an integer tensor
    a.resample((3, 4))
    assert a.state_dict()["grid_size"].tolist() == [3, 4]
    assert a.half().grid_size.dtype == torch.int64


def test_resample_regrids_the_fusion_parameters():
    torch.manual_seed(0)
    mod = ctal.CrossTaskAffinity(["a", "b", "c"], 4, (4, 6), backend="reference").double()
    w0, b0 = mod.weight, mod.bias
    x = torch.randn(2, 3, 4, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        y0 = mod(x)
    # same size: the identity (same parameter objects, same values, same output)
    assert mod.resample((4, 6)) is mod
    assert mod.weight is w0 and mod.bias is b0 and mod.size == (4, 6)
    with torch.no_grad():
        assert torch.equal(mod(x), y0)
    # another size: new parameters of the new grid's shapes, same dtype; the module then runs there
    mod.resample((8, 3))
    assert mod.size == (8, 3)
    assert tuple(mod.weight.shape) == (24, 3, 3, 3) and tuple(mod.bias.shape) == (24,)
    assert mod.weight.dtype == torch.float64 and mod.weight.requires_grad
    assert mod.weight is not w0 and dict(mod.named_parameters())["weight"] is mod.weight
    assert mod(torch.randn(1, 3, 4, 8, 3, dtype=torch.float64)).shape == (1, 3, 4, 8, 3)
    with pytest.raises(ValueError, match="input grid 4x6 differs"):
        mod(x)
    # a constant field stays constant, scaled by N_old / N_new (rescale=True)
    with torch.no_grad():
        mod.weight.fill_(0.5)
        mod.bias.fill_(-1.0)
    mod.resample((2, 3))  # 24 -> 6 query pixels: the per-key weights grow 4x
    assert torch.allclose(mod.weight, torch.full_like(mod.weight, 0.5 * 4))
    assert torch.allclose(mod.bias, torch.full_like(mod.bias, -1.0 * 4))
    mod.resample((4, 6), rescale=False)
    assert torch.allclose(mod.bias, torch.full_like(mod.bias, -4.0))
    with pytest.raises(ValueError, match=r"size must be an \(H, W\) pair"):
        mod.resample((0, 3))
    with pytest.raises(AttributeError):
        mod.size = (5, 5)  # only resample changes the grid


def test_backend_is_a_validated_attribute():
    mod = ctal.CrossTaskAffinity(2, 3, (4, 4))
    assert mod.backend == "auto"
    mod.backend = "reference"
    assert mod.backend == "reference"
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*'reference'"):
        mod.backend = "nope"
    assert mod.backend == "reference"


def test_state_dict_records_the_task_order():
    """The fusion weight is indexed by task position: weights of ["a", "b", "c"] have the shape of
    ["b", "a", "c"]'s, and loading them there would pair each task with another's kernels."""
    torch.manual_seed(0)
    a = ctal.CrossTaskAffinity(["a", "b", "c"], 4, (3, 4), backend="reference")
    sd = a.state_dict()
    assert all(torch.is_tensor(v) for v in sd.values())  # tools that expect tensor-only state dicts
    swapped = ctal.CrossTaskAffinity(["b", "a", "c"], 4, (3, 4))
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"saved for the tasks \['a', 'b', 'c'\] \(in this order\), "
                                             r"this CrossTaskAffinity has \['b', 'a', 'c'\]"):
            swapped.load_state_dict(sd, strict=strict)
    # the same order loads and computes the same function
    same = ctal.CrossTaskAffinity(["a", "b", "c"], 4, (3, 4), backend="reference")
    same.load_state_dict(sd)
    x = torch.randn(1, 3, 4, 3, 4)
    with torch.no_grad():
        assert torch.equal(same(x), a(x))
    # another set of tasks: the per-task keys differ (strict error); strict=False transfers the rest
    other = ctal.CrossTaskAffinity(["a", "b", "d"], 4, (3, 4))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"proj.d.weight\""):
        other.load_state_dict(sd)
    result = other.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["proj.c.weight", "proj.c.bias"] and torch.equal(other.weight, a.weight)
    # a state dict saved before the order was recorded still loads strictly, with a warning
    old = {k: v for k, v in sd.items() if k != "task_order"}
    with pytest.warns(UserWarning, match="no task-order record"):
        same.load_state_dict(old)
    # the record is no buffer (nothing for .to() / DDP to move) and outlives half() and resample
    assert "task_order" not in dict(a.named_buffers())
    assert torch.equal(a.half().float().resample((2, 2)).state_dict()["task_order"], sd["task_order"])


@pytest.mark.parametrize("bad", ["keys", "type", "training", "items", "values", "a.b", "", 3, None, "x y"])
def test_task_names_that_collide_with_module_attributes_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match=r"tasks\[1\] .*task name"):
        ctal.CrossTaskAffinity(["semseg", bad], 3, (4, 4))
