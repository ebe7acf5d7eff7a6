r"""Fused, memory-lean cross-entropy for 2-D logits and class-index targets, in chunked PyTorch ops.

Forward keeps only the per-row log-sum-exp (``N`` floats), never log-probabilities. Backward writes

.. math:: \frac{\partial ℓ_i}{\partial z_{ij}} = g_i\big[(A_i + 2λ\,\mathrm{LSE}_i)\,p_{ij} − a_{ij}\big]

into one ``(N, C)`` buffer (or, with ``inplace_backward``, into the logits themselves), row chunk by row
chunk so the working set stays in cache. ``a_{ij} = w_j((1−ε)δ_{j y_i} + ε/C)`` (0 on ignored rows) and
``A_i = Σ_j a_{ij}``. The transform ``z = softcap(x) / T`` is recomputed per chunk in backward rather than
stored.

All maths runs in fp32 for fp16/bf16 logits (in the logits' dtype otherwise); only the final gradient is
rounded to the logits' dtype.
"""

from __future__ import annotations

import torch

from ..._reduction import reduce_loss, row_scale
from .._autograd import strict_once_differentiable

#: bytes of fp32 work per chunk: ~4 MiB keeps a chunk (and its temporaries) in L2/L3 on CPUs.
CHUNK_BYTES = 4 << 20


def chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many rows as fit in :data:`CHUNK_BYTES` of fp32."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(num_rows, 1)))
    return max(1, min(max(num_rows, 1), CHUNK_BYTES // (4 * max(num_classes, 1))))


def _load_transformed(
    out: torch.Tensor, x: torch.Tensor, inv_temperature: float, softcap: float | None
) -> torch.Tensor:
    """Write ``z = softcap(x) / T`` into ``out`` (fp32 or wider) and return it."""
    out.copy_(x)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    if inv_temperature != 1.0:
        out.mul_(inv_temperature)
    return out


def row_weights(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, num_classes: int, work_dtype: torch.dtype
):
    """Per-row quantities shared by the fused paths.

    Returns ``(valid, safe_target, weight, w_y, weight_total)``: the mask ``target != ignore_index``, the
    target with ignored entries replaced by class 0 (safe to gather with), the class weights in
    ``work_dtype`` (or None), ``w_y`` (the target's class weight, 0 on ignored rows) and ``W = Σ_c w_c``
    (``C`` without weights).
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    if weight is not None:
        weight = weight.to(work_dtype)
        zero = torch.zeros((), dtype=work_dtype, device=target.device)
        w_y = torch.where(valid, weight[safe_target], zero)
        weight_total = weight.sum()
    else:
        w_y = valid.to(work_dtype)
        weight_total = torch.tensor(float(num_classes), dtype=work_dtype, device=target.device)
    return valid, safe_target, weight, w_y, weight_total


def row_loss(
    lse: torch.Tensor,
    z_target: torch.Tensor,
    z_weighted_sum: torch.Tensor | None,
    w_y: torch.Tensor,
    valid: torch.Tensor,
    weight_total: torch.Tensor,
    label_smoothing: float,
    num_classes: int,
    z_loss: float,
) -> torch.Tensor:
    """``ℓ_i = (1−ε) w_y (LSE − z_y) + (ε/C)(W·LSE − Σ_c w_c z_c) + λ LSE²``, 0 on ignored rows."""
    eps = label_smoothing
    loss = (1.0 - eps) * w_y * (lse - z_target)
    if eps > 0:
        smooth = (weight_total * lse - z_weighted_sum) * (eps / num_classes)
        loss = loss + torch.where(valid, smooth, torch.zeros_like(smooth))
    if z_loss > 0:
        loss = loss + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    return torch.where(valid, loss, torch.zeros_like(loss))


def row_coefficients(
    scale: torch.Tensor,
    w_y: torch.Tensor,
    valid: torch.Tensor,
    weight_total: torch.Tensor,
    lse: torch.Tensor,
    label_smoothing: float,
    num_classes: int,
    z_loss: float,
):
    """Coefficients of ``∂ℓ_i/∂z_ij = g_i[(A_i + 2λ LSE_i) p_ij − a_ij]`` with ``g_i = scale_i``.

    Returns ``(row_coefficient, target_coefficient, smooth_coefficient)``: ``g_i (A_i + 2λ LSE_i)``
    (``(N,)``), ``g_i (1−ε) w_y`` (``(N, 1)``, subtracted at the target class) and ``g_i ε/C`` (``(N,)``,
    times ``w_j`` subtracted from every class; None when ``ε = 0``). ``scale`` must already be 0 on ignored
    rows.
    """
    eps = label_smoothing
    row_coefficient = ((1.0 - eps) * w_y + (eps / num_classes) * weight_total * valid) * scale
    if z_loss > 0:
        row_coefficient = row_coefficient + 2.0 * z_loss * lse * scale
    target_coefficient = ((1.0 - eps) * w_y * scale)[:, None]
    smooth_coefficient = scale * (eps / num_classes) if eps > 0 else None
    return row_coefficient, target_coefficient, smooth_coefficient


def softcap_derivative_(out: torch.Tensor, x: torch.Tensor, inv_temperature: float, softcap: float) -> torch.Tensor:
    """Write ``dz/dx = (1 − tanh²(x/c)) / T`` into ``out`` (which may not alias ``x``) and return it."""
    out.copy_(x).div_(softcap).tanh_()
    torch.addcmul(torch.ones_like(out), out, out, value=-1.0, out=out)
    if inv_temperature != 1.0:
        out.mul_(inv_temperature)
    return out


def finish_logit_grad_(
    out: torch.Tensor,
    row_coefficient: torch.Tensor,
    target_coefficient: torch.Tensor,
    smooth_coefficient: torch.Tensor | None,
    smooth_classes: torch.Tensor | None,
    target: torch.Tensor,
    derivative: torch.Tensor | None,
    inv_temperature: float,
) -> torch.Tensor:
    """Turn ``out = p`` (softmax probabilities of a row chunk) into ``∂ℓ/∂x`` in place.

    ``out ← [row_coefficient·p − smooth_coefficient·w − target_coefficient·onehot(target)] · dz/dx``, with
    ``dz/dx`` the soft-cap ``derivative`` when given, else ``1/T``. All coefficient tensors are the chunk's
    rows of :func:`row_coefficients`' outputs.
    """
    out.mul_(row_coefficient[:, None])
    if smooth_coefficient is not None:
        if smooth_classes is None:
            out.sub_(smooth_coefficient[:, None])
        else:
            out.addr_(smooth_coefficient, smooth_classes, alpha=-1.0)
    out.scatter_add_(1, target[:, None], -target_coefficient)
    if derivative is not None:
        out.mul_(derivative)
    elif inv_temperature != 1.0:
        out.mul_(inv_temperature)
    return out


class _CrossEntropyFunction(torch.autograd.Function):
    """Private autograd Function behind :func:`softmaxkit.cross_entropy`'s fused path."""

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
        chunk_size: int | None,
        inplace_backward: bool,
    ) -> torch.Tensor:
        num_rows, num_classes = logits.shape
        work_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        inv_t = 1.0 / temperature
        eps = label_smoothing
        valid, safe_target, weight, w_y, weight_total = row_weights(
            target, weight, ignore_index, num_classes, work_dtype
        )

        lse = torch.empty(num_rows, dtype=work_dtype, device=logits.device)
        z_target = torch.empty(num_rows, dtype=work_dtype, device=logits.device)
        z_weighted_sum = torch.empty(num_rows, dtype=work_dtype, device=logits.device) if eps > 0 else None

        rows = chunk_rows(num_rows, num_classes, chunk_size)
        direct = work_dtype == logits.dtype and softcap is None and inv_t == 1.0
        buffer = torch.empty((min(rows, num_rows), num_classes), dtype=work_dtype, device=logits.device)
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            x = logits[start:stop]
            buf = buffer[: stop - start]
            z = x if direct else _load_transformed(buf, x, inv_t, softcap)
            row_max = z.amax(dim=1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            torch.gather(z, 1, safe_target[start:stop, None], out=z_target[start:stop, None])
            if z_weighted_sum is not None:
                if weight is None:
                    torch.sum(z, dim=1, out=z_weighted_sum[start:stop])
                else:
                    torch.mv(z, weight, out=z_weighted_sum[start:stop])
            torch.sub(z, row_max, out=buf)
            buf.exp_()
            torch.sum(buf, dim=1, out=lse[start:stop])
            lse[start:stop].log_().add_(row_max[:, 0])

        loss = row_loss(lse, z_target, z_weighted_sum, w_y, valid, weight_total, eps, num_classes, z_loss)

        denominator = w_y.sum()
        out = reduce_loss(loss, reduction, denominator)

        ctx.save_for_backward(logits, safe_target, valid, w_y, lse, weight, denominator)
        ctx.options = (reduction, eps, inv_t, z_loss, softcap, chunk_size, inplace_backward, weight_total)
        return out.to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, target, valid, w_y, lse, weight, denominator = ctx.saved_tensors
        reduction, eps, inv_t, z_loss, softcap, chunk_size, inplace_backward, weight_total = ctx.options
        num_rows, num_classes = logits.shape
        work_dtype = lse.dtype

        # Per-row upstream scale g_i (0 on ignored rows), folded into every coefficient below.
        scale = row_scale(grad_output.to(work_dtype), reduction, num_rows, denominator, valid)
        row_coefficient, target_coefficient, smooth_coefficient = row_coefficients(
            scale, w_y, valid, weight_total, lse, eps, num_classes, z_loss
        )

        if inplace_backward:
            grad = logits
            torch.autograd.graph.increment_version(logits)
        else:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        rows = chunk_rows(num_rows, num_classes, chunk_size)
        direct = work_dtype == logits.dtype
        buffer = None
        if not direct:
            buffer = torch.empty((min(rows, num_rows), num_classes), dtype=work_dtype, device=logits.device)
        derivative = (
            torch.empty((min(rows, num_rows), num_classes), dtype=work_dtype, device=logits.device)
            if softcap is not None
            else None
        )
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            x = logits[start:stop]
            out = grad[start:stop] if direct else buffer[: stop - start]
            d = None
            if derivative is not None:
                # dz/dx = (1 − tanh²(x/c)) / T, computed before `out` may overwrite x (in place).
                d = softcap_derivative_(derivative[: stop - start], x, inv_t, softcap)
            if direct and softcap is None and inv_t == 1.0:
                torch.sub(x, lse[start:stop, None], out=out)  # one pass; also correct when out is x
            else:
                _load_transformed(out, x, inv_t, softcap).sub_(lse[start:stop, None])
            out.exp_()
            finish_logit_grad_(
                out,
                row_coefficient[start:stop],
                target_coefficient[start:stop],
                None if smooth_coefficient is None else smooth_coefficient[start:stop],
                weight,
                target[start:stop],
                d,
                inv_t,
            )
            if not direct:
                grad[start:stop].copy_(out)
        return grad, None, None, None, None, None, None, None, None, None, None
