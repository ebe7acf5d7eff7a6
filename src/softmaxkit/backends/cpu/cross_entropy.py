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
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd.function import once_differentiable

from ..._reduction import safe_divide
from . import _build

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
_FLAG_STATS, _FLAG_GRAD = 1, 2
#: rows below this many elements run on the calling thread (thread hand-off costs ~50 µs)
_PARALLEL_MIN_ELEMENTS = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_functions: dict[str, object] = {}


def available() -> bool:
    """Whether the compiled CPU kernel can be used (builds it on the first call, < 1 s, then cached)."""
    return _build.load() is not None


def supports(logits: torch.Tensor) -> bool:
    """Whether the kernel handles these logits: a CPU tensor of a supported dtype with unit class stride."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in _SUFFIX
        and logits.dim() == 2
        and (logits.stride(1) == 1 or logits.shape[1] <= 1)
        and available()
    )


def _function(dtype: torch.dtype):
    suffix = _SUFFIX[dtype]
    if suffix not in _functions:
        library = _build.load()
        function = getattr(library, f"skce_rows_{suffix}")
        pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        function.argtypes = [
            pointer, i64, pointer, pointer, i64, i64, i64, i64,
            f64, f64, f64, f64, f64, i64,
            pointer, pointer, pointer, pointer, pointer, i64,
        ]
        function.restype = None
        _functions[suffix] = function
    return _functions[suffix]


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != workers:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="softmaxkit-ce")
        _pool_size = workers
    return _pool


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
    z_target: torch.Tensor | None,
    z_weighted_sum: torch.Tensor | None,
    scale: torch.Tensor | None,
    grad: torch.Tensor | None,
) -> None:
    """Call the kernel over all rows, split into contiguous row ranges across torch's thread count.

    ``target`` is int64 and contiguous; ``weight``, ``lse``, ``z_target``, ``z_weighted_sum`` and ``scale``
    are contiguous in the compute dtype; ``grad`` has unit class stride (it may be ``logits`` itself).
    """
    num_rows, num_classes = logits.shape
    function = _function(logits.dtype)
    arguments = (
        _pointer(target), _pointer(weight), None, None, num_classes, ignore_index,
        float(label_smoothing), float(inv_temperature), float(z_loss), float(softcap or 0.0),
        float(weight_total), flags, _pointer(lse), _pointer(z_target), _pointer(z_weighted_sum),
        _pointer(scale), _pointer(grad), grad.stride(0) if grad is not None else 0,
    )
    x_pointer, x_stride = logits.data_ptr(), logits.stride(0)

    def call(start: int, stop: int) -> None:
        function(x_pointer, x_stride, *arguments[:2], start, stop, *arguments[4:])

    workers = min(_threads(), num_rows)
    if workers <= 1 or num_rows * num_classes < _PARALLEL_MIN_ELEMENTS:
        call(0, num_rows)
        return
    bounds = [num_rows * k // workers for k in range(workers + 1)]
    futures = [_executor(workers).submit(call, bounds[k], bounds[k + 1]) for k in range(1, workers)]
    call(bounds[0], bounds[1])  # the calling thread takes the first range
    for future in futures:
        future.result()


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
    ) -> torch.Tensor:
        num_rows, num_classes = logits.shape
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        eps = label_smoothing
        target = target.to(torch.int64).contiguous()
        valid = target != ignore_index
        if weight is not None:
            weight = weight.to(work).contiguous()
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            w_y = torch.where(valid, weight[safe_target], torch.zeros((), dtype=work))
            weight_total = float(weight.sum())
        else:
            w_y = valid.to(work)
            weight_total = float(num_classes)
        denominator = w_y.sum()

        lse = torch.empty(num_rows, dtype=work)
        z_target = torch.empty(num_rows, dtype=work)
        z_weighted_sum = torch.empty(num_rows, dtype=work) if eps > 0 else None
        # Fuse the gradient pass into forward when it will be needed and its scale is known now.
        fused = ctx.needs_input_grad[0] and reduction != "none" and not inplace_backward
        scale = grad = None
        flags = _FLAG_STATS
        if fused:
            scale = valid.to(work)
            if reduction == "mean":
                scale = safe_divide(scale, denominator)
            grad = torch.empty((num_rows, num_classes), dtype=logits.dtype)
            flags |= _FLAG_GRAD
        run_rows(
            logits, target, weight, ignore_index, eps, 1.0 / temperature, z_loss, softcap, weight_total, flags,
            lse, z_target, z_weighted_sum, scale, grad,
        )

        # ℓ_i = (1−ε) w_y (LSE − z_y) + (ε/C)(W·LSE − Σ_c w_c z_c) + λ LSE², 0 on ignored rows.
        loss = (1.0 - eps) * w_y * (lse - z_target)
        if eps > 0:
            loss = loss + (weight_total * lse - z_weighted_sum) * (eps / num_classes)
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if reduction == "mean":
            out = safe_divide(loss.sum(), denominator)
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss

        ctx.save_for_backward(logits, target, lse, weight, denominator)
        ctx.grad = grad
        ctx.options = (ignore_index, reduction, eps, temperature, z_loss, softcap, inplace_backward, weight_total)
        return out.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, target, lse, weight, denominator = ctx.saved_tensors
        ignore_index, reduction, eps, temperature, z_loss, softcap, inplace_backward, weight_total = ctx.options
        nones = (None,) * 9
        grad, ctx.grad = ctx.grad, None  # drop our reference, so autograd may keep the buffer without a copy
        if grad is not None:
            # Gradient already written in forward for a unit upstream gradient: scale it if needed.
            # (.item() is free on CPU: no device to synchronise with.)
            if grad_output.item() != 1.0:
                grad.mul_(grad_output.to(lse.dtype))
            return (grad, *nones)

        work = lse.dtype
        valid = target != ignore_index
        grad_output = grad_output.to(work)
        if reduction == "none":
            scale = grad_output * valid
        elif reduction == "mean":
            scale = safe_divide(grad_output, denominator).expand(target.shape[0]) * valid
        else:
            scale = grad_output.expand(target.shape[0]) * valid
        scale = scale.contiguous()
        if inplace_backward:
            grad = logits
            torch.autograd.graph.increment_version(logits)
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype)
        run_rows(
            logits, target, weight, ignore_index, eps, 1.0 / temperature, z_loss, softcap, weight_total,
            _FLAG_GRAD, lse, None, None, scale, grad,
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
        inplace_backward,
    )
