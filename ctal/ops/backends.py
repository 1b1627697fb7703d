"""Every implementation of the CTAL op and of its stages, registered in one place.

Adding a backend is one implementation module (its forward and backward bodies made into a
custom op with ``ctal.ops.custom_op.define_op``) plus one ``register_backend`` line here; the
conformance suite (tests/ops/test_conformance.py) then checks it against the reference.
Backends whose pieces are missing (Triton, the compiled extension, a GPU) are registered all the
same: their ``unsupported`` says why they cannot run, so ``ctal.ops.explain`` can tell.
"""
from __future__ import annotations

from functools import partial

from ctal import kernels
from ctal.kernels import fused_plan, linear_plan

from . import extension, reference
from .cost import cuda_fused_flops, cuda_linear_flops
from .linear import linear_attention, traceable_attention
from .quadratic import quadratic_attention
from .registry import STAGES, Backend, register_backend, register_stage

# --- PyTorch -------------------------------------------------------------------------------------
register_backend(Backend("reference", "quadratic", "pytorch", reference.ctal_attention,
                         auto_eligible=False, materializes_nxn=True))
register_backend(Backend("quadratic", "quadratic", "pytorch", quadratic_attention, materializes_nxn=True))
register_backend(Backend("linear", "linear", "pytorch", linear_attention))
# The linear forward as plain torch ops, for export (no custom op to carry); never picked by auto.
register_backend(Backend("linear-traceable", "linear", "pytorch", traceable_attention, auto_eligible=False))
for _stage in STAGES:
    register_stage(_stage, "reference", getattr(reference, _stage))

# --- the compiled extension (csrc/) --------------------------------------------------------------
register_backend(Backend("cpp", "linear", "cpp", extension.cpp_attention, extension.cpp_unsupported))
# The CUDA and Triton kernels declare the FLOPs their launches really perform (padded pixel axes
# and tiles, the fused kernels' recomputation), forward or forward + backward: ``auto`` compares those.
register_backend(Backend("cuda-linear", "linear", "cuda", extension.cpp_attention,
                         extension.cuda_linear_unsupported, cost=cuda_linear_flops))
register_backend(Backend("cuda-fused", "quadratic", "cuda", extension.fused_attention,
                         extension.cuda_fused_unsupported, cost=cuda_fused_flops,
                         deterministic_backward=False))
extension.read_device_limits()

# --- Triton (kernels/, installed as ctal.kernels) ------------------------------------------------
if kernels.TRITON_IMPORT_ERROR is None:
    from ctal.kernels.affinity import affinity as _triton_affinity, align as _triton_align
    from ctal.kernels.diffusion import diffuse as _triton_diffuse, propagate as _triton_propagate
    from ctal.kernels.fused import fused_attention as _triton_fused
    from ctal.kernels.linear import linear_attention as _triton_linear
    from ctal.kernels.staged import staged_attention as _triton_staged
else:  # registered anyway: unsupported() gives the import error, and so would a call
    def _triton_missing(*args, **kwargs):
        raise RuntimeError(kernels.TRITON_IMPORT_ERROR)
    _triton_affinity = _triton_align = _triton_diffuse = _triton_propagate = _triton_missing
    _triton_fused = _triton_linear = _triton_staged = _triton_missing

register_backend(Backend("triton-fused", "quadratic", "triton", _triton_fused,
                         partial(kernels.unsupported, channel_limited=True), cost=fused_plan.flops,
                         deterministic_backward=False))
register_backend(Backend("triton-linear", "linear", "triton", _triton_linear,
                         partial(kernels.unsupported, channel_limited=True), cost=linear_plan.flops))
# Materializes the affinities and M; ``auto`` prefers triton-fused, the same algorithm in O(N) memory.
register_backend(Backend("triton-staged", "quadratic", "triton", _triton_staged,
                         partial(kernels.unsupported, channel_limited=False),
                         auto_eligible=False, materializes_nxn=True))
register_stage("affinity", "triton", _triton_affinity)
register_stage("align", "triton", _triton_align)
register_stage("diffuse", "triton", _triton_diffuse)
register_stage("propagate", "triton", _triton_propagate)
