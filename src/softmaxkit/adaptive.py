r"""Adaptive softmax (Grave et al. 2017), interchangeable with :class:`torch.nn.AdaptiveLogSoftmaxWithLoss`.

Classes sorted by decreasing frequency are split by ``cutoffs = [c_1, …, c_k]`` into a shortlist
``[0, c_1)`` and tail clusters ``[c_i, c_{i+1})``. The head is a softmax over the shortlist plus one entry
per cluster; cluster ``i`` has its own low-rank softmax (``D → ⌊D / div^{i+1}⌋ → |cluster|``):

.. math:: \log p(y) = \begin{cases} \log\operatorname{softmax}(H h)_y & y < c_1 \\
          \log\operatorname{softmax}(H h)_{c_1 + i} + \log\operatorname{softmax}(T_i h)_{y − c_{i+1}}
          & y ∈ \text{cluster } i \end{cases}

The parameters (``head``, ``tail.i.0``, ``tail.i.1``) have PyTorch's names and shapes, so state dicts load
both ways. Compared with PyTorch's module: the loss goes through the fused cross-entropy (no log-softmax
tensors are kept for backward), rows are grouped by cluster with one host sync instead of one per cluster,
and :meth:`AdaptiveSoftmax.predict` evaluates a tail cluster only for the rows where that cluster's total
probability exceeds the best class found so far (no class inside a cluster can beat its cluster's
probability), where PyTorch computes every cluster for every row whose head argmax is a cluster.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence

import torch
from torch import nn

from . import _validation as v
from ._core import CrossEntropyOptions
from .functional.cross_entropy import cross_entropy_core

#: the per-row cross-entropy of the head and the tails (inputs built and validated here)
_PER_ROW = CrossEntropyOptions(reduction="none")

#: the ``(output, loss)`` pair :meth:`AdaptiveSoftmax.forward` returns, as PyTorch's ``_ASMoutput``.
AdaptiveSoftmaxOutput = namedtuple("AdaptiveSoftmaxOutput", ["output", "loss"])


def _check_cutoffs(cutoffs: object, n_classes: int) -> list[int]:
    if not isinstance(cutoffs, Sequence) or isinstance(cutoffs, str) or len(cutoffs) == 0:
        raise ValueError(f"`cutoffs` must be a non-empty sequence of ints, but got {cutoffs!r}")
    values = list(cutoffs)
    if (
        any(isinstance(c, bool) or int(c) != c for c in values)
        or values != sorted(values)
        or len(set(values)) != len(values)
        or min(values) <= 0
        or max(values) > n_classes - 1
    ):
        raise ValueError(
            f"`cutoffs` must be unique ints sorted in increasing order, each in [1, n_classes - 1] = "
            f"[1, {n_classes - 1}], but got {values}"
        )
    return [int(c) for c in values]


class AdaptiveSoftmax(nn.Module):
    r"""Adaptive softmax with loss: the interface and results of ``torch.nn.AdaptiveLogSoftmaxWithLoss``.

    Args:
        in_features: ``D``, the hidden size.
        n_classes: ``C``, the number of classes (sorted by decreasing frequency).
        cutoffs: increasing ints in ``[1, C − 1]``; ``[c_1, …, c_k]`` gives a shortlist of ``c_1`` classes
            and ``k`` tail clusters.
        div_value: cluster ``i`` (from 0) projects to ``⌊D / div_value^{i+1}⌋`` dimensions.
        head_bias: add a bias to the head.
        device, dtype: factory arguments of the parameters.

    Shapes: ``forward(input (N, D) or (D,), target (N,) or ())`` returns ``(output, loss)`` with ``output``
    the target's log-probability (target's shape) and ``loss = −mean(output)`` (0 for an empty batch, where
    PyTorch gives NaN); ``log_prob(input) -> (N, C)``; ``predict(input) -> (N,)``.

    Example:
        >>> import torch
        >>> from softmaxkit.nn import AdaptiveSoftmax
        >>> asm = AdaptiveSoftmax(16, 1000, cutoffs=[50, 200])
        >>> out = asm(torch.randn(4, 16), torch.tensor([1, 60, 300, 999]))
        >>> out.output.shape, out.loss.shape
        (torch.Size([4]), torch.Size([]))

    References:
        Grave, Joulin, Cissé, Grangier, Jégou, "Efficient softmax approximation for GPUs", ICML 2017.
    """

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        cutoffs: Sequence[int],
        div_value: float = 4.0,
        head_bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = v.check_positive_int("in_features", in_features)
        self.n_classes = v.check_positive_int("n_classes", n_classes)
        self.cutoffs = [*_check_cutoffs(cutoffs, self.n_classes), self.n_classes]
        self.div_value = v.check_positive("div_value", div_value)
        self.head_bias = bool(head_bias)
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        self.head = nn.Linear(self.in_features, self.head_size, bias=self.head_bias, **factory)
        self.tail = nn.ModuleList()
        for i in range(self.n_clusters):
            hidden_size = int(self.in_features // (self.div_value ** (i + 1)))
            cluster_size = self.cutoffs[i + 1] - self.cutoffs[i]
            self.tail.append(
                nn.Sequential(
                    nn.Linear(self.in_features, hidden_size, bias=False, **factory),
                    nn.Linear(hidden_size, cluster_size, bias=False, **factory),
                )
            )

    def reset_parameters(self) -> None:
        self.head.reset_parameters()
        for projection, output in self.tail:
            projection.reset_parameters()
            output.reset_parameters()

    def _check_input(self, input: torch.Tensor) -> torch.Tensor:
        input = v.check_floating("input", input)
        if input.dim() not in (1, 2) or input.shape[-1] != self.in_features:
            raise ValueError(
                f"`input` must have shape (N, {self.in_features}) or ({self.in_features},), but has shape "
                f"{tuple(input.shape)}"
            )
        return input

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> AdaptiveSoftmaxOutput:
        input = self._check_input(input)
        target = v.check_tensor("target", target)
        expected = (input.shape[0],) if input.dim() == 2 else ()
        if tuple(target.shape) != expected:
            raise ValueError(
                f"`target` must have shape {expected} for input of shape {tuple(input.shape)}, but has shape "
                f"{tuple(target.shape)}"
            )
        v.check_class_indices(target, self.n_classes)
        batched = input.dim() == 2
        rows = input if batched else input.unsqueeze(0)
        labels = (target if batched else target.unsqueeze(0)).long()

        boundaries = torch.tensor(self.cutoffs[:-1], device=labels.device)
        cluster = torch.bucketize(labels, boundaries, right=True)  # 0: shortlist, i: tail cluster i − 1
        head_target = torch.where(cluster == 0, labels, self.shortlist_size + cluster - 1)
        nll = cross_entropy_core(self.head(rows), head_target, None, _PER_ROW, False)
        if self.n_clusters > 0 and labels.numel() > 0:
            order = torch.argsort(cluster, stable=True)
            sizes = torch.bincount(cluster, minlength=self.n_clusters + 1).tolist()  # the one host sync
            start = sizes[0]
            for i in range(1, self.n_clusters + 1):
                if sizes[i] == 0:
                    continue
                members = order[start : start + sizes[i]]
                start += sizes[i]
                logits = self.tail[i - 1](rows.index_select(0, members))
                local = labels.index_select(0, members) - self.cutoffs[i - 1]
                nll = nll.index_add(0, members, cross_entropy_core(logits, local, None, _PER_ROW, False))
        output = -nll
        denominator = torch.tensor(max(output.numel(), 1), dtype=nll.dtype, device=nll.device)
        loss = nll.sum() / denominator
        return AdaptiveSoftmaxOutput(output if batched else output.squeeze(0), loss)

    def _full_log_prob(self, rows: torch.Tensor, head_log_prob: torch.Tensor) -> torch.Tensor:
        out = head_log_prob.new_empty((rows.shape[0], self.n_classes))
        out[:, : self.shortlist_size] = head_log_prob[:, : self.shortlist_size]
        for i, cluster in enumerate(self.tail):
            start, stop = self.cutoffs[i], self.cutoffs[i + 1]
            cluster_log_prob = torch.log_softmax(cluster(rows), dim=1)
            out[:, start:stop] = cluster_log_prob + head_log_prob[:, self.shortlist_size + i, None]
        return out

    def log_prob(self, input: torch.Tensor) -> torch.Tensor:
        r"""``log p(c | input)`` for every class: ``(N, C)`` (``(C,)`` for one row); rows are exact log-distributions."""
        input = self._check_input(input)
        rows = input if input.dim() == 2 else input.unsqueeze(0)
        out = self._full_log_prob(rows, torch.log_softmax(self.head(rows), dim=1))
        return out if input.dim() == 2 else out.squeeze(0)

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        r"""The most probable class of each row, ``argmax_c log p(c | input)``: ``(N,)`` int64 (``()`` for one row).

        Tail cluster ``i`` is evaluated only for the rows where ``log p(cluster i)`` exceeds the best
        log-probability found so far, since ``log p(c) = log p(cluster) + log p(c | cluster) ≤ log p(cluster)``.
        Ties go to the smaller class index, as with ``argmax`` over :meth:`log_prob`.
        """
        input = self._check_input(input)
        rows = input if input.dim() == 2 else input.unsqueeze(0)
        with torch.no_grad():
            head_log_prob = torch.log_softmax(self.head(rows), dim=1)
            best_value, best = head_log_prob[:, : self.shortlist_size].max(dim=1)
            for i, cluster in enumerate(self.tail):
                bound = head_log_prob[:, self.shortlist_size + i]
                candidates = (bound > best_value).nonzero().squeeze(1)
                if candidates.numel() == 0:
                    continue
                cluster_log_prob = torch.log_softmax(cluster(rows.index_select(0, candidates)), dim=1)
                value, index = (cluster_log_prob + bound[candidates, None]).max(dim=1)
                better = value > best_value[candidates]
                chosen = candidates[better]
                best_value[chosen] = value[better]
                best[chosen] = index[better] + self.cutoffs[i]
        return best if input.dim() == 2 else best.squeeze(0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, n_classes={self.n_classes}, cutoffs={self.cutoffs[:-1]}, "
            f"div_value={self.div_value}, head_bias={self.head_bias}"
        )
