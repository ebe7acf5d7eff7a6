"""softmaxkit.class_weights: each method against its formula, the NumPy oracle and scikit-learn; the zero-count
rule; precision for β close to 1; validation. Exact float64 formulas: 1e-12 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64

COUNTS = [5, 50, 500, 1]


@pytest.mark.parametrize("method", ["inverse", "inverse_sqrt", "effective_number"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999])
def test_matches_oracle(method, normalize, beta):
    counts = torch.tensor([3.0, 0.0, 120.0, 7.0, 1.0], dtype=torch.float64)
    ours = softmaxkit.class_weights(counts, method=method, beta=beta, normalize=normalize)
    assert_close_f64(ours, ref.class_weights(counts.numpy(), method=method, beta=beta, normalize=normalize), rtol=1e-12)


def test_formulas_by_hand():
    counts = torch.tensor(COUNTS)
    total = sum(COUNTS)
    raw = softmaxkit.class_weights(counts, normalize=False).double()
    assert_close_f64(raw, [total / c for c in COUNTS], rtol=1e-6)  # float32 result for integer counts
    raw = softmaxkit.class_weights(torch.tensor(COUNTS, dtype=torch.float64), method="inverse_sqrt", normalize=False)
    assert_close_f64(raw, [np.sqrt(total / c) for c in COUNTS], rtol=1e-12)
    raw = softmaxkit.class_weights(torch.tensor(COUNTS, dtype=torch.float64), method="effective_number", beta=0.99,
                                   normalize=False)
    assert_close_f64(raw, [(1 - 0.99) / (1 - 0.99**c) for c in COUNTS], rtol=1e-12)


def test_normalised_to_mean_one_and_inverse_matches_sklearn_balanced():
    labels = np.repeat(np.arange(4), COUNTS)
    sklearn = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    ours = softmaxkit.class_weights(torch.tensor(COUNTS, dtype=torch.float64))
    assert_close_f64(ours.mean(), 1.0, rtol=1e-14)
    assert_close_f64(ours, sklearn / sklearn.mean(), rtol=1e-12)


def test_effective_number_limits():
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    ones = softmaxkit.class_weights(counts, method="effective_number", beta=0.0)
    assert_close_f64(ones, np.ones(4), rtol=1e-15)
    near_inverse = softmaxkit.class_weights(counts, method="effective_number", beta=1 - 1e-9)
    assert_close_f64(near_inverse, softmaxkit.class_weights(counts), rtol=1e-5)


def test_effective_number_precise_for_beta_close_to_one():
    # 1 − β^N by −expm1(N log β), a tiny difference of numbers close to 1; compared with the exact value of
    # the formula at the float β, in 50-digit decimal arithmetic.
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    beta = 1 - 1e-12
    counts = torch.tensor([3.0, 6.0], dtype=torch.float64)
    w = softmaxkit.class_weights(counts, method="effective_number", beta=beta, normalize=False)
    b = Decimal(beta)
    exact = [float((1 - b) / (1 - b**n)) for n in (3, 6)]
    assert_close_f64(w, exact, rtol=1e-12)


def test_zero_counts_get_zero_weight_and_are_left_out_of_the_mean():
    w = softmaxkit.class_weights(torch.tensor([10.0, 0.0, 30.0]))
    assert float(w[1]) == 0.0
    assert_close_f64(w[[0, 2]].mean(), 1.0, rtol=1e-7)
    present_only = softmaxkit.class_weights(torch.tensor([10.0, 30.0]))
    assert_close_f64(w[[0, 2]], present_only, rtol=1e-7)


def test_input_kinds_dtype_and_device():
    assert softmaxkit.class_weights([1, 2, 3]).dtype == torch.get_default_dtype()
    assert softmaxkit.class_weights(np.array([1.0, 2.0])).dtype == torch.get_default_dtype()
    assert softmaxkit.class_weights(torch.tensor([1.0, 2.0], dtype=torch.float64)).dtype == torch.float64
    assert softmaxkit.class_weights(torch.tensor([1.0, 2.0], dtype=torch.bfloat16)).dtype == torch.bfloat16
    counts = torch.tensor([4, 1])
    before = counts.clone()
    softmaxkit.class_weights(counts)
    assert torch.equal(counts, before)


def test_usable_as_cross_entropy_weight():
    counts = torch.tensor([90, 10])
    weight = softmaxkit.class_weights(counts)
    logits = torch.zeros(4, 2)
    target = torch.tensor([0, 0, 0, 1])
    # Uniform predictions: every row's CE is log 2 whatever the weights (a weighted mean of equal values).
    assert abs(float(softmaxkit.cross_entropy(logits, target, weight=weight)) - np.log(2)) < 1e-6


@pytest.mark.parametrize(("counts", "kwargs", "error", "match"), [
    ([1, -2, 3], {}, ValueError, r"`counts` must be finite and >= 0, but holds -2.0 at class 1"),
    ([0, 0], {}, ValueError, r"`counts` must have at least one positive entry"),
    ([1.0, float("nan")], {}, ValueError, r"`counts` must be finite and >= 0, but holds nan at class 1"),
    ([[1, 2]], {}, ValueError, r"`counts` must be a non-empty 1-d sequence"),
    ([], {}, ValueError, r"`counts` must be a non-empty 1-d sequence"),
    (["a", "b"], {}, TypeError, r"`counts` must hold numbers"),
    ([1, 2], dict(beta=1.0, method="effective_number"), ValueError, r"`beta` must lie in \[0, 1\), but got 1.0"),
    ([1, 2], dict(beta=-0.1), ValueError, r"`beta` must lie in \[0, 1\), but got -0.1"),
    ([1, 2], dict(method="balanced"), ValueError, r"`method` must be one of 'inverse', 'inverse_sqrt', 'effective_number'"),
    ([1, 2], dict(normalize=1), TypeError, r"`normalize` must be a bool"),
])
def test_validation(counts, kwargs, error, match):
    with pytest.raises(error, match=match):
        softmaxkit.class_weights(counts, **kwargs)
