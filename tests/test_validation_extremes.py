"""Validation found by the extreme-input audit: what PyTorch accepts is accepted, what is wrong is refused with
a message naming the argument, and module options fail at construction, not at ``forward``."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F

import softmaxkit
from softmaxkit import metrics
from softmaxkit import nn as sknn

LOGITS = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
TARGET = torch.tensor([0, 1, 2, 1, 4, 3])


# ------------------------------------------------------------------ ignore_index as PyTorch takes it
@pytest.mark.parametrize("ignore", [torch.tensor(1), np.int64(1), np.int32(1), torch.tensor(1, dtype=torch.int32)],
                         ids=["tensor", "np.int64", "np.int32", "tensor-int32"])
def test_ignore_index_as_numpy_integer_or_0d_tensor(ignore):
    expected = F.cross_entropy(LOGITS, TARGET, ignore_index=ignore)
    torch.testing.assert_close(softmaxkit.cross_entropy(LOGITS, TARGET, ignore_index=ignore), expected)
    torch.testing.assert_close(sknn.CrossEntropyLoss(ignore_index=ignore)(LOGITS, TARGET), expected)
    plain = 1
    for function in (softmaxkit.focal_loss, softmaxkit.poly1_cross_entropy, softmaxkit.sparsemax_loss):
        torch.testing.assert_close(function(LOGITS, TARGET, ignore_index=ignore),
                                   function(LOGITS, TARGET, ignore_index=plain))
    for module in (sknn.FocalLoss, sknn.Poly1Loss, sknn.SparsemaxLoss):
        torch.testing.assert_close(module(ignore_index=ignore)(LOGITS, TARGET), module(ignore_index=plain)(LOGITS, TARGET))


_H, _W = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.randn(5, 3)
_MULTI = (LOGITS > 0).float()
#: every other loss and module with ``ignore_index``, as ``f(ignore_index)`` (the multi-label ones keep it
#: negative: their targets are class probabilities)
_IGNORING = {
    "crammer_singer_loss": lambda i: softmaxkit.crammer_singer_loss(LOGITS, TARGET, ignore_index=i),
    "distillation_loss": lambda i: softmaxkit.distillation_loss(LOGITS, LOGITS / 2, target=TARGET, alpha=0.5,
                                                                ignore_index=i),
    "entmax15_loss": lambda i: softmaxkit.entmax15_loss(LOGITS, TARGET, ignore_index=i),
    "entmax_bisect_loss": lambda i: softmaxkit.entmax_bisect_loss(LOGITS, TARGET, ignore_index=i),
    "linear_cross_entropy": lambda i: softmaxkit.linear_cross_entropy(_H, _W, TARGET, ignore_index=i),
    "multi_margin_loss": lambda i: softmaxkit.multi_margin_loss(LOGITS, TARGET, ignore_index=i),
    "multilabel_soft_margin_loss": lambda i: softmaxkit.multilabel_soft_margin_loss(LOGITS, _MULTI,
                                                                                    ignore_index=i - 2),
    "sampled_softmax_loss": lambda i: softmaxkit.sampled_softmax_loss(
        _H, _W, TARGET, num_sampled=2, generator=torch.Generator().manual_seed(0), ignore_index=i),
    "score_mse_loss": lambda i: softmaxkit.score_mse_loss(LOGITS, TARGET, ignore_index=i),
    "softmax_mse_loss": lambda i: softmaxkit.softmax_mse_loss(LOGITS, TARGET, ignore_index=i),
    "CrammerSingerLoss": lambda i: sknn.CrammerSingerLoss(ignore_index=i)(LOGITS, TARGET),
    "DistillationLoss": lambda i: sknn.DistillationLoss(alpha=0.5, ignore_index=i)(LOGITS, LOGITS / 2, TARGET),
    "Entmax15Loss": lambda i: sknn.Entmax15Loss(ignore_index=i)(LOGITS, TARGET),
    "EntmaxBisectLoss": lambda i: sknn.EntmaxBisectLoss(ignore_index=i)(LOGITS, TARGET),
    "LinearCrossEntropyLoss": lambda i: sknn.LinearCrossEntropyLoss(ignore_index=i)(_H, _W, TARGET),
    "MultiMarginLoss": lambda i: sknn.MultiMarginLoss(ignore_index=i)(LOGITS, TARGET),
    "MultilabelSoftMarginLoss": lambda i: sknn.MultilabelSoftMarginLoss(ignore_index=i - 2)(LOGITS, _MULTI),
    "ScoreMSELoss": lambda i: sknn.ScoreMSELoss(ignore_index=i)(LOGITS, TARGET),
    "SoftmaxMSELoss": lambda i: sknn.SoftmaxMSELoss(ignore_index=i)(LOGITS, TARGET),
    "HierarchicalSoftmax": lambda i: _hierarchical(i),
}


def _hierarchical(ignore_index):
    torch.manual_seed(0)
    module = sknn.HierarchicalSoftmax(3, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), ignore_index=ignore_index)
    return module(_H, TARGET)


@pytest.mark.parametrize("name", list(_IGNORING))
def test_ignore_index_as_numpy_integer_or_0d_tensor_in_every_loss(name):
    """Issue 14, case 12: "every loss and the nn modules" take what PyTorch takes for ``ignore_index``."""
    expected = _IGNORING[name](1)
    for ignore in (torch.tensor(1), np.int64(1), np.int32(1)):
        torch.testing.assert_close(_IGNORING[name](ignore), expected)


@pytest.mark.parametrize("ignore", [torch.tensor(1.0), torch.tensor([1]), True, 1.0, torch.tensor(True)])
def test_ignore_index_that_is_not_an_integer_is_refused(ignore):
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        softmaxkit.cross_entropy(LOGITS, TARGET, ignore_index=ignore)


# ------------------------------------------------------------------ shapes and dtypes
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_zero_classes_with_probability_targets_returns_what_pytorch_returns(reduction, label_smoothing):
    logits, target = torch.rand(5, 0), torch.rand(5, 0)
    expected = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    actual = softmaxkit.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(actual, expected, equal_nan=True)


def test_zero_classes_with_class_indices_is_still_refused():
    with pytest.raises(ValueError, match="at least one class"):
        softmaxkit.cross_entropy(torch.rand(5, 0), torch.zeros(5, dtype=torch.long))


def test_integer_target_of_the_probability_shape_gets_a_dtype_message():
    with pytest.raises(TypeError, match=r"holds class probabilities and must be floating point.*torch\.int64"):
        softmaxkit.cross_entropy(LOGITS, torch.zeros(6, 5, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32"])
def test_softmax_dtype_must_be_floating(dtype):
    for function in (softmaxkit.softmax, softmaxkit.log_softmax):
        with pytest.raises(TypeError, match="`dtype` must be None or a floating-point torch.dtype"):
            function(LOGITS, dtype=dtype)
    with pytest.raises(TypeError, match="`dtype`"):
        sknn.Softmax(dtype=dtype)
    torch.testing.assert_close(softmaxkit.softmax(LOGITS, dtype=torch.float64), torch.softmax(LOGITS, -1, torch.float64))


@pytest.mark.parametrize("generator", [0, "seed", torch.tensor(0)])
def test_sampled_softmax_generator_must_be_a_generator(generator):
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or None"):
        softmaxkit.sampled_softmax_loss(torch.randn(4, 3), torch.randn(10, 3), torch.tensor([0, 1, 2, 3]),
                                        num_sampled=4, generator=generator)


def test_class_weights_refuses_booleans():
    for counts in ([True, False], np.array([True, True]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="`counts` must hold"):
            softmaxkit.class_weights(counts)


def test_meta_tensors_get_a_clear_message_where_data_is_needed():
    meta = torch.ones(3, device="meta")
    with pytest.raises(TypeError, match="`counts` is a meta tensor"):
        softmaxkit.class_weights(meta)
    with pytest.raises(TypeError, match="`probs` is a meta tensor"):
        metrics.brier_score(torch.ones(2, 3, device="meta"), [0, 1])


def test_meta_tensors_skip_the_eager_data_checks():
    logits = torch.randn(4, 5, device="meta")
    target = torch.zeros(4, dtype=torch.long, device="meta")
    assert softmaxkit.cross_entropy(logits, target, reduction="none").shape == (4,)
    assert softmaxkit.focal_loss(logits, target).shape == ()


# ------------------------------------------------------------------ metrics: array-likes as scikit-learn takes them
def test_metrics_accept_integer_arrays_like_sklearn():
    onehot = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
    labels = np.array([0, 1, 2, 2])
    scores = np.array([[3, 1, 0], [0, 5, 1], [1, 2, 0], [0, 0, 7]])
    assert metrics.brier_score(onehot, labels) == pytest.approx(np.mean(np.sum((onehot - np.eye(3)[labels]) ** 2, 1)))
    assert metrics.top_k_accuracy(scores, labels, k=2) == pytest.approx(
        skm.top_k_accuracy_score(labels, scores, k=2, labels=range(3)))
    assert metrics.log_loss(onehot, labels) == pytest.approx(skm.log_loss(labels, onehot, labels=range(3)))
    binary = np.array([[1, 0], [0, 1], [0, 1], [1, 0]])
    binary_labels = np.array([0, 1, 0, 0])
    assert metrics.roc_auc(binary, binary_labels) == pytest.approx(skm.roc_auc_score(binary_labels, binary[:, 1]))
    assert metrics.expected_calibration_error(onehot, labels) == pytest.approx(
        metrics.expected_calibration_error(onehot.astype(float), labels))
    assert metrics.accuracy(scores, labels) == pytest.approx(skm.accuracy_score(labels, scores.argmax(1)))


def test_top_k_accuracy_takes_logits_as_sklearn_takes_scores():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0], [-5.0, -4.0, -9.0], [1e4, -1e4, 0.0]])
    labels = np.array([0, 2, 1, 2])
    for k in (1, 2):
        assert metrics.top_k_accuracy(logits, labels, k=k) == pytest.approx(
            skm.top_k_accuracy_score(labels, logits, k=k, labels=range(3)))


def test_precision_recall_f1_refuses_predictions_beyond_the_classes():
    with pytest.raises(ValueError, match=r"`preds` must hold class indices in \[0, 3\)"):
        metrics.precision_recall_f1([0, 1, 1], [0, 1, 5], num_classes=3)


@pytest.mark.parametrize(("labels", "preds"), [([0, 1], [0, 1, 1]), ([0, 1, 1], [0, 1])])
def test_precision_recall_f1_names_both_arguments_on_a_length_mismatch(labels, preds):
    message = rf"`labels` has {len(labels)} entries but `preds` has {len(preds)}"
    with pytest.raises(ValueError, match=message):
        metrics.precision_recall_f1(labels, preds)
    with pytest.raises(ValueError, match=message):
        metrics.confusion_matrix(labels, preds)


# ------------------------------------------------------------------ modules validate in __init__
@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: sknn.CrossEntropyLoss(impl="nope"), ValueError, "`impl` must be one of"),
        (lambda: sknn.CrossEntropyLoss(weight=torch.ones(3, 2)), ValueError, "`weight` must be a 1-d tensor"),
        (lambda: sknn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.long)), TypeError, "`weight`"),
        (lambda: sknn.LinearCrossEntropyLoss(impl="cuda"), ValueError, "`impl` must be one of"),
        (lambda: sknn.LinearCrossEntropyLoss(accumulation_dtype=torch.int32), TypeError, "`accumulation_dtype`"),
        (lambda: sknn.LinearCrossEntropyLoss(class_weight=torch.ones(2, 2)), ValueError, "`class_weight`"),
        (lambda: sknn.FocalLoss(alpha=torch.ones(2, 2)), ValueError, "`alpha` must be a 1-d tensor"),
        (lambda: sknn.Poly1Loss(weight=torch.ones(())), ValueError, "`weight` must be a 1-d tensor"),
        (lambda: sknn.EntmaxBisect(alpha=0.5), ValueError, "`alpha` must be a finite number >= 1"),
        (lambda: sknn.EntmaxBisectLoss(alpha=float("inf")), ValueError, "`alpha` must be a finite number >= 1"),
        (lambda: sknn.Softmax(dtype=torch.int8), TypeError, "`dtype`"),
    ],
)
def test_module_options_fail_at_construction(make, error, fragment):
    with pytest.raises(error, match=fragment):
        make()


def test_valid_module_options_still_construct_and_match_the_function():
    module = sknn.CrossEntropyLoss(impl="composite", weight=torch.rand(5))
    torch.testing.assert_close(module(LOGITS, TARGET),
                               softmaxkit.cross_entropy(LOGITS, TARGET, impl="composite", weight=module.weight))
    assert sknn.EntmaxBisect(alpha=1.5).alpha == 1.5
    assert sknn.LinearCrossEntropyLoss(impl="triton_fused", accumulation_dtype=torch.float64).impl == "triton_fused"
