"""Autograd helpers shared by the custom Functions and ops of every backend."""

from __future__ import annotations

import functools
import sys

import torch
from torch.autograd.function import once_differentiable

from . import is_unit_upstream


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


@torch.library.custom_op("softmaxkit::scale_saved_gradient_", mutates_args=("grad",))
def _scale_saved_gradient_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``grad *= grad_output`` in place; on CPU nothing at all for the usual unit upstream gradient (its value
    is read here, at run time, from CPU memory: no device sync, never traced). Elsewhere a device multiply."""
    if grad_output.device.type == "cpu":
        scale = grad_output.tolist()
        if scale != 1.0:
            grad.mul_(scale)
    else:
        grad.mul_(grad_output.to(grad.dtype))


@_scale_saved_gradient_.register_fake
def _(grad, grad_output):
    return None


def _traced_with_donated_buffers(grad_output: torch.Tensor) -> bool:
    """Whether this backward is being traced by AOT autograd with the saved buffers donated to it.

    Only then may a saved gradient be scaled in place: a donated buffer belongs to this one backward (PyTorch
    refuses ``retain_graph=True`` for it). With donation off (``torch._functorch.config.donated_buffer =
    False``) a retained graph would see the buffer scaled twice, so it is multiplied out of place instead.
    """
    if not (torch.compiler.is_compiling() or type(grad_output) is not torch.Tensor):
        return False
    functorch_config = sys.modules.get("torch._functorch.config")
    return bool(getattr(functorch_config, "donated_buffer", False))


def saved_gradient_times(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient a fused forward wrote for a unit upstream gradient, times the actual ``grad_output``.

    Eagerly, the saved buffer itself for the usual ``loss.backward()`` (no full-size multiply), else a new
    product (the buffer may be read again under ``retain_graph``). Traced by AOT autograd with donated buffers
    (``torch.compile``), the buffer is scaled in place by ``softmaxkit::scale_saved_gradient_``, which Inductor
    runs on the donated buffer: no gradient-sized allocation, and on CPU no multiply for a unit upstream.
    """
    if _traced_with_donated_buffers(grad_output):
        torch.ops.softmaxkit.scale_saved_gradient_(grad, grad_output)
        return grad
    if is_unit_upstream(grad_output):
        return grad
    return grad * grad_output.to(grad.dtype)
