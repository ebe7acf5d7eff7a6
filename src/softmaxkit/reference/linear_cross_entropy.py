r"""Linear cross-entropy and its gradients in NumPy float64: cross-entropy of ``x = h Wᵀ + b``.

The loss is :func:`softmaxkit.reference.cross_entropy` of the logits ``x = h Wᵀ + b`` (every option of it),
and with ``G = ∂ loss/∂x`` from :func:`softmaxkit.reference.cross_entropy_grad` the chain rule gives

.. math:: \frac{\partial\,loss}{\partial h} = G\,W, \qquad \frac{\partial\,loss}{\partial W} = G^\top h,
          \qquad \frac{\partial\,loss}{\partial b} = \sum_{rows} G

``hidden`` may have any leading shape ``(..., D)``; the target has that leading shape (class indices) or
that shape followed by ``C`` (class probabilities).
"""

from __future__ import annotations

import numpy as np

from .cross_entropy import cross_entropy, cross_entropy_grad


def _logits(hidden, weight, bias):
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    rows = h.reshape(-1, h.shape[-1])
    x = rows @ w.T
    if bias is not None:
        x = x + np.asarray(bias, dtype=np.float64)
    return h, w, rows, x


def _flat_target(target, hidden, num_classes):
    """Class indices ``(...)`` → ``(N,)``; class probabilities ``(..., C)`` → ``(N, C)``."""
    target = np.asarray(target)
    if np.issubdtype(target.dtype, np.floating) and target.shape == (*hidden.shape[:-1], num_classes):
        return target.reshape(-1, num_classes)
    return target.reshape(-1)


def linear_cross_entropy(
    hidden,
    weight,
    target,
    bias=None,
    class_weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    r"""``cross_entropy(h Wᵀ + b, target, ...)``; ``"none"`` returns ``hidden.shape[:-1]``."""
    h, _, _, x = _logits(hidden, weight, bias)
    loss = cross_entropy(x, _flat_target(target, h, x.shape[-1]), class_weight, ignore_index, reduction,
                         label_smoothing, temperature, z_loss, softcap)
    return np.reshape(loss, h.shape[:-1]) if reduction == "none" else loss


def linear_cross_entropy_grad(
    hidden,
    weight,
    target,
    bias=None,
    class_weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_output=None,
):
    r"""``(∂/∂hidden, ∂/∂weight, ∂/∂bias)`` of :func:`linear_cross_entropy`: ``(G W, Gᵀ h, Σ_rows G)``.

    ``grad_output`` (``hidden.shape[:-1]``) scales each row's loss for ``"none"``.
    """
    h, w, rows, x = _logits(hidden, weight, bias)
    upstream = None if grad_output is None else np.asarray(grad_output, dtype=np.float64).reshape(-1)
    g = cross_entropy_grad(x, _flat_target(target, h, x.shape[-1]), class_weight, ignore_index, reduction,
                           label_smoothing, temperature, z_loss, softcap, grad_output=upstream)
    return (g @ w).reshape(h.shape), g.T @ rows, g.sum(axis=0)
