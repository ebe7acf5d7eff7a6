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

from ..._core import CrossEntropyOptions, compute_dtype
from ..._core.linear import LOCAL, LocalReduce, _Rows, rounded_products
from ..._core.rows import row_loss
from .._linear_ops import linear_cross_entropy_ops
from . import row_workers
from .cross_entropy import _FLAG_GRAD, _FLAG_STATS, available, run_rows, scratch_rows

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
        num_classes = options.num_classes
        target = target.to(torch.int64).contiguous()
        class_weight = None if rows.class_weight is None else rows.class_weight.contiguous()
        # Σ_c w_c as the C double the kernel takes (a read of a CPU tensor inside the CPU op, never traced)
        weight_total = float(num_classes) if class_weight is None else class_weight.sum(dtype=torch.float64).tolist()
        eps = options.label_smoothing
        scratch: list[torch.Tensor] = []  # one per call, made at the first chunk that needs it

        def run(logits: torch.Tensor, sl: slice, scale: torch.Tensor | None):
            count = logits.shape[0]
            work = compute_dtype(logits.dtype)
            lse = torch.empty(count, dtype=work)
            stats = torch.empty((count, 2), dtype=work)
            z_target = torch.empty(count, dtype=work)
            weighted = torch.empty(count, dtype=torch.float64) if eps > 0 else None
            flags = _FLAG_STATS
            if scale is not None:
                flags |= _FLAG_GRAD
                if not scratch:
                    scratch.append(scratch_rows(row_workers(count, num_classes), num_classes, options.softcap, work))
            run_rows(
                logits, target[sl], class_weight, options.ignore_index, eps, options.inv_temperature,
                options.z_loss, options.softcap, weight_total, flags, lse, stats, z_target, weighted,
                None if scale is None else scale.contiguous(), logits if scale is not None else None,
                scratch[0] if scratch else None,
            )
            row_max, log_sum = stats[:, 0], stats[:, 1].log()
            loss = row_loss(row_max, log_sum, z_target, weighted, rows.chunk(sl), options, num_classes)
            return loss, row_max, log_sum

        return run


#: ``(hidden (N, D), weight (C, D), bias, target, class_weight, options) -> loss`` (compute dtype)
cpu_linear_cross_entropy = linear_cross_entropy_ops("linear_cross_entropy_cpu", CpuChunkKernel(), device_types="cpu")
