"""Triton kernels for CTAL, one module per op family; installed as ``ctal.kernels``."""


def register_backends() -> None:
    """Register the Triton backends with ``ctal.ops.dispatch`` (filled in by the Triton work)."""
