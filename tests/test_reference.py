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


# ------------------------------------------------------------------ exact at every magnitude (vs mpmath)
# The oracle works in the shifted form d = (x − m)/T, so its only rounding is in d (none when x_i and m are
# within a factor 2) and a few operations after it: a result is within a few ulps of the exact value of the
# float64 input, times (1 + |d_i|), the condition number of exp at d_i. mpmath evaluates the same
# definitions at 80 significant digits (its operations are correctly rounded at any exponent).
mpmath = pytest.importorskip("mpmath")
EPS = np.finfo(np.float64).eps
TINY = 1e-300  # below this an entry may have underflowed (exactly representable results only above it)


def _extreme_rows():
    rng = np.random.default_rng(14)
    rows = [[1e300, 1e300], [1e30] * 3, [1e308, -1e308, 0.0], [-1.7e308, 1.7e308], [3e38, -3e38, 0.0],
            [1e8 + 0.5, 1e8, 1e8 - 0.25], [5e-324, -5e-324, 0.0], [1e-310, 0.0, -1e-310], [7.0] * 5,
            [1e30, 1e30, -np.inf], [2.5, 2.5, 2.5, -1.0], [1e16, 1e16 + 2.0, 1e16 - 2.0]]
    for scale in (1.0, 1e3, 1e8, 1e30, 1e300):
        rows.append(list(scale + rng.normal(size=6)))
        rows.append(list(scale * (1 + 1e-9 * rng.normal(size=6))))
        rows.append(list(scale * rng.normal(size=6)))
        rows.append(list(-scale + rng.normal(size=4) * 30))
    return rows


ROWS = _extreme_rows()


def _mp_shifted(row, temperature=1.0):
    x = [mpmath.mpf(float(v)) for v in row]
    m = max(x)
    d = [(v - m) / temperature for v in x]
    s = mpmath.fsum(mpmath.exp(v) for v in d)
    return m, d, s


def _check(actual, exact, rtol, atol=TINY):
    """|actual − exact| <= rtol·|exact| + atol; an exact value beyond float64's range must be matched exactly."""
    actual, exact = np.broadcast_arrays(np.asarray(actual, dtype=np.float64), np.asarray(exact, dtype=np.float64))
    rtol = np.broadcast_to(rtol, exact.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        bound = np.where(exact == 0, 0.0, rtol * np.abs(exact)) + atol
        error = np.where(actual == exact, 0.0, np.abs(actual - exact))
    assert np.all(error <= bound), (actual, exact, error / bound)


@pytest.fixture(autouse=True)
def _mp_precision():
    with mpmath.workdps(80):
        yield


@pytest.mark.parametrize("temperature", [1.0, 0.37, 4.0])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0]:.3g}")
def test_softmax_log_softmax_logsumexp_are_exact_at_any_magnitude(row, temperature):
    finite = [v for v in row if np.isfinite(v)]
    m, d, s = _mp_shifted(finite, temperature)
    x = np.array(row)
    with np.errstate(over="ignore"):
        condition = 1.0 + np.abs((x - np.max(x)) / temperature)
    p_exact = [mpmath.exp(v) / s for v in d]
    p = ref.softmax(x, temperature=temperature)[np.isfinite(x)]
    _check(p, [float(v) for v in p_exact], 8 * EPS * condition[np.isfinite(x)])
    log_p_exact = [float(v - mpmath.log(s)) for v in d]
    log_p = ref.log_softmax(x, temperature=temperature)[np.isfinite(x)]
    _check(log_p, log_p_exact, 8 * EPS, atol=8 * EPS)
    if temperature == 1.0:
        _check(ref.logsumexp(x), float(m + mpmath.log(s)), 4 * EPS, atol=4 * EPS)


def test_the_reported_oracle_failures():
    np.testing.assert_array_equal(ref.softmax([1e300, 1e300]), [0.5, 0.5])
    np.testing.assert_allclose(ref.log_softmax([1e30] * 3), [-np.log(3)] * 3, rtol=EPS)
    np.testing.assert_allclose(ref.cross_entropy(np.full((1, 14), 1.7e38), [3], label_smoothing=0.5),
                               np.log(14), rtol=4 * EPS)
    np.testing.assert_allclose(ref.cross_entropy(np.full((2, 1000), 1e30), [0, 999]), np.log(1000), rtol=4 * EPS)
    np.testing.assert_allclose(ref.cross_entropy_grad(np.full((1, 4), 1e30), [1], reduction="sum"),
                               [[0.25, -0.75, 0.25, 0.25]], rtol=4 * EPS)


def _mp_cross_entropy(row, y, weight, eps, temperature, z_loss):
    """Loss and gradient of one row, from the definitions (see softmaxkit.reference.cross_entropy)."""
    C = len(row)
    w = [mpmath.mpf(1)] * C if weight is None else [mpmath.mpf(float(v)) for v in weight]
    m, d, s = _mp_shifted(row, temperature)
    log_p = [v - mpmath.log(s) for v in d]
    p = [mpmath.exp(v) / s for v in d]
    a = [w[c] * ((1 - mpmath.mpf(eps)) * (c == y) + mpmath.mpf(eps) / C) for c in range(C)]
    lse = m / temperature + mpmath.log(s)
    loss = -mpmath.fsum(a[c] * log_p[c] for c in range(C)) + z_loss * lse**2
    coefficient = mpmath.fsum(a) + 2 * z_loss * lse
    grad = [(coefficient * p[j] - a[j]) / temperature for j in range(C)]
    return loss, grad, d


OPTIONS_MP = [
    {},
    {"label_smoothing": 0.1},
    {"weight": [0.5, 2.0, 1.0, 3.0, 0.25, 1.5], "label_smoothing": 0.3},
    {"temperature": 0.5},
    {"z_loss": 1e-4},
]


@pytest.mark.parametrize("options", OPTIONS_MP, ids=lambda o: ",".join(o) or "plain")
def test_cross_entropy_and_gradient_are_exact_at_any_magnitude(options):
    options = dict(options)
    z_loss = options.get("z_loss", 0.0)
    for row in ROWS:
        row = [v for v in row if np.isfinite(v)]
        if z_loss and max(abs(v) for v in row) > 1e150:
            continue  # λ·LSE² overflows float64: not a finite result
        C = len(row)
        weight = options.get("weight")
        weight = None if weight is None else (weight * C)[:C]
        kwargs = {**options, "weight": weight}
        for y in sorted({0, C - 1, int(np.argmax(row))}):
            loss, grad, d = _mp_cross_entropy(row, y, weight, options.get("label_smoothing", 0.0),
                                              options.get("temperature", 1.0), z_loss)
            x = np.array([row])
            condition = 1.0 + float(max(abs(v) for v in d))
            _check(ref.cross_entropy(x, [y], reduction="sum", **kwargs), float(loss), 16 * EPS * condition,
                   atol=16 * EPS)
            g = ref.cross_entropy_grad(x, [y], reduction="sum", **kwargs)[0]
            scale = float(max(abs(v) for v in grad)) + 1.0
            _check(g, [float(v) for v in grad], 16 * EPS * np.abs([float(v) for v in d]) + 16 * EPS,
                   atol=16 * EPS * scale)
            # the linear reference with h = 1, W = xᵀ forms exactly these logits
            _check(ref.linear_cross_entropy(np.ones((1, 1)), x.T, [y], reduction="sum",
                                            class_weight=weight, **{k: v for k, v in options.items()
                                                                    if k != "weight"}),
                   float(loss), 16 * EPS * condition, atol=16 * EPS)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_and_poly1_are_exact_at_any_magnitude(gamma):
    for row in ROWS:
        row = [v for v in row if np.isfinite(v)]
        C = len(row)
        _, d, s = _mp_shifted(row)
        p = [mpmath.exp(v) / s for v in d]
        log_p = [v - mpmath.log(s) for v in d]
        condition = 1.0 + float(max(abs(v) for v in d))
        for y in sorted({0, C - 1, int(np.argmax(row))}):
            focal = -((1 - p[y]) ** gamma) * log_p[y]
            _check(ref.focal_loss(np.array([row]), [y], gamma=gamma, reduction="sum"), float(focal),
                   16 * EPS * condition, atol=16 * EPS)
            poly1 = -log_p[y] + (1 - p[y])
            _check(ref.poly1_cross_entropy(np.array([row]), [y], reduction="sum"), float(poly1),
                   16 * EPS * condition, atol=16 * EPS)


def test_constant_rows_give_log_c_at_every_magnitude():
    for value in (0.0, 1.0, -3e2, 1e8, 1e30, 3e38, 1e300, -1e300, 1.7e308):
        for C in (2, 7, 1000):
            x = np.full((1, C), value)
            np.testing.assert_allclose(ref.cross_entropy(x, [C - 1]), np.log(C), rtol=4 * EPS)
            np.testing.assert_allclose(ref.softmax(x), 1.0 / C, rtol=4 * EPS)
            np.testing.assert_allclose(ref.logsumexp(x), value + np.log(C) if abs(value) < 1e15 else value,
                                       rtol=4 * EPS)


def test_non_finite_rows_follow_pytorch():
    import torch

    inf, nan = np.inf, np.nan
    rows = [[1.0, inf, 0.0], [inf, inf, 0.0], [-inf, -inf, -inf], [1.0, nan, 2.0], [-inf, 2.0, 3.0]]
    x = torch.tensor(rows, dtype=torch.float64)
    for ours, theirs in ((ref.softmax(rows), torch.softmax(x, -1)), (ref.log_softmax(rows), torch.log_softmax(x, -1)),
                         (ref.logsumexp(rows), torch.logsumexp(x, -1))):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=4 * EPS, atol=0)  # NaN where PyTorch has NaN
    target = [0, 2, 1, 0, 0]
    loss = ref.cross_entropy(rows, target, reduction="none")
    expected = torch.nn.functional.cross_entropy(x, torch.tensor(target), reduction="none").numpy()
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(expected))
    np.testing.assert_array_equal(loss[~np.isnan(loss)], expected[~np.isnan(expected)])
    # ignored rows are 0 in loss and gradient whatever they hold (the documented better answer)
    ignored = [-100, -100, -100, -100, 1]
    assert ref.cross_entropy(rows, ignored, reduction="sum") == ref.cross_entropy([rows[4]], [1], reduction="sum")
    assert ref.cross_entropy(rows, ignored, z_loss=0.1, reduction="sum") == ref.cross_entropy(
        [rows[4]], [1], z_loss=0.1, reduction="sum")
    grad = ref.cross_entropy_grad(rows, ignored, reduction="none")
    np.testing.assert_array_equal(grad[:4], 0.0)


def test_explain_at_huge_logits():
    from softmaxkit.cli.explain import explain

    result = explain([1e300, 1e300])
    np.testing.assert_array_equal(result.probs, [0.5, 0.5])
    assert np.all(result.eigenvalues >= 0) and result.eigenvalues[-1] == pytest.approx(0.5, rel=1e-15)
    assert result.jacobian_fd_error < 1e-8 and result.gradient_fd_error < 1e-8
    assert np.all(np.isfinite(result.scale_gradient_norms))
