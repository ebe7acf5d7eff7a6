r"""Cross-entropy and its closed-form gradient in NumPy float64, with every option of the torch version.

The loss of one row with logits ``x`` (``C`` classes) is built in four steps:

1. transform: ``s = c·tanh(x / c)`` when ``softcap = c`` is given, then ``z = s / T``;
2. normalise: ``log p = z − LSE(z)``;
3. target coefficients ``a_c``: for a class index ``y``, ``a = w ⊙ ((1 − ε)·onehot(y) + ε/C)``;
   for class probabilities ``t``, ``a = w ⊙ ((1 − ε)·t + ε/C)`` (``w`` the class weights, 1 when absent);
4. loss: ``ℓ = −Σ_c a_c log p_c + λ·LSE(z)²`` (the z-loss, unweighted, 0 on ignored rows).

``"mean"`` divides the summed loss by ``Σ w_y`` over non-ignored rows for class indices and by the number
of rows for probabilities (PyTorch's rules), and is 0 when that is 0. Terms with ``a_c = 0`` count as 0 even
where ``log p_c = −inf`` (a ``−inf`` logit is a masked class).

The gradient follows from ``∂(−log p_c)/∂z_j = p_j − δ_cj`` and ``∂LSE/∂z_j = p_j``:

.. math:: \frac{\partial ℓ}{\partial z_j} = (A + 2λ\,\mathrm{LSE}(z))\,p_j − a_j, \qquad A = \sum_c a_c

which is the familiar ``p − y`` when there are no extras, then ``∂z/∂x = (1/T)(1 − tanh²(x/c))``.
"""

from __future__ import annotations

import numpy as np

from .softmax import logsumexp


def _transform(x: np.ndarray, temperature: float, softcap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``z = softcap(x) / T`` and the elementwise derivative ``dz/dx``."""
    if softcap is None:
        return x / temperature, np.full_like(x, 1.0 / temperature)
    t = np.tanh(x / softcap)
    return softcap * t / temperature, (1.0 - t * t) / temperature


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
    z, _ = _transform(x, temperature, softcap)
    lse = logsumexp(z, axis=-1)
    log_p = z - lse[..., None]
    with np.errstate(invalid="ignore"):
        cross = -np.sum(np.where(a == 0, 0.0, a * log_p), axis=-1)
    loss = cross + z_loss * lse**2 * valid
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
    z, dz_dx = _transform(x, temperature, softcap)
    lse = logsumexp(z, axis=-1, keepdims=True)
    p = np.exp(z - lse)
    coefficient = a.sum(axis=-1, keepdims=True) + 2.0 * z_loss * lse * valid[..., None]
    grad = (coefficient * p - a) * dz_dx
    if reduction == "mean":
        grad = grad / denominator if denominator != 0 else np.zeros_like(grad)
    elif reduction == "none" and grad_output is not None:
        grad = grad * np.asarray(grad_output, dtype=np.float64)[..., None]
    return np.moveaxis(grad, -1, class_axis)
