"""Focal loss and Poly-1: cross-entropy variants that reweight examples by how well they are classified."""

from __future__ import annotations

import math

import torch

from .. import _validation as v
from .. import backends
from .._core import CrossEntropyOptions, compute_dtype, fp32_under_autocast
from .._reduction import reduce_loss, target_weight
from ._dtensor import holds_dtensor
from ._rows import class_rows, restore_rows
from .cross_entropy import _check_target_shape, cross_entropy_core, validate_cross_entropy_args


def _check_target(logits: torch.Tensor, target: object) -> tuple[int, bool]:
    """Validate ``target`` exactly as :func:`softmaxkit.cross_entropy` does (same errors); return ``C`` and
    whether it holds class probabilities (the logits' shape, floating) rather than class indices."""
    target = v.check_tensor("target", target)
    v.check_same_device("target", target, "logits", logits)
    probabilities = _check_target_shape(logits, target)
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes == 0:
        raise ValueError(f"`logits` must have at least one class, but has shape {tuple(logits.shape)}")
    return num_classes, probabilities


def _probability_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and probability targets of the same shape as ``(M, C)`` rows (classes last)."""
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.unsqueeze(0)
    if logits.dim() == 2:
        return logits, target
    num_classes = logits.shape[1]
    return (logits.movedim(1, -1).reshape(-1, num_classes), target.movedim(1, -1).reshape(-1, num_classes))


def _row_shape(logits: torch.Tensor) -> tuple[int, ...]:
    """Shape of a ``"none"`` loss: the logits' shape without the class dimension."""
    return () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Multi-class softmax focal loss (Lin et al. 2017).

    With ``p = softmax(x/T)``, smoothed target ``q = (1 − ε)·t + ε/C`` (``t = onehot(y)`` for a class index
    ``y``, or the given class probabilities ``t``), per-class balance ``α`` and class weight ``w``:

    .. math:: ℓ = −\sum_c α_c w_c q_c (1 − p_c)^γ \log p_c
              \;\overset{ε = 0,\ t = e_y}{=}\; −α_y w_y (1 − p_y)^γ \log p_y

    The factor ``(1 − p_c)^γ`` down-weights well-classified examples; ``γ = 0`` without ``α`` is exactly
    :func:`softmaxkit.cross_entropy`, for class indices and for class probabilities (the natural
    generalisation: each class of the target distribution is modulated by its own ``(1 − p_c)^γ``). With
    probability targets, as in :func:`torch.nn.functional.cross_entropy`, ``w`` multiplies each class
    inside the sum, ``"mean"`` divides by the number of rows (not by a sum of weights), ``ignore_index`` is
    not used (it must stay negative), and ``t`` is taken as given: neither checked for nor normalised to
    non-negative rows summing to 1. The backward is in closed form (see
    :mod:`softmaxkit.backends.torch.focal`): finite for every ``γ >= 0``, including ``γ < 1`` at ``p_y → 1``
    where autograd through ``pow`` gives NaN.

    ``logits`` may be a DTensor on a 1-D device mesh: sharded on the class dimension (``Shard(1)``; the
    global LSE and ``p_y`` come from all-reduced row statistics, the gradient ``g − p Σ_c g_c`` is local given
    them; class-index targets, replicated; ``alpha``/``weight`` whole or ``Shard(0)``), on a row dimension
    (``Shard(0)``; the mean is taken over all ranks) or ``Replicate`` (see ``docs/distributed.md``, "DTensor
    and tensor parallelism").

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, any floating dtype (fp16/bf16 computed in fp32).
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64), or class probabilities of the
            logits' shape (floating; differentiable: the loss has a gradient with respect to them).
        gamma: focusing parameter ``γ >= 0`` (the paper uses 2).
        alpha: ``(C,)`` per-class balance ``α_c >= 0``, or None (all 1). Unlike ``weight`` it does not enter the
            mean's denominator, as in the paper.
        weight: ``(C,)`` class weights, with PyTorch's cross-entropy semantics (for class indices they divide
            the mean).
        ignore_index: class-index targets equal to it contribute nothing (loss and gradient 0).
        reduction: ``"mean"`` (sum divided by ``Σ w_y`` over non-ignored targets, 0 when every target is
            ignored; by the number of rows for probability targets), ``"sum"`` or ``"none"``.
        label_smoothing: ``ε ∈ [0, 1]``.
        temperature: ``T > 0`` dividing the logits.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits``. No gradient
        flows to ``alpha`` or ``weight``.

    Example:
        >>> import torch, softmaxkit
        >>> logits = torch.tensor([[2.0, 1.0, 0.1]])
        >>> softmaxkit.focal_loss(logits, torch.tensor([0]), gamma=2.0)
        tensor(0.0485)
        >>> softmaxkit.focal_loss(logits, torch.tensor([0]), gamma=0.0)  # = cross_entropy
        tensor(0.4170)
        >>> softmaxkit.focal_loss(logits, torch.tensor([[1.0, 0.0, 0.0]]), gamma=2.0)  # one-hot probabilities
        tensor(0.0485)

    References:
        Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    if holds_dtensor(logits, target, alpha, weight):
        from . import _dtensor

        return _dtensor.focal_loss(logits, target, gamma=gamma, alpha=alpha, weight=weight, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing, temperature=temperature)
    logits, target, alpha, weight = fp32_under_autocast(logits, target, alpha, weight)
    logits = v.check_floating("logits", logits)
    num_classes, probabilities = _check_target(logits, target)
    gamma = v.check_non_negative("gamma", gamma)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    alpha = v.check_class_vector("alpha", alpha, num_classes, logits, minimum=0.0)
    weight = v.check_class_weight(weight, num_classes, logits)
    v.check_target_values(target, num_classes, ignore_index, probabilities)

    if alpha is None:
        class_scale = weight
    elif weight is None:
        class_scale = alpha
    else:
        class_scale = alpha.to(compute_dtype(logits.dtype)) * weight.to(compute_dtype(logits.dtype))
    options = CrossEntropyOptions(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                  temperature=temperature, num_classes=num_classes)
    chosen = backends.select("focal_loss", "auto", backends.Request.of(logits, target, weight))
    if probabilities:
        rows, row_target = _probability_rows(logits, target)
        loss = chosen.resolve()(rows, row_target, gamma, class_scale, None, options, True)
        return loss.reshape(_row_shape(logits)) if reduction == "none" else loss
    rows, row_target = class_rows(logits, target)
    loss = chosen.resolve()(rows, row_target, gamma, class_scale, weight, options, False)
    return restore_rows(loss, reduction, target)


def poly1_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Poly-1 loss (Leng et al. 2022): cross-entropy plus ``ε`` times the first polynomial term.

    With ``p = softmax(x/T)``, the smoothed target ``q = (1 − ε_s)·onehot(y) + ε_s/C`` and
    ``p_t = Σ_c q_c p_c = (1 − ε_s) p_y + ε_s/C``:

    .. math:: ℓ = \mathrm{CE}(x, y) + ε\, w_y (1 − p_t),\qquad
              \frac{∂ℓ}{∂z} = \frac{∂\mathrm{CE}}{∂z} + ε\, w_y\, p ⊙ (p_t − q)

    ``CE`` is :func:`softmaxkit.cross_entropy` with the same ``weight``, ``label_smoothing`` and
    ``temperature``; the polynomial term is weighted by ``w_y`` so ``"mean"`` (÷ ``Σ w_y``) stays a weighted
    average of per-example Poly-1 losses. ``ε = 0`` is cross-entropy; ``ε = −1`` removes the first term of
    the Taylor expansion of ``−log p_t`` in ``1 − p_t``.

    Class-probability targets ``t`` (the logits' shape, floating) use the paper's own definition, whose
    reference code computes ``p_t = Σ_c labels_c · softmax(x)_c`` for (possibly smoothed) label
    distributions (Leng et al. 2022, appendix): with ``q = (1 − ε_s)·t + ε_s/C``,

    .. math:: ℓ = \mathrm{CE}(x, t) + ε\, \bar w\,(1 − ⟨q, p⟩),\qquad \bar w = \sum_c w_c t_c,

    so a one-hot ``t`` gives exactly the class-index loss (``\bar w = w_y``), and without class weights
    ``\bar w = Σ_c t_c = 1`` for a distribution: ``ℓ = CE(x, t) + ε(1 − ⟨q, p⟩)``. As in
    :func:`torch.nn.functional.cross_entropy`, ``"mean"`` then divides by the number of rows,
    ``ignore_index`` is not used (it must stay negative) and ``t`` is neither checked nor renormalised. The
    gradient (by autograd) is the same formula with ``q`` in place of the one-hot target.

    ``logits`` may be a DTensor on a 1-D device mesh: class-sharded (``Shard(1)``: the vocab-parallel
    cross-entropy plus ``p_y`` from the all-reduced LSE and target logit; class-index targets, replicated), on
    a row dimension (``Shard(0)``; the mean over all ranks) or ``Replicate`` (``docs/distributed.md``).

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64), or class probabilities of the
            logits' shape (floating; differentiable).
        epsilon: ``ε >= −1`` (below −1 the loss can be negative and is unbounded below).
        weight, ignore_index, reduction, label_smoothing, temperature: as :func:`softmaxkit.cross_entropy`.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits``.

    Example:
        >>> import torch, softmaxkit
        >>> logits = torch.tensor([[2.0, 1.0, 0.1]])
        >>> softmaxkit.poly1_cross_entropy(logits, torch.tensor([0]), epsilon=1.0)
        tensor(0.7580)
        >>> softmaxkit.poly1_cross_entropy(logits, torch.tensor([[1.0, 0.0, 0.0]]), epsilon=1.0)
        tensor(0.7580)

    References:
        Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions", ICLR 2022.
    """
    if holds_dtensor(logits, target, weight):
        from . import _dtensor

        return _dtensor.poly1_cross_entropy(logits, target, epsilon=epsilon, weight=weight, ignore_index=ignore_index,
                                            reduction=reduction, label_smoothing=label_smoothing,
                                            temperature=temperature)
    logits, target, weight = fp32_under_autocast(logits, target, weight)
    logits = v.check_floating("logits", logits)
    num_classes, probabilities = _check_target(logits, target)
    epsilon = v.check_in_range("epsilon", epsilon, -1.0, math.inf, high_open=True)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    weight = v.check_class_weight(weight, num_classes, logits)

    work = compute_dtype(logits.dtype)
    class_dim = 0 if logits.dim() == 1 else 1
    if probabilities:
        v.check_target_values(target, num_classes, ignore_index, probabilities)
        z = logits.to(work)
        if temperature != 1.0:
            z = z / temperature
        log_p = torch.log_softmax(z, dim=class_dim)
        t = target.to(work)
        q = t * (1.0 - label_smoothing) + label_smoothing / num_classes if label_smoothing > 0 else t
        shape = [1] * logits.dim()
        shape[class_dim] = num_classes
        w = None if weight is None else weight.to(work).view(shape)
        coefficient = q if w is None else q * w
        # CE = −Σ_c w_c q_c log p_c, a term with a zero coefficient counting 0 even at log p_c = −inf (a
        # masked class); the mask is applied to log p only there, so ∂/∂t_c = −(1 − ε_s) w_c log p_c elsewhere,
        # also where t_c = 0, as F.cross_entropy gives
        masked = torch.isinf(log_p) & (coefficient == 0)
        ce = -(coefficient * torch.where(masked, torch.zeros_like(log_p), log_p)).sum(class_dim)
        p_t = (q * log_p.exp()).sum(class_dim)
        w_bar = (t if w is None else t * w).sum(class_dim)
        loss = ce + epsilon * w_bar * (1.0 - p_t)
        return reduce_loss(loss, reduction).to(logits.dtype)

    # the cross-entropy arguments are validated once (the target's values included), then the core is called
    _, target, weight, options, _ = validate_cross_entropy_args(
        logits, target, weight, ignore_index, "none", label_smoothing, temperature, 0.0, None
    )
    ce = cross_entropy_core(logits, target, weight, options, False)
    w_y, valid = target_weight(target, weight, ignore_index, work)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    # ignored rows read as 0 logits: a NaN or ±inf padding row gives loss and gradient 0, not 0·NaN
    z = torch.where(valid.unsqueeze(class_dim), logits.to(work), torch.zeros((), dtype=work, device=logits.device))
    if temperature != 1.0:
        z = z / temperature
    z_y = z.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim)
    row_max = z.amax(dim=class_dim, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # p_y = exp((z_y − m) − log Σ exp(z − m)): the shifted form, exact at any magnitude of the logits
    log_sum = torch.logsumexp(z - row_max, dim=class_dim)
    p_y = torch.exp((z_y - row_max.squeeze(class_dim)) - log_sum)
    p_t = (1.0 - label_smoothing) * p_y + label_smoothing / num_classes
    loss = ce.to(work) + epsilon * w_y * (1.0 - p_t)
    return reduce_loss(loss, reduction, w_y.sum()).to(logits.dtype)
