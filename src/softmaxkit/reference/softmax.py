"""Softmax, log-softmax, log-sum-exp and the softmax Jacobian in NumPy float64.

Written to be read: each function states its formula and computes it the direct, stable way: the shifted
form of :func:`shifted`, exact to a few ulps at any magnitude.
"""

from __future__ import annotations

import numpy as np


def _as_float64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def shifted(x, axis: int = -1, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The shifted form of a row: ``m = max_j x_j``, ``d = (x − m)/T`` and ``log S = log Σ_j e^{d_j}``.

    .. math:: \log\operatorname{softmax}(x/T)_i = d_i − \log S, \qquad
              \operatorname{softmax}(x/T)_i = e^{d_i}/S, \qquad \operatorname{LSE}(x/T) = m/T + \log S

    Every ``d_j <= 0`` with ``max_j d_j = 0``, so ``1 <= S <= C``: nothing overflows, ``log S`` is exact to an
    ulp, and ``d`` carries the only rounding (exact when ``x_j`` and ``m`` are within a factor 2, else a
    relative ``2^-53``). So every result is exact to a few ulps for any finite input, whatever its magnitude
    (``m`` is never added to a small number and subtracted again). Shifting before dividing by ``T`` keeps
    ``x/T`` from overflowing. Non-finite input follows PyTorch: a row of only ``−inf`` is shifted by 0
    (``S = 0``); a ``+inf`` or NaN makes ``d`` NaN there (``+inf − inf``). Returned with ``keepdims``.
    """
    x = _as_float64(x)
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # an empty row: −inf, so LSE = −inf
    m = np.where(m == -np.inf, 0.0, m)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = (x - m) / temperature
        # x − m beyond float64's range (e.g. 1e308 − (−1e308)) can still give a finite d for T > 1: halve first
        d = np.where(np.isinf(x - m) & np.isfinite(x), ((0.5 * x - 0.5 * m) / temperature) * 2.0, d)
        log_s = np.log(np.sum(np.exp(d), axis=axis, keepdims=True))
    return m, d, log_s


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    r"""Stable log-sum-exp, in the shifted form (:func:`shifted`).

    .. math:: \operatorname{LSE}(x) = m + \log \sum_j e^{x_j - m}, \qquad m = \max_j x_j

    Subtracting the maximum keeps every exponent ``<= 0``, so nothing overflows; ``m`` is added back
    exactly. Rows that are entirely ``-inf`` give ``-inf``; a row holding ``+inf`` gives ``+inf`` (as
    ``torch.logsumexp``), one holding NaN gives NaN.
    """
    m, _, log_s = shifted(x, axis=axis)
    with np.errstate(invalid="ignore"):
        out = np.where(m == np.inf, np.inf, m + log_s)
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    r"""Log-softmax of ``x / T`` in the shifted form: exact to a few ulps for any finite input.

    .. math:: \log p_i = \frac{x_i - m}{T} - \log \sum_j e^{(x_j - m)/T}, \qquad m = \max_j x_j

    (never ``x_i/T − LSE(x/T)``, which loses ``|x|·2^-53`` to cancellation). Rows holding ``+inf`` or NaN, and
    rows of only ``−inf``, are NaN (as in PyTorch).
    """
    _, d, log_s = shifted(x, axis=axis, temperature=temperature)
    with np.errstate(invalid="ignore"):
        return d - log_s


def softmax(x, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    r"""Softmax of ``x / T`` in the shifted form: exact to a few ulps for any finite input.

    .. math:: p_i = \frac{e^{(x_i - m)/T}}{\sum_j e^{(x_j - m)/T}}, \qquad m = \max_j x_j

    Rows holding ``+inf`` or NaN, and rows of only ``−inf``, are NaN (as in PyTorch).
    """
    _, d, log_s = shifted(x, axis=axis, temperature=temperature)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp(d) / np.exp(log_s)


def softmax_jacobian(p) -> np.ndarray:
    r"""Jacobian of the softmax at probabilities ``p``: ``J = diag(p) - p pᵀ``.

    .. math:: J_{ij} = \frac{\partial p_i}{\partial x_j} = p_i(\delta_{ij} - p_j)

    ``J`` is symmetric, its rows sum to 0 (adding a constant to every logit changes nothing) and it is
    positive semi-definite with one zero eigenvalue along ``(1, ..., 1)``. For a batch ``(..., C)`` it
    returns ``(..., C, C)``.
    """
    p = _as_float64(p)
    return p[..., :, None] * np.eye(p.shape[-1]) - p[..., :, None] * p[..., None, :]
