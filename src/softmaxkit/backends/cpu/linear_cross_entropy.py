r"""CPU fast path of :func:`softmaxkit.linear_cross_entropy`: the core chunk loop with the C kernel per chunk.

The loop is :func:`softmaxkit._core.linear.linear_forward` (chunk logits ``h Wᵀ + b`` by oneDNN or ``torch.mm``,
then ``∂h = G W``, ``∂W += Gᵀ h``, ``∂b += Σ G``); this module gives it :class:`CpuChunkKernel`, which computes
each chunk's cross-entropy (the row statistics and, when a gradient follows, ``G = ∂ℓ/∂x`` over the logits in
place) in one visit of each row by the CPU cross-entropy kernel (:mod:`.cross_entropy`), instead of the
core's separate torch passes (amax, subtract, exp, sum, gather, scale, scatter). For bf16 weights the chunk's
logits stay bf16, the matmuls' own operand: no fp32 ``r × C`` chunk buffer and no widening or narrowing copies
(the kernel reads bf16 and computes in fp32, rounding ``G`` to bf16 once).

It serves class-index targets on one process with fp32/fp64 weights, and bf16 weights whose chunk products are
rounded to bf16 anyway (:func:`~softmaxkit._core.linear.rounded_products`: the default); elsewhere
(class-probability targets, fp16, an explicit fp32 ``accumulation_dtype`` for bf16) the loop's torch passes
run inside the same op. The recomputing backward (``reduction="none"``) is the torch one.
"""

from __future__ import annotations

import torch

from ..._core import CrossEntropyOptions
from ..._core.linear import LOCAL, LocalReduce, _Rows, rounded_products
from ..._core.rows import row_loss
from .._linear_ops import linear_cross_entropy_ops
from . import row_workers
from .cross_entropy import _FLAG_GRAD, _FLAG_STATS, _weight_total, available, run_rows, scratch_rows

__all__ = ["CpuChunkKernel", "cpu_linear_cross_entropy"]


class CpuChunkKernel:
    """:class:`softmaxkit._core.linear.ChunkKernel` by the CPU cross-entropy kernel."""

    def serves(self, weight: torch.Tensor, options: CrossEntropyOptions, probabilities: bool,
               reduce: LocalReduce) -> bool:
        if probabilities or reduce is not LOCAL or weight.device.type != "cpu" or weight.shape[0] == 0:
            return False
        if weight.dtype not in (torch.float32, torch.float64) and not rounded_products(weight, options):
            return False
        return available(weight.dtype)

    def bind(self, target: torch.Tensor, rows: _Rows, options: CrossEntropyOptions):
        num_rows, num_classes = target.shape[0], options.num_classes
        target = target.to(torch.int64).contiguous()
        class_weight = None if rows.class_weight is None else rows.class_weight.contiguous()
        weight_total = _weight_total(class_weight, num_classes)
        eps, work = options.label_smoothing, rows.w_y.dtype
        # the kernel's per-row outputs for the whole call (each chunk writes its rows), and its scratch rows
        lse = torch.empty(num_rows, dtype=work)
        stats = torch.empty((num_rows, 2), dtype=work)
        z_target = torch.empty(num_rows, dtype=work)
        weighted = torch.empty(num_rows, dtype=torch.float64) if eps > 0 else None
        scratch = scratch_rows(row_workers(num_rows, num_classes), num_classes, options.softcap, work)

        def run(logits: torch.Tensor, sl: slice, scale: torch.Tensor | None):
            chunk_stats, chunk_weighted = stats[sl], None if weighted is None else weighted[sl]
            flags = _FLAG_STATS if scale is None else _FLAG_STATS | _FLAG_GRAD
            run_rows(
                logits, target[sl], class_weight, options.ignore_index, eps, options.inv_temperature,
                options.z_loss, options.softcap, weight_total, flags, lse[sl], chunk_stats, z_target[sl],
                chunk_weighted, scale, None if scale is None else logits, scratch,
            )
            row_max, log_sum = chunk_stats[:, 0], chunk_stats[:, 1].log()
            loss = row_loss(row_max, log_sum, z_target[sl], chunk_weighted, rows.chunk(sl), options, num_classes)
            return loss, row_max, log_sum

        return run


#: ``(hidden (N, D), weight (C, D), bias, target, class_weight, options) -> loss`` (compute dtype)
cpu_linear_cross_entropy = linear_cross_entropy_ops("linear_cross_entropy_cpu", CpuChunkKernel(), device_types="cpu")
