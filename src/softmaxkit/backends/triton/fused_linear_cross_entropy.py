r"""Fused linear cross-entropy in Triton: the logits live only in registers, never in global memory.

The approach of cut-cross-entropy (Wijmans et al. 2025, apple/ml-cross-entropy). With ``x = h Wᵀ + b``,
``z = softcap(x) / T`` (``softcap(x) = c·tanh(x/c)``) and ``a = w ⊙ ((1 − ε)·onehot(y) + ε/C)``:

**Forward** (:func:`_fused_lce_fwd_kernel`, grid ``(⌈N/BLOCK_M⌉, S)``). Program ``(i, s)`` owns rows
``i·BLOCK_M …`` and the ``s``-th of ``S`` contiguous ranges of vocabulary tiles. For each ``BLOCK_M ×
BLOCK_N`` tile it computes ``x`` by a loop over ``D`` (``tl.dot``, fp32 accumulator; fp64 for fp64), adds
the bias, applies soft-cap and temperature, and folds the tile into an online log-sum-exp
(Milakov & Gimelshein 2018),

.. math:: m' = \max(m, \max_{tile} z),\qquad s' = s\,e^{m − m'} + \textstyle\sum_{tile} e^{z − m'},

together with the target logit ``z_y`` (the one tile holding column ``y``) and, for label smoothing,
``Σ_c w_c z_c``. It writes three floats per row and range: ``m + log s``, its part of ``z_y`` and its part
of the smoothing sum. The ``S`` partials are combined with tensor ops (a log-sum-exp over ``S`` values per
row), which also give each row's loss

.. math:: ℓ = (1−ε)\,w_y(\mathrm{LSE} − z_y) + \tfrac{ε}{C}\big(\textstyle\sum_c w_c\,\mathrm{LSE} −
          \sum_c w_c z_c\big) + λ\,\mathrm{LSE}^2 \quad(0 \text{ on ignored rows}).

``S`` splits the vocabulary so that a small ``N`` still fills the GPU; the split is deterministic (no
atomics in the forward). Saved for backward: the inputs (references, no copies) and ``LSE`` (``N`` floats).

**Backward** (:func:`_fused_lce_bwd_kernel`, grid ``(⌈N/BLOCK_M⌉, ⌈C/BLOCK_N⌉)``) recomputes each logits
tile the same way and forms the gradient tile in registers,

.. math:: G = s_i\big[(A_i + 2λ\,\mathrm{LSE}_i)\,e^{z − \mathrm{LSE}_i} − a\big]\,\frac{dz}{dx},
          \qquad A_i = (1 − ε) w_{y_i} + \tfrac{ε}{C}\textstyle\sum_c w_c,

with ``s_i`` the row's upstream gradient (divided by ``Σ w_y`` for ``"mean"``, 0 on ignored rows), then
immediately multiplies it into the three gradients, ``BLOCK_K`` columns of ``D`` at a time:

.. math:: ∂ℓ/∂h_{rows} \mathrel{+}= G\,W_{tile},\qquad ∂ℓ/∂W_{tile} \mathrel{+}= Gᵀ h_{rows},\qquad
          ∂ℓ/∂b_{tile} \mathrel{+}= \textstyle\sum_{rows} G

through atomic adds into fp32 (fp64 for fp64) accumulators: ``(N, D)`` and ``(C, D)``, the size of the
gradients themselves, so the sum order (and the last bits of ``∂h``, ``∂W``) is not deterministic. The
``G`` tile is cast to the operand dtype before these two ``tl.dot`` (as the chunked paths hold ``G`` in the
logits dtype); accumulation is fp32. Peak memory beyond the returned gradients: ``O(N·S)`` floats
in forward and the fp32 accumulators in backward (which *are* the gradients for fp32 inputs); no logits.
The price is recomputation: backward redoes the forward's ``N·C·D`` matmul, so ``4·N·C·D`` multiply-adds
in all against the chunked path's ``3·N·C·D``.

No ``.item()`` anywhere: grid sizes depend on shapes only and every data-dependent scalar (the mean's
denominator, ``Σ_c w_c``) is read on the device, so forward and backward can be captured in a CUDA graph.
Offsets are int64 (``N·D``, ``C·D`` or ``N·C`` beyond ``2^31`` are fine). Under ``TRITON_INTERPRET=1``
``tanh`` comes from ``exp`` (:func:`.cross_entropy._tanh`) and the tiles are 16-wide; the interpreter
mis-computes bf16 ``tl.dot``, so CPU tests use fp64/fp32/fp16 operands.

Gradient filtering (cut-cross-entropy's skipping of tiles whose gradient is negligible) is opt-in, through
:func:`fused_linear_cross_entropy`'s ``filter_eps`` (default None: every tile is added, exactly); see there
for what it drops and the resulting error bound.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._core import CrossEntropyOptions
from ..._reduction import reduce_loss, row_scale
from .._autograd import strict_once_differentiable
from .cross_entropy import _interpreting, _load_params, _or, _scalars, _tanh


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, n_cols, hidden_size,
    stride_hn, stride_hd, stride_wc, stride_wd, inv_t, softcap,
    ACC_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``z = softcap(h Wᵀ + b)/T`` for one ``BLOCK_M × BLOCK_N`` tile, and ``dz/dx``; rows/cols are int64."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_ok = rows[:, None] < n_rows
    col_ok = cols[None, :] < n_cols
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hd,
                    mask=row_ok & (ks[None, :] < hidden_size), other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * stride_wc + ks[:, None] * stride_wd,
                    mask=col_ok & (ks[:, None] < hidden_size), other=0.0)
        if IEEE:
            acc += tl.dot(h, w, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            acc += tl.dot(h, w, out_dtype=ACC_DTYPE)
    x = acc
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = softcap * t * inv_t
        derivative = (1.0 - t * t) * inv_t
    else:
        z = x * inv_t
        derivative = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE) + inv_t
    return z, derivative


@triton.jit
def _fused_lce_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, class_weight_ptr,
    part_lse_ptr, part_target_ptr, part_smooth_ptr,
    n_rows, n_cols, hidden_size, tiles_per_split,
    stride_hn, stride_hd, stride_wc, stride_wd,
    ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row block and vocabulary range: partial LSE, partial ``z_y`` and partial ``Σ_c w_c z_c``."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    if PARAMS_IN_MEMORY:  # float64: scalar arguments would be rounded to fp32 (ε, λ enter on the host)
        _eps, inv_t, softcap, _z_loss = _load_params(params_ptr)
    ACC_DTYPE: tl.constexpr = part_lse_ptr.dtype.element_ty
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    y = tl.where(y != ignore_index, y, -1)  # an ignored row matches no column (ignore_index may be a class)
    m = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    s = tl.zeros((BLOCK_M,), ACC_DTYPE)
    z_y = tl.zeros((BLOCK_M,), ACC_DTYPE)
    smooth = tl.zeros((BLOCK_M,), ACC_DTYPE)
    first_tile = split.to(tl.int64) * tiles_per_split
    for tile in range(0, tiles_per_split):
        cols = (first_tile + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        z, _ = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, n_cols, hidden_size,
            stride_hn, stride_hd, stride_wc, stride_wd, inv_t, softcap,
            ACC_DTYPE, HAS_BIAS, HAS_SOFTCAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
                smooth += tl.sum(tl.where(col_ok[None, :], w[None, :] * z, 0.0), 1)
            else:
                smooth += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # nothing seen yet: exp(-inf - 0) = 0
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = new_m
    shift = tl.where(m == float("-inf"), 0.0, m)
    out = split.to(tl.int64) * n_rows + rows
    tl.store(part_lse_ptr + out, shift + tl.log(s), mask=row_ok)  # log 0 = -inf for an empty range
    tl.store(part_target_ptr + out, z_y, mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(part_smooth_ptr + out, smooth, mask=row_ok)


@triton.jit
def _fused_lce_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, class_weight_ptr, weight_total_ptr, lse_ptr, scale_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    n_rows, n_cols, hidden_size,
    stride_hn, stride_hd, stride_wc, stride_wd,
    ignore_index, eps, inv_t, softcap, z_loss, params_ptr, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, HAS_FILTER: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Recompute one logits tile, form ``G`` and atomically add ``G W``, ``Gᵀ h``, ``Σ_rows G`` (unless
    ``HAS_FILTER`` and every ``|G_ij| ≤ filter_eps·|s_i|``: then the tile adds nothing)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PARAMS_IN_MEMORY:
        eps, inv_t, softcap, z_loss = _load_params(params_ptr)
    ACC_DTYPE: tl.constexpr = lse_ptr.dtype.element_ty
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    active = row_ok & (y != ignore_index) & (s != 0.0)  # ignored row or zero upstream: exact zeros
    safe_y = tl.where(active, y, -1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)  # finite on every row, ignored ones included
    if HAS_WEIGHT:
        w_y = tl.load(class_weight_ptr + tl.where(active, y, 0), mask=active, other=0.0).to(ACC_DTYPE)
        weight_total = tl.load(weight_total_ptr).to(ACC_DTYPE)  # Σ_c w_c on the device (no host sync)
    else:
        w_y = tl.where(active, 1.0, 0.0).to(ACC_DTYPE)
        weight_total = n_cols * 1.0
    z, derivative = _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, n_cols, hidden_size,
        stride_hn, stride_hd, stride_wc, stride_wd, inv_t, softcap,
        ACC_DTYPE, HAS_BIAS, HAS_SOFTCAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    row_coefficient = s * ((1.0 - eps) * w_y + eps / n_cols * weight_total + 2.0 * z_loss * tl.where(active, lse, 0.0))
    # p = e^{z − LSE} ≤ 1; the clamp only matters on padding rows (LSE = 0), where e^{z} could overflow
    g = row_coefficient[:, None] * tl.exp(tl.minimum(z - lse[:, None], 0.0))
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
            g -= (s * eps / n_cols)[:, None] * w[None, :]
        else:
            g -= (s * eps / n_cols)[:, None]
    g = tl.where(cols[None, :] == safe_y[:, None], g - (s * (1.0 - eps) * w_y)[:, None], g) * derivative
    g = tl.where(active[:, None] & col_ok[None, :], g, 0.0)
    if HAS_FILTER:  # gradient filtering (opt-in): a tile whose every entry is negligible is skipped
        keep = tl.max(tl.max(tl.abs(g) - filter_eps * tl.abs(s)[:, None], 1), 0) > 0.0
    else:
        keep = True
    if keep:
        if NEED_BIAS:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(g, 0).to(grad_bias_ptr.dtype.element_ty), mask=col_ok)
        if NEED_HIDDEN or NEED_WEIGHT:
            g_operand = g.to(hidden_ptr.dtype.element_ty)
            for k0 in range(0, hidden_size, BLOCK_K):
                ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                k_ok = ks < hidden_size
                if NEED_HIDDEN:
                    w_tile = tl.load(weight_ptr + cols[:, None] * stride_wc + ks[None, :] * stride_wd,
                                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
                    if IEEE:
                        part = tl.dot(g_operand, w_tile, input_precision="ieee", out_dtype=ACC_DTYPE)
                    else:
                        part = tl.dot(g_operand, w_tile, out_dtype=ACC_DTYPE)
                    tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :], part,
                                  mask=row_ok[:, None] & k_ok[None, :])
                if NEED_WEIGHT:
                    h_tile = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hd,
                                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                    if IEEE:
                        part = tl.dot(tl.trans(g_operand), h_tile, input_precision="ieee", out_dtype=ACC_DTYPE)
                    else:
                        part = tl.dot(tl.trans(g_operand), h_tile, out_dtype=ACC_DTYPE)
                    tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :],
                                  part.to(grad_weight_ptr.dtype.element_ty),
                                  mask=col_ok[:, None] & k_ok[None, :])


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): 16-wide tiles under the interpreter. On GPUs not tuned by
    timing (no GPU was available): the largest tensor-core-sized tiles that ``ptxas -v`` compiles for sm_90a
    with every option on and no register spills (fp16/bf16: 128×128 forward, 128×64 backward, which holds
    ``z``, ``dz/dx`` and ``G`` tiles at once; fp32 IEEE dots: 64×64; fp64: 32×32)."""
    if _interpreting():
        return 16, 16, 16, 4
    if dtype == torch.float64:
        return 32, 32, 16, 4
    if dtype == torch.float32:
        return 64, 64, 32, 8
    return (128, 64, 32, 8) if backward else (128, 128, 32, 8)


def default_splits(num_rows: int, num_classes: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Vocabulary ranges per row block in the forward: enough programs for ~4 waves of the GPU's SMs."""
    row_blocks = triton.cdiv(max(num_rows, 1), block_m)
    tiles = triton.cdiv(num_classes, block_n)
    if device.type != "cuda":
        return min(tiles, 2)  # interpreter: exercise the combination of ranges on tiny shapes
    index = device.index if device.index is not None else torch.cuda.current_device()
    wanted = triton.cdiv(4 * _multiprocessors(index), row_blocks)
    return max(1, min(tiles, wanted))


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Class-index linear CE, every reduction; logits recomputed tile by tile in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, config: CrossEntropyOptions, splits,
                filter_eps):
        num_rows, hidden_size = hidden.shape
        num_classes = weight.shape[0]
        device = hidden.device
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        target = target.contiguous()
        valid = target != config.ignore_index
        if class_weight is not None:
            class_weight = class_weight.to(work).contiguous()
            weight_total = class_weight.sum().reshape(1)
            w_y = torch.where(valid, class_weight[torch.where(valid, target, torch.zeros_like(target))],
                              torch.zeros((), dtype=work, device=device))
            smooth_total = weight_total[0]
        else:
            weight_total = None
            w_y = valid.to(work)
            smooth_total = float(num_classes)
        denominator = w_y.sum()
        block_m, block_n, block_k, warps = _blocks(hidden.dtype)
        if splits is None:
            splits = default_splits(num_rows, num_classes, block_m, block_n, device)
        tiles_per_split = triton.cdiv(triton.cdiv(num_classes, block_n), splits)
        part_lse = torch.empty((splits, num_rows), dtype=work, device=device)
        part_target = torch.empty((splits, num_rows), dtype=work, device=device)
        smoothing = config.label_smoothing > 0
        part_smooth = torch.empty((splits, num_rows), dtype=work, device=device) if smoothing else None
        scalars = _scalars(work, config.label_smoothing, config.temperature, config.softcap, config.z_loss,
                           part_lse)
        ieee = hidden.dtype in (torch.float32, torch.float64)
        if num_rows > 0:
            _fused_lce_fwd_kernel[(triton.cdiv(num_rows, block_m), splits)](
                hidden, weight, _or(bias, part_lse), target, _or(class_weight, part_lse),
                part_lse, part_target, _or(part_smooth, part_lse),
                num_rows, num_classes, hidden_size, tiles_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                config.ignore_index, *scalars,
                HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None, HAS_SMOOTHING=smoothing,
                HAS_SOFTCAP=config.softcap is not None, PARAMS_IN_MEMORY=work == torch.float64, IEEE=ieee,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            )
        lse = torch.logsumexp(part_lse, dim=0)
        z_target = part_target.sum(0)
        eps = config.label_smoothing
        loss = (1.0 - eps) * w_y * (lse - z_target) + config.z_loss * lse * lse
        if smoothing:
            loss = loss + (eps / num_classes) * (smooth_total * lse - part_smooth.sum(0))
        loss = torch.where(valid, loss, torch.zeros((), dtype=work, device=device))
        out = reduce_loss(loss, config.reduction, denominator)
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, weight_total, lse, denominator)
        ctx.config = config
        ctx.filter_eps = filter_eps
        return out.to(hidden.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, target, class_weight, weight_total, lse, denominator = ctx.saved_tensors
        config: CrossEntropyOptions = ctx.config
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        num_rows, hidden_size = hidden.shape
        num_classes = weight.shape[0]
        work = lse.dtype
        valid = target != config.ignore_index
        # the row scale s_i on the device: no .item(), graph-capturable
        scale = row_scale(grad_output.to(work), config.reduction, num_rows, denominator, valid).contiguous()
        accumulation = config.accumulation_dtype or work
        grad_hidden = torch.zeros((num_rows, hidden_size), dtype=work, device=hidden.device) if needs[0] else None
        grad_weight = torch.zeros((num_classes, hidden_size), dtype=accumulation, device=hidden.device) \
            if needs[1] else None
        grad_bias = torch.zeros(num_classes, dtype=accumulation, device=hidden.device) if needs[2] else None
        block_m, block_n, block_k, warps = _blocks(hidden.dtype, backward=True)
        if num_rows > 0 and any(needs):
            _fused_lce_bwd_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(num_classes, block_n))](
                hidden, weight, _or(bias, lse), target, _or(class_weight, lse), _or(weight_total, lse), lse, scale,
                _or(grad_hidden, lse), _or(grad_weight, lse), _or(grad_bias, lse),
                num_rows, num_classes, hidden_size,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                config.ignore_index,
                *_scalars(work, config.label_smoothing, config.temperature, config.softcap, config.z_loss, lse),
                float(ctx.filter_eps or 0.0),
                HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None,
                HAS_SMOOTHING=config.label_smoothing > 0, HAS_SOFTCAP=config.softcap is not None,
                NEED_HIDDEN=needs[0], NEED_WEIGHT=needs[1], NEED_BIAS=needs[2],
                HAS_FILTER=ctx.filter_eps is not None,
                PARAMS_IN_MEMORY=work == torch.float64, IEEE=hidden.dtype in (torch.float32, torch.float64),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            )
        grads = (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return (*grads, None, None, None, None, None)


def fused_linear_cross_entropy(hidden, weight, bias, target, class_weight, config: CrossEntropyOptions,
                               splits: int | None = None, filter_eps: float | None = None):
    r"""Linear cross-entropy ``cross_entropy(h Wᵀ + b, y)`` by the fused matmul–LSE kernels (module docstring).

    Arguments are validated by :func:`softmaxkit.linear_cross_entropy` (``impl="triton_fused"``), which
    flattens the leading dimensions. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Args:
        hidden: ``(N, D)`` hidden states (fp16, bf16, fp32 or fp64).
        weight: ``(C, D)`` projection, same dtype and device.
        bias: ``(C,)`` or None.
        target: ``(N,)`` class indices (int64), ``config.ignore_index`` for ignored rows.
        class_weight: ``(C,)`` per-class loss weights or None.
        config: the non-tensor options (reduction, label smoothing, temperature, z-loss, softcap;
            ``chunk_size`` is not used; ``accumulation_dtype`` must be None, fp32 or fp64).
        splits: vocabulary ranges per row block in the forward; None picks enough for ~4 waves of the GPU's
            multiprocessors. Changes only the summation order of the log-sum-exp.
        filter_eps: None (exact, the default) or ``ε_f ≥ 0``: opt-in gradient filtering. Backward skips
            a ``BLOCK_M × BLOCK_N`` tile when every entry satisfies ``|G_ij| ≤ ε_f·|s_i|`` (``s_i`` the row's
            upstream scale), which drops its atomic adds; the loss is unchanged and the gradients change by
            at most ``|Δ∂h_i| ≤ ε_f |s_i| Σ_c |W_c|``, ``|Δ∂W_c| ≤ ε_f Σ_i |s_i| |h_i|``,
            ``|Δ∂b_c| ≤ ε_f Σ_i |s_i|`` (sums over the skipped entries only). ``0`` skips only all-zero
            tiles (exact). cut-cross-entropy's default is ``finfo(dtype).eps / 32`` (2⁻¹² for bf16); with
            peaked softmaxes most tiles hold only ``p ≈ 0`` and are skipped. Not exposed through
            :func:`softmaxkit.linear_cross_entropy`; its speed-up is unmeasured (no GPU was available).

    Returns:
        A scalar for ``"mean"``/``"sum"``, ``(N,)`` for ``"none"``; dtype of ``hidden``.
    """
    if not hidden.is_cuda and not _interpreting():
        raise ValueError(
            f"`impl='triton_fused'` needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the kernels on the "
            f"CPU), but `hidden` is on {hidden.device}"
        )
    if config.accumulation_dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"`impl='triton_fused'` accumulates gradients with atomic adds in float32 or float64, so "
            f"`accumulation_dtype` must be None, torch.float32 or torch.float64, but got {config.accumulation_dtype}"
        )
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"`splits` must be a positive int or None, but got {splits!r}")
    if filter_eps is not None and (isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float))
                                   or not 0.0 <= filter_eps < float("inf")):
        raise ValueError(f"`filter_eps` must be None or a finite number >= 0, but got {filter_eps!r}")
    # contiguous feature dimension makes the tile loads coalesced; strides are honoured either way
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if hidden.is_cuda:  # Triton launches on the current device: make it the tensors' one
        with torch.cuda.device(hidden.device):
            return _FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, target, class_weight, config,
                                                          splits, filter_eps)
    return _FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, target, class_weight, config, splits,
                                                  filter_eps)
