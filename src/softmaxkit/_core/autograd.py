"""Autograd helpers shared by the custom Functions and ops of every backend."""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def strict_once_differentiable(backward):
    """Like :func:`torch.autograd.function.once_differentiable`, but raising on a double backward.

    ``once_differentiable`` only guards a second backward when the incoming gradient requires grad, so
    ``torch.autograd.functional.hessian`` (whose first-order ``grad_outputs`` do not) silently gets zeros.
    A fused backward here is a closed form evaluated without a graph: asking for ``create_graph=True``
    through it raises instead, pointing at the twice-differentiable ``impl="composite"`` path.
    """
    wrapped = once_differentiable(backward)

    @functools.wraps(backward)
    def guarded(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "this softmaxkit op's fused backward is once differentiable; for higher-order gradients "
                "(create_graph=True, hessians) use impl='composite' where the op offers it, or compose "
                "torch ops"
            )
        return wrapped(ctx, *grad_outputs)

    return guarded


def refuse_double_backward() -> None:
    """Raise like :func:`strict_once_differentiable` when a registered custom-op backward runs with grad mode
    on (``create_graph=True``, hessians): the closed-form backward is not differentiable.

    Under a ``torch.func`` transform (``torch.func.grad`` runs its backward with grad mode on, to allow
    nesting) a first-order gradient is asked for, and it is allowed.
    """
    if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "this softmaxkit op's fused backward is once differentiable; for higher-order gradients "
            "(create_graph=True, hessians) use impl='composite' where the op offers it, or compose "
            "torch ops"
        )
