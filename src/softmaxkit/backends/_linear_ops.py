r"""The chunked linear cross-entropy's custom op pair, made once per backend from the core chunk loop.

:func:`linear_cross_entropy_ops` defines ``softmaxkit::<name>`` (forward) and ``softmaxkit::<name>_backward``
over :func:`softmaxkit._core.linear.linear_forward` / :func:`~softmaxkit._core.linear.linear_backward`, with
fake kernels and registered autograd, so ``torch.compile`` (default and ``fullgraph=True``), ``torch.export``
and ``torch.func.grad`` treat it as one node (Inductor never lowers the private ``mkldnn._linear_pointwise``
call inside it). Two backends make one: ``backends/torch`` (each chunk's cross-entropy in torch ops, any
device) and ``backends/cpu`` (each chunk's cross-entropy by the C kernel, a
:class:`~softmaxkit._core.linear.ChunkKernel`).

With ``"mean"``/``"sum"`` and a gradient wanted, the forward returns the gradients for a unit upstream
gradient too (``∂h``, ``∂W``, ``∂b``, ``∂t``; ``(0,)`` where not wanted) and backward only scales them; with
``"none"`` the backward op recomputes each chunk's logits from the stored ``m`` and ``log s`` (torch ops).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._core import CrossEntropyOptions, compute_dtype
from .._core.autograd import refuse_double_backward, saved_gradient_times
from .._core.linear import ChunkKernel, linear_backward, linear_forward
from .._reduction import reduce_loss

__all__ = ["linear_cross_entropy_ops"]


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _options(weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size,
             accumulation_dtype) -> CrossEntropyOptions:
    return CrossEntropyOptions.from_op_args(
        ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size,
        accumulation_dtype=accumulation_dtype, num_classes=weight.shape[0],
    )


def _grad_shapes(hidden, weight, bias, target, reduction, accumulation_dtype, needs):
    """The fake kernel's gradient outputs: built in forward only for a scalar reduction."""
    work = compute_dtype(weight.dtype)
    acc = accumulation_dtype or work
    precompute = reduction != "none" and any(needs)
    need_hidden, need_weight, need_bias, need_target = (precompute and need for need in needs)
    need_bias = need_bias and bias is not None
    need_target = need_target and target.dim() == 2
    return (
        hidden.new_empty(hidden.shape, dtype=acc) if need_hidden else _empty(hidden),
        weight.new_empty(weight.shape, dtype=acc) if need_weight else _empty(hidden),
        weight.new_empty((weight.shape[0],), dtype=acc) if need_bias else _empty(hidden),
        target.new_empty(target.shape) if need_target else _empty(hidden),
    )


_SCALARS = slice(5, 13)  # ignore_index ... accumulation_dtype in the forward schema


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight = inputs[:5]
    ctx.scalars = tuple(inputs[_SCALARS])
    ctx.needs = tuple(inputs[13:17])
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype, target.dtype)
    _, row_max, log_sum, *grads = output
    ctx.mark_non_differentiable(row_max, log_sum, *grads)
    ctx.set_materialize_grads(False)  # no zero gradients built for the statistics outputs
    ctx.precompute = inputs[6] != "none" and any(ctx.needs)  # the forward built the gradients
    if ctx.precompute:
        ctx.save_for_backward(*grads)
    else:
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, row_max, log_sum)


def linear_cross_entropy_ops(name: str, chunk_kernel: ChunkKernel | None = None,
                             device_types: str | None = None) -> Callable[..., torch.Tensor]:
    """Define ``softmaxkit::<name>`` and ``softmaxkit::<name>_backward``; return the function that calls the
    forward op with validated arguments ``(hidden, weight, bias, target, class_weight, options)``.

    ``chunk_kernel`` computes each chunk's cross-entropy in the forward where it serves the call (else the
    core's torch passes do); ``device_types`` restricts the ops' kernels (``"cpu"``), None for any device.
    """

    def _forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        class_weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        temperature: float,
        z_loss: float,
        softcap: float | None,
        chunk_size: int | None,
        accumulation_dtype: torch.dtype | None,
        need_hidden: bool,
        need_weight: bool,
        need_bias: bool,
        need_target: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, m, log s, ∂h, ∂W, ∂b, ∂t)`` for ``hidden (N, D)``, ``weight (C, D)`` (module docstring)."""
        options = _options(weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size,
                           accumulation_dtype)
        result = linear_forward(hidden, weight, bias, target, class_weight, options,
                                (need_hidden, need_weight, need_bias), need_target, chunk_kernel=chunk_kernel,
                                compact=True)
        # in the compute dtype: the caller rounds it to hidden's dtype (or keeps fp32 under autocast)
        loss = reduce_loss(result.loss, reduction, result.denominator)
        grads = [_empty(hidden) if g is None else g for g in
                 (result.grad_hidden, result.grad_weight, result.grad_bias, result.grad_target)]
        return (loss, result.row_max, result.log_sum, *grads)

    def _forward_fake(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                      temperature, z_loss, softcap, chunk_size, accumulation_dtype, need_hidden, need_weight,
                      need_bias, need_target):
        num_rows = hidden.shape[0]
        work = compute_dtype(weight.dtype)
        loss = hidden.new_empty((num_rows,) if reduction == "none" else (), dtype=work)
        stats = (hidden.new_empty((num_rows,), dtype=work), hidden.new_empty((num_rows,), dtype=work))
        grads = _grad_shapes(hidden, weight, bias, target, reduction, accumulation_dtype,
                             (need_hidden, need_weight, need_bias, need_target))
        return (loss, *stats, *grads)

    def _backward_op(
        grad_output: torch.Tensor,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        class_weight: torch.Tensor | None,
        row_max: torch.Tensor,
        log_sum: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        temperature: float,
        z_loss: float,
        softcap: float | None,
        chunk_size: int | None,
        accumulation_dtype: torch.dtype | None,
        need_hidden: bool,
        need_weight: bool,
        need_bias: bool,
        need_target: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(∂h, ∂W, ∂b, ∂t)`` (``(0,)`` where not wanted) by recomputing each chunk's logits."""
        options = _options(weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size,
                           accumulation_dtype)
        grads = linear_backward(grad_output, hidden, weight, bias, target, class_weight, row_max, log_sum, options,
                                (need_hidden, need_weight, need_bias), need_target, compact=True)
        return tuple(_empty(hidden) if g is None else g for g in grads)

    def _backward_fake(grad_output, hidden, weight, bias, target, class_weight, row_max, log_sum, ignore_index,
                       reduction, label_smoothing, temperature, z_loss, softcap, chunk_size, accumulation_dtype,
                       need_hidden, need_weight, need_bias, need_target):
        return _grad_shapes(hidden, weight, bias, target, "sum", accumulation_dtype,
                            (need_hidden, need_weight, need_bias, need_target))

    def _backward(ctx, grad_output, *unused):
        refuse_double_backward()
        if grad_output is None:  # the loss itself got no gradient (only statistics outputs were used)
            return (None,) * 17
        if ctx.precompute:
            # the gradients were built in forward for a unit upstream gradient
            grads = [saved_gradient_times(g, grad_output) if wanted else None
                     for g, wanted in zip(ctx.saved_tensors, ctx.needs)]
        else:
            hidden, weight, bias, target, class_weight, row_max, log_sum = ctx.saved_tensors
            grads = backward_op(
                grad_output, hidden, weight, bias, target, class_weight, row_max, log_sum, *ctx.scalars, *ctx.needs
            )
            grads = [g if wanted else None for g, wanted in zip(grads, ctx.needs)]
        grads = [None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, *(None,) * 13)

    forward_op = torch.library.custom_op(f"softmaxkit::{name}", _forward, mutates_args=(), device_types=device_types)
    forward_op.register_fake(_forward_fake)
    backward_op = torch.library.custom_op(f"softmaxkit::{name}_backward", _backward_op, mutates_args=(),
                                          device_types=device_types)
    backward_op.register_fake(_backward_fake)
    torch.library.register_autograd(f"softmaxkit::{name}", _backward, setup_context=_setup_context)

    def run(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        class_weight: torch.Tensor | None,
        options: CrossEntropyOptions,
    ) -> torch.Tensor:
        """Chunked linear CE of ``hidden (N, D)``, ``weight (C, D)``, class indices ``(N,)`` or probabilities
        ``(N, C)`` (validated arguments). Which gradients a backward will want is decided here, outside the op.

        Returns the loss in the compute dtype (fp32 for fp16/bf16)."""
        grad_on = torch.is_grad_enabled()
        needs = (
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
            grad_on and target.dim() == 2 and target.requires_grad,
        )
        loss, *_ = forward_op(
            hidden, weight, bias, target, class_weight, *options.op_args(), options.accumulation_dtype, *needs
        )
        return loss  # compute dtype: linear_cross_entropy rounds it to hidden's dtype outside the op

    run.__name__ = run.__qualname__ = f"{name}_op"
    return run
