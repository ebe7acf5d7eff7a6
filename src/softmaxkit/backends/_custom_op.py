"""Autograd for ``torch.library`` custom ops, shared by the backends' ops (no kernels here).

:func:`differentiable` gives one custom op (``torch.ops.softmaxkit.<name>``) its backward twice over, from one
``setup_context`` / ``backward`` pair:

* ``op.register_autograd``, so the op itself is differentiable wherever it is called (eager, ``torch.compile``,
  ``torch.export``, ``torch.library.opcheck``);
* a thin :class:`torch.autograd.Function` with a ``setup_context`` staticmethod whose forward is the op, which
  the public functions call: ``torch.func`` transforms (``grad``, ``vjp``) refuse the autograd Function that
  ``register_autograd`` generates (it has no ``setup_context``), and they accept this one. Dynamo traces it
  without a graph break, so compiled and exported graphs still hold the custom op.

The backward of a fused op is a closed form evaluated by another custom op (``<name>_backward``), which is
not differentiable again: :func:`once_differentiable` registers an autograd formula for it that raises a
clear error on a double backward (``create_graph=True``, hessians).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def differentiable(op, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """Register ``backward`` / ``setup_context`` as ``op``'s autograd and return a Function calling ``op``.

    Args:
        op: a custom op made by :func:`torch.library.custom_op` or :func:`torch.library.triton_op`.
        setup_context: ``(ctx, inputs, output) -> None``, as for :meth:`torch.library.register_autograd`.
        backward: ``(ctx, *grad_outputs) -> one gradient (or None) per input of op``.
    """
    op.register_autograd(backward, setup_context=setup_context)
    namespace, _, name = op._qualname.partition("::")
    overload = getattr(getattr(torch.ops, namespace), name).default  # what Dynamo traces (not the CustomOpDef)

    class _OpFunction(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return overload(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grad_outputs):
            return backward(ctx, *grad_outputs)

    _OpFunction.__name__ = _OpFunction.__qualname__ = f"{op._name}_function"
    return _OpFunction


def once_differentiable(op) -> Callable:
    """Make a differentiation through ``op`` (a backward op) raise a clear ``RuntimeError``.

    Registers that as the op's autograd and returns the function the forward ops' backward calls: ``op``
    itself, or under ``torch.func`` (which runs a backward with ``create_graph=True`` and accepts only Functions
    with ``setup_context``) a Function calling ``op`` with the same refusal.
    """

    def refuse(ctx, *grad_outputs):
        raise RuntimeError(
            f"softmaxkit's {op._qualname} is the closed-form backward of a fused op and is once differentiable; "
            "for higher-order gradients (create_graph=True, hessians) use impl='composite' where the op offers "
            "it, or compose torch ops"
        )

    def keep_nothing(ctx, inputs, output):
        return None

    function = differentiable(op, keep_nothing, refuse)
    namespace, _, name = op._qualname.partition("::")
    overload = getattr(getattr(torch.ops, namespace), name).default

    def run(*args):
        # the op itself (its registered autograd refuses a double backward) except under torch.func, which
        # needs the Function; Dynamo traces the plain op (it cannot trace a Function inside a backward)
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return overload(*args)

    return run
