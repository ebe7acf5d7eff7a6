r"""CPU fast path of the vocab-parallel cross-entropy (:mod:`softmaxkit.distributed`): the C kernel's rows.

Each process holds classes ``[o, o + C_r)`` of every row. The forward is three steps, with one collective:

1. one kernel call over the process's whole slice (rows split over threads) computes the local statistics
   in one visit of each row (read from memory once, as the one-process kernel): the local shift
   ``m_r = max z``, ``s_r = Σ exp(z − m_r)``, the target logit where this process owns the target and
   ``Σ w (z − m_r)`` when smoothing; when a gradient will follow and its scale is known (``"mean"``/``"sum"``)
   it also writes ``e = exp(z − m_r)`` into the gradient buffer;
2. one all-gather (float64, 3–4 numbers per row and process) brings every process's
   ``(m_r, s_r, z_y, Σ w (z − m_r))``, and each process combines them in rank order (so all get the same
   bits): the shift ``m = max_r m_r``, ``S = Σ_r s_r e^{m_r − m}``, ``Σ_r [Σ w (z − m_r) + (m_r − m)
   Σ_{c∈r} w_c]``, hence the loss;
3. a second kernel call turns ``e`` into this process's slice of the gradient in place,
   ``g = s[(A + 2λ LSE) e·e^{m_r − m}/S − (ε/C) w − (1−ε) w_y δ_y]`` (no second ``exp``).

Backward returns that buffer (times the upstream gradient unless it is 1). One collective per call, not one
per chunk of rows: the processes never wait for each other in the middle of the work, which on a loaded
machine (a rank descheduled for a few milliseconds) costs more than the second pass over the gradient
buffer saves. Where ``e`` does not fit the gradient buffer (soft-capping keeps ``dz/dx`` too; fp16/bf16
keep fp32 ``e``), with ``"none"`` (the upstream gradient is known only in backward) or for a forward
without gradient, the gradient is built chunk by chunk from the saved global ``m`` and ``log S``: the local
statistics call again into a cache-sized buffer (:data:`KEEP_BYTES`, no collectives), then the gradient
call, with non-temporal stores into the fresh gradient.
"""

from __future__ import annotations

import ctypes

import torch

from ..._core import CrossEntropyOptions, compute_dtype
from ..._core.autograd import saved_gradient_times, strict_once_differentiable
from ..._core.linear import _Rows, combine_row_statistics, upstream_scale
from ..._core.rows import plus_inf_row_nan, row_coefficients, row_loss
from ..._reduction import reduce_loss
from . import _build, row_workers, run_row_ranges
from .cross_entropy import _FLAG_STATS, _FLAG_STREAM, _STREAM_MIN_BYTES, _SUFFIX, _function, new_gradient

_FLAG_KEEP = 8
#: bytes of fp32 per chunk of rows where the gradient is recomputed (soft-cap, fp16/bf16, ``"none"``): the kept
#: ``exp(z − m_r)`` of a chunk is read back at once, so it should stay in cache
KEEP_BYTES = 8 << 20
_grad_functions: dict[str, object] = {}


def _grad_function(dtype: torch.dtype):
    suffix = _SUFFIX[dtype]
    if suffix not in _grad_functions:
        function = getattr(_build.load(suffix), f"skce_vp_grad_{suffix}")
        pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        function.argtypes = [pointer, pointer, i64, i64, i64, f64, f64, pointer, pointer, pointer, pointer,
                             pointer, pointer, i64, i64]
        function.restype = None
        _grad_functions[suffix] = function
    return _grad_functions[suffix]


def chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, else :data:`KEEP_BYTES` of fp32 over the total ``C`` (the same on every
    process; each process keeps ``C_r / C`` of that)."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(num_rows, 1)))
    return max(1, min(max(num_rows, 1), KEEP_BYTES // (4 * max(num_classes, 1))))


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class _Kernel:
    """The per-call constants of the two kernel calls over one ``(N, C_r)`` slice."""

    def __init__(self, logits: torch.Tensor, rows: _Rows, options: CrossEntropyOptions):
        self.logits, self.options = logits, options
        self.num_rows, self.local_classes = logits.shape
        self.work = compute_dtype(logits.dtype)
        # the kernel's stats pass reads z_y where the target is "valid": here, where this process owns it
        self.stats_target = torch.where(rows.owned, rows.local_target, -1).contiguous()
        self.weight = None if rows.class_weight is None else rows.class_weight.contiguous()
        self.stats = _function(logits.dtype)
        self.grad = _grad_function(logits.dtype)
        self.stride = self.local_classes * (2 if options.softcap is not None else 1)

    def local_stats(self, sl: slice, kept: torch.Tensor | None, row_stats, z_target, weighted, lse) -> None:
        """Kernel stats call over the rows ``sl`` (threads split them), keeping ``e`` in ``kept``'s rows
        (counted from ``sl.start``) unless it is None."""
        options, eps = self.options, self.options.label_smoothing
        x = self.logits
        arguments = (
            x.data_ptr(), x.stride(0), self.stats_target.data_ptr(), _pointer(self.weight),
        )
        tail = (self.local_classes, -1, float(eps), float(options.inv_temperature), float(options.z_loss),
                float(options.softcap or 0.0), 0.0, _FLAG_STATS | (0 if kept is None else _FLAG_KEEP),
                lse.data_ptr(), z_target.data_ptr(),
                _pointer(weighted), None, None, 0)
        workers = row_workers(sl.stop - sl.start, self.local_classes)
        row_stats_pointer = row_stats.data_ptr()

        def call(worker: int, start: int, stop: int) -> None:
            self.stats(*arguments, sl.start + start, sl.start + stop, *tail,
                       None if kept is None else kept[start].data_ptr(), row_stats_pointer)

        run_row_ranges(call, sl.stop - sl.start, workers)

    def local_grad(self, sl: slice, kept: torch.Tensor, factor, smooth, target_coefficient, scale,
                   grad: torch.Tensor) -> None:
        """Kernel gradient call over the chunk's rows, from the kept ``e``, into ``grad``'s rows."""
        options = self.options
        # a fresh, large gradient is streamed out; written over the kept e (in place) it is already cached
        in_place = kept.data_ptr() == grad.data_ptr()
        flags = _FLAG_STREAM if grad.numel() * grad.element_size() >= _STREAM_MIN_BYTES and not in_place else 0
        # every per-row array (and the gradient's rows) from the chunk's first row: the C rows are chunk rows
        target, scale, rows_of_grad = self.stats_target[sl], scale.contiguous(), grad[sl]
        head = (target.data_ptr(), _pointer(self.weight))
        middle = (self.local_classes, float(options.inv_temperature), float(options.softcap or 0.0),
                  factor.data_ptr(), _pointer(smooth), target_coefficient.data_ptr(), scale.data_ptr())
        workers = row_workers(sl.stop - sl.start, self.local_classes)

        def call(worker: int, start: int, stop: int) -> None:
            self.grad(*head, start, stop, *middle, kept[start].data_ptr(), rows_of_grad.data_ptr(),
                      rows_of_grad.stride(0), flags)

        run_row_ranges(call, sl.stop - sl.start, workers)


def _reported_shift(row_stats: torch.Tensor) -> torch.Tensor:
    """The local shift ``m_r`` of each row, ``−∞`` where the row has no finite logit here (``s_r = 0``; the
    kernel then shifted by 0): such a row must neither set the global shift nor scale its zero ``e``."""
    return torch.where(row_stats[:, 1] == 0, -torch.inf, row_stats[:, 0])


def _gradient_coefficients(kernel: _Kernel, rows: _Rows, sl: slice, scale, local_shift, row_max, log_sum):
    """Per-row ``factor``, ``smooth`` and target coefficient of the chunk's gradient (contiguous, work dtype).

    ``local_shift`` is :func:`_reported_shift` of the chunk."""
    options = kernel.options
    weights = rows.chunk(sl)
    row_coefficient, target_coefficient, smooth_coefficient = row_coefficients(
        scale, weights, row_max + log_sum, options, options.num_classes
    )
    # p = e^{z − m_r} · e^{m_r − m} / S; a +∞ logit makes the row NaN, as in PyTorch
    factor = row_coefficient * torch.exp(local_shift - row_max - log_sum) + plus_inf_row_nan(log_sum)
    target_coefficient = torch.where(rows.owned[sl], target_coefficient[:, 0], 0.0)
    return (factor.contiguous(), None if smooth_coefficient is None else smooth_coefficient.contiguous(),
            target_coefficient.contiguous())


def _recompute_grad(kernel: _Kernel, rows: _Rows, scale, row_max, log_sum, grad) -> None:
    """The gradient from the global ``m`` and ``log S`` chunk by chunk: the local statistics call again (the
    same ``e``, no collectives) into a cache-sized kept buffer, then the gradient call."""
    num_rows, work = kernel.num_rows, row_max.dtype
    lse = torch.empty(num_rows, dtype=work)
    row_stats = torch.empty((num_rows, 2), dtype=work)
    z_target = torch.empty(num_rows, dtype=work)
    weighted = torch.empty(num_rows, dtype=torch.float64) if kernel.options.label_smoothing > 0 else None
    step = chunk_rows(num_rows, kernel.options.num_classes, kernel.options.chunk_size)
    kept = torch.empty((min(step, num_rows), kernel.stride), dtype=work)
    for start in range(0, num_rows, step):
        sl = slice(start, min(start + step, num_rows))
        kernel.local_stats(sl, kept, row_stats, z_target, weighted, lse)
        factor, smooth, target_coefficient = _gradient_coefficients(
            kernel, rows, sl, scale[sl], _reported_shift(row_stats[sl]), row_max[sl], log_sum[sl])
        kernel.local_grad(sl, kept, factor, smooth, target_coefficient, scale[sl], grad)


class CpuVocabParallelCrossEntropy(torch.autograd.Function):
    """:class:`softmaxkit._core.linear.VocabParallelCrossEntropy` on the C kernel (same ``apply`` arguments).

    ``logits`` must be a CPU tensor of a kernel dtype with unit class stride (the dispatch table checks).
    """

    @staticmethod
    def forward(ctx, logits, target, class_weight, options: CrossEntropyOptions, reduce):
        num_rows, local_classes = logits.shape
        work = compute_dtype(logits.dtype)
        rows = _Rows(target, class_weight, options, local_classes, work, reduce)
        kernel = _Kernel(logits, rows, options)
        eps = options.label_smoothing
        fused = ctx.needs_input_grad[0] and options.reduction != "none" and local_classes > 0
        scale = rows.scale(options.reduction).contiguous() if fused else None
        grad = new_gradient((num_rows, local_classes), logits.dtype) if fused else None
        # e = exp(z − m_r) kept in the gradient buffer itself, then turned into the gradient in place; under
        # soft-capping (e and dz/dx) or for fp16/bf16 (e is fp32) it does not fit there: recomputed by chunks
        in_place = fused and options.softcap is None and logits.dtype == work

        lse = torch.empty(num_rows, dtype=work)
        row_stats = torch.empty((num_rows, 2), dtype=work)
        z_target = torch.zeros(num_rows, dtype=work)
        weighted = torch.zeros(num_rows, dtype=torch.float64) if eps > 0 else None
        everything = slice(0, num_rows)
        kernel.local_stats(everything, grad if in_place else None, row_stats, z_target, weighted, lse)
        local_weight_total = (float(local_classes) if class_weight is None
                              else rows.class_weight.sum(dtype=torch.float64))
        # the one collective of the rows
        shift, total, z_y, weighted_sum = combine_row_statistics(
            reduce, _reported_shift(row_stats), row_stats[:, 1], z_target, weighted, local_weight_total)
        row_max = shift.to(work)
        log_sum = total.log().to(work)
        loss = row_loss(row_max, log_sum, z_y, weighted_sum, rows.chunk(everything), options, options.num_classes)
        if in_place:
            factor, smooth, target_coefficient = _gradient_coefficients(
                kernel, rows, everything, scale, _reported_shift(row_stats), row_max, log_sum)
            kernel.local_grad(everything, grad, factor, smooth, target_coefficient, scale, grad)
        elif fused:
            _recompute_grad(kernel, rows, scale, row_max, log_sum, grad)
        ctx.options, ctx.rows, ctx.fused = options, rows, fused
        if fused:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(logits, row_max, log_sum)
        return reduce_loss(loss, options.reduction, rows.denominator).to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        options, rows = ctx.options, ctx.rows
        if ctx.fused:
            return saved_gradient_times(ctx.saved_tensors[0], grad_output), None, None, None, None
        logits, row_max, log_sum = ctx.saved_tensors
        num_rows, local_classes = logits.shape
        grad = new_gradient((num_rows, local_classes), logits.dtype)
        if local_classes == 0:
            return grad, None, None, None, None
        grad_output = grad_output.to(row_max.dtype)
        scale = upstream_scale(rows, options.reduction, grad_output)
        _recompute_grad(_Kernel(logits, rows, options), rows, scale.contiguous(), row_max, log_sum, grad)
        return grad, None, None, None, None


def cpu_vocab_parallel_cross_entropy(logits, target, class_weight, options: CrossEntropyOptions, reduce):
    """The dispatch table's ``cpu`` entry of ``vocab_parallel_cross_entropy``."""
    return CpuVocabParallelCrossEntropy.apply(logits, target, class_weight, options, reduce)
