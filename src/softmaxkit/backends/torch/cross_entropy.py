r"""The chunked PyTorch cross-entropy as the custom op ``softmaxkit::cross_entropy_chunked``.

2-D logits and class-index targets, any device. The forward (:func:`softmaxkit._core.rows.forward_rows`)
keeps only the row shift ``m`` and ``log Σ exp(z − m)`` (``2N`` floats), never log-probabilities; the
backward (:func:`softmaxkit._core.rows.backward_rows`) writes

.. math:: \frac{\partial ℓ_i}{\partial z_{ij}} = g_i\big[(A_i + 2λ\,\mathrm{LSE}_i)\,p_{ij} − a_{ij}\big]

into one ``(N, C)`` buffer (``..._backward``) or over the logits themselves (``..._backward_``, declared as
mutating ``logits``: ``inplace_backward=True``), row chunk by row chunk so the working set stays in cache.
The op has a fake kernel (meta, ``FakeTensorMode``, ``torch.compile``, ``torch.export``), its autograd
registered with ``setup_context`` (so ``torch.func.grad`` works) and ``F.cross_entropy``'s autocast rule (fp32).
"""

from __future__ import annotations

import torch

from ..._core import CrossEntropyOptions, compute_dtype, row_weights
from ..._core.autograd import refuse_double_backward
from ..._core.rows import backward_rows, chunk_rows, forward_rows
from ..._reduction import reduce_loss, row_scale
from .._custom_op import cross_entropy_backward_ops

__all__ = ["chunk_rows", "row_weights", "torch_cross_entropy"]


@torch.library.custom_op("softmaxkit::cross_entropy_chunked", mutates_args=())
def _cross_entropy_chunked(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    temperature: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced loss (logits' dtype), the row shift ``m`` and ``log s`` (compute dtype, ``(N,)`` each)."""
    options = CrossEntropyOptions.from_op_args(
        ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size
    )
    loss, row_max, log_sum, rows = forward_rows(logits, target, weight, options)
    return reduce_loss(loss, reduction, rows.w_y.sum()).to(logits.dtype), row_max, log_sum


@_cross_entropy_chunked.register_fake
def _(logits, target, weight, ignore_index, reduction, *args):
    num_rows = logits.shape[0]
    work = compute_dtype(logits.dtype)
    loss = logits.new_empty((num_rows,) if reduction == "none" else ())
    return loss, logits.new_empty((num_rows,), dtype=work), logits.new_empty((num_rows,), dtype=work)


def _backward_into(grad, grad_output, logits, target, weight, row_max, log_sum, options: CrossEntropyOptions):
    num_rows, num_classes = logits.shape
    rows = row_weights(target, weight, options.ignore_index, num_classes, row_max.dtype)
    scale = row_scale(grad_output.to(row_max.dtype), options.reduction, num_rows, rows.w_y.sum(), rows.valid)
    return backward_rows(scale, logits, rows, row_max, log_sum, options, grad)


_cross_entropy_backward_ops = cross_entropy_backward_ops(
    torch.library.custom_op, "cross_entropy_chunked", ("row_max", "log_sum"), _backward_into,
    lambda logits: torch.empty_like(logits, memory_format=torch.contiguous_format),
)


def _setup_context(ctx, inputs, output):
    logits, target, weight, *scalars = inputs
    ctx.scalars, ctx.inplace = tuple(scalars[:7]), scalars[7]
    _, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    ctx.set_materialize_grads(False)  # no zero gradients built for the statistics outputs
    ctx.save_for_backward(logits, target, weight, row_max, log_sum)


def _backward(ctx, grad_output, *unused):
    refuse_double_backward()
    if grad_output is None:  # the loss itself got no gradient (only statistics outputs were used)
        return (None,) * 11
    logits, target, weight, row_max, log_sum = ctx.saved_tensors
    if ctx.inplace:
        torch.ops.softmaxkit.cross_entropy_chunked_backward_(grad_output, logits, target, weight, row_max, log_sum,
                                                             *ctx.scalars)
        grad = logits
    else:
        grad = torch.ops.softmaxkit.cross_entropy_chunked_backward(grad_output, logits, target, weight, row_max,
                                                                   log_sum, *ctx.scalars)
    return (grad, *(None,) * 10)


torch.library.register_autograd("softmaxkit::cross_entropy_chunked", _backward, setup_context=_setup_context)
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("softmaxkit::cross_entropy_chunked", _device, torch.float32)


def torch_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, options: CrossEntropyOptions
) -> torch.Tensor:
    """Chunked cross-entropy of 2-D ``logits (N, C)`` and class indices ``(N,)`` (validated arguments)."""
    loss, _, _ = torch.ops.softmaxkit.cross_entropy_chunked(
        logits, target, weight, *options.op_args(), options.inplace_backward
    )
    return loss
