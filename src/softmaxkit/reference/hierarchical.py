r"""Hierarchical softmax over a binary tree, and Huffman code lengths, in NumPy float64 / plain Python.

A class ``y`` is reached from the root through inner nodes ``n_1 … n_L`` taking branches with signs
``s_k = ±1`` (``+1``: the ``σ(u)`` branch, code 0 in word2vec); with node scores ``u_n = w_n·h + b_n``:

.. math:: \log p(y \mid h) = \sum_{k=1}^{L} \log σ(s_k\,u_{n_k}), \qquad
          \log σ(t) = −\log(1 + e^{−t})

Huffman's algorithm (repeatedly merge the two lightest nodes) minimises the expected path length
``Σ_c counts_c · L_c / Σ counts``; that minimum equals the sum of the weights of all merged nodes, which
:func:`huffman_cost` computes with a heap.
"""

from __future__ import annotations

import heapq

import numpy as np


def _log_sigmoid(t: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -t)


def hierarchical_log_prob(hidden, weight, bias, path_nodes, path_signs) -> np.ndarray:
    r"""``log p(c | h)`` for every class ``c``: ``(N, C)``.

    ``path_nodes[c, k]`` is the ``k``-th inner node on class ``c``'s path and ``path_signs[c, k]`` its
    sign (``0`` pads paths shorter than the longest).
    """
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    nodes, signs = np.asarray(path_nodes), np.asarray(path_signs)
    scores = h @ w.T + b  # u_n for every inner node: (N, C − 1)
    out = np.zeros((h.shape[0], nodes.shape[0]))
    for c in range(nodes.shape[0]):
        for n, s in zip(nodes[c], signs[c]):
            if s != 0:
                out[:, c] += _log_sigmoid(s * scores[:, n])
    return out


def hierarchical_nll(hidden, target, weight, bias, path_nodes, path_signs) -> np.ndarray:
    r"""``−log p(y_n | h_n)`` per row: ``(N,)``."""
    log_p = hierarchical_log_prob(hidden, weight, bias, path_nodes, path_signs)
    target = np.asarray(target)
    return -log_p[np.arange(len(target)), target]


def huffman_cost(counts) -> float:
    r"""The minimum of ``Σ_c counts_c · depth_c`` over binary trees with the classes as leaves."""
    heap = [float(c) for c in counts]
    heapq.heapify(heap)
    cost = 0.0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost
