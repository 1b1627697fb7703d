"""One helper that turns a forward body and a backward body into a differentiable custom op.

Every backend of ``ctal_attention`` and every stage kernel goes through :func:`define_op`, so the
pieces PyTorch needs around a kernel are written once:

- a forward op ``ctal::<name>`` and a backward op ``ctal::<name>_backward`` (opaque to
  ``torch.compile``: it traces their fake kernels, never the bodies);
- fake kernels: the forward's is given, the backward's is derived (each gradient is shaped like
  its input);
- autograd wiring: the tensors the backward body names are saved, non-tensor arguments are kept
  on the context, gradients of absent optional inputs (``bias=None``) are ``None``;
- contiguity: bodies receive contiguous tensors and their outputs are made contiguous;
- device: bodies run with the inputs' CUDA device current (kernel launchers use the current one);
- double backward is refused up front (:func:`first_order_only`).

The contract, by example (``kernels/fused.py``)::

    def forward(x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        ...                                   # returns the output, then the by-products to keep
        return y, nrm

    def backward(dy: Tensor, x: Tensor, v: Tensor, weight: Tensor, bias: Optional[Tensor],
                 nrm: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        ...                                   # one gradient per tensor input, None for bias=None
        return dx, dv, dw, db

    fused_attention = define_op("triton_fused", forward, backward, fake=forward_fake, saved=("nrm",))

The backward's first parameter is the output's gradient; the others are looked up by name among
the forward's arguments and the names in ``saved`` (the forward's extra outputs, in order).
"""
from __future__ import annotations

import contextlib
import inspect
import typing
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["define_op", "first_order_only"]

_TENSOR_TYPES = (Tensor, Optional[Tensor])


def first_order_only(what: str) -> None:
    """Called at the start of an explicit backward: these backwards are kernels / GEMM chains
    without a backward of their own, so ``create_graph=True`` is refused up front instead of
    failing inside (or returning gradients that cannot be differentiated again)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{what}: double backward (autograd.grad(..., create_graph=True)) is not supported; "
            "use backend='reference', whose PyTorch ops are twice differentiable")


def _signature(fn: Callable) -> inspect.Signature:
    """``fn``'s signature with string annotations resolved in ``fn``'s own module (custom_op infers
    the schema from it)."""
    hints, sig = typing.get_type_hints(fn), inspect.signature(fn)
    params = []
    for p in sig.parameters.values():
        if p.name not in hints:
            raise TypeError(f"define_op: parameter {p.name!r} of {fn.__qualname__} needs a type annotation")
        params.append(p.replace(annotation=hints[p.name], default=inspect.Parameter.empty,
                                kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))


def _n_outputs(annotation) -> int:
    if annotation is Tensor:
        return 1
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and args and all(a is Tensor for a in args):
        return len(args)
    raise TypeError(f"define_op: a forward must return Tensor or tuple[Tensor, ...], got {annotation}")


def _contiguous(args) -> list:
    return [a.contiguous() if isinstance(a, Tensor) else a for a in args]


def _on_device(args):
    """Kernel launchers (Triton, the extension's CUDA code) launch on the *current* CUDA device,
    which need not hold the tensors (a model on cuda:1 while cuda:0 is current)."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is not None and first.device.type == "cuda":
        return torch.cuda.device(first.device)
    return contextlib.nullcontext()


def define_op(name: str, forward: Callable, backward: Callable, *, fake: Callable,
              saved: Sequence[str] = (), backward_fake: Optional[Callable] = None) -> Callable:
    """Register ``ctal::<name>`` (differentiable) and ``ctal::<name>_backward`` and return the
    entry point: a function with ``forward``'s arguments that returns its first output.

    ``forward``: annotated (``Tensor``, ``Optional[Tensor]``, ``int``, ``float``, ``bool``
    arguments); returns the output, followed by one extra tensor per name in ``saved``.
    ``fake``: same arguments, returns empty tensors of the outputs' shapes and dtypes.
    ``backward``: annotated; first argument the output's gradient, then any of ``forward``'s
    arguments and ``saved`` names; returns one gradient per tensor argument of ``forward``, in
    order (``None`` allowed for an absent optional input).
    ``backward_fake``: needed only when ``backward`` does not take every tensor input of
    ``forward`` (the derived one shapes each gradient like its input).
    """
    fwd_sig, bwd_sig = _signature(forward), _signature(backward)
    n_out = _n_outputs(fwd_sig.return_annotation)
    if n_out != 1 + len(saved):
        raise TypeError(f"define_op({name!r}): forward returns {n_out} tensors, expected the output "
                        f"plus one per saved name {tuple(saved)}")
    fwd_names = list(fwd_sig.parameters)
    grad_names = [n for n, p in fwd_sig.parameters.items() if p.annotation in _TENSOR_TYPES]
    bwd_args = list(bwd_sig.parameters)[1:]
    unknown = [n for n in bwd_args if n not in fwd_names and n not in saved]
    if unknown:
        raise TypeError(f"define_op({name!r}): backward arguments {unknown} are neither forward "
                        f"arguments {fwd_names} nor saved outputs {list(saved)}")
    if backward_fake is None and not set(grad_names) <= set(bwd_args):
        raise TypeError(f"define_op({name!r}): backward does not take {sorted(set(grad_names) - set(bwd_args))}; "
                        "give backward_fake to shape their gradients")
    bwd_tensor_args = [n for n in bwd_args if bwd_sig.parameters[n].annotation in _TENSOR_TYPES]
    bwd_other_args = [n for n in bwd_args if n not in bwd_tensor_args]
    n_grads = len(grad_names)
    grads_annotation = Tensor if n_grads == 1 else tuple[(Tensor,) * n_grads]

    def fwd_impl(*args):
        args = _contiguous(args)
        with _on_device(args):
            outs = forward(*args)
        if n_out == 1:
            return outs.contiguous()
        return tuple(o.contiguous() for o in outs)

    def bwd_impl(*args):
        args = _contiguous(args)
        with _on_device(args):
            grads = backward(*args)
        grads = (grads,) if n_grads == 1 else tuple(grads)
        named = dict(zip(bwd_sig.parameters, args))
        out = []
        for g, n in zip(grads, grad_names):
            if g is None:  # custom ops cannot return None; the autograd wrapper drops it again
                if named.get(n, 0) is not None:
                    raise RuntimeError(f"{name}: backward returned no gradient for {n}")
                g = args[0].new_empty(0)
            out.append(g.contiguous())
        return out[0] if n_grads == 1 else tuple(out)

    def bwd_fake_derived(*args):
        named = dict(zip(bwd_sig.parameters, args))
        out = [args[0].new_empty(0) if named[n] is None
               else torch.empty_like(named[n], memory_format=torch.contiguous_format)
               for n in grad_names]
        return out[0] if n_grads == 1 else tuple(out)

    def bwd_fake_given(*args):
        grads = backward_fake(*args)
        grads = (grads,) if n_grads == 1 else tuple(grads)
        out = [args[0].new_empty(0) if g is None else g for g in grads]
        return out[0] if n_grads == 1 else tuple(out)

    fwd_impl.__signature__ = fwd_sig
    bwd_impl.__signature__ = bwd_sig.replace(return_annotation=grads_annotation)
    fwd_op = torch.library.custom_op(f"ctal::{name}", fwd_impl, mutates_args=())
    bwd_op = torch.library.custom_op(f"ctal::{name}_backward", bwd_impl, mutates_args=())
    fwd_op.register_fake(fake)
    bwd_op.register_fake(bwd_fake_derived if backward_fake is None else bwd_fake_given)

    def setup_context(ctx, inputs, output):
        named = dict(zip(fwd_names, inputs))
        if saved:
            named.update(zip(saved, output[1:]))
        ctx.present = [named[n] is not None for n in grad_names]
        ctx.others = [named[n] for n in bwd_other_args]
        ctx.save_for_backward(*(named[n] for n in bwd_tensor_args))

    def grad_fn(ctx, grad_out, *_):
        first_order_only(name)
        # The extra outputs are by-products for the backward; nothing downstream differentiates
        # through them, so their incoming gradients are ignored.
        named = dict(zip(bwd_tensor_args, ctx.saved_tensors))
        named.update(zip(bwd_other_args, ctx.others))
        grads = bwd_op(grad_out, *(named[n] for n in bwd_args))
        grads = (grads,) if n_grads == 1 else grads
        by_name = {n: (g if present else None) for n, g, present in zip(grad_names, grads, ctx.present)}
        return tuple(by_name.get(n) for n in fwd_names)

    fwd_op.register_autograd(grad_fn, setup_context=setup_context)

    def entry(*args, **kwargs):
        out = fwd_op(*args, **kwargs)
        return out if n_out == 1 else out[0]

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = forward.__doc__
    entry.forward_op, entry.backward_op = fwd_op, bwd_op
    return entry
