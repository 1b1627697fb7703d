"""The compiled extension (csrc/) as ctal.ops backends; importing ctal never requires it."""


def register_backends() -> None:
    """Register the C++/CUDA backends with ``ctal.ops.dispatch`` (filled in by the csrc work)."""
