"""The float64 oracle itself: formulas, the Jacobian's properties, closed-form gradients vs finite differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import logsumexp as scipy_logsumexp

from softmaxkit import reference as ref


def test_seed_worked_example():
    # The seeds' example: logits (2.0, 1.0, 0.1) → (0.659, 0.242, 0.099); CE for class 0 is −log 0.659.
    p = ref.softmax([2.0, 1.0, 0.1])
    np.testing.assert_allclose(p, [0.659, 0.242, 0.099], atol=5e-4)
    np.testing.assert_allclose(ref.cross_entropy([2.0, 1.0, 0.1], 0), -np.log(p[0]), rtol=1e-14)


def test_softmax_matches_naive_formula_and_is_shift_invariant():
    x = np.random.default_rng(0).normal(size=(5, 7))
    naive = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    np.testing.assert_allclose(ref.softmax(x), naive, rtol=1e-14)
    np.testing.assert_allclose(ref.softmax(x + 1234.5), naive, rtol=1e-12)
    np.testing.assert_allclose(ref.softmax(x, axis=0), np.exp(x) / np.exp(x).sum(0), rtol=1e-14)


def test_logsumexp_matches_scipy_and_handles_extremes():
    x = np.random.default_rng(1).normal(size=(4, 9)) * 50
    np.testing.assert_allclose(ref.logsumexp(x), scipy_logsumexp(x, axis=-1), rtol=1e-14)
    assert ref.logsumexp([1e4, 1e4]) == pytest.approx(1e4 + np.log(2), rel=1e-15)
    assert ref.logsumexp([-np.inf, -np.inf]) == -np.inf
    assert ref.logsumexp([0.0, -np.inf]) == 0.0


def test_temperature_divides_logits():
    x = np.array([2.0, 1.0, 0.1])
    np.testing.assert_allclose(ref.softmax(x, temperature=2.0), ref.softmax(x / 2.0), rtol=1e-15)
    np.testing.assert_allclose(ref.log_softmax(x, temperature=0.5), ref.log_softmax(x * 2.0), rtol=1e-15)


def test_jacobian_properties():
    p = ref.softmax(np.random.default_rng(2).normal(size=6))
    jac = ref.softmax_jacobian(p)
    np.testing.assert_allclose(jac, jac.T, atol=1e-17)
    np.testing.assert_allclose(jac.sum(axis=1), 0.0, atol=1e-16)
    eigenvalues = np.linalg.eigvalsh(jac)
    assert eigenvalues.min() > -1e-15
    assert np.sum(np.abs(eigenvalues) < 1e-12) == 1  # exactly one zero eigenvalue, along (1, ..., 1)
    np.testing.assert_allclose(jac @ np.ones(6), 0.0, atol=1e-16)


def test_jacobian_equals_finite_differences():
    x = np.random.default_rng(3).normal(size=5)
    h = 1e-6
    numeric = np.stack(
        [(ref.softmax(x + h * e) - ref.softmax(x - h * e)) / (2 * h) for e in np.eye(5)], axis=1
    )
    np.testing.assert_allclose(ref.softmax_jacobian(ref.softmax(x)), numeric, atol=1e-9)


def test_batched_jacobian():
    p = ref.softmax(np.random.default_rng(4).normal(size=(3, 4)))
    batched = ref.softmax_jacobian(p)
    assert batched.shape == (3, 4, 4)
    for row in range(3):
        np.testing.assert_allclose(batched[row], ref.softmax_jacobian(p[row]), rtol=1e-15)


def _finite_difference(fn, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


OPTION_GRID = [
    dict(zip(("weight", "label_smoothing", "temperature", "z_loss", "softcap"), values))
    for values in itertools.product(
        [None, "random"], [0.0, 0.2], [1.0, 0.7], [0.0, 1e-2], [None, 3.0]
    )
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_closed_form_gradient_equals_finite_differences(options, reduction):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 5)) * 2
    target = np.array([0, 4, -100, 2])
    options = dict(options)
    if options["weight"] == "random":
        options["weight"] = rng.uniform(0.2, 2.0, size=5)
    loss = lambda x: ref.cross_entropy(x, target, reduction=reduction, **options)  # noqa: E731
    analytic = ref.cross_entropy_grad(logits, target, reduction=reduction, **options)
    np.testing.assert_allclose(analytic, _finite_difference(loss, logits), atol=1e-8)
    assert np.all(analytic[2] == 0.0)  # the ignored row gets no gradient


def test_closed_form_gradient_probability_targets_and_kdim():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 4, 3))
    target = ref.softmax(rng.normal(size=(2, 4, 3)), axis=1)
    options = dict(label_smoothing=0.1, temperature=1.3, z_loss=0.05, softcap=2.0, weight=rng.uniform(0.5, 1.5, 4))
    loss = lambda x: ref.cross_entropy(x, target, **options)  # noqa: E731
    np.testing.assert_allclose(
        ref.cross_entropy_grad(logits, target, **options), _finite_difference(loss, logits), atol=1e-8
    )


def test_gradient_is_p_minus_y_without_options():
    logits = np.array([[2.0, 1.0, 0.1]])
    grad = ref.cross_entropy_grad(logits, np.array([0]), reduction="sum")
    np.testing.assert_allclose(grad, ref.softmax(logits) - np.array([[1.0, 0.0, 0.0]]), rtol=1e-15)


def test_none_reduction_scales_by_upstream_gradient():
    rng = np.random.default_rng(7)
    logits, target, upstream = rng.normal(size=(3, 4)), np.array([1, 0, 3]), np.array([0.5, -2.0, 3.0])
    loss = lambda x: float(np.sum(ref.cross_entropy(x, target, reduction="none") * upstream))  # noqa: E731
    np.testing.assert_allclose(
        ref.cross_entropy_grad(logits, target, reduction="none", grad_output=upstream),
        _finite_difference(loss, logits),
        atol=1e-8,
    )


def test_all_ignored_mean_is_zero():
    logits = np.random.default_rng(8).normal(size=(3, 4))
    target = np.full(3, -100)
    assert ref.cross_entropy(logits, target) == 0.0
    assert np.all(ref.cross_entropy_grad(logits, target) == 0.0)


def test_masked_class_contributes_nothing():
    logits = np.array([[1.0, -np.inf, 0.5]])
    np.testing.assert_allclose(
        ref.cross_entropy(logits, np.array([2])), ref.cross_entropy(np.array([[1.0, 0.5]]), np.array([1]))
    )
    probabilities = np.array([[0.3, 0.0, 0.7]])
    assert np.isfinite(ref.cross_entropy(logits, probabilities))
