"""PlattScaling against scikit-learn's CalibratedClassifierCV(method="sigmoid"); DirichletCalibration's fit,
limits and round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV

from softmaxkit import calibration, metrics
from softmaxkit.calibration import DirichletCalibration, PlattScaling, TemperatureScaling, VectorScaling


class _Scores(ClassifierMixin, BaseEstimator):
    """A 'fitted classifier' whose features are its logits: decision_function returns them (the margin for
    two classes, as scikit-learn's binary classifiers do)."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X):
        X = np.asarray(X, dtype=np.float64)
        return X[:, 1] - X[:, 0] if X.shape[1] == 2 else X

    def predict(self, X):
        return self.classes_[np.asarray(X).argmax(axis=1)]


def _sklearn_sigmoid(logits, labels):
    """scikit-learn's sigmoid calibration of the fitted `_Scores` (FrozenEstimator from 1.6, cv="prefit" before)."""
    base = _Scores().fit(logits, labels)
    try:
        from sklearn.frozen import FrozenEstimator
    except ImportError:  # scikit-learn < 1.6
        return CalibratedClassifierCV(base, method="sigmoid", cv="prefit").fit(logits, labels)
    return CalibratedClassifierCV(FrozenEstimator(base), method="sigmoid").fit(logits, labels)


def _problem(num_classes, n=600, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + scale * np.eye(num_classes)[labels] * rng.uniform(0.2, 1.5, (n, 1))
    return logits, labels


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_platt_equals_sklearn_sigmoid_calibration(num_classes):
    logits, labels = _problem(num_classes)
    fit, new = slice(0, 400), slice(400, None)
    ours = PlattScaling().fit(logits[fit], labels[fit])
    theirs = _sklearn_sigmoid(logits[fit], labels[fit])
    np.testing.assert_allclose(ours.predict_proba(logits[new]), theirs.predict_proba(logits[new]), atol=2e-6)
    if num_classes == 2:
        (calibrator,) = theirs.calibrated_classifiers_[0].calibrators
        np.testing.assert_allclose([ours.slope_[0], ours.intercept_[0]], [-calibrator.a_, -calibrator.b_], rtol=1e-5)  # σ(−(A s + B))


def test_platt_on_huge_scores_matches_sklearn_rescaling():
    logits, labels = _problem(2)
    logits = logits * 40  # |s| > 30: both rescale the scores before fitting
    ours = PlattScaling().fit(logits, labels)
    theirs = _sklearn_sigmoid(logits, labels)
    np.testing.assert_allclose(ours.predict_proba(logits), theirs.predict_proba(logits), atol=2e-6)


def test_platt_without_prior_correction_is_plain_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    logits, labels = _problem(2, seed=3)
    ours = PlattScaling(prior_correction=False).fit(logits, labels)
    margin = (logits[:, 1] - logits[:, 0])[:, None]
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=1000).fit(margin, labels)
    np.testing.assert_allclose(ours.slope_[0], reference.coef_[0, 0], rtol=1e-5)
    np.testing.assert_allclose(ours.intercept_[0], reference.intercept_[0], rtol=1e-5, atol=1e-7)


def test_platt_masked_classes_and_tensors():
    logits, labels = _problem(4)
    logits[::7, 3] = -np.inf
    labels[::7] = 0
    platt = PlattScaling().fit(logits, labels)
    probs = platt.predict_proba(torch.from_numpy(logits))
    assert isinstance(probs, torch.Tensor)
    assert torch.all(probs[::7, 3] == 0)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(labels), dtype=torch.float64))


def test_platt_improves_an_overconfident_model():
    logits, labels = _problem(2, n=2000, scale=2.0)
    logits = logits * 4  # over-confident
    fit, new = slice(0, 1000), slice(1000, None)
    softmax = torch.softmax(torch.from_numpy(logits[new]), 1)
    calibrated = PlattScaling().fit(logits[fit], labels[fit]).predict_proba(logits[new])
    assert metrics.expected_calibration_error(calibrated, labels[new]) < metrics.expected_calibration_error(
        softmax, labels[new]) / 2
    # one-vs-rest on the raw logits of 3 classes: the NLL improves, though far less than a joint map would
    logits, labels = _problem(3, n=2000, scale=2.0)
    logits = logits * 4
    softmax = torch.softmax(torch.from_numpy(logits[new]), 1)
    platt = PlattScaling().fit(logits[fit], labels[fit]).predict_proba(logits[new])
    dirichlet = DirichletCalibration().fit(logits[fit], labels[fit]).predict_proba(logits[new])
    assert metrics.log_loss(dirichlet, labels[new]) < metrics.log_loss(platt, labels[new]) < metrics.log_loss(
        softmax, labels[new])


def test_dirichlet_recovers_a_matrix_map():
    rng = np.random.default_rng(1)
    n, c = 6000, 3
    log_p = np.log(rng.dirichlet(np.ones(c), size=n))
    true_w = np.array([[2.0, 0.5, 0.0], [0.0, 1.5, 0.0], [0.3, 0.0, 0.8]])
    true_b = np.array([0.2, -0.1, -0.1])
    scores = log_p @ true_w.T + true_b
    q = np.exp(scores - scores.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=row) for row in q])
    fitted = DirichletCalibration(off_diagonal=0.0, intercept=0.0).fit(log_p, labels)
    # W is identified only up to adding a constant to each column (softmax and the log-probabilities'
    # shift invariance): compare the maps' outputs, which are identified, up to the sampling noise of n rows
    probs = fitted.predict_proba(log_p)
    assert np.abs(probs - q).mean() < 0.01
    # and the maximum-likelihood fit is at least as likely as the true map on its own data
    assert metrics.log_loss(probs, labels) <= metrics.log_loss(q, labels) + 1e-9


def test_dirichlet_generalises_temperature_and_vector_scaling():
    logits, labels = _problem(4, n=1500)
    logits = logits * 3
    nll = {}
    for calibrator in (TemperatureScaling(), VectorScaling(), DirichletCalibration(off_diagonal=0.0, intercept=0.0)):
        nll[type(calibrator).__name__] = metrics.log_loss(calibrator.fit(logits, labels).predict_proba(logits), labels)
    assert nll["DirichletCalibration"] <= nll["VectorScaling"] + 1e-9 <= nll["TemperatureScaling"] + 2e-9


def test_dirichlet_regularisation_shrinks_off_diagonal():
    logits, labels = _problem(4, n=300)
    free = DirichletCalibration(off_diagonal=0.0, intercept=0.0).fit(logits, labels)
    strong = DirichletCalibration(off_diagonal=1e3, intercept=1e3).fit(logits, labels)
    off = ~np.eye(4, dtype=bool)
    centred = lambda w: w - w.mean(axis=0, keepdims=True)  # noqa: E731  (remove the unidentified column shift)
    assert np.abs(centred(strong.weights_)[off]).max() < np.abs(centred(free.weights_)[off]).max()
    assert np.abs(strong.bias_).max() < 1e-2


def test_dirichlet_starts_at_identity_and_masks():
    logits, labels = _problem(3)
    logits[::5, 2] = -np.inf
    labels[::5] = 0
    probs = DirichletCalibration().fit(logits, labels).predict_proba(logits)
    assert np.all(probs[::5, 2] == 0)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    one_step = DirichletCalibration(max_iter=1)
    assert one_step.max_iter == 1


@pytest.mark.parametrize("cls", [PlattScaling, DirichletCalibration])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_save_load_round_trip(cls, num_classes, tmp_path):
    logits, labels = _problem(num_classes)
    fitted = cls().fit(logits, labels)
    path = tmp_path / "calibrator.json"
    fitted.save(path)
    for loaded in (cls.load(path), calibration.load(path)):
        assert type(loaded) is cls
        np.testing.assert_array_equal(loaded.predict_proba(logits), fitted.predict_proba(logits))
    assert repr(fitted).startswith(cls.__name__)


def test_validation():
    with pytest.raises(ValueError, match="`off_diagonal`"):
        DirichletCalibration(off_diagonal=-1.0)
    with pytest.raises(TypeError, match="`prior_correction`"):
        PlattScaling(prior_correction="yes")
    with pytest.raises(ValueError, match="`max_iter`"):
        PlattScaling(max_iter=0)
    logits, labels = _problem(3)
    fitted = PlattScaling().fit(logits, labels)
    with pytest.raises(ValueError, match="3 classes"):
        fitted.predict_proba(logits[:, :2])
    with pytest.raises(ValueError, match="`labels`"):
        PlattScaling().fit(logits, labels + 5)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        DirichletCalibration().predict_proba(logits)
    with pytest.raises(ValueError, match="expected a saved PlattScaling"):
        PlattScaling.from_dict(DirichletCalibration().fit(logits, labels).to_dict())
