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
``Σ_c w_c (z_c − m)`` kept relative to the running shift (no ``Σ_c w_c z_c`` that could overflow or cancel)
and ``Σ_c w_c`` over the range. It writes these per row and range, with ``m`` and ``log s``. The ``S``
partials are combined with tensor ops in the shifted form, ``m = max_s m_s``,
``log s = log Σ_s e^{(m_s − m) + log s_s}``, ``Σ_c w_c (z_c − m) = Σ_s [Σ_{c∈s} w_c (z_c − m_s) + (m_s − m) W_s]``,
which give each row's loss

.. math:: ℓ = (1−ε)\,w_y\big((m − z_y) + \log s\big) + \tfrac{ε}{C}\big(W \log s −
          \textstyle\sum_c w_c (z_c − m)\big) + λ\,(m + \log s)^2 \quad(0 \text{ on ignored rows}),

exact to a few ulps of ``log s`` at any magnitude of the logits (``LSE − z_y`` would lose an ulp of
``LSE``). ``S`` splits the vocabulary so that a small ``N`` still fills the GPU; the split is deterministic (no
atomics in the forward). Saved for backward: the inputs (references, no copies) and ``(log s, m)`` (``2N``
floats).

**Backward** (:func:`_fused_lce_bwd_kernel`, grid ``(⌈N/BLOCK_M⌉, ⌈C/BLOCK_N⌉)``) recomputes each logits
tile the same way and forms the gradient tile in registers,

.. math:: G = s_i\big[(A_i + 2λ\,\mathrm{LSE}_i)\,e^{(z − m_i) − \log S_i} − a\big]\,\frac{dz}{dx},
          \qquad A_i = (1 − ε) w_{y_i} + \tfrac{ε}{C}\textstyle\sum_c w_c,

with ``m_i``, ``S_i`` the row's shift and sum ``s`` from the forward, ``s_i`` the row's upstream gradient
(divided by ``Σ w_y`` for ``"mean"``, 0 on ignored rows), then
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
``tanh`` comes from ``exp`` (:func:`.cross_entropy._tanh`), the tiles are 16-wide, and every ``tl.dot``
takes its operands in the accumulator's dtype (:func:`.cross_entropy._dot`: the interpreter's bf16 dot
multiplies bit patterns), so CPU tests check fp64, fp32, fp16 and bf16 operands.

Ignored rows (and rows with a zero upstream gradient) are zeroed by selection, never by multiplying by 0, and
their hidden states read as 0 in ``Gᵀ h``: a NaN or ±inf hidden state on a padding row gives loss and
gradients exactly 0 there and leaves ``∂W``, ``∂b`` untouched. A NaN on a counted row propagates.

Both passes are custom ops, ``softmaxkit::fused_linear_cross_entropy_triton`` (loss and ``(log s, m)``) and
``softmaxkit::fused_linear_cross_entropy_triton_backward`` (``∂h``, ``∂W``, ``∂b``), with fake kernels and the
backward registered through ``register_autograd``: ``torch.library.triton_op`` (Inductor sees the kernels),
a plain ``custom_op`` under ``TRITON_INTERPRET=1``.

Gradient filtering (cut-cross-entropy's skipping of tiles whose gradient is negligible) is opt-in, through
:func:`fused_linear_cross_entropy`'s ``filter_eps`` (default None: every tile is added, exactly); see there
for what it drops and the resulting error bound.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..._core import CrossEntropyOptions, compute_dtype, row_weights
from ..._core.autograd import refuse_double_backward
from ..._reduction import reduce_loss, row_scale
from .cross_entropy import _define_op, _dot, _ieee_dot, _interpreting, _load_params, _or, _scalars, _tanh


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
        acc += _dot(h, w, ACC_DTYPE, IEEE)
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


#: the label-smoothing tile sum's exact power-of-two scaling (see :func:`_fused_lce_fwd_kernel`)
_SMOOTH_SCALE = tl.constexpr(2.0 ** -18)
_SMOOTH_UNSCALE = tl.constexpr(2.0 ** 18)


@triton.jit
def _fused_lce_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, class_weight_ptr,
    part_shift_ptr, part_log_s_ptr, part_target_ptr, part_smooth_ptr, part_weight_ptr,
    n_rows, n_cols, hidden_size, tiles_per_split,
    stride_hn, stride_hd, stride_wc, stride_wd,
    ignore_index, eps, inv_t, softcap, z_loss, params_ptr,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row block and vocabulary range: the shift ``m``, ``log s``, the partial ``z_y`` and, for label
    smoothing, ``Σ_c w_c (z_c − m)`` and ``Σ_c w_c`` over the range."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    if PARAMS_IN_MEMORY:  # float64: scalar arguments would be rounded to fp32 (ε, λ enter on the host)
        _eps, inv_t, softcap, _z_loss = _load_params(params_ptr)
    ACC_DTYPE: tl.constexpr = part_log_s_ptr.dtype.element_ty
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    y = tl.where(y != ignore_index, y, -1)  # an ignored row matches no column (ignore_index may be a class)
    m = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    shift = tl.zeros((BLOCK_M,), ACC_DTYPE)
    s = tl.zeros((BLOCK_M,), ACC_DTYPE)
    z_y = tl.zeros((BLOCK_M,), ACC_DTYPE)
    # Σ w (z − shift) over the columns seen, for the running shift, and Σ w: float64 across tiles (at fp32
    # ``z − m`` reaches −6.8e38 and the sum more, although the smoothing term, scaled by ε/C, may fit)
    weighted = tl.zeros((BLOCK_M,), tl.float64)
    weight_seen = tl.zeros((BLOCK_M,), tl.float64)
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
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 1))
        new_shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # nothing seen yet: exp(-inf - 0) = 0
        if HAS_SMOOTHING:
            # Σ w (z − shift) relative to the running shift (no Σ w z that could cancel). The tile's sum is
            # taken in the compute dtype over (z − shift)·2⁻¹⁸ (power-of-two scalings are exact; at fp32
            # |z − m| ≤ 6.8e38 scales to ≤ 2.6e33, so a tile of BLOCK_N ≤ 128 columns with class weights up
            # to 2¹⁷/BLOCK_N cannot overflow), then unscaled and carried across tiles in float64. A float64
            # (BLOCK_M × BLOCK_N) tile instead would spill registers (ptxas, sm_90a, bf16 128×128 tiles).
            shifted = z * _SMOOTH_SCALE - (new_shift * _SMOOTH_SCALE)[:, None]
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
                keep = col_ok[None, :] & (w[None, :] != 0.0)
                tile_sum = tl.sum(tl.where(keep, w[None, :] * shifted, 0.0), 1).to(tl.float64) * _SMOOTH_UNSCALE
                tile_weight = tl.sum(tl.where(col_ok, w, 0.0), 0).to(tl.float64)
            else:
                tile_sum = tl.sum(tl.where(col_ok[None, :], shifted, 0.0), 1).to(tl.float64) * _SMOOTH_UNSCALE
                tile_weight = tl.sum(tl.where(col_ok, 1.0, 0.0), 0).to(tl.float64)
            moved = (shift.to(tl.float64) - new_shift.to(tl.float64)) * weight_seen
            weighted = tl.where(weight_seen != 0.0, weighted + moved, weighted)
            weighted += tile_sum
            weight_seen += tile_weight
        s = s * tl.exp(m - new_shift) + tl.sum(tl.exp(z - new_shift[:, None]), 1)
        m = new_m
        shift = new_shift
    out = split.to(tl.int64) * n_rows + rows
    tl.store(part_shift_ptr + out, shift, mask=row_ok)
    tl.store(part_log_s_ptr + out, tl.log(s), mask=row_ok)  # log 0 = -inf for an empty range
    tl.store(part_target_ptr + out, z_y, mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(part_smooth_ptr + out, weighted, mask=row_ok)
        tl.store(part_weight_ptr + out, weight_seen, mask=row_ok)


@triton.jit
def _fused_lce_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, class_weight_ptr, weight_total_ptr, shift_ptr, log_s_ptr,
    scale_ptr,
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
    ACC_DTYPE: tl.constexpr = log_s_ptr.dtype.element_ty
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    active = row_ok & (y != ignore_index) & (s != 0.0)  # ignored row or zero upstream: exact zeros
    safe_y = tl.where(active, y, -1)
    # inactive rows read (0, 0): their statistics may be NaN (non-finite hidden states on an ignored row)
    shift = tl.where(active, tl.load(shift_ptr + rows, mask=row_ok, other=0.0), 0.0)
    log_s = tl.where(active, tl.load(log_s_ptr + rows, mask=row_ok, other=0.0), 0.0)
    lse = shift + log_s
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
    row_coefficient = s * ((1.0 - eps) * w_y + eps / n_cols * weight_total + 2.0 * z_loss * lse)
    # p = e^{(z − m) − log s}, the shifted form (exact where z ≈ m at any magnitude); inactive rows are
    # zeroed below by selection (never 0·inf)
    g = row_coefficient[:, None] * tl.exp((z - shift[:, None]) - log_s[:, None])
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
                    part = _dot(g_operand, w_tile, ACC_DTYPE, IEEE)
                    tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :], part,
                                  mask=row_ok[:, None] & k_ok[None, :])
                if NEED_WEIGHT:
                    # inactive rows' h reads 0: a NaN/inf padding row stays out of ∂W (their G is 0)
                    h_tile = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hd,
                                     mask=active[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
                    part = _dot(tl.trans(g_operand), h_tile, ACC_DTYPE, IEEE)
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


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return compute_dtype(weight.dtype)


def _class_weights(target, class_weight, ignore_index, num_classes, work):
    """``(valid, class_weight, w_y, weight_total)``: contiguous class weights and ``Σ_c w_c`` as a ``(1,)``
    tensor (read by pointer in the kernels), or None without class weights."""
    valid, _, class_weight, w_y, weight_total = row_weights(target, class_weight, ignore_index, num_classes, work)
    if class_weight is not None:
        return valid, class_weight.contiguous(), w_y, weight_total.reshape(1)
    return valid, None, w_y, None


@_define_op("softmaxkit::fused_linear_cross_entropy_triton", mutates_args=())
def _fused_linear_cross_entropy_triton(
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
    splits: int | None,
    filter_eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced loss (``hidden``'s dtype) and ``(2, N)`` row statistics (``log s``, shift ``m``)."""
    num_rows, hidden_size = hidden.shape
    num_classes = weight.shape[0]
    device = hidden.device
    work = _work_dtype(weight)
    target = target.contiguous()
    valid, class_weight, w_y, weight_total = _class_weights(target, class_weight, ignore_index, num_classes, work)
    block_m, block_n, block_k, warps = _blocks(hidden.dtype)
    if splits is None:
        splits = default_splits(num_rows, num_classes, block_m, block_n, device)
    tiles_per_split = triton.cdiv(triton.cdiv(num_classes, block_n), splits)
    smoothing = label_smoothing > 0
    parts = torch.empty((3, splits, num_rows), dtype=work, device=device)
    part_shift, part_log_s, part_target = parts[0], parts[1], parts[2]
    # Σ_{c∈s} w_c (z_c − m_s) and W_s per range in float64 (beyond fp32's range for rows near ±3e38)
    smooth_parts = torch.empty((2, splits, num_rows), dtype=torch.float64, device=device) if smoothing else None
    part_smooth, part_weight = (smooth_parts[0], smooth_parts[1]) if smoothing else (part_log_s, part_log_s)
    scalars = _scalars(work, label_smoothing, temperature, softcap, z_loss, part_log_s)
    if num_rows > 0:
        wrap_triton(_fused_lce_fwd_kernel)[(triton.cdiv(num_rows, block_m), splits)](
            hidden, weight, _or(bias, part_log_s), target, _or(class_weight, part_log_s),
            part_shift, part_log_s, part_target, part_smooth, part_weight,
            num_rows, num_classes, hidden_size, tiles_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ignore_index, *scalars,
            HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None, HAS_SMOOTHING=smoothing,
            HAS_SOFTCAP=softcap is not None, PARAMS_IN_MEMORY=work == torch.float64,
            IEEE=_ieee_dot(hidden.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )
    # combine the ranges in the shifted form: m = max_s m_s, log s = log Σ_s e^{(m_s − m) + log s_s}
    neg_inf = torch.full((), float("-inf"), dtype=work, device=device)
    top = torch.where(torch.isneginf(part_log_s), neg_inf, part_shift).amax(0)
    shift = torch.where(torch.isneginf(top), torch.zeros((), dtype=work, device=device), top)
    log_s = torch.logsumexp(part_log_s + (part_shift - shift), dim=0)
    z_target = part_target.sum(0)
    # the row loss combined in float64 and rounded once: at fp32 ``m − z_y``, ``Σ w (z − m)`` and ``LSE²`` can
    # overflow for logits near ±3e38 although the loss, scaled by (1−ε)w_y, ε/C and λ, fits
    wide = torch.float64
    wide_shift, wide_log_s = shift.to(wide), log_s.to(wide)
    loss = (1.0 - label_smoothing) * w_y.to(wide) * ((wide_shift - z_target.to(wide)) + wide_log_s)
    if smoothing:
        # Σ_c w_c (z_c − m) = Σ_s [Σ_{c∈s} w_c (z_c − m_s) + (m_s − m) W_s]; no Σ w z that could cancel
        moved = torch.where(part_weight != 0, (part_shift.to(wide) - wide_shift) * part_weight,
                            torch.zeros((), dtype=wide, device=device))
        weighted = (part_smooth + moved).sum(0)
        total = float(num_classes) if weight_total is None else weight_total[0].to(wide)
        loss = loss + (label_smoothing / num_classes) * (total * wide_log_s - weighted)
    if z_loss > 0:
        lse = wide_shift + wide_log_s
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros((), dtype=wide, device=device)).to(work)
    out = reduce_loss(loss, reduction, w_y.sum())
    return out, torch.stack((log_s, shift))  # the loss in the compute dtype: the caller rounds it (or not)


@_fused_linear_cross_entropy_triton.register_fake
def _(hidden, weight, bias, target, class_weight, ignore_index, reduction, *args):
    num_rows = hidden.shape[0]
    loss = hidden.new_empty((num_rows,) if reduction == "none" else (), dtype=_work_dtype(weight))
    return loss, hidden.new_empty((2, num_rows), dtype=_work_dtype(weight))


@_define_op("softmaxkit::fused_linear_cross_entropy_triton_backward", mutates_args=())
def _fused_linear_cross_entropy_triton_backward(
    grad_output: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    stats: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    temperature: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    accumulation_dtype: torch.dtype | None,
    filter_eps: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂h, ∂W, ∂b)`` in the inputs' dtypes (a fresh ``(0,)`` tensor where not wanted), logits recomputed
    tile by tile from the row statistics of the forward."""
    num_rows, hidden_size = hidden.shape
    num_classes = weight.shape[0]
    device = hidden.device
    log_s, shift = stats[0].contiguous(), stats[1].contiguous()
    work = log_s.dtype
    target = target.contiguous()
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    valid, class_weight, w_y, weight_total = _class_weights(target, class_weight, ignore_index, num_classes, work)
    # the row scale s_i on the device: no .item(), graph-capturable
    scale = row_scale(grad_output.to(work), reduction, num_rows, w_y.sum(), valid).contiguous()
    accumulation = accumulation_dtype or work
    grad_hidden = torch.zeros((num_rows, hidden_size), dtype=work, device=device) if needs[0] else None
    grad_weight = torch.zeros((num_classes, hidden_size), dtype=accumulation, device=device) if needs[1] else None
    grad_bias = torch.zeros(num_classes, dtype=accumulation, device=device) if needs[2] else None
    block_m, block_n, block_k, warps = _blocks(hidden.dtype, backward=True)
    if num_rows > 0 and any(needs):
        wrap_triton(_fused_lce_bwd_kernel)[(triton.cdiv(num_rows, block_m), triton.cdiv(num_classes, block_n))](
            hidden, weight, _or(bias, log_s), target, _or(class_weight, log_s), _or(weight_total, log_s),
            shift, log_s, scale,
            _or(grad_hidden, log_s), _or(grad_weight, log_s), _or(grad_bias, log_s),
            num_rows, num_classes, hidden_size,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ignore_index, *_scalars(work, label_smoothing, temperature, softcap, z_loss, log_s),
            float(filter_eps or 0.0),
            HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None,
            HAS_SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=softcap is not None,
            NEED_HIDDEN=needs[0], NEED_WEIGHT=needs[1], NEED_BIAS=needs[2], HAS_FILTER=filter_eps is not None,
            PARAMS_IN_MEMORY=work == torch.float64, IEEE=_ieee_dot(hidden.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )
    # a fresh (0,) tensor per missing gradient: a custom op's outputs may not alias each other
    return (
        hidden.new_empty((0,)) if grad_hidden is None else grad_hidden.to(hidden.dtype),
        hidden.new_empty((0,)) if grad_weight is None else grad_weight.to(weight.dtype),
        hidden.new_empty((0,)) if grad_bias is None else grad_bias.to(bias.dtype),
    )


@_fused_linear_cross_entropy_triton_backward.register_fake
def _(grad_output, hidden, weight, bias, target, class_weight, stats, *args):
    need_hidden, need_weight, need_bias = args[-3:]
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty((0,)),
        weight.new_empty(weight.shape) if need_weight else hidden.new_empty((0,)),
        bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight, *scalars = inputs
    ctx.scalars = tuple(scalars[:8])  # ignore_index … accumulation_dtype
    ctx.filter_eps = scalars[9]
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, stats)


def _backward(ctx, grad_output, *unused):
    refuse_double_backward()
    if grad_output is None:
        return (None,) * 15
    hidden, weight, bias, target, class_weight, stats = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    grads = torch.ops.softmaxkit.fused_linear_cross_entropy_triton_backward(
        grad_output, hidden, weight, bias, target, class_weight, stats, *ctx.scalars, ctx.filter_eps, *needs
    )
    return (*(g if wanted else None for g, wanted in zip(grads, needs)), *(None,) * 12)


_fused_linear_cross_entropy_triton.register_autograd(_backward, setup_context=_setup_context)


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
        A scalar for ``"mean"``/``"sum"``, ``(N,)`` for ``"none"``, in the compute dtype (fp32 for fp16/bf16
        inputs), as every backend returns it: :func:`softmaxkit.linear_cross_entropy` rounds it to the
        inputs' dtype, or keeps it fp32 under autocast (``F.cross_entropy``'s rule).
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
    args = (hidden, weight, bias, target, class_weight, *config.op_args(), config.accumulation_dtype, splits,
            None if filter_eps is None else float(filter_eps))
    if hidden.is_cuda:  # Triton launches on the current device: make it the tensors' one
        with torch.cuda.device(hidden.device):
            loss, _ = torch.ops.softmaxkit.fused_linear_cross_entropy_triton(*args)
    else:
        loss, _ = torch.ops.softmaxkit.fused_linear_cross_entropy_triton(*args)
    return loss
