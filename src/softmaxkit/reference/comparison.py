r"""The losses softmax + cross-entropy is compared with, and top-k softmax, in NumPy float64.

Notation for one row with scores (logits) ``z`` over ``C`` classes, true class ``y`` (or a target vector
``t``: ``onehot(y)``, or given class probabilities / a multi-hot vector), ``p = softmax(z)`` and
``σ(u) = 1/(1 + e^{−u})``. Every loss here averages over the classes (``1/C``), as PyTorch's
``multi_margin_loss`` and ``multilabel_soft_margin_loss`` do, except Crammer–Singer (one term per row).

=============================  =========================================================  ==========================
loss                           per-row value                                              ``∂ℓ/∂z_j``
=============================  =========================================================  ==========================
Weston–Watkins hinge           ``(1/C) Σ_{j≠y} max(0, m − z_y + z_j)^q``                   ``(q/C) h_j^{q−1}[h_j>0]``,
                                                                                          ``∂/∂z_y = −Σ_{j≠y}(·)``
Crammer–Singer hinge           ``max(0, m + max_{j≠y} z_j − z_y)``                          ``±1`` on the violation
MSE on probabilities (Brier)   ``(1/C) Σ_c (p_c − t_c)²``                                   ``(2/C) p_j (r_j − ⟨r, p⟩)``
MSE on raw scores              ``(1/C) Σ_c (z_c − t_c)²``                                   ``(2/C)(z_j − t_j)``
one-vs-rest sigmoid (BCE)      ``(1/C) Σ_c w_c [softplus(z_c) − t_c z_c]``                  ``(w_j/C)(σ(z_j) − t_j)``
=============================  =========================================================  ==========================

(``h_j = m − z_y + z_j``, ``r = p − t``.) Class weights ``w``: the hinge and MSE losses multiply the row by
``w_y`` (``Σ_c w_c t_c`` for a probability target), the sigmoid loss weights each class inside the sum
(PyTorch's ``multilabel_soft_margin_loss``). ``"mean"`` divides by the number of non-ignored rows (PyTorch's
rule for these losses: class weights do not enter the denominator), and is 0 when every row is ignored.
At a hinge's kink (``h = 0``) the subgradient 0 is taken; ties of ``max_{j≠y} z_j`` share its gradient
equally (what ``torch.amax`` does).

Top-k softmax keeps the ``k`` largest scores (ties broken towards the lower index) and renormalises:

.. math:: \operatorname{topk\_softmax}(z)_i = \frac{e^{z_i}\,[i ∈ S_k]}{\sum_{j ∈ S_k} e^{z_j}},
          \qquad \frac{∂ q_i}{∂ z_j} = q_i(δ_{ij} − q_j)\,[i, j ∈ S_k]
"""

from __future__ import annotations

import numpy as np

from .softmax import softmax


def _class_last(logits, target, probabilities: bool):
    x = np.asarray(logits, dtype=np.float64)
    class_axis = 0 if x.ndim == 1 else 1
    rows = np.moveaxis(x, class_axis, -1)
    target = np.asarray(target)
    if probabilities:
        target = np.moveaxis(target.astype(np.float64), class_axis, -1)
    return rows, class_axis, target


def _is_probability_target(logits, target) -> bool:
    target = np.asarray(target)
    return target.shape == np.shape(logits) and np.issubdtype(target.dtype, np.floating)


def _targets(rows, target, weight, ignore_index, probabilities):
    """``t`` (rows × C), the valid mask, the row weight ``w_y`` (or ``Σ_c w_c t_c``) and ``y`` (0 if ignored)."""
    num_classes = rows.shape[-1]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    if probabilities:
        valid = np.ones(rows.shape[:-1], dtype=bool)
        t = target
        row_weight = (t * w).sum(axis=-1)
        y = np.zeros(rows.shape[:-1], dtype=np.int64)
    else:
        valid = target != ignore_index
        y = np.where(valid, target, 0).astype(np.int64)
        t = np.eye(num_classes)[y]
        row_weight = w[y] * valid
    return t, valid, row_weight, y, w


def _reduce(loss, valid, reduction: str):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return float(loss.sum())
    count = float(valid.sum())
    return float(loss.sum() / count) if count else 0.0


def _grad_scale(grad, valid, reduction, grad_output):
    if reduction == "mean":
        count = float(valid.sum())
        return grad / count if count else np.zeros_like(grad)
    if reduction == "none" and grad_output is not None:
        return grad * np.asarray(grad_output, dtype=np.float64)[..., None]
    return grad


# ------------------------------------------------------------------------------------------ hinge losses
def _hinge_terms(rows, y, margin):
    z_y = np.take_along_axis(rows, y[..., None], axis=-1)
    h = margin - z_y + rows
    own = np.eye(rows.shape[-1], dtype=bool)[y]
    return np.where(own, 0.0, h), own


def multi_margin_loss(logits, target, p: int = 1, margin: float = 1.0, weight=None, ignore_index: int = -100,
                      reduction: str = "mean"):
    r"""Weston–Watkins multi-class hinge ``w_y (1/C) Σ_{j≠y} max(0, m − z_y + z_j)^p`` (``F.multi_margin_loss``)."""
    rows, _, target = _class_last(logits, target, False)
    _, valid, row_weight, y, _ = _targets(rows, target, weight, ignore_index, False)
    h, _ = _hinge_terms(rows, y, margin)
    loss = (np.maximum(h, 0.0) ** p).sum(axis=-1) / rows.shape[-1] * row_weight
    return _reduce(loss, valid, reduction)


def multi_margin_loss_grad(logits, target, p: int = 1, margin: float = 1.0, weight=None,
                           ignore_index: int = -100, reduction: str = "mean", grad_output=None):
    r"""``∂/∂z_j = w_y (p/C) h_j^{p−1} [h_j > 0]`` for ``j ≠ y``; ``∂/∂z_y = −Σ_{j≠y} ∂/∂z_j``."""
    rows, class_axis, target = _class_last(logits, target, False)
    _, valid, row_weight, y, _ = _targets(rows, target, weight, ignore_index, False)
    h, own = _hinge_terms(rows, y, margin)
    active = (h > 0) & ~own
    g = np.where(active, p * np.maximum(h, 0.0) ** (p - 1), 0.0) / rows.shape[-1]
    g = g - own * g.sum(axis=-1, keepdims=True)
    g = g * row_weight[..., None]
    return np.moveaxis(_grad_scale(g, valid, reduction, grad_output), -1, class_axis)


def _crammer_singer_parts(rows, y, margin):
    own = np.eye(rows.shape[-1], dtype=bool)[y]
    others = np.where(own, -np.inf, rows)
    rival = others.max(axis=-1)
    z_y = np.take_along_axis(rows, y[..., None], axis=-1)[..., 0]
    return margin + rival - z_y, others, rival, own


def crammer_singer_loss(logits, target, margin: float = 1.0, weight=None, ignore_index: int = -100,
                        reduction: str = "mean"):
    r"""Crammer–Singer multi-class hinge ``w_y max(0, m + max_{j≠y} z_j − z_y)``."""
    rows, _, target = _class_last(logits, target, False)
    _, valid, row_weight, y, _ = _targets(rows, target, weight, ignore_index, False)
    h, *_ = _crammer_singer_parts(rows, y, margin)
    with np.errstate(invalid="ignore"):
        loss = np.where(np.isfinite(h), np.maximum(h, 0.0), 0.0) * row_weight
    return _reduce(loss, valid, reduction)


def crammer_singer_loss_grad(logits, target, margin: float = 1.0, weight=None, ignore_index: int = -100,
                             reduction: str = "mean", grad_output=None):
    r"""``+w_y/|R|`` on each rival ``j ∈ R = argmax_{j≠y} z_j`` and ``−w_y`` on ``z_y`` where ``h > 0``; else 0."""
    rows, class_axis, target = _class_last(logits, target, False)
    _, valid, row_weight, y, _ = _targets(rows, target, weight, ignore_index, False)
    h, others, rival, own = _crammer_singer_parts(rows, y, margin)
    rivals = others == rival[..., None]
    active = (h > 0) & np.isfinite(h)
    g = rivals / np.maximum(rivals.sum(axis=-1, keepdims=True), 1) - own
    g = g * (active * row_weight)[..., None]
    return np.moveaxis(_grad_scale(g, valid, reduction, grad_output), -1, class_axis)


# -------------------------------------------------------------------------------------------- MSE losses
def softmax_mse_loss(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    r"""MSE on the softmax probabilities (the Brier score over ``C``): ``w_y (1/C) Σ_c (p_c − t_c)²``."""
    probabilities = _is_probability_target(logits, target)
    rows, _, target = _class_last(logits, target, probabilities)
    t, valid, row_weight, _, _ = _targets(rows, target, weight, ignore_index, probabilities)
    p = softmax(rows, axis=-1)
    loss = ((p - t) ** 2).mean(axis=-1) * row_weight
    return _reduce(loss, valid, reduction)


def softmax_mse_loss_grad(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                          grad_output=None):
    r"""``∂/∂z_j = w_y (2/C) p_j (r_j − Σ_c r_c p_c)`` with ``r = p − t`` (the chain rule through ``J = diag(p) − ppᵀ``)."""
    probabilities = _is_probability_target(logits, target)
    rows, class_axis, target = _class_last(logits, target, probabilities)
    t, valid, row_weight, _, _ = _targets(rows, target, weight, ignore_index, probabilities)
    p = softmax(rows, axis=-1)
    r = p - t
    g = 2.0 / rows.shape[-1] * p * (r - (r * p).sum(axis=-1, keepdims=True)) * row_weight[..., None]
    return np.moveaxis(_grad_scale(g, valid, reduction, grad_output), -1, class_axis)


def score_mse_loss(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    r"""MSE on the raw scores (least-squares classification): ``w_y (1/C) Σ_c (z_c − t_c)²``."""
    probabilities = _is_probability_target(logits, target)
    rows, _, target = _class_last(logits, target, probabilities)
    t, valid, row_weight, _, _ = _targets(rows, target, weight, ignore_index, probabilities)
    loss = ((rows - t) ** 2).mean(axis=-1) * row_weight
    return _reduce(loss, valid, reduction)


def score_mse_loss_grad(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                        grad_output=None):
    r"""``∂/∂z_j = w_y (2/C)(z_j − t_j)``: linear in the error."""
    probabilities = _is_probability_target(logits, target)
    rows, class_axis, target = _class_last(logits, target, probabilities)
    t, valid, row_weight, _, _ = _targets(rows, target, weight, ignore_index, probabilities)
    g = 2.0 / rows.shape[-1] * (rows - t) * row_weight[..., None]
    return np.moveaxis(_grad_scale(g, valid, reduction, grad_output), -1, class_axis)


# ------------------------------------------------------------------------------------- one-vs-rest sigmoid
def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return np.exp(-_softplus(-x))


def multilabel_soft_margin_loss(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    r"""One-vs-rest binary cross-entropy ``(1/C) Σ_c w_c [softplus(z_c) − t_c z_c]`` (``F.multilabel_soft_margin_loss``).

    ``softplus(z) − t z = −t log σ(z) − (1 − t) log σ(−z)``.
    """
    probabilities = _is_probability_target(logits, target)
    rows, _, target = _class_last(logits, target, probabilities)
    t, valid, _, _, w = _targets(rows, target, weight, ignore_index, probabilities)
    loss = (w * (_softplus(rows) - t * rows)).mean(axis=-1) * valid
    return _reduce(loss, valid, reduction)


def multilabel_soft_margin_loss_grad(logits, target, weight=None, ignore_index: int = -100,
                                     reduction: str = "mean", grad_output=None):
    r"""``∂/∂z_j = (w_j/C)(σ(z_j) − t_j)``: each class its own logistic regression."""
    probabilities = _is_probability_target(logits, target)
    rows, class_axis, target = _class_last(logits, target, probabilities)
    t, valid, _, _, w = _targets(rows, target, weight, ignore_index, probabilities)
    g = w * (_sigmoid(rows) - t) / rows.shape[-1] * valid[..., None]
    return np.moveaxis(_grad_scale(g, valid, reduction, grad_output), -1, class_axis)


# -------------------------------------------------------------------------------------------- top-k softmax
def topk_mask(x, k: int, axis: int = -1) -> np.ndarray:
    """``[i ∈ S_k]``: the ``k`` largest entries along ``axis``, ties broken towards the lower index."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    order = np.argsort(-x, axis=-1, kind="stable")  # stable: equal values keep their index order
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :k], True, axis=-1)
    return np.moveaxis(mask, -1, axis)


def topk_softmax(x, k: int, axis: int = -1) -> np.ndarray:
    r"""Softmax over the ``k`` largest entries, exactly 0 elsewhere (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    mask = topk_mask(x, k, axis)
    return softmax(np.where(mask, x, -np.inf), axis=axis)


def topk_softmax_vjp(x, k: int, grad_output, axis: int = -1) -> np.ndarray:
    r"""``Jᵀ g`` of :func:`topk_softmax`: ``q ⊙ (g − ⟨g, q⟩)`` (0 outside the top ``k``)."""
    q = topk_softmax(x, k, axis)
    g = np.asarray(grad_output, dtype=np.float64)
    return q * (g - (g * q).sum(axis=axis, keepdims=True))
