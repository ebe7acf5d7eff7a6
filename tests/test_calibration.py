"""softmaxkit.calibration: known miscalibration recovered within its statistical error, exact optima,
held-out ECE cut, -inf masking, scikit-learn parity of the one-vs-rest maps, save/load, validation.

Statistical tolerances come from the Fisher information of the fitted parameters: a maximum-likelihood
estimate is within 5 standard errors of the truth except with probability ~6e-7 (and the seeds are fixed).
Optimiser tolerances (1e-6 relative on T) are those of L-BFGS-B stopping at |gradient| < 1e-9 on a
well-conditioned one-dimensional problem.
"""

from __future__ import annotations

import doctest
import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

import softmaxkit
import softmaxkit.calibration
from softmaxkit import metrics
from softmaxkit import reference as ref
from softmaxkit.calibration import (
    HistogramBinning,
    IsotonicCalibration,
    TemperatureScaling,
    VectorScaling,
    load,
)

from ._helpers import assert_close_f64, assert_within_budget

CALIBRATORS = [TemperatureScaling, VectorScaling, IsotonicCalibration, HistogramBinning]


def _synthetic(seed: int, num_rows: int, num_classes: int, temperature: float = 3.0, spread: float = 1.5):
    """True logits ``z``, labels drawn from softmax(z), and the miscalibrated logits ``temperature * z``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num_rows, num_classes)) * spread
    probs = ref.softmax(z)
    labels = (probs.cumsum(1) > rng.random((num_rows, 1))).argmax(1)
    return z, labels, temperature * z


def _softmax_np(logits: np.ndarray) -> np.ndarray:
    return ref.softmax(logits)


def _temperature_standard_error(z: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """Asymptotic standard error of the fitted T when labels ~ softmax(z) and logits = T z.

    In β = 1/T the model softmax(β·logits) is an exponential family with statistic logits_y, so the Fisher
    information per row is E[Var_softmax(z)(logits)]; then SE(T) = SE(β)·T² (delta method, dT = -dβ/β²).
    """
    probs = ref.softmax(z)
    variance = (probs * logits**2).sum(1) - (probs * logits).sum(1) ** 2
    return temperature**2 / math.sqrt(len(z) * variance.mean())


# ------------------------------------------------------------------------------------ temperature scaling
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_scaling_recovers_a_known_temperature(seed):
    z, labels, logits = _synthetic(seed, 20_000, 10)
    scaler = TemperatureScaling().fit(logits, labels)
    assert abs(scaler.temperature_ - 3.0) < 5 * _temperature_standard_error(z, logits, 3.0)
    assert scaler.nll_ < scaler.nll_before_


def test_temperature_is_the_exact_minimiser_of_the_reference_nll():
    from scipy.optimize import minimize_scalar

    _, labels, logits = _synthetic(3, 3000, 6, temperature=2.5)
    scaler = TemperatureScaling().fit(logits, labels)

    def nll(log_t):
        return ref.cross_entropy(logits / math.exp(log_t), labels)

    best = minimize_scalar(nll, bounds=(-3, 3), method="bounded", options={"xatol": 1e-12})
    assert scaler.temperature_ == pytest.approx(math.exp(best.x), rel=1e-6)
    assert scaler.nll_ == pytest.approx(nll(math.log(scaler.temperature_)), rel=1e-12)
    assert_close_f64(scaler.predict_proba(logits), ref.softmax(logits / scaler.temperature_))


def test_closed_form_nll_gradient_equals_autograd():
    """The fit's hand-written derivative dNLL/dβ = mean(E_p[z] - z_y) against autograd through
    softmaxkit.cross_entropy, in float64, with and without -inf entries."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 7, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (64,), generator=generator)
    masked = logits.clone()
    masked[:, 5:] = -torch.inf
    masked_labels = labels % 5
    for z, y in ((logits, labels), (masked, masked_labels)):
        finite, mask = softmaxkit.calibration._masked(z)
        own = finite.gather(1, y[:, None]).squeeze(1)
        for beta in (0.1, 0.7, 1.0, 3.0):
            nll, slope = TemperatureScaling._nll_and_slope(finite, mask, own, beta)
            b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
            scaled = b * finite if mask is None else (b * finite).masked_fill(mask, -torch.inf)
            loss = softmaxkit.cross_entropy(scaled, y)
            (grad,) = torch.autograd.grad(loss, b)
            assert nll == pytest.approx(float(loss.detach()), rel=1e-12)
            assert slope == pytest.approx(float(grad), rel=1e-10, abs=1e-12)


def test_temperature_scaling_from_ten_rows_to_many():
    rng = np.random.default_rng(5)
    tiny_logits = rng.normal(size=(10, 3)) * 4
    tiny_labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler = TemperatureScaling().fit(tiny_logits, tiny_labels)
    assert 0.01 < scaler.temperature_ < 100 and math.isfinite(scaler.nll_)
    z, labels, logits = _synthetic(6, 200_000, 3, temperature=0.5)
    scaler = TemperatureScaling().fit(torch.from_numpy(logits).float(), torch.from_numpy(labels))
    assert abs(scaler.temperature_ - 0.5) < 5 * _temperature_standard_error(z, logits, 0.5)


@pytest.mark.slow
def test_temperature_scaling_ten_million_rows():
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(10_000_000, 2, generator=generator)
    labels = (torch.rand(10_000_000, generator=generator) < torch.softmax(z, 1)[:, 1]).long()
    scaler = TemperatureScaling().fit(3 * z, labels)
    standard_error = _temperature_standard_error(z[:100_000].double().numpy(), 3 * z[:100_000].double().numpy(), 3.0)
    assert abs(scaler.temperature_ - 3.0) < 5 * standard_error / math.sqrt(100)  # Fisher estimated on 1 %


def test_separable_and_uninformative_data_warn_and_stop_at_a_bound():
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [6.0, 1.0]])
    with pytest.warns(UserWarning, match="NLL still falls at T_min: the rows are all classified correctly"):
        scaler = TemperatureScaling(bounds=(0.05, 20)).fit(logits, [0, 1, 0])
    assert scaler.temperature_ == pytest.approx(0.05)
    rng = np.random.default_rng(8)
    with pytest.warns(UserWarning, match="NLL still falls at T_max: .* no information about the labels"):
        scaler = TemperatureScaling().fit(rng.normal(size=(2000, 4)), rng.integers(0, 4, 2000))
    assert scaler.temperature_ == pytest.approx(100)


def test_temperature_scaling_keeps_the_argmax_and_handles_extreme_logits():
    _, labels, logits = _synthetic(9, 2000, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler = TemperatureScaling(bounds=(1e-2, 1e5)).fit(logits * 1e3, labels)  # logits up to ~2e4
    assert scaler.temperature_ == pytest.approx(3e3, rel=0.05)
    probs = scaler.predict_proba(logits * 1e3)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))


def test_bf16_logits_within_error_budget():
    _, labels, logits = _synthetic(10, 500, 8)
    scaler = TemperatureScaling().fit(logits, labels)
    low = torch.from_numpy(logits).bfloat16()
    ours = scaler.predict_proba(low)
    assert ours.dtype == torch.bfloat16
    oracle = ref.softmax(low.double().numpy() / scaler.temperature_)
    peer = torch.softmax(low / scaler.temperature_, dim=1)  # torch in bf16 on the same rounded logits
    assert_within_budget(ours, peer, oracle, tol=2**-9)  # half a bf16 ulp at 1: the final rounding


# ----------------------------------------------------------------------------------------- vector scaling
def test_vector_scaling_recovers_scale_and_bias_within_their_standard_errors():
    rng = np.random.default_rng(11)
    num_rows, num_classes = 20_000, 3
    z = rng.normal(size=(num_rows, num_classes)) * 2
    scale = np.array([0.5, 1.0, 2.0])
    bias = np.array([0.3, -0.2, -0.1])
    truth = ref.softmax(z * scale + bias)
    labels = (truth.cumsum(1) > rng.random((num_rows, 1))).argmax(1)
    fitted = VectorScaling(l2=0.0).fit(z, labels)
    # Hessian of the mean NLL at the estimate; the bias is identified up to a shift, so use the
    # pseudo-inverse (the covariance of the centred parameters).
    params = torch.from_numpy(np.concatenate([fitted.scale_, fitted.bias_]))
    zt, yt = torch.from_numpy(z), torch.from_numpy(labels)

    def mean_nll(theta):  # torch's own cross-entropy: twice differentiable
        return torch.nn.functional.cross_entropy(zt * theta[:num_classes] + theta[num_classes:], yt)

    hessian = torch.autograd.functional.hessian(mean_nll, params).numpy()
    covariance = np.linalg.pinv(hessian) / num_rows
    standard_errors = np.sqrt(np.diag(covariance))
    estimate = np.concatenate([fitted.scale_, fitted.bias_])
    truth_params = np.concatenate([scale, bias - bias.mean()])
    assert np.all(np.abs(estimate - truth_params) < 5 * standard_errors)
    assert abs(fitted.bias_.mean()) < 1e-12


def test_vector_scaling_is_an_optimum_at_least_as_good_as_temperature_scaling():
    _, labels, logits = _synthetic(12, 3000, 5)
    vector = VectorScaling().fit(logits, labels)
    temperature = TemperatureScaling().fit(logits, labels)
    params = torch.from_numpy(np.concatenate([vector.scale_, vector.bias_])).requires_grad_(True)
    zt, yt = torch.from_numpy(logits), torch.from_numpy(labels)
    objective = softmaxkit.cross_entropy(zt * params[:5] + params[5:], yt) + 0.5 * vector.l2 * (
        ((params[:5] - 1) ** 2).sum() + (params[5:] ** 2).sum()
    )
    (gradient,) = torch.autograd.grad(objective, params)
    assert float(gradient.abs().max()) < 1e-6
    vector_nll = metrics.log_loss(vector.predict_proba(logits), labels)
    temperature_nll = metrics.log_loss(temperature.predict_proba(logits), labels)
    assert vector_nll <= temperature_nll + 1e-6  # the vector family contains w = 1/T


# ------------------------------------------------------------------------------- one-vs-rest calibrators
def test_interp_equals_numpy_interp():
    rng = np.random.default_rng(13)
    knots_x = np.sort(rng.random(20))
    knots_y = np.sort(rng.random(20))
    x = np.concatenate([rng.random(500) * 1.2 - 0.1, knots_x, [knots_x[0], knots_x[-1]]])
    ours = softmaxkit.calibration._interp(torch.from_numpy(x), torch.from_numpy(knots_x), torch.from_numpy(knots_y))
    assert_close_f64(ours, np.interp(x, knots_x, knots_y))
    single = softmaxkit.calibration._interp(torch.from_numpy(x), torch.tensor([0.5]), torch.tensor([0.25]))
    np.testing.assert_array_equal(single.numpy(), np.full_like(x, 0.25))


def test_isotonic_maps_equal_sklearn_and_rows_are_renormalised():
    _, labels, logits = _synthetic(14, 3000, 4)
    calibrator = IsotonicCalibration().fit(logits[:2000], labels[:2000])
    train, test = _softmax_np(logits[:2000]), _softmax_np(logits[2000:])
    expected = np.empty_like(test)
    for c in range(4):
        regression = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(train[:, c], labels[:2000] == c)
        expected[:, c] = regression.predict(test[:, c])
    expected /= expected.sum(1, keepdims=True)
    assert_close_f64(calibrator.predict_proba(logits[2000:]), expected)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_histogram_binning_values_are_bin_frequencies(strategy):
    _, labels, logits = _synthetic(15, 3000, 4)
    calibrator = HistogramBinning(n_bins=10, strategy=strategy).fit(logits, labels)
    probs = _softmax_np(logits)
    for c in range(4):
        frequency, _ = calibration_curve(labels == c, probs[:, c], n_bins=10, strategy=strategy)
        edges = calibrator.edges_[c]
        filled = np.bincount(np.searchsorted(edges[1:-1], probs[:, c]), minlength=10) > 0
        assert_close_f64(calibrator.values_[c][filled], frequency)
        centres = (edges[:-1] + edges[1:]) / 2
        np.testing.assert_array_equal(calibrator.values_[c][~filled], centres[~filled])
    # prediction: look up each class's bin, renormalise (an independent NumPy lookup)
    new = _softmax_np(_synthetic(16, 200, 4)[2])
    lookup = np.stack(
        [calibrator.values_[c][np.searchsorted(calibrator.edges_[c][1:-1], new[:, c])] for c in range(4)], 1
    )
    assert_close_f64(calibrator.predict_proba(np.log(new)), lookup / lookup.sum(1, keepdims=True))


# ---------------------------------------------------------------------------------------------- all four
@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
def test_calibration_cuts_held_out_ece(calibrator):
    _, labels, logits = _synthetic(17, 12_000, 5)
    fit, held_out = slice(0, 6000), slice(6000, None)
    before = metrics.expected_calibration_error(_softmax_np(logits[held_out]), labels[held_out])
    fitted = calibrator().fit(logits[fit], labels[fit])
    after = metrics.expected_calibration_error(fitted.predict_proba(logits[held_out]), labels[held_out])
    # before ~0.3 (T = 3); a calibrated model's ECE on 6000 rows is ~0.01-0.03 (binning noise)
    assert before > 0.2
    assert after < before / 5


@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
def test_save_load_round_trip_is_exact(calibrator, tmp_path):
    _, labels, logits = _synthetic(18, 2000, 6)
    fitted = calibrator().fit(logits, labels)
    path = tmp_path / "calibrator.json"
    fitted.save(path)
    for loaded in (calibrator.load(path), load(path), calibrator.from_dict(json.loads(path.read_text()))):
        assert type(loaded) is calibrator
        np.testing.assert_array_equal(loaded.predict_proba(logits), fitted.predict_proba(logits))
    size = path.stat().st_size
    assert size < {TemperatureScaling: 200, VectorScaling: 2_000, HistogramBinning: 10_000}.get(calibrator, 200_000)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "model.json"
    TemperatureScaling().fit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [0, 1, 1]).save(path)
    with pytest.raises(ValueError, match="expected a saved VectorScaling, but got 'TemperatureScaling'"):
        VectorScaling.load(path)
    path.write_text(json.dumps({"calibrator": "TemperatureScaling", "format": 99, "temperature": 2.0}))
    with pytest.raises(ValueError, match="unsupported TemperatureScaling format 99"):
        TemperatureScaling.load(path)
    path.write_text(json.dumps({"weights": [1, 2]}))
    with pytest.raises(ValueError, match="does not hold a saved calibrator"):
        load(path)
    with pytest.raises(NotFittedError):
        TemperatureScaling().save(tmp_path / "unfitted.json")


@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
def test_minus_inf_masking_equals_truncating_the_classes(calibrator):
    _, labels, logits = _synthetic(19, 3000, 4)
    masked = np.concatenate([logits, np.full((3000, 2), -np.inf)], axis=1)
    truncated_fit = calibrator().fit(logits, labels)
    masked_fit = calibrator().fit(masked, labels)
    probs = masked_fit.predict_proba(masked)
    np.testing.assert_array_equal(probs[:, 4:], 0.0)
    # the one-vs-rest maps see identical kept-class probabilities; the scalings stop at the same optimum
    tolerance = 1e-10 if calibrator in (IsotonicCalibration, HistogramBinning) else 1e-6
    np.testing.assert_allclose(probs[:, :4], truncated_fit.predict_proba(logits), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
def test_input_kinds_outputs_and_no_mutation(calibrator):
    _, labels, logits = _synthetic(20, 1500, 5)
    logits32 = logits.astype(np.float32)
    originals = (logits.copy(), labels.copy())
    fitted = calibrator().fit(logits, labels)
    from_numpy = fitted.predict_proba(logits)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float64
    assert np.all(from_numpy >= 0) and np.allclose(from_numpy.sum(1), 1, rtol=0, atol=1e-12)
    assert fitted.predict_proba(logits32).dtype == np.float32
    tensor = torch.from_numpy(logits.copy()).requires_grad_(True)
    from_tensor = fitted.predict_proba(tensor)
    assert isinstance(from_tensor, torch.Tensor) and from_tensor.dtype == torch.float64
    assert_close_f64(from_tensor, from_numpy)
    refitted = calibrator().fit(torch.from_numpy(logits), torch.from_numpy(labels).int())
    assert_close_f64(refitted.predict_proba(logits), from_numpy)
    np.testing.assert_array_equal(logits, originals[0])
    np.testing.assert_array_equal(labels, originals[1])
    np.testing.assert_array_equal(tensor.detach().numpy(), originals[0])
    assert type(fitted).__name__ in repr(fitted)


@pytest.mark.gpu
@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
def test_cuda_equals_cpu(calibrator):
    _, labels, logits = _synthetic(21, 2000, 5)
    on_cpu = calibrator().fit(logits, labels).predict_proba(logits)
    cuda_logits, cuda_labels = torch.from_numpy(logits).cuda(), torch.from_numpy(labels).cuda()
    on_gpu = calibrator().fit(cuda_logits, cuda_labels).predict_proba(cuda_logits)
    assert on_gpu.is_cuda
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------ errors
GOOD_LOGITS = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
GOOD_LABELS = np.array([0, 1])


@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("logits", "labels", "error", "message"),
    [
        (np.array([[np.nan, 0.0, 1.0], [0.0, 1.0, 0.5]]), GOOD_LABELS, ValueError, r"row 0 holds NaN or \+inf"),
        (np.array([[2.0, 0.0, -1.0], [np.inf, 1.0, 0.5]]), GOOD_LABELS, ValueError, r"row 1 holds NaN or \+inf"),
        (np.array([[2.0, 0.0, -1.0], [-np.inf] * 3]), GOOD_LABELS, ValueError, r"row 1 is all -inf"),
        (np.array([[2.0, 0.0, -1.0], [0.0, -np.inf, 0.5]]), GOOD_LABELS, ValueError, r"-inf at row 1 \(label 1\)"),
        (GOOD_LOGITS, np.array([0, 3]), ValueError, r"class indices in \[0, 3\), but holds 3 at position 1"),
        (GOOD_LOGITS, np.array([0, 1, 2]), ValueError, r"one entry per row \(2\), but has 3"),
        (GOOD_LOGITS, np.array([0.0, 1.0]), TypeError, r"integer class indices"),
        (np.array([2.0, 0.0]), GOOD_LABELS, ValueError, r"shape \(N, C\)"),
        (np.array([[2.0], [0.0]]), GOOD_LABELS, ValueError, r"at least 2 classes"),
        (np.array([[2, 0], [0, 1]]), GOOD_LABELS, TypeError, r"floating-point dtype"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), ValueError, r"at least one row"),
    ],
)
def test_bad_fit_input_raises_with_the_reason(calibrator, logits, labels, error, message):
    with pytest.raises(error, match=message):
        calibrator().fit(logits, labels)


@pytest.mark.parametrize("calibrator", CALIBRATORS, ids=lambda c: c.__name__)
def test_predict_errors(calibrator):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        calibrator().predict_proba(GOOD_LOGITS)
    assert issubclass(NotFittedError, ValueError)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rows are separable: temperature scaling warns (tested above)
        fitted = calibrator().fit(np.vstack([GOOD_LOGITS] * 5), np.tile(GOOD_LABELS, 5))
    with pytest.raises(ValueError, match=r"must have 3 classes, as the data the calibrator was fitted on"):
        fitted.predict_proba(np.zeros((2, 4)))


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match=r"T_min < T_max"):
        TemperatureScaling(bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"`bounds\[0\]` must be a finite number > 0"):
        TemperatureScaling(bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"`l2` must be a finite number >= 0"):
        VectorScaling(l2=-1.0)
    with pytest.raises(ValueError, match=r"`n_bins` must be an int >= 1"):
        HistogramBinning(n_bins=0)
    with pytest.raises(ValueError, match=r"`strategy` must be one of 'uniform', 'quantile'"):
        HistogramBinning(strategy="kmeans")


def test_docstring_examples():
    failures, tried = doctest.testmod(softmaxkit.calibration, verbose=False)
    assert tried > 8 and failures == 0
