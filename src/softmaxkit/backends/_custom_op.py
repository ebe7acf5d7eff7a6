"""Autograd for ``torch.library`` custom ops, shared by the backends' ops (no kernels here).

:func:`differentiable` gives one custom op (``torch.ops.softmaxkit.<name>``) its backward twice over, from one
``setup_context`` / ``backward`` pair:

* ``op.register_autograd``, so the op itself is differentiable wherever it is called (eager, ``torch.compile``,
  ``torch.export``, ``torch.library.opcheck``);
* a thin :class:`torch.autograd.Function` with a ``setup_context`` staticmethod whose forward is the op, used
  only while a ``torch.func`` transform is active: ``torch.func`` (``grad``, ``vjp``) refuses the autograd
  Function that ``register_autograd`` generates (it has no ``setup_context``) and accepts this one. Otherwise
  the op is called directly, which is what Dynamo and ``torch.export`` trace.

The backward of a fused op is a closed form evaluated by another custom op (``<name>_backward``), which is
not differentiable again: :func:`once_differentiable` registers an autograd formula for it that raises a
clear error on a double backward (``create_graph=True``, hessians).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def differentiable(op, setup_context: Callable, backward: Callable) -> Callable:
    """Register ``backward`` / ``setup_context`` as ``op``'s autograd; return the function to call ``op`` with.

    The returned function calls the op (``torch.ops.<namespace>.<name>``) directly, except while a
    ``torch.func`` transform is active, where it goes through an autograd Function with the same
    ``setup_context`` / ``backward`` (Dynamo traces the plain op; ``torch.func`` needs the Function).

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

    _OpFunction.__name__ = _OpFunction.__qualname__ = f"{name}_function"

    def run(*args):
        if torch._C._are_functorch_transforms_active():
            return _OpFunction.apply(*args)
        return overload(*args)

    run.__name__ = name
    return run


def once_differentiable(op) -> Callable:
    """Make a differentiation through ``op`` (a backward op) raise a clear ``RuntimeError``.

    Registers that as the op's autograd and returns the function the forward ops' backward calls (as
    :func:`differentiable`: ``torch.func`` runs a backward with ``create_graph=True``).
    """

    def refuse(ctx, *grad_outputs):
        raise RuntimeError(
            f"softmaxkit's {op._qualname} is the closed-form backward of a fused op and is once differentiable; "
            "for higher-order gradients (create_graph=True, hessians) use impl='composite' where the op offers "
            "it, or compose torch ops"
        )

    def keep_nothing(ctx, inputs, output):
        return None

    return differentiable(op, keep_nothing, refuse)


#: the cross-entropy options every CE backward op takes after its statistics (``CrossEntropyOptions.OP_FIELDS``)
_CE_OPTIONS_SCHEMA = ("SymInt ignore_index, str reduction, float label_smoothing, float temperature, float z_loss, "
                      "float? softcap, SymInt? chunk_size")


def cross_entropy_backward_ops(define, name: str, statistics: tuple[str, ...], backward_into: Callable,
                               new_gradient: Callable) -> tuple:
    """Define the two backward ops of a cross-entropy forward op ``softmaxkit::<name>``, from one body.

    ``<name>_backward`` writes ``∂ℓ/∂logits`` into ``new_gradient(logits)`` and returns it; ``<name>_backward_``
    (``inplace_backward=True``) writes it over ``logits``. Both take ``(grad_output, logits, target, weight,
    *statistics, *options)`` and call ``backward_into(grad, grad_output, logits, target, weight, *statistics,
    options)`` with the :class:`~softmaxkit._core.CrossEntropyOptions` rebuilt from the op arguments.

    The Triton backend keeps its two ops written out: ``torch.library.triton_op`` in torch 2.13 infers the
    schema from the function's annotations and ignores ``schema=``.

    Args:
        define: ``torch.library.custom_op`` (with the backend's ``device_types`` bound); called as
            ``define(qualname, fn, mutates_args=..., schema=...)``.
        statistics: the names of the per-row statistics tensors the forward saved.
    """
    from .._core import CrossEntropyOptions

    head = "Tensor grad_output, Tensor{} logits, Tensor target, Tensor? weight, " + ", ".join(
        f"Tensor {stat}" for stat in statistics) + ", " + _CE_OPTIONS_SCHEMA
    count = len(statistics)

    def split(rest):
        return rest[:count], CrossEntropyOptions.from_op_args(*rest[count:])

    def out_of_place(grad_output, logits, target, weight, *rest):
        stats, options = split(rest)
        grad = new_gradient(logits)
        backward_into(grad, grad_output, logits, target, weight, *stats, options)
        return grad

    def in_place(grad_output, logits, target, weight, *rest):
        stats, options = split(rest)
        backward_into(logits, grad_output, logits, target, weight, *stats, options)

    backward = define(f"softmaxkit::{name}_backward", out_of_place, mutates_args=(),
                      schema=f"({head.format('')}) -> Tensor")
    backward_ = define(f"softmaxkit::{name}_backward_", in_place, mutates_args=("logits",),
                       schema=f"({head.format('(a!)')}) -> ()")
    backward.register_fake(lambda grad_output, logits, *rest: torch.empty_like(
        logits, memory_format=torch.contiguous_format))
    backward_.register_fake(lambda *args: None)
    return backward, backward_
