"""Focal loss and Poly-1: cross-entropy variants that reweight examples by how well they are classified."""

from __future__ import annotations

import math

import torch

from .. import _validation as v
from .._reduction import reduce_loss, target_weight
from ..backends.torch.focal import _FocalFunction
from ._rows import class_rows, restore_rows
from .cross_entropy import cross_entropy
from .softmax import compute_dtype


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

    With ``p = softmax(x/T)``, smoothed target ``q = (1 − ε)·onehot(y) + ε/C``, per-class balance ``α`` and
    class weight ``w``:

    .. math:: ℓ = −\sum_c α_c w_c q_c (1 − p_c)^γ \log p_c
              \;\overset{ε = 0}{=}\; −α_y w_y (1 − p_y)^γ \log p_y

    The factor ``(1 − p_y)^γ`` down-weights well-classified examples; ``γ = 0`` without ``α`` is exactly
    :func:`softmaxkit.cross_entropy`. The backward is in closed form (see
    :mod:`softmaxkit.backends.torch.focal`): finite for every ``γ >= 0``, including ``γ < 1`` at ``p_y → 1``
    where autograd through ``pow`` gives NaN.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, any floating dtype (fp16/bf16 computed in fp32).
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64).
        gamma: focusing parameter ``γ >= 0`` (the paper uses 2).
        alpha: ``(C,)`` per-class balance ``α_c >= 0``, or None (all 1). Unlike ``weight`` it does not enter the
            mean's denominator, as in the paper.
        weight: ``(C,)`` class weights, with PyTorch's cross-entropy semantics (they divide the mean).
        ignore_index: targets equal to it contribute nothing (loss and gradient 0).
        reduction: ``"mean"`` (sum divided by ``Σ w_y`` over non-ignored targets; 0 when every target is
            ignored), ``"sum"`` or ``"none"``.
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

    References:
        Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    logits = v.check_floating("logits", logits)
    num_classes = v.check_class_index_target(logits, target, "focal_loss")
    gamma = v.check_non_negative("gamma", gamma)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    alpha = v.check_class_vector("alpha", alpha, num_classes, logits, minimum=0.0)
    weight = v.check_class_weight(weight, num_classes, logits)
    v.check_class_target(target, num_classes, ignore_index)

    if alpha is None:
        class_scale = weight
    elif weight is None:
        class_scale = alpha
    else:
        class_scale = alpha.to(compute_dtype(logits.dtype)) * weight.to(compute_dtype(logits.dtype))
    rows, row_target = class_rows(logits, target)
    loss = _FocalFunction.apply(
        rows, row_target, gamma, class_scale, weight, ignore_index, reduction, label_smoothing, temperature
    )
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

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64).
        epsilon: ``ε >= −1`` (below −1 the loss can be negative and is unbounded below).
        weight, ignore_index, reduction, label_smoothing, temperature: as :func:`softmaxkit.cross_entropy`.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits``.

    Example:
        >>> import torch, softmaxkit
        >>> logits = torch.tensor([[2.0, 1.0, 0.1]])
        >>> softmaxkit.poly1_cross_entropy(logits, torch.tensor([0]), epsilon=1.0)
        tensor(0.7580)

    References:
        Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions", ICLR 2022.
    """
    logits = v.check_floating("logits", logits)
    num_classes = v.check_class_index_target(logits, target, "poly1_cross_entropy")
    epsilon = v.check_in_range("epsilon", epsilon, -1.0, math.inf, high_open=True)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    weight = v.check_class_weight(weight, num_classes, logits)

    # cross_entropy validates the target's values and handles every shape and dtype.
    ce = cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing, temperature=temperature,
    )
    work = compute_dtype(logits.dtype)
    class_dim = 0 if logits.dim() == 1 else 1
    w_y, valid = target_weight(target, weight, ignore_index, work)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    z = logits.to(work)
    if temperature != 1.0:
        z = z / temperature
    z_y = z.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim)
    p_y = torch.exp(z_y - torch.logsumexp(z, dim=class_dim))
    p_t = (1.0 - label_smoothing) * p_y + label_smoothing / num_classes
    loss = ce.to(work) + epsilon * w_y * (1.0 - p_t)
    return reduce_loss(loss, reduction, w_y.sum()).to(logits.dtype)
