r"""Triton linear cross-entropy: chunked matmul + one fused CE launch per chunk, full logits never stored.

For each chunk of ``r`` rows: ``x = h Wᵀ + b`` (``r × C``, one GEMM in the input dtype), then one launch of
:func:`~.cross_entropy._ce_fused_inplace_kernel` writes each row's loss and log-sum-exp and overwrites ``x``
with the gradient ``G = ∂ℓ/∂x`` (for a unit upstream gradient; the mean's ``1/Σw_y`` is folded in on the
device). Then

.. math:: ∂ℓ/∂h_{chunk} = G W, \qquad ∂ℓ/∂W \mathrel{+}= Gᵀ h_{chunk}, \qquad ∂ℓ/∂b \mathrel{+}= \textstyle\sum_{rows} G

where ``∂ℓ/∂W`` accumulates in fp32 across chunks through :func:`_accumulate_at_b_kernel` (fp32 accumulator
tiles, operands in the input dtype), so a bf16 model does not round its weight gradient once per chunk.
Backward only multiplies the stored gradients by the upstream scalar, on the device (no host sync).
``reduction="none"`` needs the per-row upstream gradient, known only in backward: it uses the chunk loop of the
core (:func:`softmaxkit._core.linear.linear_forward`), which recomputes chunks. The scalar path is the custom
op ``softmaxkit::linear_cross_entropy_triton`` (``triton_op``; a plain custom op when interpreted).

Peak memory beyond the returned gradients: one chunk of logits (the chunk size of the torch path) and the
fp32 ``C × D`` accumulator when the weight is fp16/bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..._core import CrossEntropyOptions, compute_dtype, row_weights
from ..._core.autograd import refuse_double_backward
from ..._core.linear import LOCAL, ChunkedLinearCrossEntropy, chunk_rows_for
from ..._reduction import reduce_loss, row_scale
from .cross_entropy import (
    _ce_fused_inplace_kernel,
    _ce_fwd_kernel,
    _define_op,
    _dot,
    _ieee_dot,
    _interpreting,
    _launch_config,
    _or,
    _scalars,
)


@triton.jit
def _accumulate_at_b_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_ak, stride_am, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """``C[M, N] += A[K, M]ᵀ B[K, N]`` with an fp32 (fp64 for fp64) accumulator tile; int64 offsets."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc_dtype = c_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(a_ptr + offs_k[None, :] * stride_ak + offs_m[:, None] * stride_am,
                    mask=(offs_k[None, :] < K) & (offs_m[:, None] < M), other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc += _dot(a, b, acc_dtype, IEEE)
    pointers = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + acc, mask=mask)


def accumulate_at_b(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += aᵀ b`` for ``a (K, M)``, ``b (K, N)``, ``out (M, N)`` in fp32/fp64."""
    k, m = a.shape
    n = b.shape[1]
    if k == 0 or m == 0 or n == 0:
        return
    blocks = (16, 16, 16) if _interpreting() else (128, 128, 32)
    grid = (triton.cdiv(m, blocks[0]), triton.cdiv(n, blocks[1]))
    wrap_triton(_accumulate_at_b_kernel)[grid](
        a, b, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2],
        IEEE=_ieee_dot(a.dtype), num_warps=4 if _interpreting() else 8,
    )


def _linear_forward(hidden, weight, bias, target, class_weight, config: CrossEntropyOptions, wanted):
    """Scalar reductions (``"mean"``/``"sum"``) of class-index linear CE with the Triton kernels: the loss and
    the gradients for a unit upstream gradient (``(0,)`` where not wanted)."""
    if True:  # one block, so the body keeps the indentation it had as an autograd Function
        num_rows, hidden_size = hidden.shape
        num_classes = weight.shape[0]
        work = compute_dtype(weight.dtype)
        accumulation = config.accumulation_dtype or work
        target = target.contiguous()
        valid, _, class_weight, w_y, weight_total = row_weights(target, class_weight, config.ignore_index,
                                                                 num_classes, work)
        # the kernels read Σ_c w_c by pointer, and only with class weights
        if class_weight is not None:
            class_weight, weight_total = class_weight.contiguous(), weight_total.reshape(1)
        else:
            weight_total = None
        denominator = w_y.sum()
        one = torch.ones((), dtype=work, device=hidden.device)
        scale = row_scale(one, config.reduction, num_rows, denominator, valid).contiguous()
        needs = (wanted[0], wanted[1], bias is not None and wanted[2])
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros((num_classes, hidden_size), dtype=accumulation, device=hidden.device) \
            if needs[1] else None
        grad_bias = torch.zeros(num_classes, dtype=accumulation, device=hidden.device) if needs[2] else None

        loss = torch.empty(num_rows, dtype=work, device=hidden.device)
        lse = torch.empty(num_rows, dtype=work, device=hidden.device)  # log Σ exp(z − m) per row
        shift = torch.empty(num_rows, dtype=work, device=hidden.device)  # the row's shift m
        block, warps = _launch_config(num_classes)
        scalars = _scalars(work, config.label_smoothing, config.temperature, config.softcap, config.z_loss, lse)
        flags = {"HAS_WEIGHT": class_weight is not None, "HAS_SMOOTHING": config.label_smoothing > 0,
                 "HAS_SOFTCAP": config.softcap is not None, "BLOCK": block,
                 "PARAMS_IN_MEMORY": work == torch.float64, "num_warps": warps}
        step = chunk_rows_for(config, num_rows, hidden_size)
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            h = hidden[start:stop]
            logits = torch.nn.functional.linear(h, weight, bias)  # (r, C) in the input dtype
            common = (target[start:stop], _or(class_weight, lse), _or(weight_total, lse), lse[start:stop],
                      shift[start:stop],
                      loss[start:stop])
            if any(needs):
                wrap_triton(_ce_fused_inplace_kernel)[(stop - start,)](
                    logits, logits.stride(0), *common, scale[start:stop], num_classes, config.ignore_index,
                    *scalars, **flags,
                )
                if needs[0]:
                    torch.mm(logits, weight, out=grad_hidden[start:stop])
                if needs[1]:
                    # ignored rows' G is 0; their hidden states read as 0 so a NaN/inf padding row stays out of ∂W
                    safe_h = torch.where(valid[start:stop, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
                    accumulate_at_b(grad_weight, logits, safe_h)
                if needs[2]:
                    grad_bias += logits.sum(0, dtype=accumulation)
            else:
                wrap_triton(_ce_fwd_kernel)[(stop - start,)](
                    logits, logits.stride(0), *common, num_classes, config.ignore_index, *scalars, **flags,
                )
        out = reduce_loss(loss, config.reduction, denominator)
        # a fresh (0,) tensor per missing gradient: a custom op's outputs may not alias each other
        # the loss in the compute dtype (fp32 for fp16/bf16): the caller rounds it, or keeps it under autocast
        return (out,
                *(hidden.new_empty((0,)) if g is None else g for g in (grad_hidden, grad_weight, grad_bias)))


@_define_op("softmaxkit::linear_cross_entropy_triton", mutates_args=())
def _linear_cross_entropy_triton(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ∂h, ∂W, ∂b)`` (gradients for a unit upstream gradient, ``(0,)`` where not wanted)."""
    options = CrossEntropyOptions.from_op_args(
        ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size,
        accumulation_dtype=accumulation_dtype, num_classes=weight.shape[0],
    )
    return _linear_forward(hidden, weight, bias, target, class_weight, options, (need_hidden, need_weight, need_bias))


@_linear_cross_entropy_triton.register_fake
def _(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, temperature, z_loss,
      softcap, chunk_size, accumulation_dtype, need_hidden, need_weight, need_bias):
    work = compute_dtype(weight.dtype)
    acc = accumulation_dtype or work
    return (
        hidden.new_empty((), dtype=work),
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty((0,)),
        weight.new_empty(weight.shape, dtype=acc) if need_weight else hidden.new_empty((0,)),
        weight.new_empty((weight.shape[0],), dtype=acc) if need_bias and bias is not None else hidden.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.needs = (inputs[13], inputs[14], inputs[15] and bias is not None)
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads)


def _backward(ctx, grad_output, *unused):
    refuse_double_backward()
    if grad_output is None:
        return (None,) * 16
    grads = [(g * grad_output.to(g.dtype)).to(dtype) if wanted else None
             for g, dtype, wanted in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs)]
    return (*grads, *(None,) * 13)


_linear_cross_entropy_triton.register_autograd(_backward, setup_context=_setup_context)


def triton_linear_cross_entropy(hidden, weight, bias, target, class_weight, config: CrossEntropyOptions):
    """Linear CE of ``hidden (N, D)``, ``weight (C, D)``, ``bias (C,)``/None and class indices ``(N,)``.

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. ``"none"`` uses the chunked torch path.
    Returns the loss in the compute dtype (fp32 for fp16/bf16 inputs), as every linear-CE backend does.
    """
    if not hidden.is_cuda and not _interpreting():
        raise ValueError(
            f"`impl='triton'` needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the kernels on the CPU), "
            f"but `hidden` is on {hidden.device}"
        )
    if config.reduction == "none":
        return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, class_weight, config, LOCAL,
                                               torch.is_grad_enabled())
    grad_on = torch.is_grad_enabled()
    wanted = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
              grad_on and bias is not None and bias.requires_grad)
    loss, *_ = torch.ops.softmaxkit.linear_cross_entropy_triton(
        hidden, weight, bias, target, class_weight, *config.op_args(), config.accumulation_dtype, *wanted
    )
    return loss
