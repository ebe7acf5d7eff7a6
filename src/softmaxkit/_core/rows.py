r"""Cross-entropy row maths in the shifted form, and the row chunking every fused path shares.

For one row with ``z = softcap(x) / T``, ``m = max_c z_c``, ``s = Σ_c exp(z_c − m)`` and
``a_c = w_c((1−ε)δ_{c y} + ε/C)`` (0 on ignored rows), ``A = Σ_c a_c``:

.. math:: ℓ = (1−ε)\,w_y\big[(m − z_y) + \log s\big]
          + \tfrac{ε}{C}\big[W \log s − \textstyle\sum_c w_c (z_c − m)\big] + λ\,(m + \log s)^2

.. math:: \frac{∂ℓ}{∂z_c} = g\big[(A + 2λ\,\mathrm{LSE})\,p_c − a_c\big],\qquad p_c = e^{z_c − m} / s

Only differences ``z − m`` (exact at any magnitude) enter an ``exp`` or a sum, so the loss is invariant to a
shift of the logits up to the dtype's range, a constant row gives ``log C`` and huge smoothed rows never form
``∞ − ∞``. The chunked PyTorch path (:func:`forward_rows` / :func:`backward_rows`) keeps only ``m`` and
``log s`` per row (``2N`` floats) between forward and backward.

All maths runs in :func:`~softmaxkit._core.compute_dtype` (fp32 for fp16/bf16); only the gradient is rounded
to the logits' dtype. The row loss is combined in float64 from ``m``, ``log s``, ``z_y`` and a float64
``Σ_c w_c (z_c − m)`` and rounded once to the compute dtype: at fp32, ``m − z_y`` and that sum overflow for
logits near ±3e38 although the loss itself fits.
"""

from __future__ import annotations

import torch

from . import CrossEntropyOptions, RowWeights, compute_dtype, row_weights

#: bytes of fp32 work per chunk: ~4 MiB keeps a chunk (and its temporaries) in L2/L3 on CPUs.
CHUNK_BYTES = 4 << 20


def chunk_rows(num_rows: int, num_classes: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many rows as fit in :data:`CHUNK_BYTES` of fp32."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(num_rows, 1)))
    return max(1, min(max(num_rows, 1), CHUNK_BYTES // (4 * max(num_classes, 1))))


def load_transformed(out: torch.Tensor, x: torch.Tensor, inv_temperature: float, softcap: float | None) -> torch.Tensor:
    """Write ``z = softcap(x) / T`` into ``out`` (fp32 or wider; may be ``x`` itself) and return it."""
    if out is not x:
        out.copy_(x)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    if inv_temperature != 1.0:
        out.mul_(inv_temperature)
    return out


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, the dtype the row loss and ``Σ w (z − m)`` are combined in (float32 on MPS, which has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def plus_inf_row_nan(log_sum: torch.Tensor) -> torch.Tensor:
    """NaN on rows with a ``+∞`` logit, else 0: a term to add to the row loss, with no gradient of its own.

    Such a row is shifted by 0 (:func:`finite_max`), so ``log s = +∞``; ``(m − z_y) + log s`` would then be
    ``+∞`` for a finite target logit, where PyTorch's loss (and the kernel's) is NaN.
    """
    return torch.where(torch.isposinf(log_sum.detach()), torch.nan, 0.0).to(log_sum.dtype)


def finite_max(row_max: torch.Tensor) -> torch.Tensor:
    """The row max used as the shift: ``m`` where finite, else 0 (all ``−∞`` rows, ``+∞``/NaN rows).

    With 0 the ``−∞`` row gives ``s = 0`` and an infinite loss, a NaN/``+∞`` row a NaN loss (PyTorch's).
    """
    return torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))


def row_loss(
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    z_target: torch.Tensor,
    shifted_weighted_sum: torch.Tensor | None,
    rows: RowWeights,
    options: CrossEntropyOptions,
    num_classes: int,
) -> torch.Tensor:
    r"""Per-row loss in the shifted form (module docstring), exactly 0 on ignored rows.

    Args:
        row_max: ``m`` per row (the shift, see :func:`finite_max`).
        log_sum: ``log Σ_c exp(z_c − m)``.
        z_target: ``z_y`` (any value on ignored rows).
        shifted_weighted_sum: ``Σ_c w_c (z_c − m)`` (``w ≡ 1`` without weights), float64 (it may exceed the
            compute dtype's range); only read when ``ε > 0``.
        rows: the call's :class:`~softmaxkit._core.RowWeights`.
        options: ``label_smoothing`` and ``z_loss`` are read.
        num_classes: ``C`` (over all processes).
    """
    eps, valid = options.label_smoothing, rows.valid
    work = row_max.dtype
    # combined in float64, rounded once to the compute dtype: at fp32 ``m − z_y`` and ``Σ w (z − m)`` can
    # exceed fp32's range (logits near ±3e38) although the row loss, scaled by (1−ε)w_y and ε/C, fits
    wide = wide_dtype(row_max.device)
    row_max, log_sum, z_target = row_max.to(wide), log_sum.to(wide), z_target.to(wide)
    nll = (row_max - z_target) + log_sum
    loss = (1.0 - eps) * rows.w_y.to(wide) * torch.where(valid, nll, torch.zeros_like(nll))
    if eps > 0:
        weight_total = rows.weight_total.to(wide)
        smooth = (weight_total * log_sum - shifted_weighted_sum.to(wide)) * (eps / num_classes)
        loss = loss + smooth
    if options.z_loss > 0:
        lse = row_max + log_sum
        loss = loss + options.z_loss * lse * lse
    loss = loss + plus_inf_row_nan(log_sum)
    return torch.where(valid, loss, torch.zeros_like(loss)).to(work)


def row_coefficients(
    scale: torch.Tensor,
    rows: RowWeights,
    lse: torch.Tensor,
    options: CrossEntropyOptions,
    num_classes: int,
):
    """Coefficients of ``∂ℓ_i/∂z_ij = g_i[(A_i + 2λ LSE_i) p_ij − a_ij]`` with ``g_i = scale_i``.

    Returns ``(row_coefficient, target_coefficient, smooth_coefficient)``: ``g_i (A_i + 2λ LSE_i)``
    (``(N,)``), ``g_i (1−ε) w_y`` (``(N, 1)``, subtracted at the target class) and ``g_i ε/C`` (``(N,)``,
    times ``w_j`` subtracted from every class; None when ``ε = 0``). ``scale`` must already be 0 on ignored
    rows.
    """
    eps, z_loss = options.label_smoothing, options.z_loss
    row_coefficient = ((1.0 - eps) * rows.w_y + (eps / num_classes) * rows.weight_total * rows.valid) * scale
    if z_loss > 0:
        row_coefficient = row_coefficient + 2.0 * z_loss * torch.where(rows.valid, lse, torch.zeros_like(lse)) * scale
    target_coefficient = ((1.0 - eps) * rows.w_y * scale)[:, None]
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
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn ``out = e^{z − m}`` (or ``p``) of a row chunk into ``∂ℓ/∂x`` in place.

    ``out ← [row_coefficient·out − smooth_coefficient·w − target_coefficient·onehot(target)] · dz/dx``, with
    ``dz/dx`` the soft-cap ``derivative`` when given, else ``1/T`` (``row_coefficient`` already divided by
    ``s`` when ``out`` holds ``e^{z − m}``). Rows where ``valid`` is False become exactly 0, whatever their
    logits hold (NaN or ``±∞`` padding rows give a zero gradient, not ``0·NaN``).
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
    if valid is not None:
        out.masked_fill_(~valid[:, None], 0.0)
    return out


def shifted_weighted_sum_(
    out: torch.Tensor, z: torch.Tensor, row_max: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """``out ← Σ_c w_c (z_c − m)`` per row of the chunk ``z`` (``w ≡ 1`` without weights), in ``out``'s dtype.

    With a float64 ``out`` the differences and the sum are formed in float64 (one chunk-sized float64
    temporary, label smoothing only): at fp32 ``z_c − m`` reaches ``−6.8e38`` and the sum more. A masked
    class (``z_c = −∞``) with ``w_c = 0`` counts 0, not ``0·(−∞)``.
    """
    shifted = torch.sub(z.to(out.dtype), row_max.to(out.dtype)[:, None])
    if weight is None:
        return torch.sum(shifted, dim=1, out=out)
    product = shifted.mul_(weight.to(out.dtype))
    product.masked_fill_(weight == 0, 0.0)
    return torch.sum(product, dim=1, out=out)


def forward_rows(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, options: CrossEntropyOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RowWeights]:
    """The chunked PyTorch forward over 2-D ``logits (N, C)`` and class indices ``(N,)``.

    Returns ``(loss, row_max, log_sum, rows)``: the per-row loss (compute dtype, 0 on ignored rows), the
    shift ``m`` and ``log s`` per row (what :func:`backward_rows` needs) and the row weights.
    """
    num_rows, num_classes = logits.shape
    work = compute_dtype(logits.dtype)
    inv_t, softcap, eps = options.inv_temperature, options.softcap, options.label_smoothing
    rows = row_weights(target, weight, options.ignore_index, num_classes, work)
    row_max = torch.empty(num_rows, dtype=work, device=logits.device)
    log_sum = torch.empty(num_rows, dtype=work, device=logits.device)
    z_target = torch.empty(num_rows, dtype=work, device=logits.device)
    # Σ w (z − m) in float64: beyond fp32's range for rows near ±3e38 (see :func:`row_loss`)
    weighted = torch.empty(num_rows, dtype=wide_dtype(logits.device), device=logits.device) if eps > 0 else None

    step = chunk_rows(num_rows, num_classes, options.chunk_size)
    direct = work == logits.dtype and softcap is None and inv_t == 1.0
    buffer = torch.empty((min(step, num_rows), num_classes), dtype=work, device=logits.device)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        buf = buffer[: stop - start]
        z = logits[start:stop] if direct else load_transformed(buf, logits[start:stop], inv_t, softcap)
        m = finite_max(z.amax(dim=1))
        row_max[start:stop] = m
        torch.gather(z, 1, rows.safe_target[start:stop, None], out=z_target[start:stop, None])
        if weighted is not None:  # before buf (which z may be) is overwritten
            shifted_weighted_sum_(weighted[start:stop], z, m, rows.weight)
        torch.sub(z, m[:, None], out=buf)  # z − m: exact where z ≈ m, whatever the magnitude
        buf.exp_()
        torch.sum(buf, dim=1, out=log_sum[start:stop])
        log_sum[start:stop].log_()
    loss = row_loss(row_max, log_sum, z_target, weighted, rows, options, num_classes)
    return loss, row_max, log_sum, rows


def backward_rows(
    scale: torch.Tensor,
    logits: torch.Tensor,
    rows: RowWeights,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    options: CrossEntropyOptions,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Write ``∂ℓ/∂x`` of the chunked path into ``grad`` (a new buffer, or ``logits`` itself).

    ``scale`` is each row's upstream gradient ``g_i`` in the compute dtype, already 0 on ignored rows.
    """
    num_rows, num_classes = logits.shape
    work = row_max.dtype
    inv_t, softcap = options.inv_temperature, options.softcap
    lse = row_max + log_sum
    row_coefficient, target_coefficient, smooth_coefficient = row_coefficients(
        scale, rows, lse, options, num_classes
    )
    row_coefficient = row_coefficient / log_sum.exp()  # p = e^{z − m} / s: fold 1/s into the coefficient
    row_coefficient = row_coefficient + plus_inf_row_nan(log_sum)  # a +∞ logit: a NaN row, as in PyTorch
    step = chunk_rows(num_rows, num_classes, options.chunk_size)
    direct = work == logits.dtype
    chunk = min(step, num_rows)
    buffer = None if direct else torch.empty((chunk, num_classes), dtype=work, device=logits.device)
    derivative = torch.empty((chunk, num_classes), dtype=work, device=logits.device) if softcap is not None else None
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        x = logits[start:stop]
        out = grad[start:stop] if direct else buffer[: stop - start]
        d = None
        if derivative is not None:
            # dz/dx = (1 − tanh²(x/c)) / T, computed before `out` may overwrite x (in place).
            d = softcap_derivative_(derivative[: stop - start], x, inv_t, softcap)
        if direct and softcap is None and inv_t == 1.0:
            torch.sub(x, row_max[start:stop, None], out=out)  # one pass; also correct when out is x
        else:
            load_transformed(out, x, inv_t, softcap).sub_(row_max[start:stop, None])
        out.exp_()
        finish_logit_grad_(
            out,
            row_coefficient[start:stop],
            target_coefficient[start:stop],
            None if smooth_coefficient is None else smooth_coefficient[start:stop],
            rows.weight,
            rows.safe_target[start:stop],
            d,
            inv_t,
            rows.valid[start:stop],
        )
        if not direct:
            grad[start:stop].copy_(out)
    return grad
