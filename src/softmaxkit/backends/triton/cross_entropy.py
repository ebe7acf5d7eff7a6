r"""Triton cross-entropy: one launch for the forward, one for the backward, every option of the torch path.

Forward, one program per row, an online log-sum-exp over column blocks (Milakov & Gimelshein 2018):

.. math:: m' = \max(m, \max_b z),\quad s' = s\,e^{m − m'} + \sum_b e^{z − m'},\qquad \mathrm{LSE} = m + \log s

with ``z = softcap(x) / T``, plus ``z_y`` and ``Σ_c w_c z_c`` (label smoothing); it writes the row's loss

.. math:: ℓ = (1−ε)\,w_y(\mathrm{LSE} − z_y) + \tfrac{ε}{C}\big(W\,\mathrm{LSE} − \textstyle\sum_c w_c z_c\big)
          + λ\,\mathrm{LSE}^2

(0 on ignored rows) and ``LSE``: ``N`` floats kept for backward, never an ``(N, C)`` temporary. Backward, one
program per row, writes ``g_j = s[(A + 2λ\,LSE)\,p_j − (ε/C)w_j − (1−ε)w_y δ_{jy}]\,∂z_j/∂x_j`` into a new
buffer or over the logits (``inplace_backward``). ``s`` (the row's upstream gradient, divided by the mean's
denominator) is computed with tensor ops on the device: no ``.item()``, so both passes are CUDA-graph
capturable. Row offsets are int64 (``N·C > 2^31`` is fine); all arithmetic is fp32 for fp16/bf16/fp32 input
(fp64 for fp64 input under the interpreter).

``tanh`` (soft-capping) is built from ``exp`` (libdevice's is unavailable under ``TRITON_INTERPRET=1``):
``tanh(u) = sign(u)(1 − e^{−2|u|})/(1 + e^{−2|u|})``, with its odd Taylor series below ``|u| = 1/8`` where
that form cancels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._core import CrossEntropyOptions, row_weights
from ..._reduction import reduce_loss, row_scale
from .._autograd import strict_once_differentiable


@triton.jit
def _tanh(u):
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    return tl.where(a < 0.125, series, t)


@triton.jit
def _load_params(params_ptr):
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3)


@triton.jit
def _row_forward(
    x_row, row, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, loss_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row's online log-sum-exp and loss; stores both and returns the LSE."""
    y = tl.load(target_ptr + row).to(tl.int64)
    valid = y != ignore_index
    safe_y = tl.where(valid, y, 0)
    acc_dtype = lse_ptr.dtype.element_ty
    m = tl.full([], float("-inf"), acc_dtype)
    s = tl.zeros([], acc_dtype)
    weighted = tl.zeros([], acc_dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(acc_dtype)
        if HAS_SOFTCAP:
            z = softcap * _tanh(x / softcap) * inv_t
        else:
            z = x * inv_t
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
                weighted += tl.sum(tl.where(mask, w * z, 0.0), 0)
            else:
                weighted += tl.sum(tl.where(mask, z, 0.0), 0)
        z = tl.where(mask, z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 0))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: exp(-inf - 0) = 0
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
        m = new_m
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse = shift + tl.log(s)
    x_y = tl.load(x_row + safe_y).to(acc_dtype)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(x_y / softcap) * inv_t
    else:
        z_y = x_y * inv_t
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + safe_y).to(acc_dtype)
        weight_total = tl.load(weight_total_ptr).to(acc_dtype)  # Σ_c w_c, read on the device (no host sync)
    else:
        w_y = 1.0
        weight_total = n_cols * 1.0
    loss = (1.0 - eps) * w_y * (lse - z_y)
    if HAS_SMOOTHING:
        loss += (weight_total * lse - weighted) * (eps / n_cols)
    loss += z_loss * lse * lse
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    return lse


@triton.jit
def _row_backward(
    x_row, g_row, row, target_ptr, weight_ptr, weight_total_ptr, lse, s,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row's gradient, scaled by ``s``; ``g_row`` may be ``x_row`` (each block is read before written)."""
    y = tl.load(target_ptr + row).to(tl.int64)
    acc_dtype = lse.dtype
    active = (y != ignore_index) & (s != 0.0)  # ignored row or zero upstream: exact zeros (no 0·inf)
    safe_y = tl.where(active, y, 0)
    lse = tl.where(active, lse, 0.0)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + safe_y).to(acc_dtype)
        weight_total = tl.load(weight_total_ptr).to(acc_dtype)
    else:
        w_y = 1.0
        weight_total = n_cols * 1.0
    row_coefficient = s * ((1.0 - eps) * w_y + eps / n_cols * weight_total + 2.0 * z_loss * lse)
    smooth = s * eps / n_cols
    target_coefficient = s * (1.0 - eps) * w_y
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(acc_dtype)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            z = softcap * t * inv_t
            derivative = (1.0 - t * t) * inv_t
        else:
            z = x * inv_t
            derivative = inv_t
        g = row_coefficient * tl.exp(z - lse)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
                g -= smooth * w
            else:
                g -= smooth
        g = tl.where(cols == safe_y, g - target_coefficient, g) * derivative
        g = tl.where(active, g, 0.0)
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    x_ptr, stride_x, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, loss_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PARAMS_IN_MEMORY:  # float64: scalar arguments would be rounded to fp32
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    _row_forward(x_ptr + row * stride_x, row, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, loss_ptr,
                 n_cols, ignore_index, eps, inv_t, softcap, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, stride_x, grad_ptr, stride_g, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, scale_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PARAMS_IN_MEMORY:
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    _row_backward(x_ptr + row * stride_x, grad_ptr + row * stride_g, row, target_ptr, weight_ptr, weight_total_ptr,
                  tl.load(lse_ptr + row), tl.load(scale_ptr + row), n_cols, ignore_index, eps, inv_t, softcap,
                  z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK)


@triton.jit
def _ce_fused_inplace_kernel(
    x_ptr, stride_x, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, loss_ptr, scale_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    """Loss, LSE and the gradient (scaled by ``scale``) of one row, the gradient over the row's logits."""
    row = tl.program_id(0).to(tl.int64)
    if PARAMS_IN_MEMORY:
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    x_row = x_ptr + row * stride_x
    lse = _row_forward(x_row, row, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, loss_ptr,
                       n_cols, ignore_index, eps, inv_t, softcap, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                       BLOCK)
    _row_backward(x_row, x_row, row, target_ptr, weight_ptr, weight_total_ptr, lse, tl.load(scale_ptr + row),
                  n_cols, ignore_index, eps, inv_t, softcap, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch_config(num_classes: int) -> tuple[int, int]:
    """(BLOCK, num_warps): whole rows up to 8192 classes per block on GPUs; small blocks when interpreted."""
    limit = 1024 if _interpreting() else 8192
    block = min(triton.next_power_of_2(max(num_classes, 1)), limit)
    return block, (4 if block <= 1024 else 8 if block <= 4096 else 16)


class _TritonCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function of the Triton path (2-D logits, class-index targets)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss,
                softcap, inplace_backward):
        num_rows, num_classes = logits.shape
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows = logits if logits.stride(1) == 1 or num_classes <= 1 else logits.contiguous()
        target = target.contiguous()
        lse = torch.empty(num_rows, dtype=work, device=logits.device)
        loss = torch.empty(num_rows, dtype=work, device=logits.device)
        _, _, weight, w_y, weight_total = row_weights(target, weight, ignore_index, num_classes, work)
        # the kernels read Σ_c w_c by pointer, and only with class weights
        if weight is not None:
            weight, weight_total = weight.contiguous(), weight_total.reshape(1)
        else:
            weight_total = None
        denominator = w_y.sum()
        block, warps = _launch_config(num_classes)
        if num_rows > 0:
            _ce_fwd_kernel[(num_rows,)](
                rows, rows.stride(0), target, _or(weight, lse), _or(weight_total, lse), lse, loss,
                num_classes, ignore_index, *_scalars(work, label_smoothing, temperature, softcap, z_loss, lse),
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=softcap is not None,
                BLOCK=block, PARAMS_IN_MEMORY=work == torch.float64, num_warps=warps,
            )
        out = reduce_loss(loss, reduction, denominator)
        ctx.save_for_backward(rows, target, weight, weight_total, lse, denominator)
        # in place only into the caller's own buffer (a contiguous copy made here would be invisible)
        ctx.options = (ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
                       inplace_backward and rows is logits)
        return out.to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        logits, target, weight, weight_total, lse, denominator = ctx.saved_tensors
        ignore_index, reduction, eps, temperature, z_loss, softcap, inplace_backward = ctx.options
        num_rows, num_classes = logits.shape
        valid = target != ignore_index
        # the row scale s_i on the device: no .item(), graph-capturable
        scale = row_scale(grad_output.to(lse.dtype), reduction, num_rows, denominator, valid).contiguous()
        if inplace_backward:
            grad = logits
            torch.autograd.graph.increment_version(logits)
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        block, warps = _launch_config(num_classes)
        if num_rows > 0:
            _ce_bwd_kernel[(num_rows,)](
                logits, logits.stride(0), grad, grad.stride(0), target, _or(weight, lse), _or(weight_total, lse),
                lse, scale, num_classes, ignore_index, *_scalars(lse.dtype, eps, temperature, softcap, z_loss, lse),
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=eps > 0, HAS_SOFTCAP=softcap is not None,
                BLOCK=block, PARAMS_IN_MEMORY=lse.dtype == torch.float64, num_warps=warps,
            )
        return grad, None, None, None, None, None, None, None, None, None


def _scalars(work, label_smoothing, temperature, softcap, z_loss, like):
    """(ε, 1/T, c, λ) as kernel scalars, plus a float64 copy in memory for float64 inputs (else a placeholder)."""
    values = (float(label_smoothing), 1.0 / temperature, float(softcap or 1.0), float(z_loss))
    params = torch.tensor(values, dtype=work, device=like.device) if work == torch.float64 else like
    return (*values, params)


def _or(tensor, placeholder):
    """A pointer argument for an optional tensor (the placeholder is never read: its HAS_* flag is off)."""
    return placeholder if tensor is None else tensor


def triton_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, options: CrossEntropyOptions
) -> torch.Tensor:
    """Cross-entropy of 2-D ``logits`` ``(N, C)`` and class indices ``(N,)`` with the Triton kernels.

    Arguments are validated by :func:`softmaxkit.cross_entropy`. CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1`` (how CPU CI checks these kernels).
    """
    if not logits.is_cuda and not _interpreting():
        raise ValueError(
            f"`impl='triton'` needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the kernels on the CPU), "
            f"but `logits` is on {logits.device}"
        )
    return _TritonCrossEntropyFunction.apply(
        logits, target, weight, options.ignore_index, options.reduction, options.label_smoothing,
        options.temperature, options.z_loss, options.softcap, options.inplace_backward,
    )
