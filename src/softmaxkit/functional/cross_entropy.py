"""Cross-entropy: validate → dispatch → reduce."""

from __future__ import annotations

import torch

from .. import _validation as v
from .._reduction import reduce_loss, target_weight
from ..backends.torch.cross_entropy import _CrossEntropyFunction
from .softmax import compute_dtype

#: implementations ``cross_entropy(impl=...)`` accepts. ``"auto"`` picks the fastest correct one.
IMPLS = ("auto", "torch", "composite", "triton", "cpu")


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
    logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap
):
    """Shared validation of :func:`cross_entropy`'s arguments; returns normalised values."""
    logits = v.check_floating("logits", logits)
    target = v.check_tensor("target", target)
    v.check_same_device("target", target, "logits", logits)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    z_loss = v.check_non_negative("z_loss", z_loss)
    softcap = v.check_softcap(softcap)
    probabilities = _check_target_shape(logits, target)
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes == 0 and not probabilities:  # no class index can be valid
        raise ValueError(f"`logits` must have at least one class, but has shape {tuple(logits.shape)}")
    weight = v.check_class_weight(weight, num_classes, logits)
    v.check_target_values(target, num_classes, ignore_index, probabilities)
    return logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap


def _composite_cross_entropy(
    logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap, probabilities
):
    """Any shape, any target kind, composed of differentiable torch ops (twice differentiable)."""
    class_dim = 0 if logits.dim() == 1 else 1
    num_classes = logits.shape[class_dim]
    work = compute_dtype(logits.dtype)
    z = logits.to(work)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, class_dim, keepdim=True)
    log_p = z - lse
    lse = lse.squeeze(class_dim)
    shape = [1] * logits.dim()
    shape[class_dim] = num_classes
    w = None if weight is None else weight.to(work).view(shape)
    eps = label_smoothing

    if probabilities:
        coefficient = target.to(work)
        if eps > 0:
            coefficient = coefficient * (1.0 - eps) + eps / num_classes
        if w is not None:
            coefficient = coefficient * w
        # 0·log 0 = 0 for masked classes (log p = −inf) that the target does not use, without a NaN; elsewhere
        # the plain product, so the target's gradient is −log p_c (F.cross_entropy's) wherever p_c > 0.
        safe_log_p = log_p.masked_fill((coefficient == 0) & torch.isneginf(log_p), 0.0)
        product = coefficient * safe_log_p
        loss = -product.sum(class_dim)
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        denominator = loss.numel()
    else:
        w_y, valid = target_weight(target, weight, ignore_index, work)
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        nll = -log_p.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim)
        loss = (1.0 - eps) * w_y * nll
        if eps > 0:
            smooth = -(log_p if w is None else log_p * w).sum(class_dim) * (eps / num_classes)
            loss = loss + smooth
        if z_loss > 0:
            loss = loss + z_loss * lse * lse
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        denominator = w_y.sum()
    return reduce_loss(loss, reduction, denominator).to(logits.dtype)


def _pick_impl(impl: str, logits: torch.Tensor, probabilities: bool, inplace_backward: bool) -> str:
    if impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {', '.join(map(repr, IMPLS))}, but got {impl!r}")
    fused_ok = logits.dim() in (1, 2) and not probabilities
    if impl == "auto":
        if fused_ok and logits.is_cuda:
            from ..backends import triton as triton_backend

            if getattr(triton_backend, "available", lambda: False)():
                return "triton"
        if fused_ok and logits.device.type == "cpu":
            from ..backends.cpu import cross_entropy as cpu_backend

            # the compiled kernel where it builds and handles these logits (measured 2-6x faster than
            # "torch", docs/benchmarks.md); the PyTorch path otherwise
            return "cpu" if cpu_backend.supports(logits.unsqueeze(0) if logits.dim() == 1 else logits) else "torch"
        return "torch" if fused_ok else "composite"
    if impl in ("torch", "triton", "cpu") and not fused_ok:
        raise ValueError(
            f"`impl={impl!r}` handles 1-d or 2-d logits with class-index targets; use impl='auto' or "
            f"'composite' for logits of shape {tuple(logits.shape)}"
            + (" with class-probability targets" if probabilities else "")
        )
    if inplace_backward and impl == "composite":
        raise ValueError("`inplace_backward=True` needs impl='auto', 'torch' or 'triton', not 'composite'")
    if impl == "cpu" and logits.device.type != "cpu":
        raise ValueError(f"`impl='cpu'` needs CPU tensors, but `logits` is on {logits.device}")
    return impl


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
        impl: ``"auto"`` (for 1-d/2-d class-index input: Triton on CUDA when available, the compiled CPU
            kernel on CPU when it builds, else the fused chunked path; ``"composite"`` otherwise),
            ``"torch"`` (fused chunked PyTorch path), ``"composite"`` (plain differentiable torch ops;
            supports double backward), ``"triton"`` (Triton kernels), ``"cpu"`` (the C kernel of
            ``softmaxkit.backends.cpu``, built on first use; the ``"torch"`` path where no C compiler is
            found or the classes are not contiguous).
        inplace_backward: opt-in; the backward writes the gradient into the ``logits`` buffer instead of a
            new one (its version counter is bumped, so any other use of ``logits`` in the graph raises).
            Saves one logits-sized allocation; ``logits`` holds the gradient afterwards.
        chunk_size: rows per chunk of the fused path (None: ~4 MiB of fp32 per chunk).

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits``.

    Example:
        >>> import torch, softmaxkit
        >>> logits = torch.tensor([[2.0, 1.0, 0.1]])
        >>> softmaxkit.cross_entropy(logits, torch.tensor([0]))
        tensor(0.4170)

    References:
        Müller et al., "When does label smoothing help?", 2019; Chowdhery et al., "PaLM", 2022 (z-loss);
        Gemma Team, "Gemma 2", 2024 (logit soft-capping).
    """
    (logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap) = (
        validate_cross_entropy_args(
            logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap
        )
    )
    probabilities = _is_probability_target(logits, target)
    if logits.shape[0 if logits.dim() == 1 else 1] == 0:  # zero classes (probability targets): PyTorch's value
        return torch.nn.functional.cross_entropy(logits, target, weight, reduction=reduction,
                                                 label_smoothing=label_smoothing)
    chosen = _pick_impl(impl, logits, probabilities, inplace_backward)
    if chosen == "composite":
        return _composite_cross_entropy(
            logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
            probabilities,
        )
    unbatched = logits.dim() == 1
    rows, row_target = (logits.unsqueeze(0), target.reshape(1)) if unbatched else (logits, target)
    if chosen == "cpu":
        from ..backends.cpu import cross_entropy as cpu_backend

        if cpu_backend.supports(rows):
            loss = cpu_backend.cpu_cross_entropy(
                rows, row_target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
                inplace_backward,
            )
            return loss.reshape(()) if unbatched and reduction == "none" else loss
        chosen = "torch"  # no compiler here, or logits without unit class stride: the same maths in torch ops
    if chosen == "triton":
        from ..backends.triton.cross_entropy import triton_cross_entropy

        loss = triton_cross_entropy(
            rows, row_target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
            inplace_backward,
        )
    else:
        loss = _CrossEntropyFunction.apply(
            rows, row_target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
            chunk_size, inplace_backward,
        )
    return loss.reshape(()) if unbatched and reduction == "none" else loss
