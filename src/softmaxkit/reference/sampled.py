r"""Sampled softmax with the log-Q correction in NumPy float64, for given draws.

For a row with hidden state ``h``, target ``y`` and the batch's draws ``s_1 … s_m`` from the proposal
``Q``, the candidates' logits are ``z_c = h·w_c + b_c`` corrected by the log of their expected number of
draws:

.. math:: o_0 = z_y − \log(m\,Q(y)), \qquad o_j = z_{s_j} − \log(m\,Q(s_j))\ \ (−∞ \text{ if } s_j = y),
          \qquad ℓ = \operatorname{LSE}(o) − o_0

and, with ``π = softmax(o)``, ``∂ℓ/∂o = π − e_0``, so ``∂ℓ/∂h = Σ_j (π_j − [j = 0])\,w_{c_j}`` and row
``c_j`` of ``∂ℓ/∂W`` gains ``(π_j − [j = 0])\,h`` (``c_0 = y``, ``c_j = s_j``).

Proposals (``C`` classes): uniform ``1/C``; log-uniform (Zipf) ``(\log(c + 2) − \log(c + 1)) / \log(C + 1)``;
unigram ``counts^{power} / Σ counts^{power}``.
"""

from __future__ import annotations

import numpy as np

from .softmax import log_softmax, softmax


def sampler_probabilities(sampler: str, num_classes: int, counts=None, power: float = 0.75) -> np.ndarray:
    """The proposal ``Q`` (see the module docstring)."""
    if sampler == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    if sampler == "log_uniform":
        c = np.arange(num_classes, dtype=np.float64)
        return (np.log(c + 2.0) - np.log(c + 1.0)) / np.log(num_classes + 1.0)
    weights = np.asarray(counts, dtype=np.float64) ** power
    return weights / weights.sum()


def _candidates(hidden, weight, target, sampled, probabilities, bias, remove_accidental_hits, subtract_log_q):
    h = np.asarray(hidden, dtype=np.float64).reshape(-1, np.shape(hidden)[-1])
    w = np.asarray(weight, dtype=np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    y = np.asarray(target).reshape(-1)
    s = np.asarray(sampled)
    m = len(s)
    log_expected = np.log(m * np.asarray(probabilities, dtype=np.float64)) if subtract_log_q else np.zeros(w.shape[0])
    rows = []
    for i in range(h.shape[0]):
        classes = np.concatenate([[y[i]], s]) if y[i] >= 0 else np.concatenate([[0], s])
        o = h[i] @ w[classes].T + b[classes] - log_expected[classes]
        if remove_accidental_hits:
            o[1:][s == classes[0]] = -np.inf
        rows.append((classes, o))
    return h, w, y, rows


def sampled_softmax_loss(
    hidden,
    weight,
    target,
    sampled,
    probabilities,
    bias=None,
    remove_accidental_hits: bool = True,
    subtract_log_q: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    r"""``ℓ = LSE(o) − o_0`` per row (0 for ``ignore_index`` rows); ``"mean"`` over non-ignored rows."""
    _, _, y, rows = _candidates(hidden, weight, target, sampled, probabilities, bias, remove_accidental_hits,
                                subtract_log_q)
    valid = y != ignore_index
    loss = np.array([-log_softmax(o)[0] if ok else 0.0 for (_, o), ok in zip(rows, valid)])  # shifted form
    if reduction == "none":
        return loss.reshape(np.shape(target))
    if reduction == "sum":
        return float(loss.sum())
    return float(loss.sum() / valid.sum()) if valid.any() else 0.0


def sampled_softmax_loss_grad(
    hidden,
    weight,
    target,
    sampled,
    probabilities,
    bias=None,
    remove_accidental_hits: bool = True,
    subtract_log_q: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    r"""``(∂/∂hidden, ∂/∂weight, ∂/∂bias)`` of :func:`sampled_softmax_loss` (see the module docstring)."""
    h, w, y, rows = _candidates(hidden, weight, target, sampled, probabilities, bias, remove_accidental_hits,
                                subtract_log_q)
    valid = y != ignore_index
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / valid.sum() if valid.any() else 0.0
    grad_h = np.zeros_like(h)
    grad_w = np.zeros_like(w)
    grad_b = np.zeros(w.shape[0])
    for i, (classes, o) in enumerate(rows):
        if not valid[i]:
            continue
        g = softmax(o)
        g[0] -= 1.0
        g *= scale
        grad_h[i] = g @ w[classes]
        np.add.at(grad_w, classes, g[:, None] * h[i][None, :])
        np.add.at(grad_b, classes, g)
    return grad_h.reshape(np.shape(hidden)), grad_w, grad_b
