"""SoftmaxRegression with the comparison losses (hinge, Crammer-Singer, MSE, raw-score MSE, sigmoid)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from softmaxkit import SoftmaxRegression
from softmaxkit.estimator import COMPARISON_LOSSES


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("loss", COMPARISON_LOSSES)
def test_fits_and_predicts(iris, loss):
    X, y = iris
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the hinges are not smooth: L-BFGS may stop early
        model = SoftmaxRegression(loss, alpha=1e-3, max_iter=300).fit(X, y)
    # least squares on the raw scores suffers from class masking (the middle class of iris): ~0.85
    assert model.score(X, y) > (0.8 if loss == "mse_scores" else 0.9)
    probs = model.predict_proba(X)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probs.argmax(1), model.predict(X))
    np.testing.assert_allclose(np.exp(model.predict_log_proba(X)), probs, rtol=1e-10)


def test_sigmoid_probabilities_are_renormalised_sigmoids(iris):
    X, y = iris
    model = SoftmaxRegression("sigmoid", alpha=1e-3).fit(X, y)
    s = torch.sigmoid(torch.from_numpy(model.decision_function(X))).numpy()
    np.testing.assert_allclose(model.predict_proba(X), s / s.sum(1, keepdims=True))


def test_class_weight_and_sample_weight_with_mse(iris):
    X, y = iris
    weighted = SoftmaxRegression("mse_scores", alpha=1e-3, class_weight={0: 3.0}).fit(X, y)
    repeated = SoftmaxRegression("mse_scores", alpha=1e-3).fit(X, y, sample_weight=np.where(y == 0, 3.0, 1.0))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-6)


def test_label_smoothing_is_refused_for_comparison_losses(iris):
    X, y = iris
    with pytest.raises(ValueError, match="`label_smoothing` is not supported with loss='hinge'"):
        SoftmaxRegression("hinge", label_smoothing=0.1).fit(X, y)


def test_sklearn_estimator_checks_with_sigmoid():
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(SoftmaxRegression("sigmoid"))
