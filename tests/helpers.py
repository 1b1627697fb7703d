"""Shared test utilities: the repository root, random CTAL problems, the relative error measure
of docs/design.md and a training config shrunk to seconds."""
from __future__ import annotations

from pathlib import Path

import torch

from ctal import config

ROOT = Path(__file__).resolve().parent.parent


def triton_device() -> str:
    """Where the Triton kernel tests run: ``"cuda"`` on a GPU, else ``"cpu"`` in the interpreter.
    Call it at module level, before importing kernel modules: it skips the module when triton is
    missing or neither a GPU nor a working interpreter is available."""
    import pytest
    pytest.importorskip("triton")
    from ctal.kernels import _common
    if torch.cuda.is_available():
        return "cuda"
    if not _common.INTERPRET:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)
    if _common.interpreter_reason():
        pytest.skip(_common.interpreter_reason(), allow_module_level=True)
    return "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """norm(a - b) / norm(b); NaN anywhere never passes."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    denom = b.detach().double().norm().clamp_min(1e-300)
    return float((a.detach().double() - b.detach().double()).norm() / denom)


def problem(B, T, C, H, W, dtype=torch.float64, bias=True, seed=None, device="cpu"):
    """Random inputs of ``ctal_attention`` (fresh per call unless ``seed`` is given)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    x, v = mk(B, T, C, H, W), mk(B, T, C, H, W)
    w = mk(H * W, T, 3, 3)
    b = mk(H * W) if bias else None
    return x, v, w, b


def run(fn, inputs, dy):
    """``fn`` on fresh leaf copies of ``inputs`` (None stays None): the detached output and the
    gradients of the present inputs for the output gradient ``dy``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return y.detach(), list(torch.autograd.grad(y, [t for t in leaves if t is not None], dy))


def reference64(fn, inputs, dy):
    """:func:`run` in float64 on the CPU, on the same (possibly rounded) values: the ground truth."""
    up = [None if t is None else t.detach().double().cpu() for t in inputs]
    return run(fn, up, dy.double().cpu())


def assert_close(got, want, tol, what):
    err = rel_err(got.cpu(), want.cpu())
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


# Odd shapes the correctness policy asks for: (B, T, C, H, W).
ODD_SHAPES = [
    (1, 1, 3, 5, 7),
    (2, 2, 4, 5, 7),
    (1, 3, 5, 1, 9),
    (2, 4, 3, 6, 1),
    (1, 5, 16, 3, 4),
    (3, 3, 8, 4, 5),
]


def fast_cpu_backends(include_reference: bool = False) -> list[str]:
    """Backends that run natively on this CPU (PyTorch and the compiled C++ extension). The Triton
    backends run here only under the slow interpreter and are tested in tests/ops/test_triton.py."""
    from ctal import ops
    names = [n for n in ops.available_backends("cpu") if ops.backends()[n].implementation in ("pytorch", "cpp")]
    return [n for n in names if include_reference or n != "reference"]


def tiny_cfg(tmp_path, **over) -> dict:
    """The synthetic default shrunk to seconds: 32x32 scenes, 2 steps per epoch."""
    cfg = config.load("synthetic")
    cfg = config.apply_overrides(cfg, [
        f"data.root={tmp_path / 'data'}", "data.generate.num_train=8", "data.generate.num_val=3",
        "data.generate.size=[32, 32]", "data.generate.workers=0", "data.batch_size=2",
        "data.num_workers=0", "data.tasks=[semseg, depth, normals, edge]", "train.epochs=2",
        "train.save_images=1", "eval.edge_thresholds=5", f"output_dir={tmp_path / 'out'}",
        "train.max_steps_per_epoch=2"])
    return config.apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])


def tiny_checkpoint(folder: Path, **over) -> Path:
    """A trainer checkpoint of the :func:`tiny_cfg` run at step 0 (``<folder>/out/last.pt``), as
    ``train.py`` writes it, without training: for tests that only need a model to load."""
    from ctal.engine import Trainer, checkpoint

    trainer = Trainer(tiny_cfg(folder, **over), device="cpu", progress=False)
    try:
        return checkpoint.save(trainer.out / "last.pt", trainer.state(0))
    finally:
        trainer.close()
