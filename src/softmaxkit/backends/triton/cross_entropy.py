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
capturable. Row offsets are int64 (``N·C > 2^31`` is fine); the elementwise arithmetic is fp32 for
fp16/bf16/fp32 input (fp64 for fp64 input), while the label-smoothing sum is carried across blocks and the row
loss combined in fp64 (at fp32 ``m − z_y`` and ``Σ w (z − m)`` overflow for rows mixing ±3e38 although the loss
fits; each block's sum is taken over ``(z − m)·2⁻²⁴``, an exact scaling that cannot overflow).

``tanh`` (soft-capping) is built from ``exp`` (libdevice's is unavailable under ``TRITON_INTERPRET=1``):
``tanh(u) = sign(u)(1 − e^{−2|u|})/(1 + e^{−2|u|})``, with its odd Taylor series below ``|u| = 1/8`` where
that form cancels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._core import CrossEntropyOptions, compute_dtype, row_weights
from ..._core.autograd import refuse_double_backward
from ..._reduction import reduce_loss, row_scale


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
def _dot(a, b, ACC_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` accumulated in ``ACC_DTYPE``. ``IEEE``: exact products, the operands taken in ``ACC_DTYPE``
    (fp32/fp64 operands on GPUs, and every dtype under ``TRITON_INTERPRET=1``, whose ``tl.dot`` multiplies the
    raw bit patterns of bf16 operands, triton-lang/triton#11584; bf16/fp16 → fp32 is exact, so this is the
    GPU's fp32-accumulated tensor-core product up to the order of the sum). Otherwise the hardware's dot of
    the operands as given (bf16/fp16 on tensor cores)."""
    if IEEE:
        return tl.dot(a.to(ACC_DTYPE), b.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
    else:
        return tl.dot(a, b, out_dtype=ACC_DTYPE)


def _ieee_dot(dtype: torch.dtype) -> bool:
    """The ``IEEE`` flag of :func:`_dot` for operands of ``dtype``."""
    return dtype in (torch.float32, torch.float64) or _interpreting()


#: the label-smoothing block sum's exact power-of-two scaling (see :func:`_row_forward`)
_SMOOTH_SCALE = tl.constexpr(2.0 ** -24)
_SMOOTH_UNSCALE = tl.constexpr(2.0 ** 24)


@triton.jit
def _row_forward(
    x_row, row, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, shift_ptr, loss_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row's online log-sum-exp and loss in the shifted form; stores ``log s`` (at ``lse_ptr``), the shift
    ``m`` and the loss, and returns ``(m, log s)``."""
    y = tl.load(target_ptr + row).to(tl.int64)
    valid = y != ignore_index
    safe_y = tl.where(valid, y, 0)
    acc_dtype = lse_ptr.dtype.element_ty
    m = tl.full([], float("-inf"), acc_dtype)
    s = tl.zeros([], acc_dtype)
    # Σ w_c (z_c − shift) over the columns seen, relative to the running shift, and Σ w_c: float64 across blocks
    # (at fp32 ``z − m`` reaches −6.8e38 and the sum more, although the smoothing term, scaled by ε/C, may fit)
    weighted = tl.zeros([], tl.float64)
    weight_seen = tl.zeros([], tl.float64)
    shift = tl.zeros([], acc_dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(acc_dtype)
        if HAS_SOFTCAP:
            z = softcap * _tanh(x / softcap) * inv_t
        else:
            z = x * inv_t
        z_masked = tl.where(mask, z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z_masked, 0))
        new_shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: exp(-inf - 0) = 0
        if HAS_SMOOTHING:
            # Σ w (z − shift) kept relative to the running shift (no Σ w z that could cancel). The block's sum
            # is taken in the compute dtype over (z − shift)·2⁻²⁴ (power-of-two scalings are exact; at fp32
            # |z − m| ≤ 6.8e38 scales to ≤ 4.1e31, so a block of up to 8192 columns with class weights up to
            # 2²³/BLOCK cannot overflow), then unscaled and carried across blocks in float64. Differences in
            # float64 instead spilled registers (ptxas, sm_90a: 188 B in the fused in-place kernel at BLOCK 8192).
            shifted = z * _SMOOTH_SCALE - new_shift * _SMOOTH_SCALE
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
                block_sum = tl.sum(tl.where(mask & (w != 0.0), w * shifted, 0.0), 0).to(tl.float64) * _SMOOTH_UNSCALE
                block_weight = tl.sum(tl.where(mask, w, 0.0), 0).to(tl.float64)
            else:
                block_sum = tl.sum(tl.where(mask, shifted, 0.0), 0).to(tl.float64) * _SMOOTH_UNSCALE
                block_weight = tl.sum(tl.where(mask, 1.0, 0.0), 0).to(tl.float64)
            moved = (shift.to(tl.float64) - new_shift.to(tl.float64)) * weight_seen
            weighted = tl.where(weight_seen != 0.0, weighted + moved, weighted)
            weighted += block_sum
            weight_seen += block_weight
        s = s * tl.exp(m - new_shift) + tl.sum(tl.exp(z_masked - new_shift), 0)
        m = new_m
        shift = new_shift
    log_s = tl.log(s)
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
    # the row loss combined in float64 and rounded once: at fp32 ``m − z_y``, ``Σ w (z − m)`` and ``LSE²`` can
    # overflow for logits near ±3e38 (or LSE > 1.8e19) although the loss, scaled by (1−ε)w_y, ε/C and λ, fits
    wide_shift, wide_log_s = shift.to(tl.float64), log_s.to(tl.float64)
    loss = (1.0 - eps) * w_y * ((wide_shift - z_y.to(tl.float64)) + wide_log_s)
    if HAS_SMOOTHING:
        loss += (weight_total * wide_log_s - weighted) * (eps / n_cols)
    if z_loss > 0.0:
        wide_lse = wide_shift + wide_log_s
        loss += z_loss * wide_lse * wide_lse
    tl.store(lse_ptr + row, log_s)
    tl.store(shift_ptr + row, shift)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0).to(loss_ptr.dtype.element_ty))
    return shift, log_s


@triton.jit
def _row_backward(
    x_row, g_row, row, target_ptr, weight_ptr, weight_total_ptr, shift, log_s, s,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row's gradient, scaled by ``s``; ``g_row`` may be ``x_row`` (each block is read before written).

    ``p = exp((z − shift) − log s)``: the shifted form, exact where ``z ≈ shift`` at any magnitude."""
    y = tl.load(target_ptr + row).to(tl.int64)
    acc_dtype = log_s.dtype
    active = (y != ignore_index) & (s != 0.0)  # ignored row or zero upstream: exact zeros (no 0·inf)
    safe_y = tl.where(active, y, 0)
    shift = tl.where(active, shift, 0.0)
    log_s = tl.where(active, log_s, 0.0)
    lse = shift + log_s
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
        g = row_coefficient * tl.exp((z - shift) - log_s)
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
    x_ptr, stride_x, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, shift_ptr, loss_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PARAMS_IN_MEMORY:  # float64: scalar arguments would be rounded to fp32
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    _row_forward(x_ptr + row * stride_x, row, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, shift_ptr, loss_ptr,
                 n_cols, ignore_index, eps, inv_t, softcap, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, stride_x, grad_ptr, stride_g, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, shift_ptr, scale_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PARAMS_IN_MEMORY:
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    _row_backward(x_ptr + row * stride_x, grad_ptr + row * stride_g, row, target_ptr, weight_ptr, weight_total_ptr,
                  tl.load(shift_ptr + row), tl.load(lse_ptr + row), tl.load(scale_ptr + row), n_cols, ignore_index, eps, inv_t, softcap,
                  z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK)


@triton.jit
def _ce_fused_inplace_kernel(
    x_ptr, stride_x, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, shift_ptr, loss_ptr, scale_ptr,
    n_cols, ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    """Loss, LSE and the gradient (scaled by ``scale``) of one row, the gradient over the row's logits."""
    row = tl.program_id(0).to(tl.int64)
    if PARAMS_IN_MEMORY:
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    x_row = x_ptr + row * stride_x
    shift, log_s = _row_forward(x_row, row, target_ptr, weight_ptr, weight_total_ptr, lse_ptr, shift_ptr, loss_ptr,
                                n_cols, ignore_index, eps, inv_t, softcap, z_loss, HAS_WEIGHT, HAS_SMOOTHING,
                                HAS_SOFTCAP, BLOCK)
    _row_backward(x_row, x_row, row, target_ptr, weight_ptr, weight_total_ptr, shift, log_s, tl.load(scale_ptr + row),
                  n_cols, ignore_index, eps, inv_t, softcap, z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch_config(num_classes: int) -> tuple[int, int]:
    """(BLOCK, num_warps): whole rows up to 8192 classes per block on GPUs; small blocks when interpreted."""
    limit = 1024 if _interpreting() else 8192
    block = min(triton.next_power_of_2(max(num_classes, 1)), limit)
    return block, (4 if block <= 1024 else 8 if block <= 4096 else 16)


def _define_op(name: str, mutates_args):
    """``torch.library.triton_op`` (Inductor sees the Triton kernels and can fuse around them); under
    ``TRITON_INTERPRET=1`` a plain ``custom_op`` (interpreted kernels on CPU tensors cannot be traced into, so the
    op stays opaque and its fake kernel serves compile/export)."""
    if _interpreting():
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return triton_op(name, mutates_args=mutates_args)


def _forward(logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
             scale=None):
    """Launch the forward kernel (or, with ``scale``, the fused forward + in-place gradient kernel)."""
    num_rows, num_classes = logits.shape
    work = compute_dtype(logits.dtype)
    stats = torch.empty((2, num_rows), dtype=work, device=logits.device)  # log s, shift m (per row)
    lse, shift = stats[0], stats[1]
    loss = torch.empty(num_rows, dtype=work, device=logits.device)
    _, _, weight, w_y, weight_total = row_weights(target, weight, ignore_index, num_classes, work)
    # the kernels read Σ_c w_c by pointer, and only with class weights
    if weight is not None:
        weight, weight_total = weight.contiguous(), weight_total.reshape(1)
    else:
        weight_total = None
    block, warps = _launch_config(num_classes)
    if num_rows > 0:
        common = (target, _or(weight, lse), _or(weight_total, lse), lse, shift, loss)
        flags = {"HAS_WEIGHT": weight is not None, "HAS_SMOOTHING": label_smoothing > 0,
                 "HAS_SOFTCAP": softcap is not None, "BLOCK": block, "PARAMS_IN_MEMORY": work == torch.float64,
                 "num_warps": warps}
        scalars = _scalars(work, label_smoothing, temperature, softcap, z_loss, lse)
        if scale is None:
            wrap_triton(_ce_fwd_kernel)[(num_rows,)](
                logits, logits.stride(0), *common, num_classes, ignore_index, *scalars, **flags)
        else:
            wrap_triton(_ce_fused_inplace_kernel)[(num_rows,)](
                logits, logits.stride(0), *common, scale, num_classes, ignore_index, *scalars, **flags)
    return reduce_loss(loss, reduction, w_y.sum()), stats


@_define_op("softmaxkit::cross_entropy_triton", mutates_args=())
def _cross_entropy_triton(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced loss (logits' dtype) and ``(2, N)`` row statistics (``log s``, shift ``m``) of 2-D ``logits``
    with unit class stride."""
    loss, lse = _forward(logits, target.contiguous(), weight, ignore_index, reduction, label_smoothing,
                         temperature, z_loss, softcap)
    return loss.to(logits.dtype), lse


@_cross_entropy_triton.register_fake
def _(logits, target, weight, ignore_index, reduction, *args):
    num_rows = logits.shape[0]
    work = compute_dtype(logits.dtype)
    loss = logits.new_empty((num_rows,) if reduction == "none" else ())
    return loss, logits.new_empty((2, num_rows), dtype=work)


def _backward_into(grad, grad_output, logits, target, weight, stats, ignore_index, reduction, eps, temperature,
                   z_loss, softcap):
    num_rows, num_classes = logits.shape
    lse, shift = stats[0], stats[1]
    rows = row_weights(target, weight, ignore_index, num_classes, lse.dtype)
    # the row scale s_i on the device: no .item(), graph-capturable
    scale = row_scale(grad_output.to(lse.dtype), reduction, num_rows, rows.w_y.sum(), rows.valid).contiguous()
    weight = None if rows.weight is None else rows.weight.contiguous()
    weight_total = None if weight is None else rows.weight_total.reshape(1)
    block, warps = _launch_config(num_classes)
    if num_rows > 0:
        wrap_triton(_ce_bwd_kernel)[(num_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), target, _or(weight, lse), _or(weight_total, lse),
            lse, shift, scale, num_classes, ignore_index,
            *_scalars(lse.dtype, eps, temperature, softcap, z_loss, lse),
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=eps > 0, HAS_SOFTCAP=softcap is not None,
            BLOCK=block, PARAMS_IN_MEMORY=lse.dtype == torch.float64, num_warps=warps,
        )


@_define_op("softmaxkit::cross_entropy_triton_backward", mutates_args=())
def _cross_entropy_triton_backward(
    grad_output: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    temperature: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """``∂ℓ/∂logits`` into a new buffer from the stored LSE (one launch)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(grad, grad_output, logits, target.contiguous(), weight, lse, ignore_index, reduction,
                   label_smoothing, temperature, z_loss, softcap)
    return grad


@_define_op("softmaxkit::cross_entropy_triton_backward_", mutates_args={"logits"})
def _cross_entropy_triton_backward_(
    grad_output: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    temperature: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> None:
    """:func:`_cross_entropy_triton_backward` written over ``logits`` (``inplace_backward=True``)."""
    _backward_into(logits, grad_output, logits, target.contiguous(), weight, lse, ignore_index, reduction,
                   label_smoothing, temperature, z_loss, softcap)


@_cross_entropy_triton_backward.register_fake
def _(grad_output, logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@_cross_entropy_triton_backward_.register_fake
def _(*args):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, weight, *scalars = inputs
    ctx.scalars, ctx.inplace = tuple(scalars[:7]), scalars[7]
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, weight, lse)


def _backward(ctx, grad_output, *unused):
    refuse_double_backward()
    if grad_output is None:
        return (None,) * 11
    logits, target, weight, lse = ctx.saved_tensors
    if ctx.inplace:
        torch.ops.softmaxkit.cross_entropy_triton_backward_(grad_output, logits, target, weight, lse, *ctx.scalars)
        grad = logits
    else:
        grad = torch.ops.softmaxkit.cross_entropy_triton_backward(grad_output, logits, target, weight, lse,
                                                                  *ctx.scalars)
    return (grad, *(None,) * 10)


_cross_entropy_triton.register_autograd(_backward, setup_context=_setup_context)
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("softmaxkit::cross_entropy_triton", _device, torch.float32)


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
    # the kernels want unit class stride; in place only into the caller's own buffer (a copy made here would
    # be invisible to the caller)
    rows = logits if logits.stride(1) == 1 or logits.shape[1] <= 1 else logits.contiguous()
    inplace = options.inplace_backward and rows is logits
    loss, _ = torch.ops.softmaxkit.cross_entropy_triton(rows, target, weight, *options.op_args(), inplace)
    return loss
