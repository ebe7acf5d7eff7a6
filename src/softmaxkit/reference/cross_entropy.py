r"""Cross-entropy and its closed-form gradient in NumPy float64, with every option of the torch version.

The loss of one row with logits ``x`` (``C`` classes) is built in four steps:

1. transform: ``s = c·tanh(x / c)`` when ``softcap = c`` is given, then ``z = s / T``;
2. normalise: ``log p = z − LSE(z)``;
3. target coefficients ``a_c``: for a class index ``y``, ``a = w ⊙ ((1 − ε)·onehot(y) + ε/C)``;
   for class probabilities ``t``, ``a = w ⊙ ((1 − ε)·t + ε/C)`` (``w`` the class weights, 1 when absent);
4. loss: ``ℓ = −Σ_c a_c log p_c + λ·LSE(z)²`` (the z-loss, unweighted, 0 on ignored rows).

Computed in the shifted form (``log p = (z − m) − log Σ e^{z − m}``, never ``z − LSE(z)``), so the oracle is
exact to a few ulps at any magnitude. Ignored rows have loss and gradient exactly 0, whatever their logits.
``"mean"`` divides the summed loss by ``Σ w_y`` over non-ignored rows for class indices and by the number
of rows for probabilities (PyTorch's rules), and is 0 when that is 0. Terms with ``a_c = 0`` count as 0 even
where ``log p_c = −inf`` (a ``−inf`` logit is a masked class).

The gradient follows from ``∂(−log p_c)/∂z_j = p_j − δ_cj`` and ``∂LSE/∂z_j = p_j``:

.. math:: \frac{\partial ℓ}{\partial z_j} = (A + 2λ\,\mathrm{LSE}(z))\,p_j − a_j, \qquad A = \sum_c a_c

which is the familiar ``p − y`` when there are no extras, then ``∂z/∂x = (1/T)(1 − tanh²(x/c))``.
"""

from __future__ import annotations

import numpy as np

from .softmax import shifted


def _transform(x: np.ndarray, temperature: float, softcap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``s = softcap(x)`` (``x`` without a softcap) and ``dz/dx`` for ``z = s / T``."""
    if softcap is None:
        return x, np.full_like(x, 1.0 / temperature)
    t = np.tanh(x / softcap)
    return softcap * t, (1.0 - t * t) / temperature


def _normalised(x: np.ndarray, temperature: float, softcap: float | None):
    """The shifted form of ``z = softcap(x)/T``: ``log p = d − log S``, ``p = e^d / S``, ``LSE(z) = m/T + log S``.

    ``d = (s − m)/T`` with ``m = max s`` (:func:`softmaxkit.reference.softmax.shifted`), so ``log p`` never
    loses ``|z|·2^-53`` to the cancellation of ``z − LSE(z)``. Returns ``(log_p, p, lse, dz_dx)``, classes last.
    """
    s, dz_dx = _transform(x, temperature, softcap)
    m, d, log_s = shifted(s, axis=-1, temperature=temperature)
    with np.errstate(invalid="ignore", over="ignore"):
        log_p = d - log_s
        p = np.exp(d) / np.exp(log_s)
        lse = np.where(m == np.inf, np.inf, m / temperature + log_s)[..., 0]
    return log_p, p, lse, dz_dx


def _rows(logits, target, weight, ignore_index, label_smoothing):
    """Move classes last and build the coefficients ``a`` (rows × C), valid mask and mean denominator."""
    x = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target)
    class_axis = 0 if x.ndim == 1 else 1
    x_last = np.moveaxis(x, class_axis, -1)
    num_classes = x_last.shape[-1]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = label_smoothing
    if target.shape == x.shape and np.issubdtype(target.dtype, np.floating):
        t = np.moveaxis(target.astype(np.float64), class_axis, -1)
        a = w * ((1.0 - eps) * t + eps / num_classes)
        valid = np.ones(x_last.shape[:-1], dtype=bool)
        denominator = float(valid.sum())
    else:
        valid = target != ignore_index
        y = np.where(valid, target, 0).astype(np.int64)
        onehot = np.eye(num_classes)[y]
        a = w * ((1.0 - eps) * onehot + eps / num_classes) * valid[..., None]
        denominator = float(np.sum(w[y] * valid))
    return x_last, class_axis, a, valid, denominator


def _reduce(loss: np.ndarray, reduction: str, denominator: float):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return float(loss.sum())
    return float(loss.sum() / denominator) if denominator != 0 else 0.0


def cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    r"""Cross-entropy ``−Σ_c a_c log softmax(z)_c + λ·LSE(z)²`` (see the module docstring).

    Shapes follow PyTorch: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; target class indices
    ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or class probabilities of the logits' shape.
    Returns a float for ``"mean"``/``"sum"`` and the per-element losses for ``"none"``.
    """
    x, _, a, valid, denominator = _rows(logits, target, weight, ignore_index, label_smoothing)
    log_p, _, lse, _ = _normalised(x, temperature, softcap)
    with np.errstate(invalid="ignore"):
        cross = -np.sum(np.where(a == 0, 0.0, a * log_p), axis=-1)
        z_term = np.where(valid, z_loss * lse**2, 0.0) if z_loss else 0.0
    loss = cross + z_term
    return _reduce(loss, reduction, denominator)


def cross_entropy_grad(
    logits,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_output=None,
) -> np.ndarray:
    r"""Closed-form ``∂ loss / ∂ logits`` of :func:`cross_entropy` (same arguments).

    .. math:: \frac{\partial ℓ}{\partial x_j} = \big[(A + 2λ\,\mathrm{LSE})\,p_j − a_j\big]\,
              \frac{1 − \tanh^2(x_j / c)}{T}

    For ``"mean"`` it is divided by the mean's denominator; for ``"none"`` each element's gradient is
    scaled by ``grad_output`` (the upstream gradient, ones by default). Returned in the logits' shape.
    """
    x, class_axis, a, valid, denominator = _rows(logits, target, weight, ignore_index, label_smoothing)
    _, p, lse, dz_dx = _normalised(x, temperature, softcap)
    with np.errstate(invalid="ignore"):
        coefficient = a.sum(axis=-1, keepdims=True)
        if z_loss:
            coefficient = coefficient + 2.0 * z_loss * lse[..., None]
        # ignored rows: an exact 0, whatever their logits hold
        grad = np.where(valid[..., None], (coefficient * p - a) * dz_dx, 0.0)
    if reduction == "mean":
        grad = grad / denominator if denominator != 0 else np.zeros_like(grad)
    elif reduction == "none" and grad_output is not None:
        grad = grad * np.asarray(grad_output, dtype=np.float64)[..., None]
    return np.moveaxis(grad, -1, class_axis)
