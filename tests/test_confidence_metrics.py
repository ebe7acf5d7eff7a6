"""metrics.confidence and metrics.most_confused_pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from softmaxkit import metrics


def test_confidence_matches_direct_formulas():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(6, 0.5), size=200)
    probs[0] = [1, 0, 0, 0, 0, 0]
    probs[1] = np.full(6, 1 / 6)
    c = metrics.confidence(probs)
    ordered = np.sort(probs, axis=1)
    np.testing.assert_allclose(c.max_probability, ordered[:, -1])
    np.testing.assert_allclose(c.margin, ordered[:, -1] - ordered[:, -2])
    np.testing.assert_allclose(c.entropy, scipy_entropy(probs, axis=1), atol=1e-12)
    assert c.entropy[0] == 0 and c.margin[0] == 1 and abs(c.entropy[1] - np.log(6)) < 1e-12
    assert c.margin[1] == 0
    torch_c = metrics.confidence(torch.from_numpy(probs).float())
    np.testing.assert_allclose(torch_c.entropy, c.entropy, atol=1e-5)


def test_confidence_validates():
    with pytest.raises(ValueError, match="`probs`"):
        metrics.confidence([[0.5, 0.6]])
    with pytest.raises(ValueError, match="`probs`"):
        metrics.confidence([0.5, 0.5])


def test_most_confused_pairs_reads_the_confusion_matrix():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 500)
    preds = np.where(rng.random(500) < 0.3, rng.integers(0, 5, 500), labels)
    pairs = metrics.most_confused_pairs(labels, preds, k=4)
    matrix = metrics.confusion_matrix(labels, preds, num_classes=5)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    expected = sorted((int(-off[a, b]), a, b) for a in range(5) for b in range(5) if off[a, b])[:4]
    assert [(p.true, p.predicted, p.count) for p in pairs] == [(a, b, -n) for n, a, b in expected]
    for p in pairs:
        assert p.rate == p.count / matrix[p.true].sum()


def test_most_confused_pairs_edges():
    assert metrics.most_confused_pairs([0, 1, 2], [0, 1, 2], k=3) == []
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    (pair,) = metrics.most_confused_pairs([1, 1, 1], scores, k=5)
    assert (pair.true, pair.predicted, pair.count, pair.rate) == (1, 0, 2, 2 / 3)
    with pytest.raises(ValueError, match="`k`"):
        metrics.most_confused_pairs([0], [0], k=0)
    with pytest.raises(ValueError, match="`labels`"):
        metrics.most_confused_pairs([0, 1], [0], k=1)
