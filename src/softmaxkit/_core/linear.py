r"""Linear cross-entropy that never holds the ``(N, C)`` logits, in chunked PyTorch ops.

For a chunk of ``r`` rows the forward computes the chunk's logits ``x = h Wᵀ + b`` (``r × C``), their
log-sum-exp and, when gradients are wanted and the upstream gradient is a scalar (``"mean"``/``"sum"``),
turns the same buffer into

.. math:: G = \frac{\partial ℓ}{\partial x} = g\,\big[(A + 2λ\,\mathrm{LSE})\,p − a\big]\,\frac{dz}{dx}

(the cross-entropy gradient of :mod:`softmaxkit._core.rows`, whose per-chunk helpers are reused here) and
accumulates ``∂ℓ/∂h = G W``, ``∂ℓ/∂W += Gᵀ h`` and ``∂ℓ/∂b += Σ_rows G``. Backward then only multiplies
what was stored by the upstream scalar. With ``"none"`` the upstream gradient differs per row and is only
known in backward, so the forward keeps just the per-row shift ``m`` and ``log Σ exp(z − m)`` and backward
recomputes each chunk's logits (one extra matmul). Peak memory is one chunk of logits plus the gradients themselves.

The same loop runs vocab-parallel (:mod:`softmaxkit.distributed`): each process holds a contiguous slice of
the classes, and the few per-row statistics (row max, sum of exponentials, target logit, smoothing sum,
target weight) are combined across processes by a ``Reduce`` object; single-process it is the identity.

Class-probability targets ``t`` (``(N, C)``, single process) take the same loop: each chunk reads its
``r × C`` slice of ``t`` and builds the chunk's coefficients ``a = w ⊙ ((1 − ε) t + ε/C)`` (one ``r × C``
temporary), so the loss ``ℓ_i = A_i (LSE_i − m_i) − Σ_c a_ic (z_ic − m_i) + λ LSE_i²`` (``m`` the row max,
``A_i = Σ_c a_ic``) and ``G`` above need nothing ``N × C`` but the target itself (``Σ_c a_ic (z_ic − m_i)``
is a batched dot product, so a chunk holds its logits and ``a``, no third ``r × C`` tensor). The loss is also
differentiable in ``t``: ``∂ℓ/∂t_ic = −(1 − ε) w_c \log p_ic · g_i``, written chunk by chunk into the
target-shaped gradient (only when ``t`` requires a gradient).

Low precision: fp16/bf16 logits are computed by a matmul in the input dtype (as ``F.linear`` does), then
reduced and exponentiated in fp32; ``∂ℓ/∂W`` and ``∂ℓ/∂b`` are accumulated across chunks in
``accumulation_dtype`` (fp32 by default), ``∂ℓ/∂h`` is one matmul over all classes per row. On CPU a bf16
chunk's ``Gᵀ h`` is by default a bf16 matmul added into the fp32 ``∂W`` (:func:`rounded_products`).

A backend may compute each chunk's cross-entropy itself (:class:`ChunkKernel`: the CPU C kernel), on logits
kept in the weight's dtype; the matmuls and accumulators around it are this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from .._reduction import reduce_loss, row_scale
from . import CrossEntropyOptions, RowWeights, compute_dtype
from .autograd import saved_gradient_times, strict_once_differentiable
from .rows import (
    finish_logit_grad_,
    finite_max,
    load_transformed,
    plus_inf_row_nan,
    row_coefficients,
    row_loss,
    shifted_weighted_sum_,
    softcap_derivative_,
    wide_dtype,
)

#: most bytes of fp32 logits per chunk when ``chunk_size`` is None (see :func:`default_chunk_rows`).
CHUNK_BYTES = 256 << 20
#: bounds on the automatic chunk: fewer rows make the matmuls inefficient, more buy nothing.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 64, 1024


def default_chunk_rows(num_rows: int, num_classes: int, hidden_size: int, element_size: int = 4) -> int:
    """Rows per chunk when ``chunk_size`` is None: ``D/2`` rows, within ``[64, 1024]`` and 256 MiB of logits.

    ``element_size``: 4 (the fp32 work buffer; fp64 keeps these rows), or 2 where the loop keeps the logits in
    bf16 (the CPU kernel's chunks): ``3D/2`` rows, so fewer chunks add their products into ``∂W``.

    Every chunk streams the whole ``(C, D)`` weight through three matmuls (and reads and writes the
    ``∂W`` accumulator), so chunks of ``r`` rows cost ``≈ 16·C·D·N/r`` bytes of memory traffic on top of
    ``6·N·C·D`` FLOPs: ``r`` should be in the hundreds. With ``r = D/2`` the chunk's ``r × C`` fp32 logits
    take half the memory of ``∂W`` (``C × D``), which the op must return anyway (bf16 chunks: ¾ of it), so the
    peak stays ``O(C·D + N·D)``, never ``O(N·C)``, and a training step's peak is ``∂W`` plus half of it again.
    Measured at ``D = 256``, ``C = 32000`` (docs/benchmarks.md, run L): ``r = 128`` 2% slower than ``r = 192``
    in the hf_causal_lm fp32 step, for 7.8 MiB less peak memory (the step's peak is within 30% of the
    model's own loss only then).
    """
    per_hidden = 3 / 2 if element_size == 2 else 1 / 2
    rows = min(MAX_CHUNK_ROWS, int(hidden_size * per_hidden), CHUNK_BYTES // (element_size * max(num_classes, 1)))
    rows = max(MIN_CHUNK_ROWS, rows - rows % 16 if rows > 16 else rows)
    return max(1, min(rows, num_rows))


class LocalReduce:
    """Single process: combining the per-class-slice statistics is the identity."""

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sum_hidden_grad_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_async(self, tensor: torch.Tensor):
        """Start gathering every process's ``tensor`` (``(k, r)``); returns ``wait()`` -> ``(P, k, r)`` in rank
        order. Single process: ``tensor[None]`` at once.

        A subclass that combines across processes (overrides ``max_``/``sum_``) must override this too:
        inheriting the single-process answer would silently drop the other processes' statistics.
        """
        if type(self).max_ is not LocalReduce.max_ or type(self).sum_ is not LocalReduce.sum_:
            raise NotImplementedError(
                f"{type(self).__name__} combines statistics across processes (max_/sum_) but does not define "
                "gather_async, which the CPU vocab-parallel cross-entropy uses"
            )
        return lambda: tensor[None]


_ONEDNN_LINEAR: bool | None = None


def onednn_linear_available() -> bool:
    """Whether oneDNN's fused linear (``torch.ops.mkldnn._linear_pointwise``) runs here and is exact.

    On x86 CPUs its fp32 GEMM is about twice as fast as the MKL ``sgemm`` behind ``torch.mm`` for these
    shapes (measured: docs/benchmarks.md); it is a private PyTorch op, so it is probed once and the
    ``torch.mm`` path is used wherever it is missing or misbehaves.
    """
    global _ONEDNN_LINEAR
    if _ONEDNN_LINEAR is None:
        try:
            # fixed values (no draw from the global RNG, whose stream belongs to the user)
            a = torch.linspace(-1.0, 1.0, 15).reshape(3, 5)
            w = torch.linspace(-2.0, 0.5, 20).reshape(4, 5)
            b = torch.linspace(0.0, 0.3, 4)
            result = torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
            # the gradient matmuls pass transposed views (_onednn_matmul): G W as (G, Wᵀ), Gᵀ h as (Gᵀ, hᵀ)
            g = torch.linspace(-0.5, 1.5, 12).reshape(3, 4)
            grad_hidden = _onednn_matmul(g, w.t())
            grad_weight = _onednn_matmul(g.t(), a.t())
            _ONEDNN_LINEAR = bool(torch.backends.mkldnn.is_available()) and all(
                torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
                for got, expected in ((result, torch.addmm(b, a, w.t())), (grad_hidden, g @ w),
                                      (grad_weight, g.t() @ a))
            )
        except (AttributeError, RuntimeError, NotImplementedError):  # op absent or not built for this CPU
            _ONEDNN_LINEAR = False
    return _ONEDNN_LINEAR


def use_onednn(weight: torch.Tensor) -> bool:
    """fp32 CPU matmuls with a contiguous ``weight`` go through oneDNN when it is available."""
    return (
        weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
        and weight.numel() > 0 and onednn_linear_available()
    )


#: above this many bytes of chunk logits, on an Intel CPU with MKL, ``torch.mm`` computes the chunk (run J,
#: measured when oneDNN's linear still made each whole chunk a fresh tensor, which glibc serves by a fresh mmap
#: beyond its 32 MiB dynamic threshold: a page fault per 4 KiB; oneDNN now fills the buffer in tiles, which
#: no Intel machine has re-measured since)
_FRESH_PAGES_BYTES = 32 << 20
_MKL_NATIVE: bool | None = None


def _mkl_native() -> bool:
    """Whether ``torch.mm``'s fp32 GEMM is MKL on an Intel CPU (MKL's own fast kernels; on other x86 CPUs
    oneDNN's GEMM was ~2× faster, docs/benchmarks.md). Read once from ``/proc/cpuinfo`` (False elsewhere)."""
    global _MKL_NATIVE
    if _MKL_NATIVE is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
                intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in info)
        except OSError:
            intel = False
        _MKL_NATIVE = intel and torch.backends.mkl.is_available()
    return _MKL_NATIVE


def onednn_for_chunks(weight: torch.Tensor, rows: int) -> bool:
    """Whether the chunk loop fills its buffer with ``rows``-row chunks of logits by oneDNN's linear
    (:func:`use_onednn`, in tiles: :func:`_onednn_linear_into`) rather than ``torch.mm``: on an Intel CPU with
    MKL, chunks beyond
    ``_FRESH_PAGES_BYTES`` go to ``torch.mm`` (measured, 8192×1024×50257 fp32, 768-row chunks: 264–271 ms
    against 304–311 ms per chunk; below 32 MiB oneDNN is level or faster: docs/benchmarks.md, run J)."""
    if not use_onednn(weight):
        return False
    return not (_mkl_native() and rows * weight.shape[0] * weight.element_size() > _FRESH_PAGES_BYTES)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (a new tensor)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _onednn_matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``x @ weight_t.T`` by oneDNN (a new tensor), either factor a transposed view: oneDNN reads the strides
    (no copy; measured, no reorder buffer of the weight either). The chunk loop's gradient matmuls: ``G W`` as
    ``(G, Wᵀ)`` and ``Gᵀ h`` as ``(Gᵀ, hᵀ)``, ~2× MKL's ``sgemm`` behind ``torch.mm``/``addmm_`` for these
    shapes on a 2-core AVX-512 AMD EPYC (docs/benchmarks.md, run N)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight_t, None, "none", [], "")


#: classes per oneDNN call when it fills the chunk loop's buffer (see :func:`_onednn_linear_into`)
ONEDNN_TILE_CLASSES = 4096
#: rows of ``∂W`` per oneDNN ``Gᵀ h`` product added into ``∂W`` (:meth:`_Accumulators.add_chunk`): the
#: product stays in L2 for the add (128 × 256 × 32000: 7.1 ms at 2048, 7.3 at 4096, 7.9 at 8192, 10.3 by
#: ``addmm_``; 512 × 1024 × 50257: 138, 151, 207, 248 ms; run N)
ONEDNN_GRAD_TILE_ROWS = 2048


def _onednn_linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``out = x @ weight.T + bias`` by oneDNN, ``ONEDNN_TILE_CLASSES`` classes per call copied into ``out``.

    oneDNN's linear has no output argument, so a whole chunk's product is a fresh chunk-sized tensor per chunk;
    glibc then sometimes keeps the freed one resident while the next takes fresh pages (two chunks of resident
    memory; docs/benchmarks.md, run L), and after the loop it stays in the heap. Filling the loop's one buffer
    in vocabulary tiles keeps the chunk loop at one chunk plus one tile whatever the heap does, for one copy
    of the logits (~10% of the GEMM's time, measured at 192 × 256 × 32000).
    """
    x = x.contiguous()
    classes = weight.shape[0]
    for first in range(0, classes, ONEDNN_TILE_CLASSES):
        last = min(first + ONEDNN_TILE_CLASSES, classes)
        tile = _onednn_linear(x, weight[first:last], None if bias is None else bias[first:last])
        out[:, first:last].copy_(tile)
        del tile  # freed before the next tile is allocated: one tile-sized block, reused
    return out


def _chunk_logits(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  low: torch.Tensor | None = None, onednn: bool = False):
    """The chunk's logits ``hidden @ weight.T + bias`` in ``out`` (the work dtype, or the weight's for a chunk
    kernel): by oneDNN in tiles where ``onednn`` (:func:`onednn_for_chunks`), else by ``torch.mm``. A
    low-precision product is formed in ``low`` (the chunk's buffer in the weight's dtype) and then widened
    into ``out``."""
    if onednn:
        return _onednn_linear_into(out, hidden, weight, bias)
    if out.dtype == weight.dtype or low is not None:
        product = out if low is None else low
        if bias is None or bias.dtype != weight.dtype:
            torch.mm(hidden, weight.t(), out=product)
            if bias is not None:
                product.add_(bias)
        else:
            torch.addmm(bias, hidden, weight.t(), out=product)
        return out if low is None else out.copy_(low)
    return out.copy_(torch.nn.functional.linear(hidden, weight, bias))


class _Rows:
    """Per-row target data of the whole batch, computed once before the chunk loop."""

    def __init__(self, target, class_weight, options: CrossEntropyOptions, local_classes, work_dtype, reduce):
        self.valid = target != options.ignore_index
        local = target.long() - options.class_offset
        self.owned = self.valid & (local >= 0) & (local < local_classes)
        self.local_target = torch.where(self.owned, local, torch.zeros_like(local))
        if class_weight is None:
            self.class_weight = None
            self.w_y = self.valid.to(work_dtype)
            self.weight_total = torch.full((), float(options.num_classes), dtype=work_dtype, device=target.device)
        else:
            self.class_weight = class_weight.to(work_dtype)
            zero = torch.zeros((), dtype=work_dtype, device=target.device)
            own_weight = (
                torch.where(self.owned, self.class_weight[self.local_target], zero)
                if local_classes > 0
                else torch.zeros(target.shape, dtype=work_dtype, device=target.device)
            )
            both = torch.cat([own_weight, self.class_weight.sum().reshape(1)])
            reduce.sum_(both)
            self.w_y, self.weight_total = both[:-1], both[-1]
        self.denominator = self.w_y.sum()
        self.weights = RowWeights(self.valid, self.local_target, self.class_weight, self.w_y, self.weight_total)

    def scale(self, reduction: str) -> torch.Tensor:
        """The upstream gradient ``g_i`` of each row for a unit upstream scalar (0 on ignored rows)."""
        one = torch.ones((), dtype=self.w_y.dtype, device=self.w_y.device)
        return row_scale(one, reduction, self.valid.shape[0], self.denominator, self.valid)

    def chunk(self, sl: slice) -> RowWeights:
        """The chunk's rows as :class:`~softmaxkit._core.RowWeights` (``w_y`` 0 where another process owns y
        is handled by ``owned`` at the target coefficient)."""
        return RowWeights(self.valid[sl], self.local_target[sl], self.class_weight, self.w_y[sl], self.weight_total)


def upstream_scale(rows, reduction: str, grad_output: torch.Tensor) -> torch.Tensor:
    """Each row's upstream gradient in a recomputing backward: ``g_i`` on kept rows (``"none"``), else the unit
    scale of :meth:`_Rows.scale` times ``g`` (``rows``: :class:`_Rows` or :class:`_ProbabilityRows`)."""
    if reduction == "none":
        return grad_output * rows.valid
    return rows.scale(reduction) * grad_output


def combine_row_statistics(reduce: LocalReduce, reported: torch.Tensor, sums: torch.Tensor, z_target: torch.Tensor,
                           weighted: torch.Tensor | None, local_weight_total: float | torch.Tensor):
    """Every process's per-row ``(m_r, s_r, z_y, Σ w (z − m_r))``, gathered in one collective and combined.

    ``reported`` is each row's local shift ``m_r`` (``−∞`` where the row has no finite logit here),
    ``sums`` ``s_r = Σ_{c∈r} exp(z_c − m_r)``, ``z_target`` the target logit (0 where another process owns it),
    ``weighted`` ``Σ_{c∈r} w_c (z_c − m_r')`` with ``m_r'`` the shift actually used (``m_r``, or 0 where
    ``m_r = −∞``; None without smoothing) and ``local_weight_total`` ``Σ_{c∈r} w_c``. Returns the global shift
    ``m = max_r m_r`` (:func:`finite_max`), ``S = Σ_r s_r e^{m_r − m}``, ``z_y`` and ``Σ_c w_c (z_c − m)``
    (float64; None without smoothing). Every process combines the same numbers in rank order, so all get the
    same bits.
    """
    num_rows = reported.shape[0]
    smoothing = weighted is not None
    packed = torch.zeros((4 if smoothing else 3, num_rows + (1 if smoothing else 0)), dtype=torch.float64,
                         device=reported.device)
    packed[0, :num_rows] = reported
    packed[1, :num_rows] = sums
    packed[2, :num_rows] = z_target
    if smoothing:
        packed[3, :num_rows] = weighted
        packed[3, num_rows] = local_weight_total
    gathered = reduce.gather_async(packed)()
    reported, sums, targets = gathered[:, 0, :num_rows], gathered[:, 1, :num_rows], gathered[:, 2, :num_rows]
    shift = finite_max(reported.amax(dim=0))
    total = (sums * torch.exp(reported - shift)).sum(dim=0)
    weighted_sum = None
    if smoothing:
        # Σ w (z − m) = Σ_r [Σ w (z − m_r') + (m_r' − m) Σ_{c∈r} w_c]
        used_shift = torch.where(torch.isinf(reported), 0.0, reported)
        weighted_sum = (gathered[:, 3, :num_rows] + (used_shift - shift) * gathered[:, 3, num_rows:]).sum(dim=0)
    return shift, total, targets.sum(dim=0), weighted_sum


class _ProbabilityRows:
    """Per-row data for ``(N, C)`` class-probability targets (single process); the target is only read a row
    chunk at a time, by :meth:`coefficients`."""

    def __init__(self, target, class_weight, options: CrossEntropyOptions, work_dtype, reduce):
        if options.class_offset != 0 or not isinstance(reduce, LocalReduce):
            raise ValueError("class-probability targets are supported by the single-process linear cross-entropy")
        self.target = target
        self.class_weight = None if class_weight is None else class_weight.to(work_dtype)
        self.valid = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        # PyTorch's rule for probability targets: "mean" divides by the number of rows
        self.denominator = torch.tensor(float(target.shape[0]), dtype=work_dtype, device=target.device)

    def scale(self, reduction: str) -> torch.Tensor:
        """The upstream gradient ``g_i`` of each row for a unit upstream scalar."""
        one = torch.ones((), dtype=self.denominator.dtype, device=self.denominator.device)
        return row_scale(one, reduction, self.valid.shape[0], self.denominator, self.valid)

    def coefficients(self, sl: slice, label_smoothing: float, num_classes: int, work_dtype) -> torch.Tensor:
        """The chunk's ``a = w ⊙ ((1 − ε) t + ε/C)`` as a new ``r × C`` tensor (the target is never written)."""
        a = self.target[sl].to(work_dtype, copy=True)  # the one r × C allocation
        if label_smoothing > 0:
            a.mul_(1.0 - label_smoothing).add_(label_smoothing / num_classes)
        if self.class_weight is not None:
            a.mul_(self.class_weight)
        return a


def _target_grad_(out: torch.Tensor, shifted: torch.Tensor, offset: torch.Tensor, coefficients: torch.Tensor,
                  rows: _ProbabilityRows, scale: torch.Tensor, label_smoothing: float) -> None:
    """``out ← −(1 − ε) w_c (shifted − offset) g_i = −(1 − ε) w_c log p · g_i`` for one chunk.

    ``shifted − offset`` is ``log p`` (``shifted = z − m``, ``offset = LSE − m``). Where a class has
    ``log p = −∞`` and no target mass (``a = 0``) the loss counts the term as 0, and its derivative is taken
    as 0 too, so masked classes leave the gradient finite.
    """
    log_p = shifted - offset[:, None]
    factor = (-(1.0 - label_smoothing)) * scale[:, None]
    if rows.class_weight is not None:
        factor = factor * rows.class_weight
    grad = log_p.mul_(factor)
    grad.masked_fill_((coefficients == 0) & torch.isinf(shifted), 0.0)
    out.copy_(grad)


def _chunk_loss_and_grad_probabilities(
    logits: torch.Tensor,
    derivative: torch.Tensor | None,
    rows: _ProbabilityRows,
    sl: slice,
    scale: torch.Tensor | None,
    options: CrossEntropyOptions,
    target_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_chunk_loss_and_grad` for class-probability targets.

    ``ℓ_i = A_i (LSE_i − m_i) − Σ_c a_ic (z_ic − m_i) + λ LSE_i²``: both sums are taken after subtracting the
    row max, so no large ``A·LSE − Σ a z`` cancellation; ``a_c (z_c − m) = 0`` when ``a_c = 0``, also at
    ``z_c = −∞`` (a masked class). With ``scale`` the chunk's logits become
    ``G = g[(A + 2λ LSE) p − a] dz/dx`` in place; with ``target_grad`` (the chunk's rows of ``∂ℓ/∂t``, needs
    ``scale``) that gradient is written too.
    """
    eps, inv_t, softcap = options.label_smoothing, options.inv_temperature, options.softcap
    d = None
    if softcap is not None:
        d = softcap_derivative_(derivative[: logits.shape[0]], logits, inv_t, softcap)
    if softcap is not None or inv_t != 1.0:
        load_transformed(logits, logits, inv_t, softcap)
    z = logits
    a = rows.coefficients(sl, eps, options.num_classes, z.dtype)
    total = a.sum(dim=1)
    row_min, row_max = torch.aminmax(z, dim=1)  # one pass for both
    row_max = finite_max(row_max)
    # (z − m)/2 from exact halves first: at fp32 z − m reaches −6.8e38 (a row [3e38, −3e38]) and would
    # overflow to −inf, although a_c (z_c − m), summed, fits; the halves never overflow
    z.mul_(0.5).sub_((0.5 * row_max)[:, None])
    # reading the flag is free on CPU; on other devices it would synchronise the host inside the op (and break
    # CUDA-graph capture), so there the masked form always runs (an r × C temporary, no sync)
    if z.device.type != "cpu" or bool(torch.isinf(row_min).any()):
        # a −inf logit (a masked class): a_c (z_c − m) must count 0 where a_c = 0, not NaN (0·−inf)
        product = a * z
        product.masked_fill_(a == 0, 0.0)
        weighted = product.sum(dim=1)
        del product
    else:
        # Σ_c a_c (z_c − m)/2 as r dot products: no r × C temporary
        weighted = torch.bmm(a.unsqueeze(1), z.unsqueeze(2)).view(-1)
    weighted = weighted.mul_(2.0)  # −inf only where Σ a (z − m) itself is beyond the range (then ℓ = +inf)
    z.mul_(2.0)  # z − m (−inf where it overflows: exp gives 0)
    shifted = z.clone() if target_grad is not None else None
    z.exp_()
    sum_exp = z.sum(dim=1)
    log_sum = sum_exp.log()
    lse = log_sum + row_max
    loss = total * log_sum - weighted
    if options.z_loss > 0:
        loss = loss + options.z_loss * lse * lse
    if target_grad is not None:
        _target_grad_(target_grad, shifted, log_sum, a, rows, scale, eps)
        del shifted
    if scale is not None:
        row_coefficient = total + 2.0 * options.z_loss * lse if options.z_loss > 0 else total
        z.mul_((row_coefficient * scale / sum_exp)[:, None]).sub_(a.mul_(scale[:, None]))
        if d is not None:
            z.mul_(d)
        elif inv_t != 1.0:
            z.mul_(inv_t)
    return loss, row_max, log_sum


def _chunk_grad_from_stats_probabilities(
    logits: torch.Tensor,
    derivative: torch.Tensor | None,
    rows: _ProbabilityRows,
    sl: slice,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    scale: torch.Tensor,
    options: CrossEntropyOptions,
    target_grad: torch.Tensor | None = None,
) -> None:
    """:func:`_chunk_grad_from_stats` for class-probability targets (and ``∂ℓ/∂t`` into ``target_grad``)."""
    eps, inv_t, softcap = options.label_smoothing, options.inv_temperature, options.softcap
    d = None
    if softcap is not None:
        d = softcap_derivative_(derivative[: logits.shape[0]], logits, inv_t, softcap)
    load_transformed(logits, logits, inv_t, softcap).sub_(row_max[:, None])  # z − m
    a = rows.coefficients(sl, eps, options.num_classes, logits.dtype)
    if target_grad is not None:
        _target_grad_(target_grad, logits, log_sum, a, rows, scale, eps)
    logits.exp_()
    total = a.sum(dim=1)
    lse = row_max + log_sum
    row_coefficient = total + 2.0 * options.z_loss * lse if options.z_loss > 0 else total
    logits.mul_((row_coefficient * scale / log_sum.exp())[:, None]).sub_(a.mul_(scale[:, None]))
    if d is not None:
        logits.mul_(d)
    elif inv_t != 1.0:
        logits.mul_(inv_t)


def _chunk_loss_and_grad(
    logits: torch.Tensor,
    derivative: torch.Tensor | None,
    rows: _Rows,
    sl: slice,
    scale: torch.Tensor | None,
    options: CrossEntropyOptions,
    reduce: LocalReduce,
    finite_ignored: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss, shift ``m`` and ``log s`` of one chunk; with ``scale``, ``logits`` becomes ``∂ℓ/∂x``.

    ``finite_ignored``: the ignored rows' logits are known finite (their hidden rows were zeroed and there is
    no bias), so their gradient rows are already exactly 0 (a 0 coefficient times finite values) and the
    pass that forces them to 0 is skipped.

    ``logits`` holds the chunk's raw logits ``x`` in the work dtype and is consumed. Uses
    ``p = exp(z − m) / s`` so the exponentials are computed once for both the loss and ``p``; the per-row
    statistics (``m``, then ``s``, ``z_y`` and ``Σ w (z − m)``) are combined across processes by ``reduce``.
    """
    eps, inv_t, softcap = options.label_smoothing, options.inv_temperature, options.softcap
    d = None
    if softcap is not None:
        d = softcap_derivative_(derivative[: logits.shape[0]], logits, inv_t, softcap)
    if softcap is not None or inv_t != 1.0:
        load_transformed(logits, logits, inv_t, softcap)
    z = logits
    owned, local_target = rows.owned[sl], rows.local_target[sl]

    row_max = z.amax(dim=1) if z.shape[1] > 0 else z.new_full((z.shape[0],), -torch.inf)
    reduce.max_(row_max)
    row_max = finite_max(row_max)
    stats = z.new_empty((2, z.shape[0]))
    if z.shape[1] > 0:
        z_target = z.gather(1, local_target[:, None])[:, 0]
        stats[1] = torch.where(owned, z_target, torch.zeros_like(z_target))
    else:  # a process may hold no classes at all (uneven vocab-parallel slices)
        stats[1] = 0
    weighted = None
    if eps > 0:
        # Σ w (z − m) formed in float64 (a 0·(−∞) of a masked, unweighted class counts 0): at fp32 z − m
        # reaches −6.8e38 and the sum more, beyond fp32's range although the row loss fits
        weighted = z.new_empty((z.shape[0],), dtype=wide_dtype(z.device))
        shifted_weighted_sum_(weighted, z, row_max, rows.class_weight)
    z.sub_(row_max[:, None])  # z − m: exact where z ≈ m at any magnitude
    z.exp_()
    torch.sum(z, dim=1, out=stats[0])
    reduce.sum_(stats)
    if weighted is not None:
        reduce.sum_(weighted)
    sum_exp = stats[0]
    log_sum = sum_exp.log()
    weights = rows.chunk(sl)
    loss = row_loss(row_max, log_sum, stats[1], weighted, weights, options, options.num_classes)
    if scale is not None and z.shape[1] > 0:
        row_coefficient, target_coefficient, smooth_coefficient = row_coefficients(
            scale, weights, row_max + log_sum, options, options.num_classes
        )
        # exp(z − m) · coefficient / Σ exp(z − m) = coefficient · p
        target_coefficient = target_coefficient * owned[:, None]
        finish_logit_grad_(z, row_coefficient / sum_exp, target_coefficient, smooth_coefficient,
                           rows.class_weight, local_target, d, inv_t, None if finite_ignored else weights.valid)
    return loss, row_max, log_sum


def _chunk_grad_from_stats(
    logits: torch.Tensor,
    derivative: torch.Tensor | None,
    rows: _Rows,
    sl: slice,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    scale: torch.Tensor,
    options: CrossEntropyOptions,
    finite_ignored: bool = False,
) -> None:
    """Turn the chunk's raw logits into ``∂ℓ/∂x`` in place, given the stored ``m`` and ``log s``
    (``finite_ignored`` as for :func:`_chunk_loss_and_grad`)."""
    inv_t, softcap = options.inv_temperature, options.softcap
    if logits.shape[1] == 0:
        return
    d = None
    if softcap is not None:
        d = softcap_derivative_(derivative[: logits.shape[0]], logits, inv_t, softcap)
    load_transformed(logits, logits, inv_t, softcap).sub_(row_max[:, None]).exp_()
    weights = rows.chunk(sl)
    row_coefficient, target_coefficient, smooth_coefficient = row_coefficients(
        scale, weights, row_max + log_sum, options, options.num_classes
    )
    target_coefficient = target_coefficient * rows.owned[sl, None]
    finish_logit_grad_(logits, row_coefficient / log_sum.exp(), target_coefficient, smooth_coefficient,
                       rows.class_weight, rows.local_target[sl], d, inv_t, None if finite_ignored else weights.valid)


#: rows of ``∂W`` per bf16 product tile (:meth:`_Accumulators.add_chunk`): 2048 × D bf16 stays in L2 for the
#: fp32 add that follows (192 × 32000 × 256 chunk: 7.7 ms at 2048, 9.8 at 512, 10.2 untiled; run K)
PRODUCT_TILE_ROWS = 2048


def rounded_products(weight: torch.Tensor, options: CrossEntropyOptions) -> bool:
    """Whether each chunk's ``Gᵀ h`` is one bf16 matmul (rounded to bf16 once, as ``F.linear``'s output is)
    added into the fp32 ``∂W``, rather than an fp32 matmul of widened factors.

    The default for bf16 weights on CPU (``accumulation_dtype=None``): PyTorch has no CPU bf16 × bf16 → fp32
    matmul, and the fp32 ``addmm_`` costs 2.4× the bf16 product and its add (docs/benchmarks.md, run K). The
    price is one bf16 rounding per chunk before the fp32 sum (normwise ``∂W`` error 1.3× that of autograd's
    single bf16 matmul over all rows, run K). ``accumulation_dtype=torch.float32``, given explicitly, keeps
    every product in fp32 (one rounding, at the end). fp16 keeps fp32 products: a chunk's product may pass
    fp16's range where the fp32 sum would not.
    """
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and options.accumulation_dtype is None
            and weight.numel() > 0)


class _Accumulators:
    """``∂ℓ/∂h``, ``∂ℓ/∂W`` and ``∂ℓ/∂b`` being built chunk by chunk, and the matmuls that build them."""

    def __init__(self, hidden, weight, bias, needs, accumulation_dtype, rounded: bool = False,
                 loop_rows: int | None = None):
        """``loop_rows``: the rows the chunk loop visits (None: all of ``hidden``'s). Fewer means it skips the
        ignored ones (:func:`kept_rows`): ``∂h`` is then zero-filled and each chunk's rows are copied to their
        places."""
        need_hidden, need_weight, need_bias = needs
        loop_rows = hidden.shape[0] if loop_rows is None else loop_rows
        scattered = loop_rows < hidden.shape[0]
        self.weight = weight
        self.accumulation_dtype = accumulation_dtype
        # fp32 products by oneDNN (_onednn_matmul), each ∂W tile copied (first chunk) or added into ∂W
        self.onednn = use_onednn(weight) and accumulation_dtype == weight.dtype
        # bf16 products of ≤ PRODUCT_TILE_ROWS rows of ∂W at a time (rounded_products), added into the fp32 ∂W
        self.tile = (
            torch.empty((min(PRODUCT_TILE_ROWS, weight.shape[0]), weight.shape[1]), dtype=weight.dtype,
                        device=weight.device)
            if rounded and need_weight else None
        )
        # ∂h = G W is one matmul per chunk: oneDNN's on the transposed view where it serves (it reads the
        # strides; run I had measured it on a contiguous (D, C) copy of Wᵀ, as large as ∂W, for no gain), else
        # torch.mm
        self.hidden = (
            (torch.zeros if scattered else torch.empty)(hidden.shape, dtype=accumulation_dtype, device=hidden.device)
            if need_hidden else None
        )
        # with ∂W built in tiles (bf16 products, or oneDNN's) the first chunk's (sl.start == 0) are copied in,
        # not added to zeros (one pass less); with no rows at all there is no first chunk
        make = torch.empty if (self.tile is not None or self.onednn) and loop_rows > 0 else torch.zeros
        self.weight_grad = make(weight.shape, dtype=accumulation_dtype, device=weight.device) if need_weight else None
        self.bias_grad = (
            torch.zeros(weight.shape[0], dtype=accumulation_dtype, device=weight.device) if need_bias else None
        )

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight_grad is not None or self.bias_grad is not None

    def add_chunk(self, grad_logits: torch.Tensor, hidden: torch.Tensor, sl: slice,
                  low: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        """Fold one chunk's ``G = ∂ℓ/∂x`` (``r × C``, work dtype) into the three gradients.

        ``hidden`` is the chunk's hidden rows as the loop formed the logits from (:class:`_ChunkHidden`: any
        ignored row among them already zeroed, so ``0·NaN`` cannot reach ``∂W``). ``sl`` is the chunk's place
        in the loop's rows; ``index``, where the loop skips ignored rows, holds those rows' places in the batch
        (``∂h`` rows go there). ``low`` (a chunk buffer in the weight's dtype, free by now) receives ``G``
        rounded to that dtype for the low-precision matmuls, so no chunk-sized temporary is allocated for it.
        """
        weight = self.weight
        acc = self.accumulation_dtype
        if grad_logits.dtype == weight.dtype:
            low = grad_logits
        elif self.hidden is None and self.tile is None and (self.weight_grad is None or acc != weight.dtype):
            low = None  # only the accumulation dtype's G is read below
        elif low is not None:
            low = low[: grad_logits.shape[0]].copy_(grad_logits)
        else:
            low = grad_logits.to(weight.dtype)
        if self.hidden is not None:
            if index is None and not self.onednn and acc == weight.dtype:
                torch.mm(low, weight, out=self.hidden[sl])
            else:
                product = _onednn_matmul(low, weight.t()) if self.onednn else torch.mm(low, weight)
                if index is None:
                    self.hidden[sl].copy_(product)
                else:
                    self.hidden.index_copy_(0, index, product.to(acc))
        if self.weight_grad is not None:
            if self.onednn or self.tile is not None:
                self._add_weight_tiles(low, hidden, first_chunk=sl.start == 0)
            elif acc == weight.dtype:
                self.weight_grad.addmm_(low.t(), hidden)
            else:
                # accumulate in `acc`: both factors in that dtype so no chunk's product is rounded to low
                factor = grad_logits if grad_logits.dtype == acc else grad_logits.to(acc)
                self.weight_grad.addmm_(factor.t(), hidden.to(acc))
        if self.bias_grad is not None:
            self.bias_grad.add_(grad_logits.sum(0, dtype=self.bias_grad.dtype))

    def _add_weight_tiles(self, low: torch.Tensor, hidden: torch.Tensor, first_chunk: bool) -> None:
        """``∂W += Gᵀ h`` one tile of classes at a time, each product copied in by the first chunk (``∂W`` was
        made empty) or added while it is in cache: oneDNN's fp32 product (``ONEDNN_GRAD_TILE_ROWS`` rows, a
        fresh tile freed before the next) or the bf16 ``torch.mm`` into ``self.tile``."""
        classes = self.weight.shape[0]
        rows = ONEDNN_GRAD_TILE_ROWS if self.onednn else self.tile.shape[0]
        hidden_t = hidden.contiguous().t() if self.onednn else None
        for first in range(0, classes, rows):
            last = min(first + rows, classes)
            if self.onednn:
                product = _onednn_matmul(low[:, first:last].t(), hidden_t)
            else:
                product = torch.mm(low[:, first:last].t(), hidden, out=self.tile[: last - first])
            if first_chunk:
                self.weight_grad[first:last].copy_(product)
            else:
                self.weight_grad[first:last].add_(product)
            del product  # a oneDNN tile is freed before the next is made: one tile-sized block, reused


def _zero_ignored(hidden: torch.Tensor, valid: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The chunk's hidden rows with the ignored ones zeroed, written into ``out`` (an ``r × D`` buffer of the
    loop, and a 0-d zero): their logits are then finite (``b``, or 0 without bias) whatever the padding held, so their
    gradient rows, scaled by 0, are exactly 0, and a NaN or ``±∞`` hidden state there cannot turn ``0·NaN``
    into NaN in ``∂W = Gᵀ h``. One buffer for the loop, not an allocation per chunk: a small allocation
    between two chunk-sized ones splits the freed chunk's block in glibc's heap, and the next chunk then
    takes fresh memory (a whole chunk more resident memory, measured)."""
    buffer, zero = out
    return torch.where(valid[:, None], hidden, zero, out=buffer[: hidden.shape[0]])


class _ChunkHidden:
    """The chunk loop's hidden rows: ``hidden[sl]``; gathered into one buffer where the loop visits only the
    kept rows (``index``, :func:`kept_rows`); with the ignored ones zeroed where ``valid`` is given
    (:func:`_zero_ignored`: a loop building ``∂W`` over all rows)."""

    def __init__(self, hidden: torch.Tensor, index: torch.Tensor | None, valid: torch.Tensor | None, chunk: int):
        self.hidden, self.index = hidden, index
        self.valid = None if index is not None else valid
        self.buffer = (
            hidden.new_empty((chunk, hidden.shape[1])) if index is not None or valid is not None else None
        )
        self.zero = hidden.new_zeros(()) if self.valid is not None else None

    def __call__(self, sl: slice) -> torch.Tensor:
        if self.index is not None:
            return torch.index_select(self.hidden, 0, self.index[sl], out=self.buffer[: sl.stop - sl.start])
        if self.valid is None:
            return self.hidden[sl]
        return _zero_ignored(self.hidden[sl], self.valid[sl], (self.buffer, self.zero))

    def rows(self, sl: slice) -> torch.Tensor | None:
        """The chunk's places in the batch (None: ``sl`` itself)."""
        return None if self.index is None else self.index[sl]


def _chunk_buffers(
    rows: int, classes: int, work_dtype, device, softcap, weight_dtype=None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk's logits buffer, soft-cap derivative, and for a low-precision weight one buffer in its dtype
    (the product before widening, then ``G`` rounded for ``G W``: one buffer for both instead of two
    chunk-sized temporaries per chunk)."""
    logits = torch.empty((rows, classes), dtype=work_dtype, device=device)
    derivative = torch.empty((rows, classes), dtype=work_dtype, device=device) if softcap is not None else None
    low = (
        torch.empty((rows, classes), dtype=weight_dtype, device=device)
        if weight_dtype is not None and weight_dtype != work_dtype else None
    )
    return logits, derivative, low


def chunk_rows_for(options: CrossEntropyOptions, num_rows: int, hidden_size: int, element_size: int = 4) -> int:
    if options.chunk_size is not None:
        return max(1, min(options.chunk_size, max(num_rows, 1)))
    return default_chunk_rows(num_rows, options.num_classes, hidden_size, element_size)


#: the single-process reduction (the identity), shared by every call
LOCAL = LocalReduce()


class LinearForward(NamedTuple):
    """What :func:`linear_forward` computes.

    Attributes:
        loss: the per-row loss ``(N,)`` in the compute dtype (0 on ignored rows).
        row_max: the per-row shift ``m``; ``log_sum``: ``log Σ exp(z − m)`` (what a recomputing backward needs).
        denominator: the ``"mean"`` denominator (``Σ w_y``, or ``N`` for probability targets).
        grad_hidden, grad_weight, grad_bias, grad_target: the gradients for a unit upstream scalar, built in
            the forward (``"mean"``/``"sum"`` with a gradient wanted), else None.
    """

    loss: torch.Tensor
    row_max: torch.Tensor
    log_sum: torch.Tensor
    denominator: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    grad_target: torch.Tensor | None


class ChunkKernel(Protocol):
    """A backend's cross-entropy of one chunk of logits, used by :func:`linear_forward` where it serves.

    ``serves(weight, options, probabilities, reduce)``: whether it handles this call (a fact of dtypes, device
    and options, never of values). ``bind(target, rows, options)``: once per call, returns
    ``run(logits, sl, scale) -> (loss, m, log s)`` for the chunk ``sl`` of rows: ``logits`` (``r × C``, the
    weight's dtype, contiguous, owned by the loop) holds the chunk's raw logits; with ``scale`` (the rows'
    upstream gradient ``g_i``) it is overwritten by ``G = ∂ℓ/∂x`` in the same dtype, as
    :func:`_chunk_loss_and_grad` does to its work-dtype buffer.
    """

    def serves(self, weight: torch.Tensor, options: CrossEntropyOptions, probabilities: bool,
               reduce: LocalReduce) -> bool: ...

    def bind(self, target: torch.Tensor, rows: _Rows, options: CrossEntropyOptions) -> Callable[
        [torch.Tensor, slice, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def kept_rows(target: torch.Tensor, options: CrossEntropyOptions, reduce: LocalReduce) -> torch.Tensor | None:
    """The places of the non-ignored rows of a class-index ``target`` when some rows are ignored, for a chunk
    loop that visits only those: None when every row is kept, for class-probability targets, across processes
    (every process must run the same chunks) and off the CPU.

    An ignored row's loss, gradient and ``∂h`` row are 0 whatever its logits, so its three matmuls and its
    cross-entropy are wasted work: in a causal-LM batch the padding and prompt rows are a quarter of the
    rows or more (hf_causal_lm: 256 of 1024; cut-cross-entropy drops them too). Reading ``target`` here is
    a host read, so only the custom ops' kernels call the loop with ``compact=True``: they run on real CPU
    tensors (fake, meta and traced calls take the fake kernel), where it synchronises nothing.
    """
    if target.dim() != 1 or reduce is not LOCAL or target.device.type != "cpu":
        return None
    index = (target != options.ignore_index).nonzero().squeeze(1)
    return None if index.numel() == target.numel() else index


def _scattered(index: torch.Tensor | None, num_rows: int, values: torch.Tensor) -> torch.Tensor:
    """Per-row ``values`` of the loop's rows placed at ``index`` among ``num_rows`` zeros (as is without one)."""
    if index is None:
        return values
    return values.new_zeros(num_rows).index_copy_(0, index, values)


def _rows_for(target, class_weight, options, local_classes, work, reduce):
    if target.dim() == 2:
        return _ProbabilityRows(target, class_weight, options, work, reduce)
    return _Rows(target, class_weight, options, local_classes, work, reduce)


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    options: CrossEntropyOptions,
    needs: tuple[bool, bool, bool] = (False, False, False),
    need_target: bool = False,
    reduce: LocalReduce = LOCAL,
    chunk_kernel: ChunkKernel | None = None,
    compact: bool = False,
) -> LinearForward:
    """The chunk loop of linear cross-entropy (module docstring) over ``hidden (N, D)``, ``weight (C_local, D)``.

    ``needs`` says which of ``∂h, ∂W, ∂b`` a backward will want and ``need_target`` whether ``∂t``
    (probability targets) will: with ``"mean"``/``"sum"`` they are built here for a unit upstream gradient.
    ``options.num_classes`` must be set (the total over processes). ``chunk_kernel``, where it serves the call,
    computes each chunk's cross-entropy on logits kept in the weight's dtype (no work-dtype chunk buffer).
    ``compact``: the loop may visit only the non-ignored rows (:func:`kept_rows`; a custom op's kernel only).
    The per-row outputs of ignored rows are then 0 (``m`` and ``log s`` too: no logits were formed).
    """
    num_rows, hidden_size = hidden.shape
    local_classes = weight.shape[0]
    work = compute_dtype(weight.dtype)
    accumulation = options.accumulation_dtype or work
    probabilities = target.dim() == 2
    index = kept_rows(target, options, reduce) if compact else None
    if index is not None:
        target = target.index_select(0, index)  # the loop's rows: all kept (same Σ w_y, so the same mean)
    loop_rows = target.shape[0]
    rows = _rows_for(target, class_weight, options, local_classes, work, reduce)
    needs = (needs[0], needs[1], bias is not None and needs[2])
    need_target = probabilities and need_target
    precompute = options.reduction != "none" and (any(needs) or need_target)
    grads = _Accumulators(hidden, weight, bias, needs, accumulation, rounded_products(weight, options),
                          loop_rows) if precompute else None
    scale = rows.scale(options.reduction) if precompute else None
    # ∂ℓ/∂t has the target's own (N, C) shape: the one full-size tensor, and only when it is asked for
    target_grad = torch.empty_like(target, memory_format=torch.contiguous_format) if (
        precompute and need_target) else None

    loss = torch.empty(loop_rows, dtype=work, device=hidden.device)
    row_max = torch.empty(loop_rows, dtype=work, device=hidden.device)
    log_sum = torch.empty(loop_rows, dtype=work, device=hidden.device)
    kernel = None
    if chunk_kernel is not None and chunk_kernel.serves(weight, options, probabilities, reduce):
        kernel = chunk_kernel.bind(target, rows, options)
    narrow = kernel is not None and weight.element_size() == 2  # bf16 kernel chunks: 3D/2 rows (default_chunk_rows)
    step = chunk_rows_for(options, loop_rows, hidden_size, 2 if narrow else 4)
    chunk = min(step, loop_rows)
    # with a kernel the chunk's logits, and then its gradient, are in the weight's dtype (the matmuls' own
    # operand; the kernel forms dz/dx of the soft-cap itself): one buffer, no derivative, no low copy
    onednn = onednn_for_chunks(weight, chunk)
    buffer, derivative, low = _chunk_buffers(
        chunk, local_classes, work if kernel is None else weight.dtype, hidden.device,
        options.softcap if kernel is None else None, weight.dtype if kernel is None else None)
    source = _ChunkHidden(hidden, index, None if grads is None or probabilities else rows.valid, chunk)
    for start in range(0, loop_rows, step):
        sl = slice(start, min(start + step, loop_rows))
        chunk_hidden = source(sl)
        logits = _chunk_logits(buffer[: sl.stop - start], chunk_hidden, weight, bias,
                               None if low is None else low[: sl.stop - start], onednn)
        chunk_scale = None if scale is None else scale[sl]
        if kernel is not None:
            loss[sl], row_max[sl], log_sum[sl] = kernel(logits, sl, chunk_scale)
        elif probabilities:
            loss[sl], row_max[sl], log_sum[sl] = _chunk_loss_and_grad_probabilities(
                logits, derivative, rows, sl, chunk_scale, options,
                None if target_grad is None else target_grad[sl],
            )
        else:
            loss[sl], row_max[sl], log_sum[sl] = _chunk_loss_and_grad(
                logits, derivative, rows, sl, chunk_scale, options, reduce, grads is not None and bias is None
            )
        if grads is not None:
            grads.add_chunk(logits, chunk_hidden, sl, low, source.rows(sl))
    del buffer, derivative, low, source
    loss, row_max, log_sum = (_scattered(index, num_rows, values) for values in (loss, row_max, log_sum))
    if grads is None:
        return LinearForward(loss, row_max, log_sum, rows.denominator, None, None, None, None)
    if grads.hidden is not None:
        reduce.sum_hidden_grad_(grads.hidden)
    return LinearForward(loss, row_max, log_sum, rows.denominator, grads.hidden, grads.weight_grad,
                         grads.bias_grad, target_grad)


def linear_backward(
    grad_output: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    options: CrossEntropyOptions,
    needs: tuple[bool, bool, bool],
    need_target: bool = False,
    reduce: LocalReduce = LOCAL,
    compact: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(∂h, ∂W, ∂b, ∂t)`` by recomputing each chunk's logits (``"none"``, or a forward run without grad);
    ``compact`` as for :func:`linear_forward`."""
    work = row_max.dtype
    probabilities = target.dim() == 2
    grad_output = grad_output.to(work)
    index = kept_rows(target, options, reduce) if compact else None
    if index is not None:  # the loop's rows: the kept ones, with their statistics and upstream gradients
        target, row_max, log_sum = (t.index_select(0, index) for t in (target, row_max, log_sum))
        if options.reduction == "none":
            grad_output = grad_output.index_select(0, index)
    rows = _rows_for(target, class_weight, options, weight.shape[0], work, reduce)
    target_grad = (
        torch.empty_like(target, memory_format=torch.contiguous_format) if probabilities and need_target else None
    )
    hidden_size = hidden.shape[1]
    loop_rows = target.shape[0]
    accumulation = options.accumulation_dtype or work
    needs = (needs[0], needs[1], bias is not None and needs[2])
    grads = _Accumulators(hidden, weight, bias, needs, accumulation, rounded_products(weight, options),
                          loop_rows)
    scale = upstream_scale(rows, options.reduction, grad_output)
    if not probabilities and index is None:
        # the ignored rows' logits are recomputed from zeroed hidden rows below (finite); their stored
        # statistics may come from whatever the padding held (NaN): shift them by 0 and divide by 1 instead
        zero = torch.zeros((), dtype=work, device=row_max.device)
        row_max, log_sum = torch.where(rows.valid, row_max, zero), torch.where(rows.valid, log_sum, zero)
    step = chunk_rows_for(options, loop_rows, hidden_size)
    chunk = min(step, loop_rows)
    onednn = onednn_for_chunks(weight, chunk)
    buffer, derivative, low = _chunk_buffers(chunk, weight.shape[0], work, hidden.device, options.softcap,
                                             weight.dtype)
    source = _ChunkHidden(hidden, index, None if probabilities else rows.valid, chunk)
    for start in range(0, loop_rows, step):
        sl = slice(start, min(start + step, loop_rows))
        chunk_hidden = source(sl)
        logits = _chunk_logits(buffer[: sl.stop - start], chunk_hidden, weight, bias,
                               None if low is None else low[: sl.stop - start], onednn)
        if probabilities:
            _chunk_grad_from_stats_probabilities(logits, derivative, rows, sl, row_max[sl], log_sum[sl], scale[sl],
                                                 options, None if target_grad is None else target_grad[sl])
        else:
            _chunk_grad_from_stats(logits, derivative, rows, sl, row_max[sl], log_sum[sl], scale[sl], options,
                                   bias is None)
        grads.add_chunk(logits, chunk_hidden, sl, low, source.rows(sl))
    if grads.hidden is not None:
        reduce.sum_hidden_grad_(grads.hidden)
    return grads.hidden, grads.weight_grad, grads.bias_grad, target_grad


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd of :func:`linear_forward` with a cross-process ``reduce`` (vocab-parallel linear CE).

    The single-process path is the custom op ``torch.ops.softmaxkit.linear_cross_entropy``; this Function
    serves the vocab-parallel loss, whose statistics are all-reduced inside the chunk loop.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, options: CrossEntropyOptions, reduce, grad_enabled):
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[:3])
        result = linear_forward(hidden, weight, bias, target, class_weight, options, needs, False, reduce)
        ctx.options, ctx.reduce, ctx.needs = options, reduce, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.precompute = result.grad_hidden is not None or result.grad_weight is not None or (
            result.grad_bias is not None)
        if ctx.precompute:
            ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, result.row_max, result.log_sum)
        return reduce_loss(result.loss, options.reduction, result.denominator)  # compute dtype: callers round

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        if ctx.precompute:
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors]
        else:
            hidden, weight, bias, target, class_weight, row_max, log_sum = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            grads = linear_backward(grad_output, hidden, weight, bias, target, class_weight, row_max, log_sum,
                                    ctx.options, needs, False, ctx.reduce)[:3]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


#: bytes of fp32 per row chunk of :class:`VocabParallelCrossEntropy` (over the total ``C``, so the same on every
#: process): each chunk costs one collective, so chunks are larger than the one-process 4 MiB
VOCAB_PARALLEL_CHUNK_BYTES = 32 << 20


def vocab_parallel_chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(num_rows, 1)))
    return max(1, min(max(num_rows, 1), VOCAB_PARALLEL_CHUNK_BYTES // (4 * max(num_classes, 1))))


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of class-sliced logits ``(N, C_local)`` whose row statistics ``reduce`` combines.

    Chunked torch ops, any device: per chunk of rows the local shift ``m_r``, ``s_r = Σ exp(z − m_r)``, the
    target logit and the smoothing sum, then one :func:`combine_row_statistics` (one all-gather). When a
    gradient will follow and its scale is known (``"mean"``/``"sum"``) the chunk's gradient is written from
    its ``exp(z − m_r)`` in forward and backward returns it; otherwise backward recomputes ``p`` from the
    stored global ``m`` and ``log S`` chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits, target, class_weight, options: CrossEntropyOptions, reduce):
        num_rows, local_classes = logits.shape
        work = compute_dtype(logits.dtype)
        device = logits.device
        eps, inv_t, softcap = options.label_smoothing, options.inv_temperature, options.softcap
        rows = _Rows(target, class_weight, options, local_classes, work, reduce)
        fused = ctx.needs_input_grad[0] and options.reduction != "none" and local_classes > 0
        scale = rows.scale(options.reduction) if fused else None
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if fused else None
        loss = torch.empty(num_rows, dtype=work, device=device)
        row_max = torch.empty(num_rows, dtype=work, device=device)
        log_sum = torch.empty(num_rows, dtype=work, device=device)
        local_weight_total = (float(local_classes) if class_weight is None
                              else rows.class_weight.sum(dtype=torch.float64))
        step = vocab_parallel_chunk_rows(num_rows, options.num_classes, options.chunk_size)  # same everywhere
        buffer = torch.empty((min(step, num_rows), local_classes), dtype=work, device=device)
        derivative = torch.empty_like(buffer) if softcap is not None else None
        for start in range(0, num_rows, step):
            sl = slice(start, min(start + step, num_rows))
            z = buffer[: sl.stop - start].copy_(logits[sl])
            d = None
            if softcap is not None:
                d = softcap_derivative_(derivative[: z.shape[0]], z, inv_t, softcap)
            if softcap is not None or inv_t != 1.0:
                load_transformed(z, z, inv_t, softcap)
            owned, local_target = rows.owned[sl], rows.local_target[sl]
            if local_classes > 0:
                shift_used = finite_max(z.amax(dim=1))
                z_target = torch.where(owned, z.gather(1, local_target[:, None])[:, 0], 0.0)
            else:  # a process may hold no classes at all (uneven slices)
                shift_used = z.new_zeros(z.shape[0])
                z_target = z.new_zeros(z.shape[0])
            weighted = None
            if eps > 0:
                weighted = z.new_empty((z.shape[0],), dtype=wide_dtype(device))
                shifted_weighted_sum_(weighted, z, shift_used, rows.class_weight)
            z.sub_(shift_used[:, None]).exp_()
            sums = z.sum(dim=1)
            # a row with no finite logit here (s_r = 0) must not set the shift
            reported = torch.where(sums == 0, -torch.inf, shift_used)
            shift, total, z_y, weighted_sum = combine_row_statistics(reduce, reported, sums, z_target, weighted,
                                                                     local_weight_total)
            row_max[sl] = shift
            log_sum[sl] = total.log()
            weights = rows.chunk(sl)
            loss[sl] = row_loss(row_max[sl], log_sum[sl], z_y, weighted_sum, weights, options, options.num_classes)
            if fused:
                row_coefficient, target_coefficient, smooth_coefficient = row_coefficients(
                    scale[sl], weights, row_max[sl] + log_sum[sl], options, options.num_classes)
                # e^{z − m_r} · e^{m_r − m} / S = p; a +∞ logit makes the row NaN, as in PyTorch
                factor = (row_coefficient * torch.exp(reported - row_max[sl] - log_sum[sl])
                          + plus_inf_row_nan(log_sum[sl]))
                finish_logit_grad_(z, factor, target_coefficient * owned[:, None], smooth_coefficient,
                                   rows.class_weight, local_target, d, inv_t, weights.valid)
                grad[sl].copy_(z)
        ctx.options, ctx.rows, ctx.fused = options, rows, fused
        if fused:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(logits, row_max, log_sum)
        return reduce_loss(loss, options.reduction, rows.denominator).to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        if ctx.fused:
            return saved_gradient_times(ctx.saved_tensors[0], grad_output), None, None, None, None
        logits, row_max, log_sum = ctx.saved_tensors
        options, rows = ctx.options, ctx.rows
        num_rows, local_classes = logits.shape
        grad_output = grad_output.to(row_max.dtype)
        scale = upstream_scale(rows, options.reduction, grad_output)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        step = vocab_parallel_chunk_rows(num_rows, options.num_classes, options.chunk_size)
        buffer = torch.empty((min(step, num_rows), local_classes), dtype=row_max.dtype, device=logits.device)
        derivative = torch.empty_like(buffer) if options.softcap is not None else None
        for start in range(0, num_rows, step):
            sl = slice(start, min(start + step, num_rows))
            chunk = buffer[: sl.stop - start].copy_(logits[sl])
            _chunk_grad_from_stats(chunk, derivative, rows, sl, row_max[sl], log_sum[sl], scale[sl], options)
            grad[sl].copy_(chunk)
        return grad, None, None, None, None
