r"""CPU fast path of :func:`softmaxkit.sparsemax`, :func:`~softmaxkit.entmax15` and their Fenchel-Young losses.

A C kernel (``_sparse.c``, built on first use by :mod:`._build`) solves each row's threshold in linear time
without a full sort: with ``m = max x`` the support lies in ``{x > m − 1}`` (sparsemax) or ``{x > m − 2}``
(1.5-entmax, ``p = [(x − τ)/2]_+²``); those few candidates are narrowed by lower bounds of ``τ`` (Michelot's
step; a Newton step and a Cauchy–Schwarz bound for 1.5-entmax), sorted, and ``τ`` is read off the sorted
closed form, which is exact on any superset of the support. Rows are split over torch's threads
(:func:`softmaxkit.backends.cpu.run_row_ranges`).

.. math:: \frac{∂p}{∂x} = \mathrm{diag}(s) − \frac{s s^⊤}{Σ_j s_j}\quad(s = 1[p > 0]\ \text{or}\ \sqrt p),
          \qquad \frac{∂ℓ_{FY}}{∂x} = w_y (p − e_y)

**Memory.** The maps save only their output ``p`` (forward + backward allocate ``p`` and the gradient: 2× the
input); the losses save nothing ``(N, C)`` besides the logits and a per-row ``(m, t)``, and backward
recomputes ``p`` into the gradient buffer. Scratch is one row per thread.

**Precision.** fp16/bf16 are solved in fp32 and rounded once; float64 stays float64. The maps' backward uses
the saved (rounded) output: in fp16 an entry whose probability is below 3e-8 (half of fp16's smallest
subnormal) rounds to 0 and is then outside the support the Jacobian sees.

**Non-finite rows** (a NaN, a +inf, or every entry −inf) have no threshold: their ``p``, loss and gradients
are NaN in every entry of the row (the PyTorch path gives NaN too, in entries that depend on its top-k order).

Used automatically for CPU tensors of a supported dtype; ``SOFTMAXKIT_CPU_KERNELS=0`` or a missing compiler
leave the PyTorch path (:mod:`softmaxkit.backends.torch.sparse`). Tests force that path by monkeypatching
:func:`available` to return False.
"""

from __future__ import annotations

import ctypes

import torch

from ..._reduction import reduce_loss, row_scale
from .._autograd import strict_once_differentiable
from ..torch.cross_entropy import row_weights
from ..torch.sparse import ENTMAX15, SPARSEMAX, work_dtype
from . import _build, row_workers, run_row_ranges
from .cross_entropy import new_gradient

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
_KIND = {SPARSEMAX: 0, ENTMAX15: 1}
_functions: dict[tuple[str, str], object] = {}

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    # x, ldx, start, stop, C, kind, scratch, row_stats, out, ldo, target, loss
    "forward": [_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _P],
    # p, ldp, g, ldg, grad, ldr, start, stop, C, kind
    "map_backward": [_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64],
    # x, ldx, row_stats, target, scale, grad, ldg, start, stop, C, kind
    "loss_backward": [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64],
}


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled kernel for ``dtype`` can be used (builds it on the first call, then cached)."""
    return dtype in _SUFFIX and _build.load(_SUFFIX[dtype], source="sparse") is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel handles these 2-D rows: a CPU tensor of a supported dtype (any strides)."""
    return x.device.type == "cpu" and x.dim() == 2 and x.dtype in _SUFFIX and available(x.dtype)


def _function(name: str, dtype: torch.dtype):
    suffix = _SUFFIX[dtype]
    if (name, suffix) not in _functions:
        function = getattr(_build.load(suffix, source="sparse"), f"sksp_{name}_{suffix}")
        function.argtypes = _SIGNATURES[name]
        function.restype = None
        _functions[name, suffix] = function
    return _functions[name, suffix]


def _unit_class_stride(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its classes are contiguous (any row stride), else a contiguous copy."""
    return tensor if tensor.stride(1) == 1 or tensor.shape[1] <= 1 else tensor.contiguous()


def _solve(x: torch.Tensor, kind: str, out: torch.Tensor | None, target: torch.Tensor | None):
    """Run the forward kernel over all rows of ``x`` (unit class stride): ``(row_stats, loss)``, where
    ``row_stats`` ``(N, 2)`` holds each row's ``(m, t)`` and ``loss`` ``(N,)`` its loss when ``target`` is
    given (else None); ``p`` goes into ``out`` when given."""
    num_rows, num_classes = x.shape
    work = work_dtype(x.dtype)
    row_stats = torch.empty((num_rows, 2), dtype=work)
    loss = torch.empty(num_rows, dtype=work) if target is not None else None
    if num_rows == 0:
        return row_stats, loss
    workers = row_workers(num_rows, num_classes)
    scratch = torch.empty((workers, max(num_classes, 1)), dtype=work)  # a candidate buffer per thread
    function = _function("forward", x.dtype)
    constant = (
        x.data_ptr(), x.stride(0), num_classes, _KIND[kind], row_stats.data_ptr(),
        None if out is None else out.data_ptr(), 0 if out is None else out.stride(0),
        None if target is None else target.data_ptr(), None if loss is None else loss.data_ptr(),
    )

    def call(worker: int, start: int, stop: int) -> None:
        function(*constant[:2], start, stop, *constant[2:4], scratch[worker].data_ptr(), *constant[4:])

    run_row_ranges(call, num_rows, workers)
    return row_stats, loss


class _CpuEntmaxFunction(torch.autograd.Function):
    """Sparsemax / 1.5-entmax of 2-D rows ``(N, C)`` by the C kernel; saves only the output ``p``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str) -> torch.Tensor:
        x = _unit_class_stride(x)
        out = new_gradient(tuple(x.shape), x.dtype)  # (huge pages where the OS allows: fewer first-touch faults)
        _solve(x, kind, out, None)
        ctx.kind = kind
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (p,) = ctx.saved_tensors
        num_rows, num_classes = p.shape
        grad_output = _unit_class_stride(grad_output.to(p.dtype))
        grad = new_gradient(tuple(p.shape), p.dtype)
        if num_rows:
            function = _function("map_backward", p.dtype)
            kind = _KIND[ctx.kind]

            def call(worker: int, start: int, stop: int) -> None:
                function(p.data_ptr(), p.stride(0), grad_output.data_ptr(), grad_output.stride(0), grad.data_ptr(),
                         grad.stride(0), start, stop, num_classes, kind)

            run_row_ranges(call, num_rows, row_workers(num_rows, num_classes))
        return grad, None


class _CpuFenchelYoungFunction(torch.autograd.Function):
    r"""The sparsemax / 1.5-entmax Fenchel-Young loss of 2-D logits ``(N, C)`` by the C kernel.

    Per row ``ℓ = w_y [(1 + ‖p‖²)/2 − (x_y − τ)]`` (sparsemax) or ``w_y [(2/3)Σ p^{3/2} + 4/3 − (x_y − τ)]``
    (1.5-entmax), 0 where ignored; forward keeps the logits and each row's ``(m, t)``, backward writes
    ``w_y·g·(p − e_y)`` recomputing ``p``. Weights, ``ignore_index`` and reductions as
    :class:`softmaxkit.backends.torch.sparse._FenchelYoungFunction`.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        target: torch.Tensor,
        kind: str,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
    ) -> torch.Tensor:
        x = _unit_class_stride(x)
        work = work_dtype(x.dtype)
        valid, safe_target, _, w_y, _ = row_weights(target, weight, ignore_index, x.shape[1], work)
        safe_target = safe_target.contiguous()
        row_stats, row = _solve(x, kind, None, safe_target)
        # A target class with probability 0 and logit −inf has infinite loss; an ignored row has none.
        loss = torch.where(valid, w_y * row, torch.zeros((), dtype=work))
        denominator = w_y.sum()
        out = reduce_loss(loss, reduction, denominator)
        ctx.save_for_backward(x, row_stats, safe_target, w_y, denominator)
        ctx.kind, ctx.reduction = kind, reduction
        return out.to(x.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, row_stats, target, w_y, denominator = ctx.saved_tensors
        num_rows, num_classes = x.shape
        scale = row_scale(grad_output.to(w_y.dtype), ctx.reduction, num_rows, denominator, w_y).contiguous()
        grad = new_gradient(tuple(x.shape), x.dtype)
        if num_rows:
            function = _function("loss_backward", x.dtype)
            kind = _KIND[ctx.kind]

            def call(worker: int, start: int, stop: int) -> None:
                function(x.data_ptr(), x.stride(0), row_stats.data_ptr(), target.data_ptr(), scale.data_ptr(),
                         grad.data_ptr(), grad.stride(0), start, stop, num_classes, kind)

            run_row_ranges(call, num_rows, row_workers(num_rows, num_classes))
        return grad, None, None, None, None, None


def cpu_entmax(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Sparsemax (``kind="sparsemax"``) or 1.5-entmax (``"entmax15"``) of 2-D rows ``x`` ``(N, C)`` along the
    last dim; the caller checks :func:`supports` first."""
    return _CpuEntmaxFunction.apply(x, kind)


def cpu_fenchel_young(
    x: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """The Fenchel-Young loss of ``kind`` for 2-D logits ``(N, C)`` and class indices ``(N,)``; arguments are
    already validated (see :func:`softmaxkit.sparsemax_loss`) and the caller checks :func:`supports` first."""
    return _CpuFenchelYoungFunction.apply(x, target, kind, weight, ignore_index, reduction)
