r"""Adaptive softmax (Grave et al. 2017) log-probabilities in NumPy float64.

With cutoffs ``c_1 < … < c_k < c_{k+1} = C``, the head ``H`` (``(c_1 + k) × D``, bias ``β`` or 0) and the
tail clusters ``T_i = O_i P_i`` (projection ``P_i``, output ``O_i``):

.. math:: \log p(y \mid h) = \begin{cases} \log\operatorname{softmax}(H h + β)_y & y < c_1 \\
          \log\operatorname{softmax}(H h + β)_{c_1 + i} + \log\operatorname{softmax}(O_i P_i h)_{y − c_{i+1}}
          & c_{i+1} ≤ y < c_{i+2} \end{cases}

(clusters counted from 0), and the loss is ``−mean_n log p(y_n | h_n)``.
"""

from __future__ import annotations

import numpy as np

from .softmax import log_softmax


def adaptive_log_prob(hidden, head_weight, head_bias, tail, cutoffs) -> np.ndarray:
    r"""``log p(c | h)`` for every class: ``(N, C)``.

    Args:
        hidden: ``(N, D)``.
        head_weight, head_bias: ``(c_1 + k, D)`` and ``(c_1 + k,)`` or None.
        tail: ``[(P_0, O_0), …]``, ``P_i`` of shape ``(d_i, D)`` and ``O_i`` of ``(|cluster i|, d_i)``.
        cutoffs: ``[c_1, …, c_k]`` (without ``C``).
    """
    h = np.asarray(hidden, dtype=np.float64)
    head = h @ np.asarray(head_weight, dtype=np.float64).T
    if head_bias is not None:
        head = head + np.asarray(head_bias, dtype=np.float64)
    head_lp = log_softmax(head, axis=-1)
    shortlist = cutoffs[0]
    parts = [head_lp[:, :shortlist]]
    for i, (projection, output) in enumerate(tail):
        cluster = (h @ np.asarray(projection, dtype=np.float64).T) @ np.asarray(output, dtype=np.float64).T
        parts.append(log_softmax(cluster, axis=-1) + head_lp[:, shortlist + i, None])
    return np.concatenate(parts, axis=1)


def adaptive_softmax_loss(hidden, target, head_weight, head_bias, tail, cutoffs):
    r"""``(output, loss)``: the target's log-probability per row and ``−mean(output)``."""
    log_p = adaptive_log_prob(hidden, head_weight, head_bias, tail, cutoffs)
    target = np.asarray(target)
    output = log_p[np.arange(len(target)), target]
    return output, float(-output.mean())
