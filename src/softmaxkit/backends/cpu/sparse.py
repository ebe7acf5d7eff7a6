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

**Precision.** fp16/bf16 are computed in fp32 and rounded once; float64 stays float64. The threshold is solved
in float64 for every dtype (the sums over up to ``C`` near-equal candidates, ``τ`` itself and the loss), so a
wide near-uniform fp32 row still sums to 1 within a few fp32 ulps; the output pass subtracts ``τ`` as two
fp32 halves and stays vectorised. The maps' backward sums in float64 and uses
the saved (rounded) output: in fp16 an entry whose probability is below 3e-8 (half of fp16's smallest
subnormal) rounds to 0 and is then outside the support the Jacobian sees.

**Non-finite rows** (a NaN, a +inf, or every entry −inf) have no threshold: their ``p``, loss and gradients
are NaN in every entry of the row (the PyTorch path gives NaN too, in entries that depend on its top-k order).

**Custom ops.** ``torch.ops.softmaxkit.sparse_map_cpu`` / ``sparse_map_backward_cpu`` (the maps) and
``fenchel_young_cpu`` / ``fenchel_young_backward_cpu`` (the losses), each with a fake kernel (shapes only:
FakeTensorMode, meta tensors, ``torch.compile`` and ``torch.export`` never hand a pointer to C) and the
autograd of :mod:`softmaxkit.backends._custom_op`. The forward/backward run no host synchronisation.

Chosen by the dispatch table (``backends/__init__.py``, :func:`supports`) for CPU tensors of a supported
dtype; ``SOFTMAXKIT_CPU_KERNELS=0`` or a missing compiler leave the PyTorch path
(:mod:`softmaxkit.backends.torch.sparse`). Tests force that path with ``impl="torch"`` or by monkeypatching
:func:`available` to return False.
"""

from __future__ import annotations

import ctypes

import torch

from ..._core import ENTMAX15, SPARSEMAX, row_weights
from ..._core import compute_dtype as work_dtype
from ..._reduction import reduce_loss, row_scale
from .._custom_op import differentiable, once_differentiable
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


def supports(request) -> str | None:
    """The dispatch table's question (no side effects: nothing is built): None when the C kernel can serve a
    call described by ``request`` (:class:`softmaxkit.backends.Request`), else why not."""
    if request.device != "cpu":
        return f"needs CPU tensors, got {request.device}"
    if request.dtype not in _SUFFIX:
        return f"needs float32, float64, bfloat16 or float16, got {request.dtype}"
    if request.has("subclass"):
        return "needs plain tensors (not a tensor subclass such as DTensor)"
    if not _build.usable(_SUFFIX[request.dtype], "sparse"):
        return "the C kernel cannot be built here (SOFTMAXKIT_CPU_KERNELS=0 or no C compiler)"
    return None


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
    ``row_stats`` ``(N, 2)`` float64 holds each row's ``(m, t)`` and ``loss`` ``(N,)`` its loss when ``target``
    is given (else None); ``p`` goes into ``out`` when given."""
    num_rows, num_classes = x.shape
    work = work_dtype(x.dtype)
    row_stats = torch.empty((num_rows, 2), dtype=torch.float64)
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


def _check_kernel(x: torch.Tensor, kind: str) -> None:
    """The op's real kernel runs on plain CPU tensors only (fake and meta tensors get the fake kernel)."""
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or x.device.type != "cpu" or x.dtype not in _SUFFIX or kind not in _KIND:
        raise TypeError(
            f"the softmaxkit CPU sparse kernels take plain CPU tensors of dtype float32, float64, bfloat16 or "
            f"float16 and kind 'sparsemax' or 'entmax15', but got a {type(x).__name__} on {x.device} of dtype "
            f"{x.dtype} and kind {kind!r}"
        )
    if not available(x.dtype):
        raise RuntimeError(f"the softmaxkit CPU sparse kernel is not available: {_build.failure_reason}")


# ----------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("softmaxkit::sparse_map_cpu", mutates_args=(), device_types="cpu")
def _map_op(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Sparsemax / 1.5-entmax (``kind``) of 2-D rows ``x`` ``(N, C)`` by the C kernel (any row stride)."""
    _check_kernel(x, kind)
    x = _unit_class_stride(x)
    out = new_gradient(tuple(x.shape), x.dtype)  # (huge pages where the OS allows: fewer first-touch faults)
    _solve(x, kind, out, None)
    return out


@_map_op.register_fake
def _map_fake(x, kind):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("softmaxkit::sparse_map_backward_cpu", mutates_args=(), device_types="cpu")
def _map_backward_op(p: torch.Tensor, grad_output: torch.Tensor, kind: str) -> torch.Tensor:
    """``s ⊙ (g − Σ s g / Σ s)`` from the saved output ``p`` (``s = 1[p > 0]`` or ``√p``), by the C kernel."""
    _check_kernel(p, kind)
    num_rows, num_classes = p.shape
    p = _unit_class_stride(p)
    grad_output = _unit_class_stride(grad_output.to(p.dtype))
    grad = new_gradient(tuple(p.shape), p.dtype)
    if num_rows:
        function = _function("map_backward", p.dtype)
        code = _KIND[kind]

        def call(worker: int, start: int, stop: int) -> None:
            function(p.data_ptr(), p.stride(0), grad_output.data_ptr(), grad_output.stride(0), grad.data_ptr(),
                     grad.stride(0), start, stop, num_classes, code)

        run_row_ranges(call, num_rows, row_workers(num_rows, num_classes))
    return grad


@_map_backward_op.register_fake
def _map_backward_fake(p, grad_output, kind):
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _map_setup(ctx, inputs, output):
    ctx.kind = inputs[1]
    ctx.save_for_backward(output)


def _map_backward(ctx, grad_output):
    (p,) = ctx.saved_tensors
    return _MapBackward(p, grad_output, ctx.kind), None


_MapFunction = differentiable(_map_op, _map_setup, _map_backward)
_MapBackward = once_differentiable(_map_backward_op)


@torch.library.custom_op("softmaxkit::fenchel_young_cpu", mutates_args=(), device_types="cpu")
def _loss_op(
    x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, kind: str,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(loss, row_stats)``: the sparsemax / 1.5-entmax Fenchel-Young loss of 2-D logits ``(N, C)`` by the C
    kernel, and each row's float64 ``(m, t)`` ``(N, 2)`` for the backward.

    Per row ``ℓ = w_y [(1 + ‖p‖²)/2 − (x_y − τ)]`` (sparsemax) or ``w_y [(2/3)Σ p^{3/2} + 4/3 − (x_y − τ)]``
    (1.5-entmax), 0 where ignored; the loss is ``()`` for ``"mean"`` / ``"sum"``, ``(N,)`` for ``"none"``.
    """
    _check_kernel(x, kind)
    x = _unit_class_stride(x)
    work = work_dtype(x.dtype)
    valid, safe_target, _, w_y, _ = row_weights(target, weight, ignore_index, x.shape[1], work)
    row_stats, row = _solve(x, kind, None, safe_target.contiguous())
    # A target class with probability 0 and logit −inf has infinite loss; an ignored row has none.
    loss = torch.where(valid, w_y * row, torch.zeros((), dtype=work))
    return reduce_loss(loss, reduction, w_y.sum()).to(x.dtype), row_stats


@_loss_op.register_fake
def _loss_fake(x, target, weight, ignore_index, kind, reduction):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else ())
    return loss, x.new_empty((x.shape[0], 2), dtype=torch.float64)


@torch.library.custom_op("softmaxkit::fenchel_young_backward_cpu", mutates_args=(), device_types="cpu")
def _loss_backward_op(
    grad_output: torch.Tensor, x: torch.Tensor, row_stats: torch.Tensor, target: torch.Tensor,
    weight: torch.Tensor | None, ignore_index: int, kind: str, reduction: str,
) -> torch.Tensor:
    """``scale_i (p − e_y)`` with ``p`` recomputed from the logits and each row's ``(m, t)``, by the C kernel."""
    _check_kernel(x, kind)
    x = _unit_class_stride(x)
    num_rows, num_classes = x.shape
    work = work_dtype(x.dtype)
    _, safe_target, _, w_y, _ = row_weights(target, weight, ignore_index, num_classes, work)
    safe_target = safe_target.contiguous()
    scale = row_scale(grad_output.to(work), reduction, num_rows, w_y.sum(), w_y).contiguous()
    row_stats = row_stats.contiguous()
    grad = new_gradient(tuple(x.shape), x.dtype)
    if num_rows:
        function = _function("loss_backward", x.dtype)
        code = _KIND[kind]

        def call(worker: int, start: int, stop: int) -> None:
            function(x.data_ptr(), x.stride(0), row_stats.data_ptr(), safe_target.data_ptr(), scale.data_ptr(),
                     grad.data_ptr(), grad.stride(0), start, stop, num_classes, code)

        run_row_ranges(call, num_rows, row_workers(num_rows, num_classes))
    return grad


@_loss_backward_op.register_fake
def _loss_backward_fake(grad_output, x, row_stats, target, weight, ignore_index, kind, reduction):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    x, target, weight, ignore_index, kind, reduction = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.options = (ignore_index, kind, reduction)
    ctx.save_for_backward(x, output[1], target, weight)


def _loss_backward(ctx, grad_loss, grad_row_stats):
    x, row_stats, target, weight = ctx.saved_tensors
    grad = _LossBackward(grad_loss, x, row_stats, target, weight, *ctx.options)
    return grad, None, None, None, None, None


_LossFunction = differentiable(_loss_op, _loss_setup, _loss_backward)
_LossBackward = once_differentiable(_loss_backward_op)


def cpu_entmax(
    x: torch.Tensor, kind: str, alpha_rows: torch.Tensor | None = None, scalar_alpha: float | None = None,
    n_iter: int = 0,
) -> torch.Tensor:
    """Sparsemax (``kind="sparsemax"``) or 1.5-entmax (``"entmax15"``) of 2-D rows ``x`` ``(N, C)`` along the
    last dim through ``torch.ops.softmaxkit.sparse_map_cpu`` (the α arguments are not used: the dispatch
    table's common signature)."""
    return _MapFunction(x, kind)


def cpu_fenchel_young(
    x: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    alpha_rows: torch.Tensor | None = None,
    scalar_alpha: float | None = None,
    n_iter: int = 0,
) -> torch.Tensor:
    """The Fenchel-Young loss of ``kind`` for 2-D logits ``(N, C)`` and class indices ``(N,)`` through
    ``torch.ops.softmaxkit.fenchel_young_cpu``; arguments are already validated (see
    :func:`softmaxkit.sparsemax_loss`)."""
    return _LossFunction(x, target, weight, ignore_index, kind, reduction)[0]
