"""Cross-entropy: validate → dispatch → reduce."""

from __future__ import annotations

import torch

from .. import _validation as v
from .. import backends
from .._core import CrossEntropyOptions, compute_dtype, fp32_under_autocast
from .._core.rows import plus_inf_row_nan, wide_dtype
from .._reduction import reduce_loss, target_weight
from ._dtensor import holds_dtensor

#: implementations ``cross_entropy(impl=...)`` accepts (the dispatch table's row, in ``auto`` preference
#: order). ``"auto"`` picks the fastest one that can serve the inputs.
IMPLS = backends.implementations("cross_entropy")


def _is_probability_target(logits: torch.Tensor, target: torch.Tensor) -> bool:
    return target.shape == logits.shape and target.is_floating_point()


def _check_target_shape(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Validate the target's shape against the logits; return True for class-probability targets."""
    if logits.dim() == 0:
        raise ValueError("`logits` must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...), but is 0-d")
    if _is_probability_target(logits, target):
        return True
    if target.shape == logits.shape:  # the probability shape with an integer dtype: the dtype is the problem
        v.check_probability_target(target, logits)
    expected = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"`target` must have shape {expected} (class indices) or {tuple(logits.shape)} (class "
            f"probabilities) for logits of shape {tuple(logits.shape)}, but has shape {tuple(target.shape)}"
        )
    if target.is_floating_point():
        # Same shape as the class-index form but floating: a common mistake (float labels).
        raise TypeError(
            f"`target` of shape {tuple(target.shape)} holds class indices and must have an integer dtype "
            f"(int64), but has dtype {target.dtype}"
        )
    v.check_target_dtype(target)
    return False


def validate_cross_entropy_args(
    logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
    chunk_size=None, inplace_backward=False,
):
    """Shared validation of :func:`cross_entropy`'s arguments.

    Returns ``(logits, target, weight, options, probabilities)`` with the options as one
    :class:`~softmaxkit._core.CrossEntropyOptions`.
    """
    logits = v.check_floating("logits", logits)
    target = v.check_tensor("target", target)
    v.check_same_device("target", target, "logits", logits)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    z_loss = v.check_non_negative("z_loss", z_loss)
    softcap = v.check_softcap(softcap)
    chunk_size = v.check_optional_positive_int("chunk_size", chunk_size)
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    probabilities = _check_target_shape(logits, target)
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes == 0 and not probabilities:  # no class index can be valid
        raise ValueError(f"`logits` must have at least one class, but has shape {tuple(logits.shape)}")
    weight = v.check_class_weight(weight, num_classes, logits)
    v.check_target_values(target, num_classes, ignore_index, probabilities)
    if inplace_backward:
        check_writable_logits(logits)
    options = CrossEntropyOptions(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, temperature=temperature,
        z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, inplace_backward=inplace_backward,
        num_classes=num_classes,
    )
    return logits, target, weight, options, probabilities


def check_bool(name: str, value: object) -> bool:
    """A real ``bool`` (``"no"``, ``0`` or a tensor are refused, not read as truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool (True or False), but got {value!r} of type {type(value).__name__}")
    return value


def check_writable_logits(logits: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient over ``logits``: every element must own its memory."""
    if v._data_checks_enabled(logits) and torch._debug_has_internal_overlap(logits) != 0:
        raise ValueError(
            "`inplace_backward=True` writes the gradient over `logits`, but more than one element of `logits` "
            f"refers to a single memory location (an expanded or overlapping view, strides {logits.stride()}); "
            "pass a contiguous tensor (logits.clone()) or inplace_backward=False"
        )


def composite_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CrossEntropyOptions,
    probabilities: bool = False,
) -> torch.Tensor:
    """Any shape, any target kind, composed of differentiable torch ops (twice differentiable).

    The shifted form of :mod:`softmaxkit._core` with autograd: ``log p = (z − m) − log Σ exp(z − m)``;
    for class-index targets the logits of ignored rows are replaced by 0 first, so a NaN or ``±∞`` padding
    row gives loss and gradient exactly 0.
    """
    class_dim = 0 if logits.dim() == 1 else 1
    num_classes = logits.shape[class_dim]
    work = compute_dtype(logits.dtype)
    eps, z_loss = options.label_smoothing, options.z_loss
    z = logits.to(work)
    if not probabilities:
        w_y, valid = target_weight(target, weight, options.ignore_index, work)
        z = torch.where(valid.unsqueeze(class_dim), z, torch.zeros((), dtype=work, device=z.device))
    if options.softcap is not None:
        z = options.softcap * torch.tanh(z / options.softcap)
    if options.temperature != 1.0:
        z = z / options.temperature
    row_max = z.amax(class_dim, keepdim=True).detach()  # the shift: any constant gives the same value
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = z - row_max
    log_sum = torch.logsumexp(shifted, class_dim, keepdim=True)
    lse = (row_max + log_sum).squeeze(class_dim)
    shape = [1] * logits.dim()
    shape[class_dim] = num_classes
    w = None if weight is None else weight.to(work).view(shape)

    if probabilities:
        coefficient = target.to(work)
        if eps > 0:
            coefficient = coefficient * (1.0 - eps) + eps / num_classes
        if w is not None:
            coefficient = coefficient * w
        # −log p / 2 = (log s − (z − m)) / 2 from exact halves: z − m reaches −6.8e38 at fp32 (a row [3e38,
        # −3e38]) and would overflow to −inf, although a_c (m − z_c), summed and doubled, fits
        half_nll = 0.5 * log_sum - (0.5 * z - 0.5 * row_max)
        # 0·log 0 = 0 for masked classes (log p = −inf) that the target does not use, without a NaN; elsewhere
        # the plain product, so the target's gradient is −log p_c (F.cross_entropy's) wherever p_c > 0.
        safe_half_nll = half_nll.masked_fill((coefficient == 0) & torch.isposinf(half_nll), 0.0)
        product = coefficient * safe_half_nll
        loss = 2.0 * product.sum(class_dim)
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        denominator = loss.numel()
    else:
        # The row is combined in float64 and rounded once to the compute dtype (as in the fused paths): at
        # fp32, m − z_y and Σ w (z − m) can exceed fp32's range (logits near ±3e38) although the loss fits.
        wide = wide_dtype(z.device)
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        z_y = z.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim)
        m, log_s = row_max.squeeze(class_dim).to(wide), log_sum.squeeze(class_dim).to(wide)
        nll = (m - z_y.to(wide)) + log_s  # −log p_y
        loss = (1.0 - eps) * w_y.to(wide) * nll
        if eps > 0:
            # −Σ_c w_c log p_c = W log s − Σ_c w_c (z_c − m), the differences formed in float64
            shifted_wide = z.to(wide) - row_max.to(wide)
            if w is None:
                weighted, weight_total = shifted_wide.sum(class_dim), float(num_classes)
            else:
                w_wide = w.to(wide)
                weighted = (shifted_wide * w_wide).masked_fill(w == 0, 0.0).sum(class_dim)
                weight_total = w_wide.sum()
            loss = loss + (weight_total * log_s - weighted) * (eps / num_classes)
        if z_loss > 0:
            lse_wide = m + log_s
            loss = loss + z_loss * lse_wide * lse_wide
        # a +∞ logit: NaN loss and gradient over the row, as in PyTorch (× exactly 1 on every other row)
        loss = loss * (1.0 + plus_inf_row_nan(log_s))
        loss = torch.where(valid, loss, torch.zeros_like(loss)).to(work)
        denominator = w_y.sum()
    return reduce_loss(loss, options.reduction, denominator).to(logits.dtype)


def cross_entropy_core(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    options: CrossEntropyOptions,
    probabilities: bool,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`cross_entropy` on already validated arguments: select an implementation, then call it.

    Composed losses (poly-1, distillation, adaptive softmax, calibration) call this, so the inputs are
    validated (and the target range checked) once.
    """
    logits, target, weight = fp32_under_autocast(logits, target, weight)
    flags = ["probabilities"] if probabilities else []
    if options.inplace_backward:
        flags.append("inplace_backward")
    request = backends.Request.of(logits, target, weight, class_dim=0 if logits.dim() == 1 else 1,
                                  flags=tuple(flags))
    chosen = backends.select("cross_entropy", impl, request)
    if chosen.name == "composite":
        return chosen.resolve()(logits, target, weight, options, probabilities)
    unbatched = logits.dim() == 1
    rows, row_target = (logits.unsqueeze(0), target.reshape(1)) if unbatched else (logits, target)
    loss = chosen.resolve()(rows, row_target, weight, options)
    return loss.reshape(()) if unbatched and options.reduction == "none" else loss


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    inplace_backward: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Softmax cross-entropy with PyTorch's semantics plus temperature, z-loss and soft-capping.

    With ``z = softcap(x) / T`` (``softcap(x) = c·tanh(x/c)``, Gemma 2) and target coefficients
    ``a = w ⊙ ((1 − ε)·y + ε/C)`` (``y`` one-hot or the given probabilities, ``w`` class weights):

    .. math:: ℓ = −\sum_c a_c \log\operatorname{softmax}(z)_c + λ\,\operatorname{LSE}(z)^2

    and ``∂ℓ/∂z = (Σ_c a_c + 2λ\,LSE)·p − a``, the textbook ``p − y`` when no option is set.

    ``logits`` may be a DTensor on a 1-D device mesh: sharded on the class dimension it runs the vocab-parallel
    algorithm over the mesh (no gather of the logits), sharded on a row dimension it reduces with the weighted
    mean over all ranks, ``Replicate`` computes locally; the loss comes back as a DTensor and the gradient
    with the logits' placements (``docs/distributed.md``, "DTensor and tensor parallelism").

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, any floating dtype. ``-inf`` entries are
            masked classes. fp16/bf16 are reduced and exponentiated in fp32.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64), or class probabilities of
            the logits' shape (floating).
        weight: ``(C,)`` per-class weight (negative entries allowed, as in PyTorch).
        ignore_index: class-index targets equal to it contribute nothing (loss and gradient 0).
        reduction: ``"mean"`` (sum divided by the summed weight of non-ignored targets, or by the number of
            rows for probability targets; 0 with zero gradient when that is 0), ``"sum"`` or ``"none"``.
        label_smoothing: ``ε ∈ [0, 1]``, mixes the target with the uniform distribution.
        temperature: ``T > 0`` dividing the (soft-capped) logits.
        z_loss: ``λ ≥ 0``, adds ``λ·LSE(z)²`` per non-ignored row (PaLM); not multiplied by class weights.
        softcap: ``c > 0`` or None; applies ``c·tanh(x/c)`` before the temperature.
        impl: ``"auto"`` (the first implementation of the dispatch table's row that can serve the inputs:
            for 1-d/2-d class-index input Triton on CUDA, the compiled CPU kernel on CPU where a compiler or a
            cached kernel exists, else the fused chunked path; ``"composite"`` otherwise), ``"torch"`` (fused
            chunked PyTorch path), ``"composite"`` (plain differentiable torch ops; supports double
            backward), ``"triton"`` (Triton kernels), ``"cpu"`` (the C kernel of
            ``softmaxkit.backends.cpu``, built on first use). An implementation named explicitly that cannot
            serve the inputs raises a ``ValueError`` saying why (see :mod:`softmaxkit.backends`).
        inplace_backward: opt-in; the backward writes the gradient into the ``logits`` buffer instead of a
            new one (its version counter is bumped, so any other use of ``logits`` in the graph raises).
            Saves one logits-sized allocation; ``logits`` holds the gradient afterwards. Must be a ``bool``;
            ``logits`` must not be an expanded or self-overlapping view; not available with
            ``impl="composite"`` (nor with class-probability or K-dimensional input, which only it serves).
        chunk_size: rows per chunk of the fused path (None: ~4 MiB of fp32 per chunk); a positive int.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits`` (fp32 under
        ``torch.autocast`` for fp16/bf16 logits, as ``F.cross_entropy``).

    Example:
        >>> import torch, softmaxkit
        >>> logits = torch.tensor([[2.0, 1.0, 0.1]])
        >>> softmaxkit.cross_entropy(logits, torch.tensor([0]))
        tensor(0.4170)

    References:
        Müller et al., "When does label smoothing help?", 2019; Chowdhery et al., "PaLM", 2022 (z-loss);
        Gemma Team, "Gemma 2", 2024 (logit soft-capping).
    """
    if holds_dtensor(logits, target, weight):
        from . import _dtensor

        return _dtensor.cross_entropy(
            logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, temperature=temperature, z_loss=z_loss, softcap=softcap, impl=impl,
            inplace_backward=inplace_backward, chunk_size=chunk_size,
        )
    logits, target, weight, options, probabilities = validate_cross_entropy_args(
        logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
        chunk_size, inplace_backward,
    )
    if logits.shape[0 if logits.dim() == 1 else 1] == 0:  # zero classes (probability targets): PyTorch's value
        return torch.nn.functional.cross_entropy(logits, target, weight, reduction=options.reduction,
                                                 label_smoothing=options.label_smoothing)
    return cross_entropy_core(logits, target, weight, options, probabilities, impl)
