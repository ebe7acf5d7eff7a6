"""softmaxkit.metrics: parity with scikit-learn (and torchmetrics), definition-level oracles, degenerate
inputs, input kinds, low precision, validation messages.

Tolerances: on float64 inputs every metric is compared with ``assert_close_f64`` (1e-10 relative): the
metrics are sums of at most a few thousand float64 terms here (summation-order differences ~1e-15), and
ROC-AUC is an exact integer ratio on our side and a trapezoid on scikit-learn's (~1e-16 apart). Where a
peer itself computes in float32 (scikit-learn's log-loss on float32 input, torchmetrics' ECE) the
float32 tolerance of ``_helpers`` applies: a few float32 ulps times the terms accumulated.
"""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

import softmaxkit.metrics
from softmaxkit import metrics

from ._helpers import assert_close_f32, assert_close_f64

SEEDS = [0, 1, 2]
SHAPES = [(1, 2), (7, 2), (50, 3), (257, 10), (1000, 7)]


def _problem(seed: int, num_rows: int, num_classes: int, sharpness: float = 2.0, dtype=np.float64):
    """Softmax probabilities of Gaussian logits, and labels drawn from softmax(logits / 2) (miscalibrated)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_rows, num_classes)) * sharpness
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    truth = np.exp(logits / 2 - (logits / 2).max(1, keepdims=True))
    truth /= truth.sum(1, keepdims=True)
    labels = (truth.cumsum(1) > rng.random((num_rows, 1))).argmax(1)
    return probs.astype(dtype), labels


def _all_classes_present(labels: np.ndarray, num_classes: int) -> bool:
    return len(np.unique(labels)) == num_classes


# ------------------------------------------------------------------------------- oracles from definitions
def _auc_by_pairs(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC straight from its definition: P(s_pos > s_neg) + 1/2 P(s_pos = s_neg), over all pairs."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    equal = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * equal) / (len(pos) * len(neg))


def _calibration_error_by_loop(scores, hits, n_bins, strategy, norm):
    """Binned calibration error from its definition, one row and one bin at a time.

    Bins are right-closed: a row goes to the first bin whose upper edge is >= its score. Uniform edges
    are m/M; quantile edges are numpy.percentile's.
    """
    scores = [float(s) for s in scores]
    hits = [float(h) for h in hits]
    if strategy == "uniform":
        edges = list(np.linspace(0.0, 1.0, n_bins + 1))
    else:
        edges = list(np.percentile(scores, np.linspace(0, 1, n_bins + 1) * 100))
    members = [[] for _ in range(n_bins)]
    for row, score in enumerate(scores):
        m = 0
        while m < n_bins - 1 and score > edges[m + 1]:
            m += 1
        members[m].append(row)
    gaps, weights = [], []
    for rows in members:
        if rows:
            accuracy = sum(hits[i] for i in rows) / len(rows)
            confidence = sum(scores[i] for i in rows) / len(rows)
            gaps.append(abs(accuracy - confidence))
            weights.append(len(rows) / len(scores))
    if norm == "l1":
        return sum(w * g for w, g in zip(weights, gaps))
    if norm == "l2":
        return sum(w * g * g for w, g in zip(weights, gaps)) ** 0.5
    return max(gaps)


# ------------------------------------------------------------------------------------------ decisions
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decision_metrics_equal_sklearn(seed, shape):
    probs, labels = _problem(seed, *shape)
    num_classes = shape[1]
    preds = probs.argmax(1)
    classes = list(range(num_classes))
    assert metrics.accuracy(probs, labels) == skm.accuracy_score(labels, preds)
    assert metrics.accuracy(preds, labels) == skm.accuracy_score(labels, preds)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, probs), skm.confusion_matrix(labels, preds, labels=classes)
    )
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, preds, num_classes), skm.confusion_matrix(labels, preds, labels=classes)
    )
    for average in ("macro", "micro", "weighted", None):
        ours = metrics.precision_recall_f1(labels, preds, average, num_classes=num_classes)
        theirs = skm.precision_recall_fscore_support(
            labels, preds, labels=classes, average=average, zero_division=0
        )[:3]
        for a, b in zip(ours, theirs):
            assert_close_f64(a, b)
    if num_classes >= 3:  # scikit-learn's top-k takes (N,) scores for two classes
        for k in range(1, num_classes + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns that k >= C is a perfect score
                expected = skm.top_k_accuracy_score(labels, probs, k=k, labels=classes)
            assert metrics.top_k_accuracy(probs, labels, k) == pytest.approx(expected, abs=1e-15)


def test_top_k_breaks_ties_as_sklearn():
    rng = np.random.default_rng(3)
    # scores on a coarse grid: most rows have ties, including ties with the label's score
    scores = rng.integers(0, 3, size=(300, 5)).astype(np.float64)
    labels = rng.integers(0, 5, 300)
    for k in (1, 2, 3, 4):
        expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=range(5))
        assert metrics.top_k_accuracy(scores, labels, k) == pytest.approx(expected, abs=1e-15)
    # accuracy's argmax takes the first maximum, as numpy's
    assert metrics.accuracy(scores, labels) == skm.accuracy_score(labels, scores.argmax(1))


def test_top_k_accepts_logits_and_minus_inf():
    logits = torch.tensor([[2.0, -torch.inf, 1.0], [-torch.inf, 0.0, 5.0]])
    assert metrics.top_k_accuracy(logits, [2, 0], 1) == 0.0
    assert metrics.top_k_accuracy(logits, [2, 0], 2) == 0.5
    assert metrics.top_k_accuracy(logits, [2, 0], 3) == 1.0
    assert metrics.top_k_accuracy(logits, [2, 0], 100) == 1.0


def test_precision_recall_f1_degenerate_classes_equal_sklearn():
    # class 3 is never predicted, class 4 never occurs in labels, class 5 occurs in neither
    labels = np.array([0, 0, 1, 1, 2, 3, 3, 0, 2, 1])
    preds = np.array([0, 1, 1, 4, 2, 0, 2, 0, 4, 1])
    classes = list(range(6))
    for average in ("macro", "micro", "weighted", None):
        ours = metrics.precision_recall_f1(labels, preds, average, num_classes=6)
        theirs = skm.precision_recall_fscore_support(
            labels, preds, labels=classes, average=average, zero_division=0
        )[:3]
        for a, b in zip(ours, theirs):
            assert_close_f64(a, b)
    per_class = metrics.precision_recall_f1(labels, preds, None, num_classes=6)
    assert per_class.precision[3] == 0 and per_class.recall[4] == 0 and per_class.f1[5] == 0


def test_micro_average_is_accuracy_and_perfect_predictions_score_one():
    probs, labels = _problem(4, 200, 5)
    micro = metrics.precision_recall_f1(labels, probs, "micro")
    assert micro.precision == micro.recall == micro.f1 == metrics.accuracy(probs, labels)
    perfect = metrics.precision_recall_f1(labels, labels, "macro", num_classes=5)
    assert perfect == (1.0, 1.0, 1.0)


def test_confusion_matrix_infers_classes_and_counts_rows():
    matrix = metrics.confusion_matrix([0, 2, 2], [1, 2, 0])
    np.testing.assert_array_equal(matrix, [[0, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert matrix.dtype == np.int64 and matrix.sum() == 3


# --------------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(7, 2), (50, 3), (257, 10), (1000, 7)], ids=str)
def test_roc_auc_equals_sklearn(seed, shape):
    probs, labels = _problem(seed, *shape)
    num_classes = shape[1]
    if not _all_classes_present(labels, num_classes):
        labels[:num_classes] = np.arange(num_classes)
    if num_classes == 2:
        # scikit-learn's multi-class path refuses two columns: build the same averages from binary AUCs
        per_class = np.array([skm.roc_auc_score(labels == c, probs[:, c]) for c in range(2)])
        support = np.bincount(labels, minlength=2)
        one_hot = np.eye(2)[labels]
        expected = {
            ("ovr", None): per_class,
            ("ovr", "macro"): per_class.mean(),
            ("ovr", "weighted"): np.average(per_class, weights=support),
            ("ovr", "micro"): skm.roc_auc_score(one_hot.ravel(), probs.ravel()),
            ("ovo", "macro"): per_class.mean(),
            ("ovo", "weighted"): per_class.mean(),
        }
        for (multi_class, average), value in expected.items():
            assert_close_f64(metrics.roc_auc(probs, labels, multi_class, average), value)
        assert_close_f64(metrics.roc_auc(probs, labels), skm.roc_auc_score(labels, probs[:, 1]))
        return
    classes = list(range(num_classes))
    for average in ("macro", "weighted", "micro", None):
        expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average=average, labels=classes)
        assert_close_f64(metrics.roc_auc(probs, labels, "ovr", average), expected)
    for average in ("macro", "weighted"):
        expected = skm.roc_auc_score(labels, probs, multi_class="ovo", average=average, labels=classes)
        assert_close_f64(metrics.roc_auc(probs, labels, "ovo", average), expected)


def test_roc_auc_with_ties_equals_sklearn_and_the_pair_definition():
    rng = np.random.default_rng(5)
    # probabilities on a 0.1 grid: heavy ties within every column
    raw = rng.integers(0, 4, size=(400, 4)).astype(np.float64) + 1
    probs = raw / raw.sum(1, keepdims=True)
    labels = rng.integers(0, 4, 400)
    classes = list(range(4))
    for multi_class, averages in (("ovr", ("macro", "weighted", "micro", None)), ("ovo", ("macro", "weighted"))):
        for average in averages:
            expected = skm.roc_auc_score(labels, probs, multi_class=multi_class, average=average, labels=classes)
            assert_close_f64(metrics.roc_auc(probs, labels, multi_class, average), expected)
    per_class = metrics.roc_auc(probs, labels, average=None)
    for c in range(4):
        assert_close_f64(per_class[c], _auc_by_pairs(probs[:, c], labels == c))


def test_roc_auc_absent_class_is_nan_with_warning_as_sklearn():
    probs, labels = _problem(6, 300, 5)
    labels[labels == 3] = 1  # class 3 never occurs
    classes = list(range(5))
    with pytest.warns(UserWarning, match=r"classes \[3\] do not occur"):
        per_class = metrics.roc_auc(probs, labels, average=None)
    assert np.isnan(per_class[3]) and np.isfinite(np.delete(per_class, 3)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average=None, labels=classes)
        np.testing.assert_allclose(per_class, expected, rtol=1e-10, equal_nan=True)
        assert np.isnan(metrics.roc_auc(probs, labels, average="macro"))
        for average in ("weighted", "micro"):
            expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average=average, labels=classes)
            assert_close_f64(metrics.roc_auc(probs, labels, average=average), expected)
    # one-vs-one uses the pairs of present classes only, as scikit-learn
    for average in ("macro", "weighted"):
        expected = skm.roc_auc_score(labels, probs, multi_class="ovo", average=average, labels=classes)
        assert_close_f64(metrics.roc_auc(probs, labels, "ovo", average), expected)


def test_roc_auc_one_vs_rest_and_pairwise_counts_agree():
    """The rank-sum (one sort per class) and pairwise (one argsort per class) paths share no code but
    must give the same integers: 2U_a = sum_b 2U_ab."""
    probs, labels = _problem(7, 500, 6)
    tensor_probs, tensor_labels = torch.from_numpy(probs), torch.from_numpy(labels)
    rest, counts = metrics._twice_u_one_vs_rest(tensor_probs, tensor_labels)
    pairwise, counts_again = metrics._twice_u_pairwise(tensor_probs, tensor_labels)
    np.testing.assert_array_equal(counts, counts_again)
    np.testing.assert_array_equal(rest, pairwise.sum(1) - np.diag(pairwise))
    np.testing.assert_array_equal(np.diag(pairwise), counts**2)  # each class against itself: n_a^2


@pytest.mark.parametrize("decimals", [None, 1])
def test_rank_count_kernels_give_the_same_integers_in_numpy_and_torch(decimals):
    """The kernels run on NumPy for CPU data and on torch for CUDA data: both backends, run here on the
    CPU, must give identical integers (with and without ties)."""
    probs, labels = _problem(21, 700, 6)
    if decimals is not None:
        probs = np.round(probs, decimals)
        probs /= probs.sum(1, keepdims=True)
    tensor_probs, tensor_labels = torch.from_numpy(probs), torch.from_numpy(labels)
    for kernel in (metrics._twice_u_one_vs_rest, metrics._twice_u_pairwise):
        with_numpy = kernel(tensor_probs, tensor_labels, metrics._NUMPY_OPS)
        with_torch = kernel(tensor_probs, tensor_labels, metrics._TORCH_OPS)
        for a, b in zip(with_numpy, with_torch):
            np.testing.assert_array_equal(a, b)
    assert metrics._twice_u_micro(tensor_probs, tensor_labels, metrics._NUMPY_OPS) == metrics._twice_u_micro(
        tensor_probs, tensor_labels, metrics._TORCH_OPS
    )


def test_roc_auc_perfect_and_reversed_rankings():
    labels = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[labels] * 0.8 + 0.2 / 3
    assert metrics.roc_auc(perfect, labels) == 1.0
    assert metrics.roc_auc(perfect, labels, "ovo") == 1.0
    reversed_probs = (1 - np.eye(3)[labels]) / 2
    assert metrics.roc_auc(reversed_probs, labels) == 0.0


@given(
    st.integers(2, 5),
    st.integers(4, 40),
    st.integers(0, 2**31 - 1),
    st.sampled_from([None, 1, 2]),
)
def test_roc_auc_property_equals_pair_definition(num_classes, num_rows, seed, decimals):
    """Any probabilities (rounded to create ties or not): per-class OvR AUC = the pair definition, and
    every OvO pair AUC too."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(num_classes), num_rows)
    if decimals is not None:
        probs = np.round(probs, decimals)
        probs[:, -1] = 1 - probs[:, :-1].sum(1)
        probs = np.clip(probs, 0, None)
        probs /= probs.sum(1, keepdims=True)
    labels = rng.integers(0, num_classes, num_rows)
    labels[:2] = [0, 1]  # at least two classes present
    counts = np.bincount(labels, minlength=num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_class = metrics.roc_auc(probs, labels, average=None)
    for c in range(num_classes):
        if counts[c] == 0:
            assert np.isnan(per_class[c])
        else:
            assert abs(per_class[c] - _auc_by_pairs(probs[:, c], labels == c)) <= 1e-12
    pairwise, _ = metrics._twice_u_pairwise(torch.from_numpy(probs), torch.from_numpy(labels))
    for a in range(num_classes):
        for b in range(num_classes):
            if a != b and counts[a] and counts[b]:
                rows = (labels == a) | (labels == b)
                expected = _auc_by_pairs(probs[rows, a], labels[rows] == a)
                assert abs(pairwise[a, b] / (2.0 * counts[a] * counts[b]) - expected) <= 1e-12


# -------------------------------------------------------------------------------------- proper scores
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_log_loss_and_brier_equal_sklearn(seed, shape):
    probs, labels = _problem(seed, *shape)
    classes = list(range(shape[1]))
    assert_close_f64(metrics.log_loss(probs, labels), skm.log_loss(labels, probs, labels=classes))
    assert_close_f64(
        metrics.brier_score(probs, labels),
        skm.brier_score_loss(labels, probs, labels=classes, scale_by_half=False),
    )


def test_log_loss_clips_zero_probabilities_as_sklearn():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    labels = np.array([1, 1, 2])  # the first and last rows give the label probability 0
    classes = [0, 1, 2]
    for dtype in (np.float64, np.float32):
        expected = skm.log_loss(labels, probs.astype(dtype), labels=classes)
        ours = metrics.log_loss(probs.astype(dtype), labels)
        assert np.isfinite(ours)
        assert_close_f32(ours, expected)
    assert metrics.log_loss(probs, labels) == pytest.approx(2 * -np.log(np.finfo(np.float64).eps) / 3, rel=1e-12)


def test_float32_inputs_match_sklearn_within_float32_rounding():
    probs, labels = _problem(8, 500, 6, dtype=np.float32)
    classes = list(range(6))
    assert_close_f32(metrics.log_loss(probs, labels), skm.log_loss(labels, probs, labels=classes))
    assert_close_f32(
        metrics.brier_score(probs, labels), skm.brier_score_loss(labels, probs, labels=classes, scale_by_half=False)
    )
    # rank metrics are exact in any dtype
    assert_close_f64(
        metrics.roc_auc(probs, labels), skm.roc_auc_score(labels, probs, multi_class="ovr", labels=classes)
    )


def test_brier_score_extremes():
    assert metrics.brier_score(np.eye(4), np.arange(4)) == 0.0
    assert metrics.brier_score(np.eye(4), np.array([1, 2, 3, 0])) == 2.0


# ------------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_reliability_curve_per_class_equals_sklearn_calibration_curve(seed, strategy, n_bins):
    probs, labels = _problem(seed, 600, 4)
    for c in range(4):
        curve = metrics.reliability_curve(probs, labels, n_bins, strategy, class_index=c)
        prob_true, prob_pred = calibration_curve(labels == c, probs[:, c], n_bins=n_bins, strategy=strategy)
        assert_close_f64(curve.accuracy, prob_true)
        assert_close_f64(curve.confidence, prob_pred)
        assert curve.count.sum() == 600 and (curve.count > 0).all()
        assert (curve.lower < curve.upper).all() or strategy == "quantile"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_calibration_errors_equal_the_binned_definition(seed, strategy, norm):
    probs, labels = _problem(seed, 700, 5)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    expected = _calibration_error_by_loop(confidence, correct, 12, strategy, norm)
    assert_close_f64(metrics.expected_calibration_error(probs, labels, 12, strategy, norm), expected)
    classwise = np.mean(
        [_calibration_error_by_loop(probs[:, c], labels == c, 12, strategy, norm) for c in range(5)]
    )
    assert_close_f64(metrics.classwise_ece(probs, labels, 12, strategy, norm), classwise)
    if norm == "max":
        assert metrics.max_calibration_error(probs, labels, 12, strategy) == pytest.approx(expected, rel=1e-12)


def test_top_label_correctness_follows_argmax_through_ties():
    """Correctness is ``argmax == label`` with the first maximum winning ties (as numpy), also on the
    shortcut path (the label's probability equals the row maximum)."""
    probs = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0]])
    labels = np.array([1, 0, 2, 1])
    # rows: tie lost (argmax 0), tie won, unique max, tie at 0.5 lost
    assert metrics.expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(
        abs((0 + 1 + 1 + 0) / 4 - (0.4 + 0.4 + 0.5 + 0.5) / 4)
    )
    many_ties = _dyadic_probabilities(20, 2000, 4, denominator=16)  # multiples of 1/16: many tied maxima
    labels = np.random.default_rng(20).integers(0, 4, 2000)
    confidence, correct = many_ties.max(1), many_ties.argmax(1) == labels
    assert (np.sort(many_ties, 1)[:, -1] == np.sort(many_ties, 1)[:, -2]).sum() > 100
    for strategy in ("uniform", "quantile"):
        expected = _calibration_error_by_loop(confidence, correct, 10, strategy, "l1")
        assert_close_f64(metrics.expected_calibration_error(many_ties, labels, 10, strategy), expected)


def test_ece_is_the_weighted_gap_of_the_reliability_curve():
    probs, labels = _problem(9, 1000, 8)
    curve = metrics.reliability_curve(probs, labels, 15)
    weights = curve.count / curve.count.sum()
    gaps = np.abs(curve.accuracy - curve.confidence)
    assert_close_f64(metrics.expected_calibration_error(probs, labels, 15), np.sum(weights * gaps))
    assert_close_f64(metrics.max_calibration_error(probs, labels, 15), gaps.max())
    assert_close_f64(np.sum(weights * curve.accuracy), metrics.accuracy(probs, labels))


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_ece_equals_torchmetrics(norm):
    torchmetrics = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _problem(10, 2000, 6)
    # random continuous confidences: none lies exactly on a bin edge, where the conventions differ
    edges = np.linspace(0, 1, 16)
    assert not np.isin(probs.max(1), edges).any()
    expected = torchmetrics.multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(labels), num_classes=6, n_bins=15, norm=norm
    )
    assert_close_f32(metrics.expected_calibration_error(probs, labels, 15, norm=norm), expected)


def test_calibration_degenerate_inputs():
    # confident and right: confidence exactly 1 lands in the last (right-closed) bin, ECE 0
    assert metrics.expected_calibration_error(np.eye(3), [0, 1, 2]) == 0.0
    # confident and wrong: ECE is 1
    assert metrics.expected_calibration_error(np.eye(3), [1, 2, 0]) == 1.0
    # uniform probabilities: all rows tie, one bin, quantile edges collapse; accuracy 1/3 vs confidence 1/3
    flat = np.full((6, 3), 1 / 3)
    for strategy in ("uniform", "quantile"):
        curve = metrics.reliability_curve(flat, [0, 1, 2, 0, 1, 2], 10, strategy)
        assert len(curve.count) == 1 and curve.count[0] == 6
        assert metrics.expected_calibration_error(flat, [0, 1, 2, 0, 1, 2], 10, strategy) == pytest.approx(0, abs=1e-15)
    # a single row
    assert metrics.expected_calibration_error([[0.3, 0.7]], [1]) == pytest.approx(0.3)


@given(st.integers(2, 6), st.integers(1, 60), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_calibration_error_properties(num_classes, num_rows, n_bins, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(num_classes) * 0.5, num_rows)
    labels = rng.integers(0, num_classes, num_rows)
    permutation = rng.permutation(num_rows)
    for strategy in ("uniform", "quantile"):
        l1 = metrics.expected_calibration_error(probs, labels, n_bins, strategy)
        l2 = metrics.expected_calibration_error(probs, labels, n_bins, strategy, "l2")
        top = metrics.max_calibration_error(probs, labels, n_bins, strategy)
        assert 0 <= l1 <= l2 + 1e-12 <= top + 2e-12 <= 1 + 2e-12  # power-mean inequality
        shuffled = metrics.expected_calibration_error(probs[permutation], labels[permutation], n_bins, strategy)
        assert shuffled == pytest.approx(l1, abs=1e-12)  # order of rows does not matter
        assert 0 <= metrics.classwise_ece(probs, labels, n_bins, strategy) <= 1


# ------------------------------------------------------------------------------------ kinds and dtypes
ALL_METRICS = [
    ("accuracy", lambda p, y: metrics.accuracy(p, y)),
    ("top_k_accuracy", lambda p, y: metrics.top_k_accuracy(p, y, 2)),
    ("confusion_matrix", lambda p, y: metrics.confusion_matrix(y, p)),
    ("precision_recall_f1", lambda p, y: metrics.precision_recall_f1(y, p, None)),
    ("roc_auc", lambda p, y: metrics.roc_auc(p, y, average=None)),
    ("roc_auc_ovo", lambda p, y: metrics.roc_auc(p, y, "ovo")),
    ("roc_auc_micro", lambda p, y: metrics.roc_auc(p, y, average="micro")),
    ("log_loss", lambda p, y: metrics.log_loss(p, y)),
    ("brier_score", lambda p, y: metrics.brier_score(p, y)),
    ("ece", lambda p, y: metrics.expected_calibration_error(p, y)),
    ("ece_quantile", lambda p, y: metrics.expected_calibration_error(p, y, strategy="quantile")),
    ("mce", lambda p, y: metrics.max_calibration_error(p, y)),
    ("classwise_ece", lambda p, y: metrics.classwise_ece(p, y)),
    ("reliability_curve", lambda p, y: metrics.reliability_curve(p, y)),
]


def _assert_same(a, b):
    """Integers exactly; floats to 1e-10 (a different memory layout may change a summation order)."""
    for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind in "iub":
            np.testing.assert_array_equal(x, y)
        else:
            assert_close_f64(x, y)


@pytest.mark.parametrize(("name", "metric"), ALL_METRICS, ids=[m[0] for m in ALL_METRICS])
def test_numpy_torch_and_list_inputs_agree_and_are_not_mutated(name, metric):
    probs, labels = _problem(11, 120, 5)
    labels[:5] = np.arange(5)
    probs_copy, labels_copy = probs.copy(), labels.copy()
    from_numpy = metric(probs, labels)
    tensor_probs, tensor_labels = torch.from_numpy(probs.copy()), torch.from_numpy(labels.copy()).int()
    tensor_probs.requires_grad_(True)
    _assert_same(metric(tensor_probs, tensor_labels), from_numpy)
    _assert_same(metric(probs.tolist(), labels.tolist()), from_numpy)
    _assert_same(metric(np.asfortranarray(probs), labels), from_numpy)  # non-contiguous rows
    np.testing.assert_array_equal(probs, probs_copy)
    np.testing.assert_array_equal(labels, labels_copy)
    np.testing.assert_array_equal(tensor_probs.detach().numpy(), probs_copy)
    assert isinstance(from_numpy, (float, np.ndarray, tuple))


def _dyadic_probabilities(seed: int, num_rows: int, num_classes: int, denominator: int = 256) -> np.ndarray:
    """Probabilities that are multiples of 1/denominator (a power of 2 <= 256) summing exactly to 1: exact
    in bfloat16 and float16."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, denominator + 1, size=(num_rows, num_classes - 1)), axis=1)
    bounds = np.concatenate([np.zeros((num_rows, 1)), cuts, np.full((num_rows, 1), denominator)], axis=1)
    return np.diff(bounds, axis=1) / denominator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "metric"), ALL_METRICS, ids=[m[0] for m in ALL_METRICS])
def test_low_precision_probabilities_are_read_exactly(dtype, name, metric):
    """A metric of float32/bf16/fp16 probabilities equals the metric of the same values in float64: the
    metric adds no error of its own (it widens before summing). The values are multiples of 1/256, exact
    in every dtype, so both calls see the same numbers. log_loss clips at the input dtype's eps."""
    probs = _dyadic_probabilities(12, 300, 6)
    labels = np.random.default_rng(12).integers(0, 6, 300)
    labels[:6] = np.arange(6)
    low = torch.from_numpy(probs).to(dtype)
    assert torch.equal(low.double(), torch.from_numpy(probs))
    if name == "log_loss":
        eps = torch.finfo(dtype).eps
        own = np.clip(probs[np.arange(300), labels], eps, 1 - eps)
        assert_close_f64(metric(low, labels), -np.log(own).mean())
        return
    _assert_same(metric(low, labels), metric(probs, labels))


def test_large_input_chunks_agree_with_sklearn():
    """Enough rows and classes to cross the (N, C) chunk and column-block boundaries."""
    probs, labels = _problem(13, 40_000, 120, sharpness=1.0, dtype=np.float32)
    labels[:120] = np.arange(120)
    classes = list(range(120))
    assert metrics.top_k_accuracy(probs, labels, 5) == pytest.approx(
        skm.top_k_accuracy_score(labels, probs, k=5, labels=classes), abs=1e-15
    )
    assert_close_f32(
        metrics.brier_score(probs, labels), skm.brier_score_loss(labels, probs, labels=classes, scale_by_half=False)
    )
    per_class = metrics.roc_auc(probs, labels, average=None)
    for c in (0, 57, 119):
        assert_close_f64(per_class[c], skm.roc_auc_score(labels == c, probs[:, c]))


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "metric"), ALL_METRICS, ids=[m[0] for m in ALL_METRICS])
def test_cuda_equals_cpu(name, metric):
    probs, labels = _problem(14, 500, 7)
    labels[:7] = np.arange(7)
    on_cpu = metric(torch.from_numpy(probs), torch.from_numpy(labels))
    on_gpu = metric(torch.from_numpy(probs).cuda(), torch.from_numpy(labels).cuda())
    for a, b in zip(on_gpu, on_cpu) if isinstance(on_cpu, tuple) else [(on_gpu, on_cpu)]:
        assert_close_f64(a, b)


# ------------------------------------------------------------------------------------------ bad input
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
LABELS = np.array([0, 1])
PROBABILITY_METRICS = [
    metrics.roc_auc,
    metrics.log_loss,
    metrics.brier_score,
    metrics.expected_calibration_error,
    metrics.max_calibration_error,
    metrics.classwise_ece,
    metrics.reliability_curve,
]


@pytest.mark.parametrize("metric", PROBABILITY_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("probs", "labels", "error", "message"),
    [
        (np.array([[0.7, 0.2, 0.2], [0.1, 0.8, 0.1]]), LABELS, ValueError, r"rows sum to 1 .* row 0 sums to 1\.1"),
        (np.array([[0.7, 0.2, 0.1], [1.2, -0.3, 0.1]]), LABELS, ValueError, r"non-negative .* -0\.3 at row 1, class 1"),
        (np.array([[0.7, 0.2, 0.1], [np.nan, 0.8, 0.2]]), LABELS, ValueError, r"NaN, but row 1"),
        (np.array([[0.7, 0.2, 0.1], [np.inf, 0.8, 0.1]]), LABELS, ValueError, r"row 1 holds an infinite value"),
        (PROBS, np.array([0, 3]), ValueError, r"class indices in \[0, 3\), but holds 3 at position 1"),
        (PROBS, np.array([0, -1]), ValueError, r"but holds -1 at position 1"),
        (PROBS, np.array([0, 1, 2]), ValueError, r"one entry per row \(2\), but has 3"),
        (PROBS, np.array([0.0, 1.0]), TypeError, r"`labels` must hold integer class indices"),
        (PROBS, np.array([[0, 1]]), ValueError, r"1-d array of class indices"),
        (np.array([[1.0], [1.0]]), LABELS, ValueError, r"at least 2 classes"),
        (np.array([0.3, 0.7]), LABELS, ValueError, r"shape \(N, C\).*np\.stack"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), ValueError, r"at least one row"),
        (np.array([["a", "b"]]), LABELS, TypeError, r"must hold numbers"),
    ],
)
def test_bad_probabilities_and_labels_raise_with_the_reason(metric, probs, labels, error, message):
    with pytest.raises(error, match=message):
        metric(probs, labels)


def test_sum_tolerance_is_1e4_in_float32_and_dtype_aware_below():
    ok = np.array([[0.5, 0.5 + 0.9e-4]])
    metrics.log_loss(ok, [0])
    with pytest.raises(ValueError, match="within 1e-04"):
        metrics.log_loss(np.array([[0.5, 0.5 + 1.1e-4]]), [0])
    # bfloat16 rounding moves a row sum by up to ~4e-3: accepted; a real error of 2e-2 is not
    rounded = torch.tensor([[0.333, 0.333, 0.334]]).bfloat16()
    assert abs(float(rounded.float().sum()) - 1) > 1e-4
    metrics.log_loss(rounded, [0])
    with pytest.raises(ValueError, match="rows sum to 1"):
        metrics.log_loss(torch.tensor([[0.35, 0.35, 0.32]]).bfloat16(), [0])


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`average` must be one of 'macro', 'weighted', 'micro'"):
        metrics.roc_auc(PROBS, LABELS, average="samples")
    with pytest.raises(ValueError, match=r"'macro' or 'weighted' with multi_class='ovo', but got None"):
        metrics.roc_auc(PROBS, LABELS, "ovo", None)
    with pytest.raises(ValueError, match=r"`multi_class` must be one of"):
        metrics.roc_auc(PROBS, LABELS, "raise")
    with pytest.raises(ValueError, match=r"at least two classes present in `labels`, but all 2 labels are 1"):
        metrics.roc_auc(PROBS, [1, 1])
    with pytest.raises(ValueError, match=r"`strategy` must be one of"):
        metrics.expected_calibration_error(PROBS, LABELS, strategy="adaptive")
    with pytest.raises(ValueError, match=r"`norm` must be one of"):
        metrics.expected_calibration_error(PROBS, LABELS, norm="l3")
    with pytest.raises(ValueError, match=r"`n_bins` must be an int >= 1, but got 0"):
        metrics.expected_calibration_error(PROBS, LABELS, n_bins=0)
    with pytest.raises(TypeError, match=r"`n_bins` must be an int"):
        metrics.expected_calibration_error(PROBS, LABELS, n_bins=2.5)
    with pytest.raises(ValueError, match=r"`k` must be an int >= 1, but got 0"):
        metrics.top_k_accuracy(PROBS, LABELS, 0)
    with pytest.raises(ValueError, match=r"`class_index` must be None or a class in \[0, 3\), but got 3"):
        metrics.reliability_curve(PROBS, LABELS, class_index=3)
    with pytest.raises(ValueError, match=r"`average` must be one of"):
        metrics.precision_recall_f1(LABELS, LABELS, "binary")
    with pytest.raises(ValueError, match=r"`num_classes` is 4 but `preds` holds scores for 3 classes"):
        metrics.confusion_matrix(LABELS, PROBS, num_classes=4)
    with pytest.raises(ValueError, match=r"`preds` must hold class indices in \[0, 2\), but holds 2"):
        metrics.confusion_matrix(LABELS, [0, 2], num_classes=2)
    with pytest.raises(ValueError, match=r"`scores` must not contain NaN, but row 1 does"):
        metrics.top_k_accuracy(np.array([[0.1, 2.0], [np.nan, 1.0]]), [0, 1], 1)
    with pytest.raises(ValueError, match=r"one entry per row \(2\), but has 1"):
        metrics.accuracy([3, 1], [1])


def test_docstring_examples():
    failures, tried = doctest.testmod(softmaxkit.metrics, verbose=False)
    assert tried > 10 and failures == 0
