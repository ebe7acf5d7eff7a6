"""Softmax, log-softmax, log-sum-exp and the softmax Jacobian in NumPy float64.

Written to be read: each function states its formula and computes it the direct, stable way.
"""

from __future__ import annotations

import numpy as np


def _as_float64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    r"""Stable log-sum-exp.

    .. math:: \operatorname{LSE}(x) = m + \log \sum_j e^{x_j - m}, \qquad m = \max_j x_j

    Subtracting the maximum keeps every exponent ``<= 0``, so nothing overflows; ``m`` is added back
    exactly. Rows that are entirely ``-inf`` give ``-inf``.
    """
    x = _as_float64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # an all -inf row: exp(-inf - 0) = 0, log 0 = -inf
    with np.errstate(divide="ignore"):
        out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    r"""Stable log-softmax of ``x / T``.

    .. math:: \log p_i = x_i / T - \operatorname{LSE}(x / T)
    """
    z = _as_float64(x) / temperature
    return z - logsumexp(z, axis=axis, keepdims=True)


def softmax(x, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    r"""Stable softmax of ``x / T``.

    .. math:: p_i = \frac{e^{x_i/T - m}}{\sum_j e^{x_j/T - m}}, \qquad m = \max_j x_j / T
    """
    return np.exp(log_softmax(x, axis=axis, temperature=temperature))


def softmax_jacobian(p) -> np.ndarray:
    r"""Jacobian of the softmax at probabilities ``p``: ``J = diag(p) - p pᵀ``.

    .. math:: J_{ij} = \frac{\partial p_i}{\partial x_j} = p_i(\delta_{ij} - p_j)

    ``J`` is symmetric, its rows sum to 0 (adding a constant to every logit changes nothing) and it is
    positive semi-definite with one zero eigenvalue along ``(1, ..., 1)``. For a batch ``(..., C)`` it
    returns ``(..., C, C)``.
    """
    p = _as_float64(p)
    return p[..., :, None] * np.eye(p.shape[-1]) - p[..., :, None] * p[..., None, :]
