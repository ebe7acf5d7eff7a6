r"""CPU fast path of :func:`softmaxkit.cross_entropy`: a fused C kernel, rows split over threads.

Per row the kernel reads the logits once from memory (max, then ``Σ exp`` and the target logit while the
row is still in cache) and, when a gradient will be needed, writes

.. math:: g_{ij} = s_i\big[(A_i + 2λ\,\mathrm{LSE}_i)\,p_{ij} − (ε/C)\,w_j − (1−ε)\,w_{y_i}δ_{j y_i}\big]
          \,\frac{∂z_{ij}}{∂x_{ij}}

in the same visit, so forward + backward moves ``N·C`` elements in and ``N·C`` out: one gradient-sized
allocation and no other full-size temporary. ``s_i`` is the row's share of the upstream gradient (``1/Σw_y``
for ``"mean"``), ``A_i = (1−ε)w_{y_i} + (ε/C)Σ_c w_c``. When the upstream gradient is not known in forward
(``reduction="none"``) or ``inplace_backward`` is asked for, the gradient pass runs in backward instead
(into the logits buffer for ``inplace_backward``).

fp16/bf16 logits are computed in fp32, float64 in float64; the gradient is rounded once to the logits'
dtype. The C source is ``_cross_entropy.c``; :mod:`._build` compiles it on first use.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from ..._reduction import reduce_loss, row_scale
from .._autograd import strict_once_differentiable
from ..torch.cross_entropy import row_loss, row_weights
from . import _build, row_workers, run_row_ranges

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
_FLAG_STATS, _FLAG_GRAD, _FLAG_STREAM = 1, 2, 4
#: a gradient at least this large (and not written over the logits) is written with non-temporal stores:
#: it cannot stay in the caches anyway, and streaming skips reading each line before overwriting it
_STREAM_MIN_BYTES = 32 << 20
_functions: dict[str, object] = {}


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled CPU kernel for ``dtype`` can be used (builds it on the first call, then cached)."""
    return dtype in _SUFFIX and _build.load(_SUFFIX[dtype]) is not None


def supports(logits: torch.Tensor) -> bool:
    """Whether the kernel handles these logits: a CPU tensor of a supported dtype with unit class stride."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in _SUFFIX
        and logits.dim() == 2
        and (logits.stride(1) == 1 or logits.shape[1] <= 1)
        and available(logits.dtype)
    )


def _function(dtype: torch.dtype):
    suffix = _SUFFIX[dtype]
    if suffix not in _functions:
        library = _build.load(suffix)
        function = getattr(library, f"skce_rows_{suffix}")
        pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        function.argtypes = [
            pointer, i64, pointer, pointer, i64, i64, i64, i64,
            f64, f64, f64, f64, f64, i64,
            pointer, pointer, pointer, pointer, pointer, i64, pointer, pointer,
        ]
        function.restype = None
        _functions[suffix] = function
    return _functions[suffix]


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def _madvise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages over ``tensor``'s (not yet touched) memory.

    A fresh gradient-sized buffer is mostly page faults on first touch (4 KiB at a time); with 2 MiB pages
    there are 512× fewer (what torch's ``THP_MEM_ALLOC_ENABLE=1`` does for every allocation). Best effort:
    a no-op off Linux or where THP is disabled.
    """
    global _libc
    size = tensor.numel() * tensor.element_size()
    if size < 4 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (tensor.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        stop = (tensor.data_ptr() + size) & ~(_HUGE_PAGE - 1)
        _libc.madvise(start, stop - start, _MADV_HUGEPAGE)
    except (OSError, AttributeError):  # pragma: no cover - platform dependent
        pass


def new_gradient(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU buffer for a gradient, backed by huge pages where the OS allows."""
    buffer = torch.empty(shape, dtype=dtype)
    _madvise_huge_pages(buffer)
    return buffer


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def run_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    inv_temperature: float,
    z_loss: float,
    softcap: float | None,
    weight_total: float,
    flags: int,
    lse: torch.Tensor,
    row_stats: torch.Tensor,
    z_target: torch.Tensor | None,
    z_weighted_sum: torch.Tensor | None,
    scale: torch.Tensor | None,
    grad: torch.Tensor | None,
) -> None:
    """Call the kernel over all rows, split into contiguous row ranges across torch's thread count.

    ``target`` is int64 and contiguous; ``weight``, ``lse``, ``row_stats`` (``(N, 2)``: row max ``m`` and
    ``Σ exp(z − m)``), ``z_target``, ``z_weighted_sum`` and ``scale`` are contiguous in the compute dtype;
    ``grad`` has unit class stride (it may be ``logits`` itself).
    """
    num_rows, num_classes = logits.shape
    function = _function(logits.dtype)
    arguments = (
        _pointer(target), _pointer(weight), None, None, num_classes, ignore_index,
        float(label_smoothing), float(inv_temperature), float(z_loss), float(softcap or 0.0),
        float(weight_total), flags, _pointer(lse), _pointer(z_target), _pointer(z_weighted_sum),
        _pointer(scale), _pointer(grad), grad.stride(0) if grad is not None else 0,
    )
    if (grad is not None and grad.data_ptr() != logits.data_ptr()
            and grad.numel() * grad.element_size() >= _STREAM_MIN_BYTES):
        flags |= _FLAG_STREAM
    arguments = (*arguments[:11], flags, *arguments[12:])
    x_pointer, x_stride, stats_pointer = logits.data_ptr(), logits.stride(0), row_stats.data_ptr()
    workers = row_workers(num_rows, num_classes)
    scratch = None
    if flags & (_FLAG_STATS | _FLAG_GRAD) == _FLAG_STATS | _FLAG_GRAD:
        # one row of exp(z − m) (and dz/dx under softcap) per worker: cache-sized, not logits-sized
        scratch = torch.empty((workers, num_classes * (2 if softcap is not None else 1)), dtype=lse.dtype)

    def call(worker: int, start: int, stop: int) -> None:
        row = None if scratch is None else scratch[worker].data_ptr()
        function(x_pointer, x_stride, *arguments[:2], start, stop, *arguments[4:], row, stats_pointer)

    run_row_ranges(call, num_rows, workers)


class _CpuCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function of the CPU fast path (2-D logits, class-index targets)."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        temperature: float,
        z_loss: float,
        softcap: float | None,
        inplace_backward: bool,
        gradient_wanted: bool,
    ) -> torch.Tensor:
        num_rows, num_classes = logits.shape
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        eps = label_smoothing
        target = target.to(torch.int64).contiguous()
        valid, _, weight, w_y, weight_total_tensor = row_weights(target, weight, ignore_index, num_classes, work)
        weight = None if weight is None else weight.contiguous()
        weight_total = float(weight_total_tensor)
        denominator = w_y.sum()

        lse = torch.empty(num_rows, dtype=work)
        row_stats = torch.empty((num_rows, 2), dtype=work)
        z_target = torch.empty(num_rows, dtype=work)
        z_weighted_sum = torch.empty(num_rows, dtype=work) if eps > 0 else None
        # Fuse the gradient pass into forward when it will be needed and its scale is known now.
        # (ctx.needs_input_grad is True under torch.no_grad() too, so the caller says whether a backward can
        # follow: grad mode on and logits requiring grad.)
        fused = gradient_wanted and reduction != "none" and not inplace_backward
        scale = grad = None
        flags = _FLAG_STATS
        if fused:
            scale = row_scale(torch.ones((), dtype=work), reduction, num_rows, denominator, valid).contiguous()
            grad = new_gradient((num_rows, num_classes), logits.dtype)
            flags |= _FLAG_GRAD
        run_rows(
            logits, target, weight, ignore_index, eps, 1.0 / temperature, z_loss, softcap, weight_total, flags,
            lse, row_stats, z_target, z_weighted_sum, scale, grad,
        )

        loss = row_loss(lse, z_target, z_weighted_sum, w_y, valid, weight_total_tensor, eps, num_classes, z_loss)
        out = reduce_loss(loss, reduction, denominator)

        ctx.save_for_backward(logits, target, lse, row_stats, weight, denominator, scale)
        ctx.grad = grad
        ctx.fused = fused
        ctx.options = (ignore_index, reduction, eps, temperature, z_loss, softcap, inplace_backward, weight_total)
        return out.to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, target, lse, row_stats, weight, denominator, fused_scale = ctx.saved_tensors
        ignore_index, reduction, eps, temperature, z_loss, softcap, inplace_backward, weight_total = ctx.options
        nones = (None,) * 10
        grad, ctx.grad = ctx.grad, None  # drop our reference, so autograd may keep the buffer without a copy
        if ctx.fused and grad is None:
            # A repeated backward (retain_graph=True): redo the fused pass, so the result is bitwise the same.
            grad = new_gradient(tuple(logits.shape), logits.dtype)
            run_rows(
                logits, target, weight, ignore_index, eps, 1.0 / temperature, z_loss, softcap, weight_total,
                _FLAG_STATS | _FLAG_GRAD, torch.empty_like(lse), torch.empty_like(row_stats), torch.empty_like(lse),
                torch.empty_like(lse) if eps > 0 else None, fused_scale, grad,
            )
        if grad is not None:
            # Gradient already written in forward for a unit upstream gradient: scale it if needed.
            # (.item() is free on CPU: no device to synchronise with.)
            if grad_output.item() != 1.0:
                grad.mul_(grad_output.to(lse.dtype))
            return (grad, *nones)

        work = lse.dtype
        valid = target != ignore_index
        scale = row_scale(grad_output.to(work), reduction, target.shape[0], denominator, valid).contiguous()
        if inplace_backward:
            grad = logits
            torch.autograd.graph.increment_version(logits)
        else:
            grad = new_gradient(tuple(logits.shape), logits.dtype)
        run_rows(
            logits, target, weight, ignore_index, eps, 1.0 / temperature, z_loss, softcap, weight_total,
            _FLAG_GRAD, lse, row_stats, None, None, scale, grad,
        )
        return (grad, *nones)


def cpu_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    temperature: float,
    z_loss: float,
    softcap: float | None,
    inplace_backward: bool,
) -> torch.Tensor:
    """Fused CPU cross-entropy of 2-D ``logits`` ``(N, C)`` and class indices ``target`` ``(N,)``.

    Arguments are already validated (see :func:`softmaxkit.cross_entropy`); the caller checks
    :func:`supports` first.
    """
    return _CpuCrossEntropyFunction.apply(
        logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
        inplace_backward, torch.is_grad_enabled() and logits.requires_grad,
    )
