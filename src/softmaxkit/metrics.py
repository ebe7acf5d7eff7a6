r"""Metrics for a softmax classifier: what its argmax and its probabilities are worth.

Three families:

* **decisions** — :func:`accuracy`, :func:`top_k_accuracy`, :func:`confusion_matrix`,
  :func:`precision_recall_f1`;
* **ranking** — :func:`roc_auc` (one-vs-rest and one-vs-one);
* **probabilities** — the proper scores :func:`log_loss` and :func:`brier_score`, and the calibration
  errors :func:`expected_calibration_error`, :func:`max_calibration_error`, :func:`classwise_ece`, with
  :func:`reliability_curve` for the diagram.

Inputs are NumPy arrays, array-likes or torch tensors (CPU or CUDA). The work is done by torch on the
device the data live on: a CUDA tensor is never copied to the host, only the handful of numbers in the
result is. NumPy arrays are wrapped without a copy. Results are Python floats or small NumPy arrays.

Conventions:

* ``probs`` is ``(N, C)`` with ``C >= 2``: non-negative rows summing to 1 (within 1e-4 in float32/64, a
  dtype-aware bound for float16/bfloat16, see :func:`softmaxkit._validation.probability_tolerance`).
  ``scores`` (for the decision metrics) may be probabilities or logits: only their order matters.
* ``labels`` are integer class indices in ``[0, C)``; classes are always ``0 .. C-1``, as scikit-learn
  with ``labels=range(C)``.
* Every value equals scikit-learn's for the same metric (tested on random and degenerate inputs); where
  conventions differ, the docstring says so.

Bad input raises ``ValueError`` / ``TypeError`` naming the argument, the value found and what was expected.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from . import _validation as v

__all__ = [
    "Confidence",
    "ConfusedPair",
    "PrecisionRecallF1",
    "ReliabilityCurve",
    "accuracy",
    "brier_score",
    "classwise_ece",
    "confidence",
    "confusion_matrix",
    "expected_calibration_error",
    "log_loss",
    "max_calibration_error",
    "most_confused_pairs",
    "precision_recall_f1",
    "reliability_curve",
    "roc_auc",
    "top_k_accuracy",
]

_AVERAGES = ("macro", "micro", "weighted")
_STRATEGIES = ("uniform", "quantile")
_NORMS = ("l1", "l2", "max")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: (N, C) work is done in row chunks of about this many elements, bounding temporaries to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 22


class PrecisionRecallF1(NamedTuple):
    """Precision, recall and F1: floats for an average, ``(C,)`` arrays for ``average=None``."""

    precision: float | np.ndarray
    recall: float | np.ndarray
    f1: float | np.ndarray


class ReliabilityCurve(NamedTuple):
    """One entry per non-empty bin, in increasing order of confidence.

    Attributes:
        confidence: mean predicted probability in the bin.
        accuracy: fraction of the bin's rows that are correct (top-label curve) or belong to the class
            (one-class curve).
        count: number of rows in the bin.
        lower: the bin's lower edge (excluded, except for the first bin).
        upper: the bin's upper edge (included).
    """

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


# ----------------------------------------------------------------------------------------- input helpers
def _prepare_probs(probs: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    probs = v.check_probabilities("probs", v.as_float_tensor("probs", probs))
    labels = _labels_like(labels, probs)
    return probs, labels


def _prepare_scores(scores: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    scores = v.check_scores("scores", v.as_float_tensor("scores", scores))
    return scores, _labels_like(labels, scores)


def _labels_like(labels: object, data: torch.Tensor) -> torch.Tensor:
    """Validated int64 labels on ``data``'s device (labels are N integers: moving them is cheap)."""
    labels = v.as_tensor("labels", labels)
    labels = v.check_labels("labels", labels, data.shape[0], data.shape[1])
    return labels.to(data.device)


def _prepare_predictions(
    labels: object, preds: object, num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Labels and predicted classes (argmax of ``preds`` when it is ``(N, C)`` scores), and ``C``."""
    labels = v.as_tensor("labels", labels)
    preds = v.as_tensor("preds", preds)
    if num_classes is not None:
        num_classes = v.check_positive_int("num_classes", num_classes)
    if preds.dim() == 2:
        scores = v.check_scores("preds", v.as_float_tensor("preds", preds))
        if num_classes is not None and num_classes != scores.shape[1]:
            raise ValueError(
                f"`num_classes` is {num_classes} but `preds` holds scores for {scores.shape[1]} classes "
                f"(shape {tuple(scores.shape)})"
            )
        num_classes = scores.shape[1]
        preds = scores.argmax(dim=1)
    else:
        preds = v.check_labels("preds", preds, None, num_classes)
    v.check_same_length("labels", labels, "preds", preds)
    labels = v.check_labels("labels", labels, preds.shape[0], num_classes).to(preds.device)
    if num_classes is None:
        num_classes = int(torch.maximum(labels.max(), preds.max())) + 1
    return labels, preds, num_classes


def _row_chunks(num_rows: int, num_columns: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, num_columns))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def _column_blocks(matrix: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first column, block)`` with ``block`` a contiguous ``(B, N)`` copy of ``B`` adjacent columns.

    Reading one column of a row-major ``(N, C)`` matrix touches a cache line per row; copying a block of
    columns transposed reads each line once for all of them (several times faster than column by column),
    at a bounded cost of ~64 MB per block.
    """
    num_rows, num_columns = matrix.shape
    width = max(1, min(num_columns, _CHUNK_ELEMENTS * 4 // max(1, num_rows)))
    for start in range(0, num_columns, width):
        block = matrix[:, start : start + width]
        if block.device.type != "cpu":
            yield start, block.T.contiguous()
            continue
        # On the CPU, a transpose tiled over 1024 rows (each tile stays in cache) is 3x faster than NumPy's
        # or torch's one-shot transposing copy.
        source = _widen(block).numpy()
        out = np.empty((source.shape[1], num_rows), dtype=source.dtype)
        for row in range(0, num_rows, 1024):
            out[:, row : row + 1024] = source[row : row + 1024].T
        yield start, torch.from_numpy(out)


def _widen(values: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 to float32 (exact), other dtypes unchanged."""
    return values.float() if values.dtype in _LOW_PRECISION else values


def _sort(values: torch.Tensor) -> torch.Tensor:
    """Ascending sort of a 1-d tensor.

    On the CPU this is NumPy's sort on a zero-copy view (its SIMD sort is 20-50x faster than ``torch.sort``
    there); on CUDA, ``torch.sort``.
    """
    values = _widen(values)
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy()))
    return torch.sort(values).values


# --------------------------------------------------------------------------------------------- decisions
def accuracy(scores: object, labels: object) -> float:
    r"""Fraction of rows whose prediction is the label.

    .. math:: \operatorname{acc} = \frac{1}{N}\sum_i [\hat y_i = y_i],\qquad \hat y_i = \arg\max_c s_{ic}

    Args:
        scores: ``(N, C)`` probabilities or logits (the prediction is the first maximum of each row, as
            ``argmax``), or ``(N,)`` predicted class indices.
        labels: ``(N,)`` class indices.

    Returns:
        A float in ``[0, 1]``; equals ``sklearn.metrics.accuracy_score(labels, scores.argmax(1))``.

    Example:
        >>> from softmaxkit.metrics import accuracy
        >>> accuracy([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], [0, 1, 1])
        0.6666666666666666
    """
    preds = v.as_tensor("scores", scores)
    if preds.dim() == 2:
        scores = v.check_scores("scores", v.as_float_tensor("scores", preds))
        preds, labels = scores.argmax(dim=1), _labels_like(labels, scores)
    else:
        preds = v.check_labels("scores", preds, None, None)
        labels = v.check_labels("labels", v.as_tensor("labels", labels), preds.shape[0], None).to(preds.device)
    return int((preds == labels).sum()) / labels.shape[0]


def top_k_accuracy(probs: object, labels: object, k: int) -> float:
    r"""Fraction of rows whose label is among the ``k`` highest scores.

    .. math:: \frac{1}{N}\sum_i \Big[\#\{c : s_{ic} > s_{iy_i}\} + \#\{c > y_i : s_{ic} = s_{iy_i}\} < k\Big]

    Ties are broken as scikit-learn's ``top_k_accuracy_score`` breaks them: among equal scores the *higher*
    class index ranks first. (So with ties, ``top_k_accuracy(s, y, 1)`` can differ from
    :func:`accuracy`, whose ``argmax`` takes the lower index, as ``numpy.argmax`` does.) No sort: one
    comparison pass over the scores, in row chunks.

    Args:
        probs: ``(N, C)`` probabilities or logits (only the order within a row matters).
        labels: ``(N,)`` class indices.
        k: how many top classes count as a hit, ``>= 1``; ``k >= C`` gives 1.

    Returns:
        A float in ``[0, 1]``; equals ``sklearn.metrics.top_k_accuracy_score(labels, probs, k=k,
        labels=range(C))`` for ``C >= 3``.

    Example:
        >>> from softmaxkit.metrics import top_k_accuracy
        >>> top_k_accuracy([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]], [1, 0], k=2)
        0.5
    """
    scores, labels = _prepare_scores(probs, labels)
    k = v.check_positive_int("k", k)
    num_rows, num_classes = scores.shape
    classes = torch.arange(num_classes, device=scores.device)
    hits = 0
    for rows in _row_chunks(num_rows, num_classes):
        chunk, target = scores[rows], labels[rows, None]
        own = chunk.gather(1, target)
        ahead = (chunk > own).sum(dim=1) + ((chunk == own) & (classes > target)).sum(dim=1)
        hits += int((ahead < k).sum())
    return hits / num_rows


def confusion_matrix(labels: object, preds: object, num_classes: int | None = None) -> np.ndarray:
    r"""Counts of (true class, predicted class) pairs.

    .. math:: M_{ab} = \#\{i : y_i = a,\ \hat y_i = b\}

    Args:
        labels: ``(N,)`` true class indices.
        preds: ``(N,)`` predicted class indices, or ``(N, C)`` scores whose row argmax is the prediction.
        num_classes: ``C``; by default the number of columns of ``preds`` scores, else
            ``max(labels, preds) + 1``.

    Returns:
        ``(C, C)`` int64 NumPy array, rows true classes, columns predictions; equals
        ``sklearn.metrics.confusion_matrix(labels, preds, labels=range(C))``.

    Example:
        >>> from softmaxkit.metrics import confusion_matrix
        >>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2])
        array([[1, 0, 0],
               [0, 1, 1],
               [0, 0, 1]])
    """
    labels, preds, num_classes = _prepare_predictions(labels, preds, num_classes)
    counts = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64, copy=False)


def _divide_or_zero(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def precision_recall_f1(
    labels: object, preds: object, average: str | None = "macro", *, num_classes: int | None = None
) -> PrecisionRecallF1:
    r"""Precision, recall and F1 per class, or averaged.

    For class ``c`` with ``tp_c`` true positives, ``fp_c`` false positives and ``fn_c`` false negatives:

    .. math::
        P_c = \frac{tp_c}{tp_c + fp_c},\quad R_c = \frac{tp_c}{tp_c + fn_c},\quad
        F1_c = \frac{2\,tp_c}{2\,tp_c + fp_c + fn_c}

    A ratio whose denominator is 0 is 0 (scikit-learn's ``zero_division=0``). ``"macro"`` averages the
    per-class values over all ``C`` classes (a class absent from both labels and predictions counts as 0);
    ``"weighted"`` weights them by support (the number of true rows of the class); ``"micro"`` pools the
    counts first (for single-label data P = R = F1 = accuracy).

    Args:
        labels: ``(N,)`` true class indices.
        preds: ``(N,)`` predicted class indices, or ``(N, C)`` scores whose row argmax is the prediction.
        average: ``"macro"``, ``"micro"``, ``"weighted"`` or ``None`` (per class).
        num_classes: ``C``, as in :func:`confusion_matrix`.

    Returns:
        :class:`PrecisionRecallF1` of floats, or of ``(C,)`` float64 arrays for ``average=None``; equals
        ``sklearn.metrics.precision_recall_fscore_support(labels, preds, labels=range(C),
        average=average, zero_division=0)[:3]``.

    Example:
        >>> from softmaxkit.metrics import precision_recall_f1
        >>> p, r, f1 = precision_recall_f1([0, 0, 1, 2], [0, 1, 1, 1], average=None)
        >>> f1
        array([0.66666667, 0.5       , 0.        ])
    """
    if average is not None:
        v.check_choice("average", average, _AVERAGES)
    matrix = confusion_matrix(labels, preds, num_classes).astype(np.float64)
    true_positive = np.diag(matrix)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    if average == "micro":
        true_positive, predicted, actual = true_positive.sum(), predicted.sum(), actual.sum()
    precision = _divide_or_zero(true_positive, predicted)
    recall = _divide_or_zero(true_positive, actual)
    f1 = _divide_or_zero(2 * true_positive, actual + predicted)
    if average is None:
        return PrecisionRecallF1(precision, recall, f1)
    if average == "micro":
        return PrecisionRecallF1(float(precision), float(recall), float(f1))
    weights = None if average == "macro" else actual
    if weights is not None and weights.sum() == 0:
        return PrecisionRecallF1(0.0, 0.0, 0.0)
    return PrecisionRecallF1(*(float(np.average(value, weights=weights)) for value in (precision, recall, f1)))


# ------------------------------------------------------------------------------------------------ ranking
class _Ops(NamedTuple):
    """The array operations the rank-count kernels of :func:`roc_auc` need, in NumPy or torch.

    The kernels are written once against this interface. CPU data run on NumPy (zero-copy views): its
    SIMD sorts and binary searches are 10-50x faster than torch's there, and they run in one thread, so
    a busy machine does not stall them. CUDA data run on torch, on the device. The tests run both on the
    CPU and require identical integers.
    """

    array: object  # tensor -> native array (a view)
    sort: object
    argsort: object
    stable_argsort: object
    searchsorted: object  # (sorted, values, side)
    cumsum: object
    int64: object
    bincount: object  # (indices, float64 weights, length) -> float64 sums
    any: object


_NUMPY_OPS = _Ops(
    array=lambda t: _widen(t).numpy() if isinstance(t, torch.Tensor) else t,
    sort=np.sort,
    argsort=np.argsort,
    stable_argsort=lambda x: np.argsort(x, kind="stable"),
    searchsorted=lambda a, v, side: np.searchsorted(a, v, side=side),
    cumsum=np.cumsum,
    int64=lambda x: x.astype(np.int64),
    bincount=lambda x, w, n: np.bincount(x, weights=w.astype(np.float64), minlength=n),
    any=lambda x: bool(x.any()),
)
_TORCH_OPS = _Ops(
    array=lambda t: _widen(t),
    sort=lambda x: torch.sort(x).values,
    argsort=torch.argsort,
    stable_argsort=lambda x: torch.argsort(x, stable=True),
    searchsorted=lambda a, v, side: torch.searchsorted(a, v.contiguous(), side=side),
    cumsum=lambda x: torch.cumsum(x, 0),
    int64=lambda x: x.long(),
    bincount=lambda x, w, n: torch.bincount(x, weights=w.double(), minlength=n),
    any=lambda x: bool(x.any()),
)


def _ops_for(tensor: torch.Tensor) -> _Ops:
    return _NUMPY_OPS if tensor.device.type == "cpu" else _TORCH_OPS


def _twice_u_one_vs_rest(
    probs: torch.Tensor, labels: torch.Tensor, ops: _Ops | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""``2U`` of each class's Mann-Whitney statistic against the rest, and the class counts.

    For class ``a`` with ``n_a`` rows, rank the whole column ``p_{:,a}`` (average ranks for ties); then
    ``U_a = R_a - n_a(n_a+1)/2`` where ``R_a`` is the rank sum of the class's own rows. The average rank of
    a value ``s`` is ``(#{< s} + #{<= s} + 1)/2``, so ``2U_a = Σ_{i∈a}(#{< s_i} + #{<= s_i} + 1) - n_a(n_a+1)``:
    integers throughout, so the AUC ``U_a / (n_a (N - n_a))`` is the correctly rounded quotient.
    One sort of the column plus ``n_a`` binary searches (of sorted keys).
    """
    ops = ops or _ops_for(probs)
    num_rows, num_classes = probs.shape
    counts = torch.bincount(labels, minlength=num_classes).cpu().numpy()
    order = ops.stable_argsort(ops.array(labels))  # rows grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    twice_u = np.zeros(num_classes, dtype=np.int64)
    for first, block in _column_blocks(probs):
        block = ops.array(block)
        for offset in range(block.shape[0]):
            a = first + offset
            n_a = int(counts[a])
            if n_a == 0 or n_a == num_rows:
                continue
            column = block[offset]
            own = ops.sort(column[order[starts[a] : starts[a] + n_a]])
            column = ops.sort(column)
            below = ops.searchsorted(column, own, "left")
            upto = ops.searchsorted(column, own, "right")
            twice_u[a] = int(below.sum()) + int(upto.sum()) + n_a - n_a * (n_a + 1)
    return twice_u, counts.astype(np.int64)


def _twice_u_pairwise(
    probs: torch.Tensor, labels: torch.Tensor, ops: _Ops | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(C, C)`` matrix of ``2U_{ab}``: class ``a``'s rows against class ``b``'s, scored by column ``a``.

    .. math:: U_{ab} = \sum_{i: y_i = b}\ \#\{j: y_j = a,\ p_{ja} > p_{ia}\} + \tfrac12\,\#\{j: y_j = a,\ p_{ja} = p_{ia}\}

    so that ``AUC(a | b) = U_{ab} / (n_a n_b)`` (Hand & Till 2001). One argsort of column ``a`` serves every
    ``b`` at once: walking the sorted column, a running count of class-``a`` rows gives, for each row, the
    class-``a`` rows strictly below its value and at or below it (for tied values, at the first and last
    position of the value, found by binary search), and a sum by label gives row ``a`` of the matrix.
    Integers throughout (the per-label sums are float64 sums of integers below 2^53: exact).
    """
    ops = ops or _ops_for(probs)
    num_classes = probs.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).cpu().numpy()
    labels = ops.array(labels)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for first, block in _column_blocks(probs):
        block = ops.array(block)
        for offset in range(block.shape[0]):
            a = first + offset
            n_a = int(counts[a])
            if n_a == 0:
                continue
            column = block[offset]
            order = ops.argsort(column)
            values, sorted_labels = column[order], labels[order]
            is_a = ops.int64(sorted_labels == a)
            upto_here = ops.cumsum(is_a)
            before_here = upto_here - is_a
            if ops.any(values[1:] == values[:-1]):  # ties: count at the first / last position of each value
                below = before_here[ops.searchsorted(values, values, "left")]
                upto = upto_here[ops.searchsorted(values, values, "right") - 1]
            else:
                below, upto = before_here, upto_here
            sums = ops.bincount(sorted_labels, 2 * n_a - below - upto, num_classes)
            matrix[a] = np.rint(sums.cpu().numpy() if isinstance(sums, torch.Tensor) else sums).astype(np.int64)
    return matrix, counts.astype(np.int64)


def _twice_u_micro(probs: torch.Tensor, labels: torch.Tensor, ops: _Ops | None = None) -> int:
    """``2U`` of the pooled one-vs-rest problem: the ``N`` true-class scores against the ``N(C-1)`` others.

    One sort of all ``N·C`` scores (a copy), then rank sums as in :func:`_twice_u_one_vs_rest`.
    """
    ops = ops or _ops_for(probs)
    num_rows = probs.shape[0]
    everything = ops.sort(ops.array(probs).reshape(-1))
    own = ops.sort(ops.array(probs.gather(1, labels[:, None]).squeeze(1)))
    below = ops.searchsorted(everything, own, "left")
    upto = ops.searchsorted(everything, own, "right")
    return int(below.sum()) + int(upto.sum()) + num_rows - num_rows * (num_rows + 1)


def roc_auc(
    probs: object, labels: object, multi_class: str = "ovr", average: str | None = "macro"
) -> float | np.ndarray:
    r"""Area under the ROC curve of a multi-class classifier, one-vs-rest or one-vs-one.

    The AUC of scores ``s`` for positives ``P`` against negatives ``Q`` is the Mann-Whitney probability
    that a positive outranks a negative, ties counting one half:

    .. math:: \operatorname{AUC} = \frac{1}{|P||Q|}\sum_{i\in P}\sum_{j\in Q}\big([s_i > s_j] + \tfrac12[s_i = s_j]\big)

    * ``"ovr"``: class ``a`` (column ``a``) against all other rows. ``"macro"`` averages over classes,
      ``"weighted"`` weights by class support, ``"micro"`` pools all ``N·C`` (score, is-true-class) pairs,
      ``None`` returns the ``(C,)`` per-class array.
    * ``"ovo"`` (Hand & Till 2001): for each pair of classes present in ``labels``,
      ``(AUC(a|b) + AUC(b|a)) / 2`` on the rows of the two classes; ``"macro"`` averages over pairs,
      ``"weighted"`` weights a pair by the fraction of rows in it.

    Computed exactly from integer rank counts (one sort per class, no thresholds), so any number of
    distinct scores and ties is handled without binning.

    A class absent from ``labels`` has no one-vs-rest AUC: its entry is NaN with a ``UserWarning``, the
    ``"macro"`` average is then NaN (as scikit-learn's) while ``"weighted"`` gives it weight 0;
    ``"ovo"`` uses only the pairs of present classes. Fewer than two classes present raises ``ValueError``.

    Args:
        probs: ``(N, C)`` probabilities (rows sum to 1).
        labels: ``(N,)`` class indices.
        multi_class: ``"ovr"`` or ``"ovo"``.
        average: ``"macro"``, ``"weighted"``, ``"micro"`` (ovr only) or ``None`` (ovr only).

    Returns:
        A float, or a ``(C,)`` float64 array for ``average=None``; equals
        ``sklearn.metrics.roc_auc_score(labels, probs, multi_class=..., average=..., labels=range(C))``.

    Example:
        >>> from softmaxkit.metrics import roc_auc
        >>> probs = [[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]]
        >>> roc_auc(probs, [0, 1, 2, 1])
        1.0

    References:
        Hanley & McNeil (1982), *The meaning and use of the area under a ROC curve*; Hand & Till (2001),
        *A simple generalisation of the area under the ROC curve for multiple class classification problems*.
    """
    v.check_choice("multi_class", multi_class, ("ovr", "ovo"))
    if multi_class == "ovr":
        if average is not None:
            v.check_choice("average", average, ("macro", "weighted", "micro"))
    elif average is None or average not in ("macro", "weighted"):
        raise ValueError(f"`average` must be 'macro' or 'weighted' with multi_class='ovo', but got {average!r}")
    probs, labels = _prepare_probs(probs, labels)
    num_rows, num_classes = probs.shape
    present = torch.bincount(labels, minlength=num_classes) > 0
    if int(present.sum()) < 2:
        raise ValueError(
            f"roc_auc needs at least two classes present in `labels`, but all {num_rows} labels are "
            f"{int(labels[0])}"
        )
    if multi_class == "ovo":
        twice_u, counts = _twice_u_pairwise(probs, labels)
        a, b = np.triu_indices(num_classes, 1)
        both = (counts[a] > 0) & (counts[b] > 0)
        a, b = a[both], b[both]
        pairs = 2.0 * counts[a] * counts[b]
        pair_auc = (twice_u[a, b] / pairs + twice_u[b, a] / pairs) / 2
        weights = (counts[a] + counts[b]) / num_rows if average == "weighted" else None
        return float(np.average(pair_auc, weights=weights))
    if average == "micro":
        return _twice_u_micro(probs, labels) / (2.0 * num_rows * num_rows * (num_classes - 1))
    twice_u, counts = _twice_u_one_vs_rest(probs, labels)
    defined = (counts > 0) & (counts < num_rows)
    per_class = np.full(num_classes, np.nan)
    per_class[defined] = twice_u[defined] / (2.0 * counts[defined] * (num_rows - counts[defined]))
    if not defined.all():
        missing = np.flatnonzero(~defined).tolist()
        warnings.warn(
            f"roc_auc: classes {missing} do not occur in `labels`, so their one-vs-rest AUC is undefined (NaN)",
            UserWarning,
            stacklevel=2,
        )
    if average is None:
        return per_class
    if average == "macro":
        return float(per_class.mean())
    return float(np.average(per_class[defined], weights=counts[defined]))


# ------------------------------------------------------------------------------------------ probabilities
def log_loss(probs: object, labels: object) -> float:
    r"""Mean negative log-likelihood of the labels (cross-entropy of probabilities).

    .. math:: \mathcal L = -\frac1N\sum_i \log \operatorname{clip}(p_{i y_i}, \varepsilon, 1-\varepsilon)

    with ``ε`` the machine epsilon of ``probs``' dtype (scikit-learn's clipping, so a zero probability on
    the label costs ``-log ε`` — 36.04 in float64, 15.94 in float32 — rather than infinity). Only the
    label's probability is read; the logs are taken in float64.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.

    Returns:
        A float ``>= 0``; equals ``sklearn.metrics.log_loss(labels, probs, labels=range(C))``.

    Example:
        >>> from softmaxkit.metrics import log_loss
        >>> round(log_loss([[0.9, 0.1], [0.2, 0.8]], [0, 1]), 6)
        0.164252
    """
    probs, labels = _prepare_probs(probs, labels)
    eps = torch.finfo(probs.dtype).eps
    own = probs.gather(1, labels[:, None]).squeeze(1).double().clamp(eps, 1 - eps)
    return float(-own.log().mean())


def brier_score(probs: object, labels: object) -> float:
    r"""Multi-class Brier score: squared distance to the one-hot label, summed over classes.

    .. math:: \operatorname{BS} = \frac1N\sum_i\sum_c \big(p_{ic} - [y_i = c]\big)^2 \in [0, 2]

    (Brier 1950.) Summed over classes, never halved: for ``C = 2`` it is twice the binary Brier score of
    the positive class. Computed in float64, in row chunks.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.

    Returns:
        A float; equals ``sklearn.metrics.brier_score_loss(labels, probs, labels=range(C),
        scale_by_half=False)``.

    Example:
        >>> from softmaxkit.metrics import brier_score
        >>> round(brier_score([[0.9, 0.1], [0.2, 0.8]], [0, 1]), 6)
        0.05
    """
    probs, labels = _prepare_probs(probs, labels)
    num_rows, num_classes = probs.shape
    total = torch.zeros((), dtype=torch.float64, device=probs.device)
    for rows in _row_chunks(num_rows, num_classes):
        difference = probs[rows].to(torch.float64, copy=True)  # a copy: never write into the caller's array
        difference.scatter_add_(1, labels[rows, None], difference.new_full((difference.shape[0], 1), -1.0))
        total += difference.square().sum()
    return float(total) / num_rows


# ------------------------------------------------------------------------------------------- calibration
def _quantile_edges(scores: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``numpy.percentile(scores, linspace(0, 1, n_bins + 1) * 100)`` (method "linear"), computed on the
    device; the index arithmetic and the interpolation follow NumPy's operation for operation, so the edges
    are the ones scikit-learn's ``calibration_curve(strategy="quantile")`` uses."""
    ordered = _sort(scores)
    count = ordered.shape[0]
    quantiles = np.true_divide(np.linspace(0.0, 1.0, n_bins + 1) * 100, 100)
    virtual = (count - 1) * quantiles
    previous = np.floor(virtual)
    gamma = torch.from_numpy(virtual - previous).to(ordered.device)
    low = previous.astype(np.int64)
    low[virtual >= count - 1] = count - 1
    high = np.minimum(low + 1, count - 1)
    a = ordered[torch.from_numpy(low).to(ordered.device)]
    b = ordered[torch.from_numpy(high).to(ordered.device)]
    difference = b - a
    return torch.where(gamma >= 0.5, b - difference * (1 - gamma), a + difference * gamma)


def _bin_edges(scores: torch.Tensor, n_bins: int, strategy: str) -> torch.Tensor:
    if strategy == "uniform":
        return torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1)).to(scores.device)
    return _quantile_edges(scores, n_bins)


def _bin_index(scores: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin of each score: bins are right-closed, ``(e_m, e_{m+1}]``, the first one also holds ``e_0``
    (Guo et al. 2017's convention, and ``numpy.searchsorted(edges[1:-1], scores)`` as scikit-learn)."""
    inner = edges[1:-1]
    if inner.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    return torch.searchsorted(inner, scores.contiguous(), side="left")


class _Bins(NamedTuple):
    edges: np.ndarray
    count: np.ndarray
    score_sum: np.ndarray
    hit_sum: np.ndarray


def _binned(scores: torch.Tensor, hits: torch.Tensor, n_bins: int, strategy: str) -> _Bins:
    """Per-bin row count, sum of scores and sum of hits (float64), for scores in ``[0, 1]``."""
    scores = scores.double()
    edges = _bin_edges(scores, n_bins, strategy)
    index = _bin_index(scores, edges)
    count = torch.bincount(index, minlength=n_bins)
    score_sum = torch.bincount(index, weights=scores, minlength=n_bins)
    hit_sum = torch.bincount(index, weights=hits.double(), minlength=n_bins)
    return _Bins(*(t.cpu().numpy() for t in (edges, count, score_sum, hit_sum)))


def _calibration_error(bins: _Bins, norm: str) -> float:
    filled = bins.count > 0
    count = bins.count[filled].astype(np.float64)
    gap = np.abs(bins.hit_sum[filled] / count - bins.score_sum[filled] / count)
    if norm == "max":
        return float(gap.max())
    weight = count / count.sum()
    if norm == "l1":
        return float(np.sum(weight * gap))
    return float(math.sqrt(np.sum(weight * gap * gap)))


def _top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence ``max_c p_ic`` and correctness ``argmax_c p_ic == y_i`` (first maximum).

    ``amax`` plus a gather of the label's probability is 3-4x cheaper than ``max(dim=1)`` with indices on
    the CPU. The label's probability equals the maximum exactly when the label is *an* argmax; it is
    *the* (first) argmax unless an earlier class ties. A tie at the maximum needs two entries of at least
    ``conf``, so ``2·conf <= row sum <= 1 + tol``: only the rare rows with ``conf <= (1 + tol)/2`` that
    pass the first test get an explicit ``argmax``.
    """
    confidence = probs.amax(dim=1)
    own = probs.gather(1, labels[:, None]).squeeze(1)
    correct = own == confidence
    tolerance = v.probability_tolerance(probs.dtype, probs.shape[1])
    ambiguous = (correct & (confidence <= (1 + tolerance) / 2)).nonzero().squeeze(1)
    if ambiguous.numel():
        correct[ambiguous] = probs[ambiguous].argmax(dim=1) == labels[ambiguous]
    return confidence, correct


def _check_binning(n_bins: object, strategy: object, norm: object = "l1") -> tuple[int, str, str]:
    return (
        v.check_positive_int("n_bins", n_bins),
        v.check_choice("strategy", strategy, _STRATEGIES),
        v.check_choice("norm", norm, _NORMS),
    )


def expected_calibration_error(
    probs: object, labels: object, n_bins: int = 15, strategy: str = "uniform", norm: str = "l1"
) -> float:
    r"""Expected calibration error of the top label (Naeini et al. 2015, Guo et al. 2017).

    With confidence ``conf_i = max_c p_ic``, correctness ``[argmax_c p_ic = y_i]``, and rows grouped into
    bins ``B_m`` of confidence:

    .. math::
        \operatorname{ECE}_{\ell_1} = \sum_m \frac{|B_m|}{N}\,\big|\operatorname{acc}(B_m) - \operatorname{conf}(B_m)\big|,\quad
        \operatorname{ECE}_{\ell_2} = \Big(\sum_m \frac{|B_m|}{N}\,(\operatorname{acc} - \operatorname{conf})^2\Big)^{1/2},\quad
        \operatorname{ECE}_{\max} = \max_{B_m \neq \emptyset} |\operatorname{acc} - \operatorname{conf}|

    ``strategy="uniform"``: ``n_bins`` equal-width bins on ``[0, 1]``, right-closed ``((m-1)/M, m/M]``;
    ``"quantile"``: edges at the quantiles of the confidences (equal-mass bins, the adaptive ECE of Nixon
    et al. 2019), placed as ``numpy.percentile`` places them; tied confidences always share a bin.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: number of bins ``M >= 1``.
        strategy: ``"uniform"`` or ``"quantile"``.
        norm: ``"l1"`` (the ECE), ``"l2"`` or ``"max"`` (the MCE).

    Returns:
        A float in ``[0, 1]``. Equals torchmetrics' ``multiclass_calibration_error`` for uniform bins
        (which differ only for a confidence exactly on an inner edge, where torchmetrics' bins are
        left-closed), and is the count-weighted gap of :func:`reliability_curve`'s bins.

    Example:
        >>> from softmaxkit.metrics import expected_calibration_error
        >>> round(expected_calibration_error([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], n_bins=2), 6)
        0.133333
    """
    n_bins, strategy, norm = _check_binning(n_bins, strategy, norm)
    probs, labels = _prepare_probs(probs, labels)
    confidence, correct = _top_label(probs, labels)
    return _calibration_error(_binned(confidence, correct, n_bins, strategy), norm)


def max_calibration_error(probs: object, labels: object, n_bins: int = 15, strategy: str = "uniform") -> float:
    r"""Maximum calibration error: the largest gap between accuracy and confidence over non-empty bins.

    .. math:: \operatorname{MCE} = \max_{B_m \neq \emptyset} |\operatorname{acc}(B_m) - \operatorname{conf}(B_m)|

    The same as ``expected_calibration_error(..., norm="max")`` (Naeini et al. 2015).

    Example:
        >>> from softmaxkit.metrics import max_calibration_error
        >>> round(max_calibration_error([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], n_bins=10), 6)
        0.8
    """
    return expected_calibration_error(probs, labels, n_bins=n_bins, strategy=strategy, norm="max")


def classwise_ece(
    probs: object, labels: object, n_bins: int = 15, strategy: str = "uniform", norm: str = "l1"
) -> float:
    r"""Class-wise calibration error (Kull et al. 2019): every class's probability, not just the top one.

    .. math::
        \operatorname{cwECE} = \frac1C\sum_{c}\sum_m \frac{|B_{mc}|}{N}\,
        \Big|\frac{1}{|B_{mc}|}\sum_{i\in B_{mc}}[y_i = c] - \frac{1}{|B_{mc}|}\sum_{i\in B_{mc}} p_{ic}\Big|

    where ``B_{mc}`` bins all ``N`` rows by ``p_{ic}``. Binning and norms as
    :func:`expected_calibration_error`, applied per class and averaged over the ``C`` classes.

    Returns:
        A float in ``[0, 1]``.

    Example:
        >>> from softmaxkit.metrics import classwise_ece
        >>> round(classwise_ece([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], n_bins=2), 6)
        0.333333

    References:
        Kull et al. (2019), *Beyond temperature scaling: obtaining well-calibrated multiclass probabilities
        with Dirichlet calibration*.
    """
    n_bins, strategy, norm = _check_binning(n_bins, strategy, norm)
    probs, labels = _prepare_probs(probs, labels)
    errors = [
        _calibration_error(_binned(column, labels == first + offset, n_bins, strategy), norm)
        for first, block in _column_blocks(probs)
        for offset, column in enumerate(block)
    ]
    return float(np.mean(errors))


def reliability_curve(
    probs: object,
    labels: object,
    n_bins: int = 15,
    strategy: str = "uniform",
    *,
    class_index: int | None = None,
) -> ReliabilityCurve:
    r"""Per-bin confidence, accuracy and count: the data of a reliability diagram.

    With ``class_index=None`` (top label), rows are binned by ``max_c p_ic`` and "accuracy" is the fraction
    of correct argmax predictions, so that ``Σ count·|accuracy − confidence| / N`` is
    :func:`expected_calibration_error`. With ``class_index=c`` (one class against the rest), rows are
    binned by ``p_ic`` and "accuracy" is the fraction with label ``c``. Bins as in
    :func:`expected_calibration_error`; empty bins are left out.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: number of bins ``>= 1``.
        strategy: ``"uniform"`` or ``"quantile"``.
        class_index: None for the top-label curve, or a class in ``[0, C)``.

    Returns:
        :class:`ReliabilityCurve` of ``(B,)`` arrays, ``B <= n_bins`` the non-empty bins. For a class,
        ``(accuracy, confidence)`` equal ``sklearn.calibration.calibration_curve(labels == c, probs[:, c],
        n_bins=n_bins, strategy=strategy)``.

    Example:
        >>> from softmaxkit.metrics import reliability_curve
        >>> curve = reliability_curve([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], n_bins=2)
        >>> curve.confidence, curve.accuracy, curve.count
        (array([0.8]), array([0.66666667]), array([3]))
    """
    n_bins, strategy, _ = _check_binning(n_bins, strategy)
    probs, labels = _prepare_probs(probs, labels)
    if class_index is None:
        scores, hits = _top_label(probs, labels)
    else:
        class_index = v.check_int("class_index", class_index)
        if not 0 <= class_index < probs.shape[1]:
            raise ValueError(
                f"`class_index` must be None or a class in [0, {probs.shape[1]}), but got {class_index}"
            )
        scores, hits = probs[:, class_index], labels == class_index
    bins = _binned(scores, hits, n_bins, strategy)
    filled = bins.count > 0
    count = bins.count[filled]
    return ReliabilityCurve(
        confidence=bins.score_sum[filled] / count,
        accuracy=bins.hit_sum[filled] / count,
        count=count.astype(np.int64),
        lower=bins.edges[:-1][filled],
        upper=bins.edges[1:][filled],
    )


# ------------------------------------------------------------------------------- confidence and confusion
class Confidence(NamedTuple):
    """Per-row confidence read off the probabilities: ``(N,)`` float64 NumPy arrays.

    Attributes:
        max_probability: ``p_(1)``, the largest probability.
        margin: ``p_(1) − p_(2)``, the gap between the largest and the second-largest probability.
        entropy: ``−Σ_c p_c log p_c`` in nats (``0 log 0 = 0``), between 0 and ``log C``.
    """

    max_probability: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray


def confidence(probs: object) -> Confidence:
    r"""How sure the model is about each row: top probability, top-1 − top-2 margin, entropy.

    .. math:: p_{(1)},\qquad p_{(1)} − p_{(2)},\qquad H(p) = −\sum_c p_c \log p_c

    The three agree on the extremes (a one-hot row: 1, 1, 0; a uniform row: ``1/C``, 0, ``log C``) and
    differ in between: the margin sees only the two leading classes (whether the decision is close), the
    entropy the whole distribution. Computed in float64 on the data's device.

    Args:
        probs: ``(N, C)`` probabilities (rows summing to 1, ``C >= 2``).

    Returns:
        :class:`Confidence` of three ``(N,)`` float64 arrays.

    Example:
        >>> from softmaxkit.metrics import confidence
        >>> c = confidence([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
        >>> c.max_probability.round(2), c.margin.round(2), c.entropy.round(3)
        (array([0.7, 0.4]), array([0.5 , 0.05]), array([0.802, 1.081]))
    """
    probs = v.check_probabilities("probs", v.as_tensor("probs", probs)).to(torch.float64)
    top = torch.topk(probs, 2, dim=1).values
    logs = torch.where(probs > 0, probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    entropy = -(probs * logs).sum(dim=1)
    return Confidence(
        max_probability=top[:, 0].cpu().numpy(),
        margin=(top[:, 0] - top[:, 1]).cpu().numpy(),
        entropy=entropy.clamp_min(0.0).cpu().numpy(),
    )


class ConfusedPair(NamedTuple):
    """One off-diagonal cell of the confusion matrix.

    Attributes:
        true: the true class.
        predicted: the class it was taken for.
        count: how many rows of class ``true`` were predicted as ``predicted``.
        rate: ``count`` over the number of rows of class ``true`` (the share of that class lost to it).
    """

    true: int
    predicted: int
    count: int
    rate: float


def most_confused_pairs(labels: object, preds: object, k: int = 5, *, num_classes: int | None = None) -> list[ConfusedPair]:
    r"""The ``k`` largest off-diagonal cells of the confusion matrix: which classes are taken for which.

    .. math:: \{(a, b) : a ≠ b\} 	ext{ ordered by } M_{ab} 	ext{ (descending), then } (a, b) 	ext{ (ascending)}

    Cells with a zero count are left out, so fewer than ``k`` pairs come back when there are fewer
    mistakes. The pairs are directed (``a`` taken for ``b``); ``(b, a)`` is a separate entry.

    Args:
        labels: ``(N,)`` true class indices.
        preds: ``(N,)`` predicted class indices, or ``(N, C)`` scores whose row argmax is the prediction.
        k: the number of pairs, ``>= 1``.
        num_classes: ``C``, as in :func:`confusion_matrix`.

    Returns:
        A list of at most ``k`` :class:`ConfusedPair`.

    Example:
        >>> from softmaxkit.metrics import most_confused_pairs
        >>> most_confused_pairs([0, 0, 0, 1, 1, 2], [1, 1, 0, 0, 1, 2], k=2)
        [ConfusedPair(true=0, predicted=1, count=2, rate=0.6666666666666666), ConfusedPair(true=1, predicted=0, count=1, rate=0.5)]
    """
    k = v.check_positive_int("k", k)
    return confused_pairs_of(confusion_matrix(labels, preds, num_classes), k)


def confused_pairs_of(matrix: object, k: int) -> list[ConfusedPair]:
    """:func:`most_confused_pairs` of an already-built ``(C, C)`` confusion matrix (rows: true classes)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    support = matrix.sum(axis=1)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    true, predicted = np.nonzero(off)
    counts = off[true, predicted]
    order = np.lexsort((predicted, true, -counts))[:k]  # count descending, then (true, predicted) ascending
    return [
        ConfusedPair(int(true[i]), int(predicted[i]), int(counts[i]), float(counts[i] / support[true[i]]))
        for i in order
    ]
