r"""Hierarchical softmax over a Huffman tree (Morin & Bengio 2005; Mikolov et al. 2013, word2vec).

The ``C`` classes are the leaves of a binary tree built from their counts by Huffman's algorithm, so
frequent classes get short paths (the expected path length is within one of the counts' entropy in bits).
Each of the ``C − 1`` inner nodes ``n`` has a vector ``w_n`` (and bias ``b_n``); a class's probability is
the product of the binary decisions along its path ``n_1 … n_L`` with codes ``d_k ∈ {0, 1}``:

.. math:: \log p(y \mid h) = \sum_{k=1}^{L_y} \log σ\big((1 − 2 d_k)(w_{n_k}·h + b_{n_k})\big)

(word2vec's convention: code 0 is the ``σ(u)`` branch). Since ``σ(u) + σ(−u) = 1`` at every node, the
``C`` leaf probabilities sum to exactly 1: the model is normalised by construction, at ``O(L·D)`` per row
instead of ``O(C·D)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import _validation as v
from . import backends
from ._core import compute_dtype
from ._reduction import reduce_loss
from .backends.torch.hierarchical import path_matrix as _path_matrix  # noqa: F401  (the tests build one)
from .backends.torch.hierarchical import sparse_path as _sparse_path

#: bytes of gathered node vectors (``rows × L × D``) per chunk in forward and backward.
_CHUNK_BYTES = 16 << 20


def huffman_tree(counts) -> tuple[np.ndarray, np.ndarray]:
    """Huffman tree over ``C`` classes, built the way word2vec's ``CreateBinaryTree`` does.

    Leaves are the classes ``0 … C−1``; inner node ``C + j`` is the ``j``-th merge, so the root is
    ``2C − 2``. Repeatedly the two lightest remaining nodes are merged (two sorted queues, leaves and
    merged nodes: O(C log C) for the sort, then O(C)); the second-picked child gets code 1. On equal
    weights the leaf is taken first (word2vec takes the merged node), which gives the minimum-variance
    Huffman code: the same optimal expected depth with the shallowest deepest leaf.

    Returns ``(parent, code)``: int64 arrays of length ``2C − 1`` (``parent[root] = −1``, ``code[root] = 0``).
    """
    counts = np.asarray(counts, dtype=np.float64)
    num_classes = len(counts)
    total_nodes = 2 * num_classes - 1
    weight = np.empty(total_nodes)
    weight[:num_classes] = counts
    parent = np.full(total_nodes, -1, dtype=np.int64)
    code = np.zeros(total_nodes, dtype=np.int64)
    leaves = np.argsort(counts, kind="stable")  # lightest first; ties by class index
    leaf_pos, inner_pos, next_inner = 0, num_classes, num_classes

    def pop() -> int:
        nonlocal leaf_pos, inner_pos
        # the lighter front; on a tie take the leaf, which keeps the tree shallow for equal counts
        if leaf_pos < num_classes and (inner_pos >= next_inner or weight[leaves[leaf_pos]] <= weight[inner_pos]):
            leaf_pos += 1
            return int(leaves[leaf_pos - 1])
        inner_pos += 1
        return inner_pos - 1

    for _ in range(num_classes - 1):
        first, second = pop(), pop()
        weight[next_inner] = weight[first] + weight[second]
        parent[first] = parent[second] = next_inner
        code[second] = 1
        next_inner += 1
    return parent, code


def huffman_paths(parent: np.ndarray, code: np.ndarray, num_classes: int):
    """Each class's path from the root: inner-node indices ``(C, L)`` (``node − C``), signs ``1 − 2d`` with
    0 as padding ``(C, L)``, and the path lengths ``(C,)``; ``L`` is the deepest leaf's depth."""
    nodes, signs = [], []
    current = np.arange(num_classes)
    while True:
        up = parent[current]
        alive = up >= 0
        if not alive.any():
            break
        nodes.append(np.where(alive, up - num_classes, 0))
        signs.append(np.where(alive, 1 - 2 * code[current], 0))
        current = np.where(alive, up, current)
    if not nodes:  # a single class: no decisions
        return np.zeros((num_classes, 0), np.int64), np.zeros((num_classes, 0), np.int64), np.zeros(num_classes, np.int64)
    node_matrix = np.stack(nodes[::-1], axis=1)
    sign_matrix = np.stack(signs[::-1], axis=1)
    lengths = (sign_matrix != 0).sum(axis=1)
    # root first: shift each row so its path starts at column 0 and the padding is at the end
    depth = node_matrix.shape[1]
    shift = depth - lengths
    columns = (np.arange(depth)[None, :] + shift[:, None]) % depth
    rows = np.arange(num_classes)[:, None]
    return node_matrix[rows, columns], sign_matrix[rows, columns], lengths


def _levels(parent: np.ndarray, code: np.ndarray, num_classes: int):
    """Non-root nodes grouped by depth (root's children first): per level, ``(child, parent inner index, sign)``."""
    total = len(parent)
    depth = np.zeros(total, dtype=np.int64)
    for node in range(total - 2, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    order = np.argsort(depth, kind="stable")
    order = order[depth[order] > 0]
    boundaries = np.flatnonzero(np.diff(depth[order])) + 1
    groups = np.split(order, boundaries) if len(order) else []
    return [(g, parent[g] - num_classes, 1 - 2 * code[g]) for g in groups]


class _HierarchicalNLLFunction:
    """``apply(hidden, weight, bias, nodes, signs, chunk_rows) -> (N,)``: the per-row ``−log p(y | h)``.

    Not an autograd Function: it calls the dispatch row ``hierarchical_nll`` (the custom op
    ``softmaxkit::hierarchical_nll`` of :mod:`softmaxkit.backends.torch.hierarchical`, whose closed-form
    backward is registered with the op), with the sparse/gathered choice of :func:`_sparse_path`.
    """

    @staticmethod
    def apply(hidden, weight, bias, nodes, signs, chunk_rows):
        chosen = backends.select("hierarchical_nll", "auto", backends.Request.of(hidden, weight, bias))
        return chosen.resolve()(hidden, weight, bias, nodes, signs, chunk_rows, _sparse_path(hidden.dtype))


class HierarchicalSoftmax(nn.Module):
    r"""Hierarchical softmax over a Huffman tree of the classes (see the module docstring for the formula).

    Args:
        in_features: ``D``, the hidden size.
        counts: ``(C,)`` class counts (or frequencies), all finite and ``> 0``, ``C ≥ 2``.
        bias: give each inner node a bias.
        reduction: ``"mean"`` (over non-ignored rows; 0 when there are none), ``"sum"`` or ``"none"``.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        device, dtype: factory arguments of the parameters.

    Parameters: ``weight (C − 1, D)`` and ``bias (C − 1,)``, one row per inner node. Buffers (in the state
    dict): ``counts``, ``path_nodes (C, L)``, ``path_signs (C, L)`` (``±1``, 0 padding), ``path_lengths``.

    Methods:
        ``forward(hidden (..., D), target (...)) -> loss``: ``−log p(target | hidden)`` reduced, computed
        from each row's own path only (``O(L·D)`` per row, vectorised over the batch with padded paths).
        ``log_prob(hidden (..., D)) -> (..., C)``: exact log-distributions (``logsumexp = 0``), computed
        top-down one tree level at a time. ``predict(hidden) -> (...)``: ``argmax`` of ``log_prob``.

    Example:
        >>> import torch
        >>> from softmaxkit.nn import HierarchicalSoftmax
        >>> hsm = HierarchicalSoftmax(8, counts=torch.tensor([50.0, 20.0, 10.0, 5.0, 1.0]))
        >>> hsm.path_lengths.tolist()
        [1, 2, 3, 4, 4]
        >>> torch.logsumexp(hsm.log_prob(torch.randn(3, 8)), dim=-1).abs().max() < 1e-6
        tensor(True)

    References:
        Morin & Bengio, "Hierarchical Probabilistic Neural Network Language Model", AISTATS 2005;
        Mikolov et al., "Distributed Representations of Words and Phrases and their Compositionality", 2013.
    """

    def __init__(
        self,
        in_features: int,
        counts,
        *,
        bias: bool = True,
        reduction: str = "mean",
        ignore_index: int = -100,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = v.check_positive_int("in_features", in_features)
        counts = v.check_positive_counts("counts", counts)
        if counts.shape[0] < 2:
            raise ValueError(f"`counts` must cover at least 2 classes for a tree of decisions, but has {counts.shape[0]}")
        self.num_classes = counts.shape[0]
        self.reduction = v.check_reduction(reduction)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        parent, code = huffman_tree(counts.cpu().numpy())
        nodes, signs, lengths = huffman_paths(parent, code, self.num_classes)
        self.register_buffer("counts", counts.to(device))
        self.register_buffer("path_nodes", torch.from_numpy(nodes).to(device))
        self.register_buffer("path_signs", torch.from_numpy(signs).to(device=device, dtype=torch.int8))
        self.register_buffer("path_lengths", torch.from_numpy(lengths).to(device))
        self._levels = [
            tuple(torch.from_numpy(a) for a in level) for level in _levels(parent, code, self.num_classes)
        ]
        self.weight = nn.Parameter(torch.empty(self.num_classes - 1, self.in_features, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(self.num_classes - 1, device=device, dtype=dtype)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``±1/√D`` (as ``nn.Linear``); word2vec starts its node vectors at 0, which also works."""
        bound = 1.0 / self.in_features**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = v.check_floating("hidden", hidden)
        if hidden.dim() < 1 or hidden.shape[-1] != self.in_features:
            raise ValueError(
                f"`hidden` must have shape (..., {self.in_features}), but has shape {tuple(hidden.shape)}"
            )
        if hidden.dtype != self.weight.dtype:
            raise TypeError(f"`hidden` has dtype {hidden.dtype} but the module's weight {self.weight.dtype}")
        return hidden

    def _chunk_rows(self) -> int:
        depth = max(self.path_nodes.shape[1], 1)
        return max(1, _CHUNK_BYTES // (4 * depth * self.in_features))

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden = self._check_hidden(hidden)
        target = v.check_tensor("target", target)
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"`target` must have shape {tuple(hidden.shape[:-1])} (one class per row of `hidden`), but has "
                f"shape {tuple(target.shape)}"
            )
        v.check_target_dtype(target)
        v.check_class_target(target, self.num_classes, self.ignore_index)
        rows = hidden.reshape(-1, self.in_features)
        labels = target.reshape(-1)
        valid = labels != self.ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        signs = self.path_signs[safe] * valid[:, None].to(self.path_signs.dtype)  # ignored rows: no decisions
        nll = _HierarchicalNLLFunction.apply(rows, self.weight, self.bias, self.path_nodes[safe], signs,
                                             self._chunk_rows())
        loss = reduce_loss(nll, self.reduction, valid.sum())
        return loss.reshape(target.shape) if self.reduction == "none" else loss

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """``log p(c | hidden)`` for every class, ``(..., C)``: each row is an exact log-distribution."""
        hidden = self._check_hidden(hidden)
        rows = hidden.reshape(-1, self.in_features)
        work = compute_dtype(rows.dtype)
        scores = torch.nn.functional.linear(rows.to(work), self.weight.to(work),
                                            None if self.bias is None else self.bias.to(work))
        left, right = torch.nn.functional.logsigmoid(scores), torch.nn.functional.logsigmoid(-scores)
        node_log_prob = scores.new_zeros((rows.shape[0], 2 * self.num_classes - 1))
        for children, parents, signs in self._levels:
            children, parents, signs = (t.to(rows.device) for t in (children, parents, signs))
            branch = torch.where(signs > 0, left.index_select(1, parents), right.index_select(1, parents))
            parent_nodes = parents + self.num_classes
            node_log_prob[:, children] = node_log_prob.index_select(1, parent_nodes) + branch
        out = node_log_prob[:, : self.num_classes].to(hidden.dtype)
        return out.reshape(*hidden.shape[:-1], self.num_classes)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most probable class, ``argmax_c log p(c | hidden)``: ``hidden.shape[:-1]``, int64."""
        hidden = self._check_hidden(hidden)
        rows = hidden.reshape(-1, self.in_features)
        step = max(1, (64 << 20) // (8 * 2 * self.num_classes))
        with torch.no_grad():
            parts = [self.log_prob(rows[s : s + step]).argmax(dim=-1) for s in range(0, rows.shape[0], step)]
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=hidden.device)
        return out.reshape(hidden.shape[:-1])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, max_depth={self.path_nodes.shape[1]}, "
            f"bias={self.bias is not None}, reduction={self.reduction!r}"
        )
