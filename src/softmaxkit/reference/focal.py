r"""Focal loss, Poly-1, class-balanced weights and distillation in NumPy float64, straight from the formulas.

Shared notation for one row with logits ``x`` over ``C`` classes and target ``t``, either ``onehot(y)`` for a
class index ``y`` or given class probabilities (a floating array of the logits' shape):

* ``z = x / T`` (temperature), ``p = softmax(z)``, ``log p = z − LSE(z)``;
* smoothed target ``q = (1 − ε)·t + ε/C`` (``ε`` the label smoothing);
* ``w`` the class weights (``1`` when absent): for class indices ``"mean"`` divides the summed loss by
  ``Σ_i w_{y_i}`` over the non-ignored rows, and is 0 when that is 0 (the cross-entropy convention of this
  package); for class probabilities it divides by the number of rows (PyTorch's rule), nothing is ignored.

Focal loss (Lin et al. 2017), generalised to a smoothed target class by class:

.. math:: ℓ = −\sum_c α_c w_c q_c (1 − p_c)^γ \log p_c

(``−α_y w_y (1 − p_y)^γ log p_y`` without smoothing; ``γ = 0`` and no ``α`` is cross-entropy). Its gradient
follows from ``∂p_c/∂z_j = p_c(δ_{cj} − p_j)``:

.. math:: \frac{∂ℓ}{∂z_j} = g_j − p_j \sum_c g_c,\qquad
          g_c = α_c w_c q_c (1 − p_c)^γ \Big(γ\,\frac{p_c \log p_c}{1 − p_c} − 1\Big)

where ``p log p / (1 − p) → −1`` as ``p → 1`` (so no ``0^{γ−1}`` ever appears).

Poly-1 (Leng et al. 2022): ``ℓ = CE + ε_1 \bar w (1 − p_t)`` with ``p_t = ⟨q, p⟩ = Σ_c q_c p_c`` (the
paper's code takes the inner product of the label distribution with the softmax) and row weight
``\bar w = Σ_c w_c t_c`` (``w_y`` for a class index, 1 for a distribution without class weights); since
``∂p_t/∂z_j = p_j (q_j − p_t)``, ``∂ℓ/∂z = ∂CE/∂z + ε_1 \bar w p ⊙ (p_t − q)``.
"""

from __future__ import annotations

import numpy as np

from .cross_entropy import _reduce, _rows, cross_entropy, cross_entropy_grad
from .softmax import log_softmax


def _one_minus_p(log_p: np.ndarray) -> np.ndarray:
    """``1 − p`` computed as ``−expm1(log p)``: accurate when ``p`` is close to 1."""
    return -np.expm1(log_p)


def _class_scale(alpha, num_classes: int) -> np.ndarray:
    return np.ones(num_classes) if alpha is None else np.asarray(alpha, dtype=np.float64)


def focal_loss(
    logits,
    target,
    gamma: float = 2.0,
    alpha=None,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
):
    r"""Softmax focal loss ``−Σ_c α_c w_c q_c (1 − p_c)^γ log p_c`` (see the module docstring).

    Shapes as :func:`softmaxkit.reference.cross_entropy` (class indices, or class probabilities of the logits'
    shape). Returns a float for ``"mean"``/``"sum"`` and the per-element losses (0 where ignored) for
    ``"none"``.
    """
    x, _, a, _, denominator = _rows(logits, target, weight, ignore_index, label_smoothing)
    a = a * _class_scale(alpha, x.shape[-1])
    log_p = log_softmax(x, axis=-1, temperature=temperature)
    modulation = _one_minus_p(log_p) ** gamma
    with np.errstate(invalid="ignore"):
        terms = np.where(a == 0, 0.0, -a * modulation * log_p)
    return _reduce(terms.sum(axis=-1), reduction, denominator)


def focal_loss_grad(
    logits,
    target,
    gamma: float = 2.0,
    alpha=None,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    grad_output=None,
) -> np.ndarray:
    r"""Closed-form ``∂ loss / ∂ logits`` of :func:`focal_loss` (same arguments).

    .. math:: \frac{∂ℓ}{∂x_j} = \frac{1}{T}\Big(g_j − p_j \sum_c g_c\Big),\qquad
              g_c = a_c (1 − p_c)^γ \Big(γ\,\frac{p_c \log p_c}{1 − p_c} − 1\Big),\quad a_c = α_c w_c q_c

    For ``"mean"`` divided by the mean's denominator; for ``"none"`` each row is scaled by ``grad_output``.
    """
    x, class_axis, a, _, denominator = _rows(logits, target, weight, ignore_index, label_smoothing)
    a = a * _class_scale(alpha, x.shape[-1])
    log_p = log_softmax(x, axis=-1, temperature=temperature)
    p = np.exp(log_p)
    one_minus = _one_minus_p(log_p)
    with np.errstate(invalid="ignore", divide="ignore"):
        # p log p / (1 − p): −1 in the limit p → 1, 0 at p = 0.
        ratio = np.where(one_minus == 0, -1.0, np.where(p == 0, 0.0, p * log_p / one_minus))
    g = np.where(a == 0, 0.0, a * one_minus**gamma * (gamma * ratio - 1.0))
    grad = (g - p * g.sum(axis=-1, keepdims=True)) / temperature
    if reduction == "mean":
        grad = grad / denominator if denominator != 0 else np.zeros_like(grad)
    elif reduction == "none" and grad_output is not None:
        grad = grad * np.asarray(grad_output, dtype=np.float64)[..., None]
    return np.moveaxis(grad, -1, class_axis)


def _poly1_parts(logits, target, weight, ignore_index, label_smoothing, temperature):
    """Classes last: ``q`` (smoothed target), row weight ``w̄ = Σ_c w_c t_c`` (0 where ignored), ``p``,
    ``p_t = ⟨q, p⟩`` and the ``"mean"`` denominator."""
    x, class_axis, _, valid, denominator = _rows(logits, target, weight, ignore_index, label_smoothing)
    num_classes = x.shape[-1]
    target = np.asarray(target)
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    if target.shape == np.shape(logits) and np.issubdtype(target.dtype, np.floating):
        t = np.moveaxis(target.astype(np.float64), class_axis, -1)
    else:
        t = np.eye(num_classes)[np.where(valid, target, 0).astype(np.int64)] * valid[..., None]
    q = (1.0 - label_smoothing) * t + label_smoothing / num_classes
    w_bar = np.sum(w * t, axis=-1)
    p = np.exp(log_softmax(x, axis=-1, temperature=temperature))
    p_t = np.sum(q * p, axis=-1)
    return class_axis, q, w_bar, p, p_t, denominator


def poly1_cross_entropy(
    logits,
    target,
    epsilon: float = 1.0,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
):
    r"""Poly-1 loss ``CE + ε_1 w̄ (1 − p_t)``, ``p_t = Σ_c q_c p_c``, ``w̄ = Σ_c w_c t_c`` (Leng et al. 2022).

    ``CE`` is :func:`softmaxkit.reference.cross_entropy` with the same weight, smoothing and temperature;
    the polynomial term is weighted by ``w̄`` (``w_y`` for class indices) so that ``"mean"`` stays a weighted
    average of per-row losses. Class-probability targets: ``"mean"`` divides by the number of rows.
    """
    ce = cross_entropy(
        logits, target, weight, ignore_index, "none", label_smoothing, temperature=temperature
    )
    _, _, w_bar, _, p_t, denominator = _poly1_parts(logits, target, weight, ignore_index, label_smoothing,
                                                    temperature)
    loss = ce + epsilon * w_bar * (1.0 - p_t)
    return _reduce(loss, reduction, denominator)


def poly1_cross_entropy_grad(
    logits,
    target,
    epsilon: float = 1.0,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    grad_output=None,
) -> np.ndarray:
    r"""Closed-form gradient of :func:`poly1_cross_entropy`:
    ``∂CE/∂x + (ε_1 w̄ / T)·p ⊙ (p_t − q)``."""
    ce_grad = cross_entropy_grad(
        logits, target, weight, ignore_index, "none", label_smoothing, temperature=temperature
    )
    class_axis, q, w_bar, p, p_t, denominator = _poly1_parts(logits, target, weight, ignore_index,
                                                             label_smoothing, temperature)
    poly = (epsilon * w_bar)[..., None] * p * (p_t[..., None] - q) / temperature
    grad = np.moveaxis(ce_grad, class_axis, -1) + poly
    if reduction == "mean":
        grad = grad / denominator if denominator != 0 else np.zeros_like(grad)
    elif reduction == "none" and grad_output is not None:
        grad = grad * np.asarray(grad_output, dtype=np.float64)[..., None]
    return np.moveaxis(grad, -1, class_axis)


def class_weights(counts, method: str = "inverse", beta: float = 0.999, normalize: bool = True) -> np.ndarray:
    r"""Per-class weights from class counts ``N_c`` (``N = Σ_c N_c``).

    .. math::
        \text{inverse: } w_c = \frac{N}{N_c},\qquad
        \text{inverse\_sqrt: } w_c = \sqrt{\frac{N}{N_c}},\qquad
        \text{effective\_number: } w_c = \frac{1 − β}{1 − β^{N_c}}

    (Cui et al. 2019: ``(1 − β^{N_c})/(1 − β)`` is the "effective number" of samples of class ``c``.)
    Classes with ``N_c = 0`` get weight 0: they never occur as a target. With ``normalize`` the weights of the
    classes that occur are rescaled to mean 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    safe = np.where(present, counts, 1.0)
    if method == "inverse":
        w = counts.sum() / safe
    elif method == "inverse_sqrt":
        w = np.sqrt(counts.sum() / safe)
    elif method == "effective_number":
        w = (1.0 - beta) / (1.0 - beta**safe) if beta > 0 else np.ones_like(safe)
    else:
        raise ValueError(f"unknown method {method!r}")
    w = np.where(present, w, 0.0)
    if normalize:
        w = w / w[present].mean()
    return w


def distillation_loss(
    student_logits,
    teacher_logits,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target=None,
    alpha=None,
    weight=None,
    ignore_index: int = -100,
):
    r"""Knowledge distillation (Hinton et al. 2015), per distribution (row):

    .. math:: ℓ_i = T^2\,\mathrm{KL}\big(\mathrm{softmax}(t_i/T)\,\big\|\,\mathrm{softmax}(s_i/T)\big)
              = T^2 \sum_c π_c (\log π_c − \log σ_c)

    with ``π = softmax(t/T)``, ``σ = softmax(s/T)`` and ``0·log 0 = 0``. ``"batchmean"`` divides the sum by the
    batch size (``s.shape[0]`` for batched input, 1 for a single ``(C,)`` row), ``"mean"`` by the number of
    rows, ``"sum"`` adds, ``"none"`` returns the per-row values. With ``target`` and ``alpha`` the result is
    ``α·(the above) + (1 − α)·cross_entropy(s, target)`` (the cross-entropy reduced its own way: ``"mean"`` for
    ``"batchmean"``/``"mean"``).
    """
    s = np.asarray(student_logits, dtype=np.float64)
    t = np.asarray(teacher_logits, dtype=np.float64)
    class_axis = 0 if s.ndim == 1 else 1
    log_sigma = log_softmax(s, axis=class_axis, temperature=temperature)
    log_pi = log_softmax(t, axis=class_axis, temperature=temperature)
    pi = np.exp(log_pi)
    with np.errstate(invalid="ignore"):
        kl = np.sum(np.where(pi == 0, 0.0, pi * (log_pi - log_sigma)), axis=class_axis)
    kl = temperature**2 * kl
    if reduction == "none":
        kl_reduced = kl
    elif reduction == "sum":
        kl_reduced = float(kl.sum())
    elif reduction == "mean":
        kl_reduced = float(kl.mean())
    else:
        kl_reduced = float(kl.sum() / (1 if s.ndim == 1 else s.shape[0]))
    if target is None:
        return kl_reduced
    ce_reduction = "mean" if reduction in ("mean", "batchmean") else reduction
    ce = cross_entropy(s, target, weight, ignore_index, ce_reduction)
    return alpha * kl_reduced + (1.0 - alpha) * ce


def distillation_loss_grad(student_logits, teacher_logits, temperature: float = 1.0, reduction: str = "batchmean"):
    r"""``∂ℓ/∂s`` of the pure distillation term: ``T²·(1/T)(σ − π) = T (σ − π)`` per row, then reduced."""
    s = np.asarray(student_logits, dtype=np.float64)
    t = np.asarray(teacher_logits, dtype=np.float64)
    class_axis = 0 if s.ndim == 1 else 1
    sigma = np.exp(log_softmax(s, axis=class_axis, temperature=temperature))
    pi = np.exp(log_softmax(t, axis=class_axis, temperature=temperature))
    grad = temperature * (sigma - pi)
    if reduction == "mean":
        grad = grad / (grad.size / grad.shape[class_axis])
    elif reduction == "batchmean":
        grad = grad / (1 if s.ndim == 1 else s.shape[0])
    return grad
