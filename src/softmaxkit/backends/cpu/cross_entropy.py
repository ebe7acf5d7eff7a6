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
import functools
import sys

import torch

from ..._core import CrossEntropyOptions, compute_dtype, constant_result, row_weights
from ..._core.autograd import refuse_double_backward, saved_gradient_times
from ..._core.rows import backward_rows, forward_rows, row_loss
from ..._reduction import reduce_loss, row_scale
from .._custom_op import cross_entropy_backward_ops
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


@constant_result
def _kernel_usable(variant: str) -> bool:
    """:func:`._build.usable` (a fact of the machine: torch.compile folds it to a constant, no trace of it)."""
    return _build.usable(variant)


def why_not(request) -> str | None:
    """The dispatch table's ``supports`` for the kernel: None if it may serve ``request``, else why not.

    Answers from facts only (device, dtype, layout, whether a library is cached or a compiler exists): it
    never builds. A build that then fails makes the op compute the same maths with torch ops.
    """
    if request.device != "cpu":
        return f"needs CPU tensors, got {request.device}"
    if not request.real_storage:
        return "needs plain CPU tensors with storage (not meta, fake, DTensor or another subclass)"
    if request.dtype not in _SUFFIX:
        return f"handles {', '.join(map(str, _SUFFIX))} logits, got {request.dtype}"
    if not request.unit_class_stride:
        return "needs logits whose class dimension has stride 1"
    if not _kernel_usable(_SUFFIX[request.dtype]):
        return "no C compiler or cached kernel library (or SOFTMAXKIT_CPU_KERNELS=0)"
    return None


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


def scratch_rows(workers: int, num_classes: int, softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
    """One row of ``exp(z − m)`` (and ``dz/dx`` under softcap) per worker for the fused stats + gradient visit:
    cache-sized, not logits-sized."""
    return torch.empty((workers, num_classes * (2 if softcap is not None else 1)), dtype=dtype)


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
    scratch: torch.Tensor | None = None,
) -> None:
    """Call the kernel over all rows, split into contiguous row ranges across torch's thread count.

    ``target`` is int64 and contiguous; ``weight``, ``lse``, ``row_stats`` (``(N, 2)``: row max ``m`` and
    ``Σ exp(z − m)``), ``z_target`` and ``scale`` are contiguous in the compute dtype, ``z_weighted_sum``
    (``Σ w (z − m)``) contiguous float64;
    ``grad`` has unit class stride (it may be ``logits`` itself). ``scratch``: the per-worker rows the fused
    stats + gradient visit needs (:func:`scratch_rows`), for a caller that makes many calls; else made here.
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
    if flags & (_FLAG_STATS | _FLAG_GRAD) != _FLAG_STATS | _FLAG_GRAD:
        scratch = None
    elif scratch is None or scratch.shape[0] < workers:
        scratch = scratch_rows(workers, num_classes, softcap, lse.dtype)

    def call(worker: int, start: int, stop: int) -> None:
        row = None if scratch is None else scratch[worker].data_ptr()
        function(x_pointer, x_stride, *arguments[:2], start, stop, *arguments[4:], row, stats_pointer)

    run_row_ranges(call, num_rows, workers)


# ---------------------------------------------------------------------------------------------------------
# The custom op ``softmaxkit::cross_entropy_cpu`` (forward) and its backward ops. Schema scalars are the
# options' :data:`~softmaxkit._core.CrossEntropyOptions.OP_FIELDS` (unpacked in one place, by
# :func:`cpu_cross_entropy`), then ``inplace_backward`` and ``fuse_gradient``.


def _kernel_ready(logits: torch.Tensor) -> bool:
    return _build.load(_SUFFIX[logits.dtype]) is not None


def _weight_total(weight: torch.Tensor | None, num_classes: int) -> float:
    """``Σ_c w_c`` as the C double the kernel takes: a read of a CPU tensor by the CPU kernel, never traced."""
    if weight is None:
        return float(num_classes)
    return weight.sum().tolist()


@torch.library.custom_op("softmaxkit::cross_entropy_cpu", mutates_args=(), device_types="cpu")
def _cross_entropy_cpu(
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
    fuse_gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, ``lse (N,)``, ``row_stats (N, 2)`` (``m`` and ``s``) and the fused gradient (or ``(0,)``).

    With ``fuse_gradient`` (a backward will follow, decided by the caller from grad mode and
    ``requires_grad``) and a scalar reduction, the gradient for a unit upstream gradient is written in the
    same visit of each row as the loss.
    """
    options = CrossEntropyOptions.from_op_args(
        ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size
    )
    num_rows, num_classes = logits.shape
    work = compute_dtype(logits.dtype)
    eps = label_smoothing
    fused = fuse_gradient and reduction != "none" and not inplace_backward
    if not _kernel_ready(logits):  # the build failed after all: the same maths in torch ops
        loss_rows, row_max, log_sum, rows = forward_rows(logits, target, weight, options)
        denominator = rows.w_y.sum()
        grad = logits.new_empty((0,))
        if fused:
            scale = row_scale(torch.ones((), dtype=work), reduction, num_rows, denominator, rows.valid)
            grad = backward_rows(scale, logits, rows, row_max, log_sum, options, new_gradient(logits.shape, logits.dtype))
        stats = torch.stack([row_max, log_sum.exp()], dim=1)
        return reduce_loss(loss_rows, reduction, denominator).to(logits.dtype), row_max + log_sum, stats, grad
    target = target.to(torch.int64).contiguous()
    rows = row_weights(target, weight, ignore_index, num_classes, work)
    weight = None if rows.weight is None else rows.weight.contiguous()
    denominator = rows.w_y.sum()
    lse = torch.empty(num_rows, dtype=work)
    row_stats = torch.empty((num_rows, 2), dtype=work)
    z_target = torch.empty(num_rows, dtype=work)
    # float64 for every dtype (the kernel accumulates it in double): beyond fp32's range for huge rows
    shifted_weighted_sum = torch.empty(num_rows, dtype=torch.float64) if eps > 0 else None
    scale, grad, flags = None, logits.new_empty((0,)), _FLAG_STATS
    if fused:
        scale = row_scale(torch.ones((), dtype=work), reduction, num_rows, denominator, rows.valid).contiguous()
        grad = new_gradient((num_rows, num_classes), logits.dtype)
        flags |= _FLAG_GRAD
    run_rows(
        logits, target, weight, ignore_index, eps, 1.0 / temperature, z_loss, softcap,
        _weight_total(weight, num_classes), flags, lse, row_stats, z_target, shifted_weighted_sum, scale,
        grad if fused else None,
    )
    loss = row_loss(row_stats[:, 0], row_stats[:, 1].log(), z_target, shifted_weighted_sum, rows, options,
                    num_classes)
    return reduce_loss(loss, reduction, denominator).to(logits.dtype), lse, row_stats, grad


@_cross_entropy_cpu.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, chunk_size,
      inplace_backward, fuse_gradient):
    num_rows, num_classes = logits.shape
    work = compute_dtype(logits.dtype)
    fused = fuse_gradient and reduction != "none" and not inplace_backward
    loss = logits.new_empty((num_rows,) if reduction == "none" else ())
    grad = logits.new_empty((num_rows, num_classes) if fused else (0,))
    return loss, logits.new_empty((num_rows,), dtype=work), logits.new_empty((num_rows, 2), dtype=work), grad


def _backward_into(grad, grad_output, logits, target, weight, lse, row_stats, options: CrossEntropyOptions):
    """The deferred gradient pass (``"none"``, or ``inplace_backward``) into ``grad``."""
    num_rows, num_classes = logits.shape
    work = lse.dtype
    target = target.to(torch.int64).contiguous()
    rows = row_weights(target, weight, options.ignore_index, num_classes, work)
    scale = row_scale(grad_output.to(work), options.reduction, num_rows, rows.w_y.sum(), rows.valid).contiguous()
    if not _kernel_ready(logits):
        log_sum = row_stats[:, 1].log()
        backward_rows(scale, logits, rows, row_stats[:, 0].contiguous(), log_sum, options, grad)
        return
    weight = None if rows.weight is None else rows.weight.contiguous()
    run_rows(
        logits, target, weight, options.ignore_index, options.label_smoothing, options.inv_temperature,
        options.z_loss, options.softcap, _weight_total(weight, num_classes), _FLAG_GRAD, lse, row_stats, None,
        None, scale, grad,
    )


_cross_entropy_backward_ops = cross_entropy_backward_ops(
    functools.partial(torch.library.custom_op, device_types="cpu"), "cross_entropy_cpu", ("lse", "row_stats"),
    _backward_into, lambda logits: new_gradient(tuple(logits.shape), logits.dtype),
)


def _setup_context(ctx, inputs, output):
    logits, target, weight, *scalars = inputs
    ctx.scalars = tuple(scalars[:7])
    ctx.inplace = scalars[7]
    _, lse, row_stats, grad = output
    ctx.mark_non_differentiable(lse, row_stats, grad)
    ctx.set_materialize_grads(False)  # no zero gradients built for the statistics outputs
    ctx.fused = grad.dim() == 2
    if ctx.fused:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, weight, lse, row_stats)


def _backward(ctx, grad_output, *unused):
    refuse_double_backward()
    if grad_output is None:  # the loss itself got no gradient (only statistics outputs were used)
        return (None,) * 12
    if ctx.fused:  # the gradient was written in forward for a unit upstream gradient
        return (saved_gradient_times(ctx.saved_tensors[0], grad_output), *(None,) * 11)
    logits, target, weight, lse, row_stats = ctx.saved_tensors
    if ctx.inplace:
        torch.ops.softmaxkit.cross_entropy_cpu_backward_(grad_output, logits, target, weight, lse, row_stats,
                                                         *ctx.scalars)
        return (logits, *(None,) * 11)
    grad = torch.ops.softmaxkit.cross_entropy_cpu_backward(grad_output, logits, target, weight, lse, row_stats,
                                                           *ctx.scalars)
    return (grad, *(None,) * 11)


torch.library.register_autograd("softmaxkit::cross_entropy_cpu", _backward, setup_context=_setup_context)
torch.library.register_autocast("softmaxkit::cross_entropy_cpu", "cpu", torch.float32)


def cpu_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, options: CrossEntropyOptions
) -> torch.Tensor:
    """Fused CPU cross-entropy of 2-D ``logits`` ``(N, C)`` and class indices ``target`` ``(N,)``.

    Arguments are already validated (see :func:`softmaxkit.cross_entropy`) and the dispatch table chose this
    path (:func:`why_not`). Whether to fuse the gradient into forward is decided here, outside the op: grad
    mode on and ``logits`` requiring a gradient. Eagerly, the fused gradient is returned as it is when the
    upstream gradient is 1 (the usual ``loss.backward()``): logits read once, gradient written once. A
    compiled backward cannot know the upstream value at trace time, so it scales the donated saved gradient
    in place (``_core.autograd.saved_gradient_times``), which does nothing for a unit upstream gradient.
    """
    fuse = torch.is_grad_enabled() and logits.requires_grad
    loss, *_ = torch.ops.softmaxkit.cross_entropy_cpu(
        logits, target, weight, *options.op_args(), options.inplace_backward, fuse
    )
    return loss
