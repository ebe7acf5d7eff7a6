r"""Sparsemax, entmax and their Fenchel-Young losses in NumPy float64, written for reading.

α-entmax (Peters et al. 2019) maps scores ``x`` to the distribution that maximises score plus Tsallis entropy:

.. math:: \mathrm{entmax}_α(x) = \arg\max_{p ∈ Δ} \; ⟨p, x⟩ + H_α(p),\qquad
          H_α(p) = \frac{1 − \sum_i p_i^α}{α(α − 1)}\;(α ≠ 1),\qquad H_1(p) = −\sum_i p_i \log p_i

Its solution is ``p_i = [(α − 1)x_i − τ]_+^{1/(α−1)}`` with the threshold ``τ`` chosen so that ``Σ p = 1``:
``α = 1`` is softmax, ``α = 2`` sparsemax (the Euclidean projection onto the simplex, Martins & Astudillo
2016), ``α = 1.5`` has an exact sort-based solution.

The Jacobian on the support is ``J = diag(s) − s sᵀ / Σ s`` with ``s_i = p_i^{2−α}`` (``s = 1[p > 0]`` for
sparsemax, ``√p`` for 1.5-entmax, ``p`` for softmax).

The Fenchel-Young loss of entmax (Blondel et al. 2020) for a class-index target ``y`` is

.. math:: L(x, y) = ⟨p^⋆ − e_y, x⟩ + H_α(p^⋆),\qquad p^⋆ = \mathrm{entmax}_α(x)

and its gradient is ``∂L/∂x = p^⋆ − e_y``: the loss is 0 exactly when ``p^⋆ = e_y``.
"""

from __future__ import annotations

import math

import numpy as np

from .cross_entropy import _reduce, _rows
from .softmax import softmax


def _rows_last(x, axis: int):
    x = np.asarray(x, dtype=np.float64)
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _back(rows: np.ndarray, moved_shape, axis: int) -> np.ndarray:
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def _candidates(z: np.ndarray, scale: float) -> tuple[np.ndarray | None, float]:
    """``u = (z − max z)/scale`` of the entries that can be in the support (``u > −1``), sorted descending,
    and ``max z``; None for a row without a solution (a NaN, a +inf, every entry −inf).

    Shifting by the row max first keeps every quantity below small (``3e38 − 1`` rounds to ``3e38``; ``0 −
    1`` does not), and ``τ >= max − scale`` means only the ``u > −1`` can be in the support."""
    top = np.max(z)
    if not np.isfinite(top) or np.isnan(z).any():
        return None, top
    u = (z - top) / scale
    return np.sort(u[u > -1.0])[::-1], top


def _sparsemax_row(z: np.ndarray) -> np.ndarray:
    """With ``u = z − max z`` sorted descending, the support size is ``k = max{j : 1 + j u_(j) > Σ_{i≤j} u_(i)}``
    (Martins & Astudillo 2016; ``j = 1`` always qualifies) and ``τ = (Σ_{i≤k} u_(i) − 1)/k``, the sum exactly
    rounded (``math.fsum``)."""
    u, top = _candidates(z, 1.0)
    if u is None:
        return np.full_like(z, np.nan)
    k = int(np.nonzero(1.0 + np.arange(1, len(u) + 1) * u > np.cumsum(u))[0].max()) + 1
    tau = (math.fsum(u[:k]) - 1.0) / k
    return np.maximum((z - top) - tau, 0.0)


def sparsemax(x, axis: int = -1) -> np.ndarray:
    r"""Sparsemax: the Euclidean projection of ``x`` onto the probability simplex.

    .. math:: \mathrm{sparsemax}(x) = \arg\min_{p ∈ Δ} \|p − x\|^2 = [x − τ]_+,\qquad \sum_i [x_i − τ]_+ = 1
    """
    rows, shape = _rows_last(x, axis)
    return _back(np.stack([_sparsemax_row(r) for r in rows]) if len(rows) else rows, shape, axis)


def _entmax15_row(z: np.ndarray) -> np.ndarray:
    """With ``u = (z − max z)/2`` sorted descending, ``τ_k = mean_k − sqrt((1 − Σ_{i≤k}(u_(i) − mean_k)²)/k)``
    (the larger root of ``Σ_{i≤k}(u_(i) − τ)² = 1``, Peters et al. 2019) and the support size is the largest
    ``k`` with ``τ_k <= u_(k)`` (``k = 1`` always qualifies); sums exactly rounded (``math.fsum``)."""
    u, top = _candidates(z, 2.0)
    if u is None:
        return np.full_like(z, np.nan)
    ranks = np.arange(1, len(u) + 1)
    mean = np.cumsum(u) / ranks
    spread = np.cumsum(u * u) - ranks * mean * mean  # |u| < 1: a few ulps of k, enough to pick k
    tau_k = mean - np.sqrt(np.maximum(0.0, (1.0 - spread) / ranks))
    k = int(np.nonzero(tau_k <= u)[0].max()) + 1
    head = u[:k]
    mean_k = math.fsum(head) / k  # τ itself from exactly rounded sums
    tau = mean_k - math.sqrt(max(0.0, (1.0 - math.fsum((head - mean_k) ** 2)) / k))
    return np.maximum((z - top) / 2.0 - tau, 0.0) ** 2


def entmax15(x, axis: int = -1) -> np.ndarray:
    r"""Exact 1.5-entmax (Peters et al. 2019, Algorithm 2).

    .. math:: \mathrm{entmax}_{1.5}(x)_i = \big[x_i/2 − τ\big]_+^2,\qquad \sum_i [x_i/2 − τ]_+^2 = 1
    """
    rows, shape = _rows_last(x, axis)
    return _back(np.stack([_entmax15_row(r) for r in rows]) if len(rows) else rows, shape, axis)


def _entmax_bisect_row(z: np.ndarray, alpha: float, n_iter: int) -> np.ndarray:
    if alpha == 1.0:
        return softmax(z)
    top = np.max(z)
    if not np.isfinite(top) or np.isnan(z).any():
        return np.full_like(z, np.nan)  # a NaN, a +inf or every entry −inf: no solution
    d = alpha - 1.0
    scaled = d * (z - top)  # shifted by the max (large |z| would swallow the bracket's width)
    # Σ p(τ) decreases in τ; at τ = −1 the largest p is 1, at τ = −(1/C)^d every p <= 1/C.
    lo, hi = -1.0, -((1.0 / len(z)) ** d)
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        if np.sum(np.maximum(scaled - mid, 0.0) ** (1.0 / d)) >= 1.0:
            lo = mid
        else:
            hi = mid
    p = np.maximum(scaled - lo, 0.0) ** (1.0 / d)
    return p / p.sum()


def entmax_bisect(x, alpha=1.5, axis: int = -1, n_iter: int = 200) -> np.ndarray:
    r"""α-entmax by bisection on the threshold, to float64 precision (200 halvings), for any ``α >= 1``.

    .. math:: \mathrm{entmax}_α(x)_i = [(α − 1)x_i − τ]_+^{1/(α−1)},\qquad \sum_i p_i = 1

    ``α = 1`` is softmax. ``alpha`` is a float or an array broadcastable to ``x`` with size 1 along ``axis``
    (one α per row). The result is renormalised to sum to 1.
    """
    x = np.asarray(x, dtype=np.float64)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), _alpha_shape(x.shape, axis))
    rows, shape = _rows_last(x, axis)
    alphas, _ = _rows_last(alpha, axis)
    out = [_entmax_bisect_row(r, float(a[0]), n_iter) for r, a in zip(rows, alphas)]
    return _back(np.stack(out) if out else rows, shape, axis)


def _alpha_shape(shape, axis: int):
    shape = list(shape)
    shape[axis] = 1
    return tuple(shape)


def entmax_jacobian(p, alpha: float) -> np.ndarray:
    r"""Jacobian ``∂p/∂x`` of α-entmax at its output ``p`` (one row ``(C,)`` or a batch ``(..., C)``).

    .. math:: J = \mathrm{diag}(s) − \frac{s s^\top}{\sum_i s_i},\qquad s_i = p_i^{2−α}\,1[p_i > 0]
    """
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        s = np.where(p > 0, p ** (2.0 - alpha), 0.0)
    outer = s[..., :, None] * s[..., None, :] / s.sum(axis=-1)[..., None, None]
    return s[..., :, None] * np.eye(p.shape[-1]) - outer


def entmax_alpha_derivative(p, alpha: float) -> np.ndarray:
    r"""``∂p/∂α`` of α-entmax at its output ``p`` (rows ``(..., C)``), for ``α > 1`` (Correia et al. 2019).

    .. math:: \frac{∂p_i}{∂α} = \frac{p_i − \tilde s_i}{(α − 1)^2} − \frac{p_i \log p_i − \tilde s_i h}{α − 1},
              \qquad \tilde s = \frac{s}{\sum_j s_j},\; s_i = p_i^{2−α},\; h = \sum_j p_j \log p_j

    (The textbook form; it cancels catastrophically as ``α → 1``, where the limit is
    ``−p_i(\log^2 p_i − \sum_j p_j \log^2 p_j)/2``.)
    """
    p = np.asarray(p, dtype=np.float64)
    d = alpha - 1.0
    support = p > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(support, np.log(np.where(support, p, 1.0)), 0.0)
    s = np.where(support, np.exp((1.0 - d) * log_p), 0.0)
    s_tilde = s / s.sum(axis=-1, keepdims=True)
    plogp = p * log_p
    h = plogp.sum(axis=-1, keepdims=True)
    return (p - s_tilde) / d**2 - (plogp - s_tilde * h) / d


def tsallis_entropy(p, alpha: float) -> np.ndarray:
    r"""Tsallis α-entropy of rows ``(..., C)``; Shannon's at ``α = 1``.

    .. math:: H_α(p) = \frac{1 − \sum_i p_i^α}{α(α − 1)},\qquad H_1(p) = −\sum_i p_i \log p_i
    """
    p = np.asarray(p, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        shannon = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
        tsallis = (1.0 - np.sum(p**alpha[..., None], axis=-1)) / (alpha * (alpha - 1.0))
    return np.where(alpha == 1.0, shannon, tsallis)


def _fenchel_young(logits, target, probabilities, alpha, weight, ignore_index, reduction, temperature):
    x, class_axis, a, valid, denominator = _rows(logits, target, weight, ignore_index, 0.0)
    target = np.asarray(target)
    z = x / temperature
    p = np.moveaxis(probabilities(np.moveaxis(z, -1, class_axis), class_axis), class_axis, -1)
    onehot = np.where(valid[..., None], np.eye(x.shape[-1])[np.where(valid, target, 0).astype(np.int64)], 0.0)
    alpha_rows = np.broadcast_to(np.asarray(alpha, dtype=np.float64), p.shape[:-1])
    loss = np.sum((p - onehot) * z, axis=-1) + tsallis_entropy(p, alpha_rows)
    row_weight = a.sum(axis=-1)
    loss = np.where(valid, row_weight * loss, 0.0)
    return loss, p, onehot, row_weight, class_axis, denominator


def _fy_loss(logits, target, probabilities, alpha, weight, ignore_index, reduction, temperature):
    loss, *_, denominator = _fenchel_young(
        logits, target, probabilities, alpha, weight, ignore_index, reduction, temperature
    )
    return _reduce(loss, reduction, denominator)


def _fy_grad(logits, target, probabilities, alpha, weight, ignore_index, reduction, temperature, grad_output):
    _, p, onehot, row_weight, class_axis, denominator = _fenchel_young(
        logits, target, probabilities, alpha, weight, ignore_index, reduction, temperature
    )
    grad = row_weight[..., None] * (p - onehot) / temperature
    if reduction == "mean":
        grad = grad / denominator if denominator != 0 else np.zeros_like(grad)
    elif reduction == "none" and grad_output is not None:
        grad = grad * np.asarray(grad_output, dtype=np.float64)[..., None]
    return np.moveaxis(grad, -1, class_axis)


def sparsemax_loss(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean", temperature=1.0):
    r"""Sparsemax loss ``⟨p − e_y, z⟩ + (1 − ‖p‖²)/2`` with ``p = sparsemax(z)``, ``z = x/T``; each row
    weighted by ``w_y``, reduced like cross-entropy."""
    return _fy_loss(logits, target, sparsemax, 2.0, weight, ignore_index, reduction, temperature)


def entmax15_loss(logits, target, weight=None, ignore_index: int = -100, reduction: str = "mean", temperature=1.0):
    r"""1.5-entmax loss ``⟨p − e_y, z⟩ + (1 − Σ p^{1.5})/0.75`` with ``p = entmax15(z)``."""
    return _fy_loss(logits, target, entmax15, 1.5, weight, ignore_index, reduction, temperature)


def entmax_bisect_loss(
    logits, target, alpha=1.5, weight=None, ignore_index: int = -100, reduction: str = "mean", temperature=1.0
):
    r"""α-entmax loss ``⟨p − e_y, z⟩ + H_α(p)`` with ``p = entmax_bisect(z, α)``; cross-entropy at ``α = 1``.

    ``alpha`` is a float or one value per row (the target's shape)."""
    alpha_rows = np.asarray(alpha, dtype=np.float64)

    def probabilities(z, axis):
        a = alpha_rows if alpha_rows.ndim == 0 else np.expand_dims(alpha_rows, axis)
        return entmax_bisect(z, a, axis=axis)

    return _fy_loss(logits, target, probabilities, alpha_rows, weight, ignore_index, reduction, temperature)


def sparsemax_loss_grad(logits, target, weight=None, ignore_index=-100, reduction="mean", temperature=1.0, grad_output=None):
    r"""``∂L/∂x = w_y (p − e_y) / T`` for :func:`sparsemax_loss`, reduced as the loss."""
    return _fy_grad(logits, target, sparsemax, 2.0, weight, ignore_index, reduction, temperature, grad_output)


def entmax15_loss_grad(logits, target, weight=None, ignore_index=-100, reduction="mean", temperature=1.0, grad_output=None):
    r"""``∂L/∂x = w_y (p − e_y) / T`` for :func:`entmax15_loss`."""
    return _fy_grad(logits, target, entmax15, 1.5, weight, ignore_index, reduction, temperature, grad_output)


def entmax_bisect_loss_alpha_derivative(logits, target, alpha: float) -> np.ndarray:
    r"""``∂L/∂α`` per row of :func:`entmax_bisect_loss` (no weights, ``T = 1``).

    By the envelope theorem (``p^⋆`` maximises ``⟨p, x⟩ + H_α(p)``) it is ``∂H_α/∂α`` at fixed ``p = p^⋆``:

    .. math:: \frac{∂H_α}{∂α} = −\frac{\sum_i p_i^α \log p_i}{α(α−1)} − \frac{(2α − 1)(1 − \sum_i p_i^α)}{α^2(α−1)^2}
    """
    x = np.asarray(logits, dtype=np.float64)
    p = entmax_bisect(x, alpha, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    power = np.sum(p**alpha, axis=-1)
    d = alpha - 1.0
    return -np.sum(p**alpha * log_p, axis=-1) / (alpha * d) - (2 * alpha - 1) * (1 - power) / (alpha * d) ** 2
