"""softmaxkit.focal_loss: float64 oracle, gradcheck of the closed-form backward, invariances, extremes.

Tolerances: float64 against the NumPy oracle to 1e-10 relative (tests/_helpers.py); bf16/fp16 through an error
budget against a hand-written PyTorch focal loss run in the same dtype, with one output ulp of slack (the
result is rounded to that dtype once).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64, assert_within_budget, to_numpy


def _make(shape, dtype=torch.float64, ignore_fraction=0.25, scale=2.0):
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, num_classes, target_shape)
    if ignore_fraction and target.dim() > 0:
        target[torch.rand(target_shape) < ignore_fraction] = -100
        target.view(-1)[0] = 0  # keep at least one target so "mean" is not trivially 0
    return logits, target, num_classes


def _grad(loss, x, upstream=None):
    (g,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
    return g


def naive_focal(logits, target, gamma, alpha=None, reduction="mean"):
    """The hand-written PyTorch focal loss most code bases carry (autograd through pow); a peer."""
    log_p = F.log_softmax(logits, dim=1)
    valid = target != -100
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p_y = log_p.gather(1, safe[:, None])[:, 0]
    loss = -((1 - log_p_y.exp()) ** gamma) * log_p_y
    if alpha is not None:
        loss = loss * alpha[safe]
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


SHAPES = [(7,), (1, 1), (5, 7), (4, 3, 5)]


# ------------------------------------------------------------------------------ the float64 oracle
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("gamma", "use_alpha", "use_weight", "label_smoothing"),
                         list(itertools.product([0.0, 0.5, 2.0], [False, True], [False, True], [0.0, 0.2])))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle(shape, gamma, use_alpha, use_weight, label_smoothing, reduction):
    logits, target, num_classes = _make(shape)
    alpha = torch.rand(num_classes, dtype=torch.float64) if use_alpha else None
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(gamma=gamma, alpha=alpha, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss = softmaxkit.focal_loss(logits, target, **options)
    np_options = {k: (to_numpy(o) if isinstance(o, torch.Tensor) else o) for k, o in options.items()}
    expected = ref.focal_loss(to_numpy(logits), to_numpy(target), **np_options)
    assert_close_f64(loss, expected)
    upstream = torch.rand_like(loss) if reduction == "none" else None
    grad = _grad(loss, logits, upstream)
    expected_grad = ref.focal_loss_grad(
        to_numpy(logits), to_numpy(target), **np_options,
        grad_output=None if upstream is None else to_numpy(upstream),
    )
    assert_close_f64(grad, expected_grad)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_temperature_matches_oracle(temperature):
    logits, target, _ = _make((6, 5))
    loss = softmaxkit.focal_loss(logits, target, gamma=1.5, temperature=temperature, label_smoothing=0.1)
    expected = ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=1.5, temperature=temperature,
                              label_smoothing=0.1)
    assert_close_f64(loss, expected)
    expected_grad = ref.focal_loss_grad(to_numpy(logits), to_numpy(target), gamma=1.5, temperature=temperature,
                                        label_smoothing=0.1)
    assert_close_f64(_grad(loss, logits), expected_grad)


def test_temperature_equals_scaled_logits():
    logits, target, _ = _make((6, 5))
    a = softmaxkit.focal_loss(logits, target, gamma=2.0, temperature=2.5)
    b = softmaxkit.focal_loss(logits / 2.5, target, gamma=2.0)
    assert_close_f64(a, b)
    assert_close_f64(_grad(a, logits), _grad(b, logits))


# ------------------------------------------------------------------------------ gradcheck of the custom backward
@pytest.mark.parametrize(("gamma", "label_smoothing", "use_alpha", "use_weight", "temperature", "reduction"), [
    (2.0, 0.0, False, False, 1.0, "mean"),
    (0.5, 0.0, True, False, 1.0, "sum"),
    (0.25, 0.3, True, True, 1.0, "none"),
    (3.0, 0.1, False, True, 0.7, "mean"),
    (1.0, 0.0, True, True, 2.0, "none"),
])
def test_gradcheck(gamma, label_smoothing, use_alpha, use_weight, temperature, reduction):
    logits, target, num_classes = _make((4, 5), ignore_fraction=0.3)
    alpha = torch.rand(num_classes, dtype=torch.float64) if use_alpha else None
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None

    def function(x):
        return softmaxkit.focal_loss(x, target, gamma=gamma, alpha=alpha, weight=weight, reduction=reduction,
                                     label_smoothing=label_smoothing, temperature=temperature)

    assert torch.autograd.gradcheck(function, (logits,))


def test_gradcheck_k_dimensional():
    logits, target, _ = _make((2, 3, 2, 2))
    assert torch.autograd.gradcheck(lambda x: softmaxkit.focal_loss(x, target, gamma=1.5, reduction="none"), (logits,))


# ------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma_zero_is_cross_entropy(shape, use_weight, label_smoothing, reduction):
    logits, target, num_classes = _make(shape)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    ours = softmaxkit.focal_loss(logits, target, gamma=0.0, weight=weight, reduction=reduction,
                                 label_smoothing=label_smoothing)
    theirs = F.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    assert_close_f64(ours, theirs)
    upstream = torch.rand_like(ours) if reduction == "none" else None
    assert_close_f64(_grad(ours, logits, upstream), _grad(theirs, logits, upstream))


def test_matches_hand_written_peer():
    logits, target, num_classes = _make((8, 6))
    alpha = torch.rand(num_classes, dtype=torch.float64)
    for gamma in (0.5, 2.0, 5.0):
        ours = softmaxkit.focal_loss(logits, target, gamma=gamma, alpha=alpha)
        theirs = naive_focal(logits, target, gamma, alpha)
        assert_close_f64(ours, theirs)
        assert_close_f64(_grad(ours, logits), _grad(theirs, logits))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_rows_equal_dropped_rows(reduction):
    logits, target, num_classes = _make((9, 4), ignore_fraction=0.0)
    target[[1, 4, 5]] = -100
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    keep = target != -100
    full = softmaxkit.focal_loss(logits, target, gamma=2.0, weight=weight, reduction=reduction, label_smoothing=0.1)
    dropped = softmaxkit.focal_loss(logits[keep], target[keep], gamma=2.0, weight=weight, reduction=reduction,
                                    label_smoothing=0.1)
    assert_close_f64(full, dropped)
    grad = _grad(full, logits)
    assert torch.all(grad[~keep] == 0)
    assert_close_f64(grad[keep], _grad(dropped, logits)[keep])


def test_custom_ignore_index():
    logits, target, _ = _make((6, 4), ignore_fraction=0.0)
    target[2] = 3
    ours = softmaxkit.focal_loss(logits, target, ignore_index=3, reduction="none")
    assert ours[2] == 0
    mask = target != 3
    assert_close_f64(ours[mask], softmaxkit.focal_loss(logits[mask], target[mask], reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero(reduction):
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), -100)
    loss = softmaxkit.focal_loss(logits, target, label_smoothing=0.2, reduction=reduction)
    assert torch.all(loss == 0)
    grad = _grad(loss.sum(), logits)
    assert torch.all(grad == 0) and not torch.isnan(grad).any()


def test_masked_classes_equal_truncated_classes():
    logits, target, _ = _make((6, 7), ignore_fraction=0.0)
    target = target % 5
    masked = logits.detach().clone()
    masked[:, 5:] = -torch.inf
    masked.requires_grad_()
    a = softmaxkit.focal_loss(masked, target, gamma=0.5, reduction="sum")
    b = softmaxkit.focal_loss(logits[:, :5], target, gamma=0.5, reduction="sum")
    assert_close_f64(a, b)
    grad = _grad(a, masked)
    assert torch.all(grad[:, 5:] == 0)
    assert_close_f64(grad[:, :5], _grad(b, logits)[:, :5])


def test_alpha_scales_rows_without_entering_the_mean():
    logits, target, num_classes = _make((5, 3), ignore_fraction=0.0)
    alpha = torch.full((num_classes,), 0.25, dtype=torch.float64)
    plain = softmaxkit.focal_loss(logits, target)
    scaled = softmaxkit.focal_loss(logits, target, alpha=alpha)
    assert_close_f64(scaled, 0.25 * plain)


# ------------------------------------------------------------------------------ extremes: p_y → 1, γ < 1, ±1e4
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 0.99, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_confident_correct_rows_have_zero_loss_and_finite_gradient(gamma, dtype):
    # p_y == 1 in every dtype: (1 − p_y)^{γ−1} is infinite for γ < 1; autograd through pow gives NaN here.
    logits = torch.tensor([[1e4, 0.0, -1e4], [0.0, 80.0, 0.0]], dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 1])
    loss = softmaxkit.focal_loss(logits, target, gamma=gamma, reduction="sum")
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-30)
    grad = _grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert float(grad.abs().max()) <= 1e-30


def test_naive_pow_autograd_is_nan_where_ours_is_not():
    # Documents the failure the closed form avoids (the peer, not ours, must produce NaN).
    logits = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0])
    assert torch.isnan(_grad(naive_focal(logits, target, 0.5), logits)).any()
    assert torch.isfinite(_grad(softmaxkit.focal_loss(logits, target, gamma=0.5), logits)).all()


@pytest.mark.parametrize("gamma", [0.3, 2.0])
def test_large_logits_finite_and_match_oracle(gamma):
    logits = (torch.randn(6, 5, dtype=torch.float64) * 1e4).requires_grad_()
    target = torch.randint(0, 5, (6,))
    loss = softmaxkit.focal_loss(logits, target, gamma=gamma, label_smoothing=0.1)
    grad = _grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_f64(loss, ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=gamma, label_smoothing=0.1))
    assert_close_f64(grad, ref.focal_loss_grad(to_numpy(logits), to_numpy(target), gamma=gamma,
                                               label_smoothing=0.1))


def test_near_one_probability_keeps_relative_precision():
    # 1 − p_y ≈ 2e-9: computed as −expm1(log p), not 1 − p (which would lose ~7 of 16 digits).
    logits = torch.tensor([[20.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0])
    loss = softmaxkit.focal_loss(logits, target, gamma=0.5)
    expected = ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=0.5)
    assert_close_f64(loss, expected, rtol=1e-12)


# ------------------------------------------------------------------------------ low precision: error budget
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_low_precision_error_budget(dtype, gamma):
    logits64 = torch.randn(64, 33, dtype=torch.float64) * 3
    target = torch.randint(0, 33, (64,))
    logits = logits64.to(dtype).requires_grad_()
    oracle = ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=gamma, reduction="none")
    oracle_grad = ref.focal_loss_grad(to_numpy(logits), to_numpy(target), gamma=gamma, reduction="sum")
    ours = softmaxkit.focal_loss(logits, target, gamma=gamma, reduction="none")
    peer = naive_focal(logits, target, gamma, reduction="none")
    eps = torch.finfo(dtype).eps
    # Slack: one ulp of the dtype at each value (both results are rounded to it once at the end).
    assert_within_budget(ours, peer, oracle, tol=float(eps * np.abs(oracle).max()))
    grad = _grad(ours.sum(), logits)
    peer_grad = _grad(peer.sum(), logits)
    assert_within_budget(grad, peer_grad, oracle_grad, tol=float(eps * np.abs(oracle_grad).max()))
    assert ours.dtype == dtype and grad.dtype == dtype


# ------------------------------------------------------------------------------ property test against the oracle
@given(
    rows=st.integers(1, 5),
    classes=st.integers(1, 6),
    gamma=st.floats(0.0, 4.0),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(rows, classes, gamma, smoothing, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=generator)
    loss = softmaxkit.focal_loss(logits, target, gamma=gamma, label_smoothing=smoothing, reduction="sum")
    expected = ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=gamma, label_smoothing=smoothing,
                              reduction="sum")
    assert_close_f64(loss, expected, atol=1e-11)
    assert loss.item() >= 0
    expected_grad = ref.focal_loss_grad(to_numpy(logits), to_numpy(target), gamma=gamma,
                                        label_smoothing=smoothing, reduction="sum")
    assert_close_f64(_grad(loss, logits), expected_grad, atol=1e-11)


# ------------------------------------------------------------------------------ inputs, module, validation
def test_inputs_not_mutated():
    logits, target, num_classes = _make((5, 4))
    alpha = torch.rand(num_classes, dtype=torch.float64)
    before = (logits.detach().clone(), target.clone(), alpha.clone())
    loss = softmaxkit.focal_loss(logits, target, alpha=alpha, label_smoothing=0.1)
    loss.backward()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(target, before[1]) and torch.equal(alpha, before[2])


def test_module_equals_function():
    logits, target, num_classes = _make((5, 4))
    alpha = torch.rand(num_classes, dtype=torch.float64)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    options = dict(gamma=1.5, alpha=alpha, weight=weight, ignore_index=-100, reduction="sum", label_smoothing=0.1,
                   temperature=1.3)
    module = softmaxkit.nn.FocalLoss(**options)
    assert torch.equal(module(logits, target), softmaxkit.focal_loss(logits, target, **options))
    assert set(module.state_dict()) == {"alpha", "weight"}
    assert "gamma=1.5" in repr(module)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(gamma=-0.5), ValueError, r"`gamma` must be a finite number >= 0, but got -0.5"),
    (dict(gamma=float("nan")), ValueError, r"`gamma` must be a real number, but got nan"),
    (dict(gamma="2"), TypeError, r"`gamma` must be a real number"),
    (dict(alpha=torch.ones(3, dtype=torch.float64)), ValueError, r"`alpha` must be a 1-d tensor with one entry per class \(4\), but has shape \(3,\)"),
    (dict(alpha=torch.tensor([1.0, -0.5, 1.0, 1.0], dtype=torch.float64)), ValueError, r"`alpha` must hold finite and >= 0 entries, but holds -0.5 at class 1"),
    (dict(alpha=torch.ones(4, dtype=torch.int64)), TypeError, r"`alpha` must have a floating-point dtype"),
    (dict(alpha=[1.0] * 4), TypeError, r"`alpha` must be a torch.Tensor, but got list"),
    (dict(weight=torch.ones(5, dtype=torch.float64)), ValueError, r"`weight` must be a 1-d tensor with one entry per class \(4\)"),
    (dict(reduction="avg"), ValueError, r"`reduction` must be one of 'mean', 'sum', 'none', but got 'avg'"),
    (dict(label_smoothing=1.5), ValueError, r"`label_smoothing` must lie in \[0, 1\], but got 1.5"),
    (dict(temperature=0.0), ValueError, r"`temperature` must be a finite number > 0, but got 0.0"),
    (dict(ignore_index=1.0), TypeError, r"`ignore_index` must be an int"),
])
def test_validation(kwargs, error, match):
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    with pytest.raises(error, match=match):
        softmaxkit.focal_loss(logits, target, **kwargs)


def test_validation_of_target():
    logits = torch.randn(3, 4)
    # (class-probability targets of the logits' shape are accepted: see the probability-target tests below)
    with pytest.raises(TypeError, match=r"`target` of shape \(3,\) holds class indices and must have an integer"):
        softmaxkit.focal_loss(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`target` must have shape \(3,\) \(class indices\) or \(3, 4\)"):
        softmaxkit.focal_loss(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\) or ignore_index=-100, but holds 4 at position 2"):
        softmaxkit.focal_loss(logits, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match=r"`logits` must have a floating-point dtype"):
        softmaxkit.focal_loss(torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]))


def test_double_backward_raises_instead_of_returning_zeros():
    logits, target, _ = _make((3, 4), ignore_fraction=0.0)
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.functional.hessian(lambda x: softmaxkit.focal_loss(x, target), logits.detach())


# ------------------------------------------------------------------------------ class-probability targets
# ℓ = −Σ_c α_c w_c q_c (1 − p_c)^γ log p_c with q = (1 − ε)t + ε/C for a given distribution t (the logits'
# shape, floating); "mean" divides by the number of rows, as F.cross_entropy does for probability targets.


def _soft_target(shape, dtype=torch.float64, zero_fraction=0.3, generator=None):
    """Random distributions over dim 1 (dim 0 for 1-d), with some exact zeros (zero coefficients)."""
    class_dim = 0 if len(shape) == 1 else 1
    scores = torch.randn(shape, dtype=torch.float64, generator=generator)
    keep = torch.rand(shape, generator=generator) >= zero_fraction
    keep = keep | (scores == scores.amax(class_dim, keepdim=True))  # at least one class per row
    t = torch.where(keep, scores.exp(), torch.zeros_like(scores))
    return (t / t.sum(class_dim, keepdim=True)).to(dtype)


def naive_soft_focal(logits, target, gamma, reduction="mean"):
    """Hand-written PyTorch focal loss for probability targets (autograd through pow); the low-precision peer."""
    log_p = F.log_softmax(logits, dim=1)
    loss = -(((1 - log_p.exp()) ** gamma) * target * log_p).sum(1)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("gamma", "use_alpha", "use_weight", "label_smoothing"),
                         list(itertools.product([0.0, 0.5, 2.0], [False, True], [False, True], [0.0, 0.2])))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match_oracle(shape, gamma, use_alpha, use_weight, label_smoothing, reduction):
    logits, _, num_classes = _make(shape)
    target = _soft_target(shape)
    alpha = torch.rand(num_classes, dtype=torch.float64) if use_alpha else None
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(gamma=gamma, alpha=alpha, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss = softmaxkit.focal_loss(logits, target, **options)
    np_options = {k: (to_numpy(o) if isinstance(o, torch.Tensor) else o) for k, o in options.items()}
    expected = ref.focal_loss(to_numpy(logits), to_numpy(target), **np_options)
    assert loss.shape == (np.shape(expected) if reduction == "none" else ())
    assert_close_f64(loss, expected)
    upstream = torch.rand_like(loss) if reduction == "none" else None
    expected_grad = ref.focal_loss_grad(
        to_numpy(logits), to_numpy(target), **np_options,
        grad_output=None if upstream is None else to_numpy(upstream),
    )
    assert_close_f64(_grad(loss, logits, upstream), expected_grad)


def test_probability_target_oracle_is_the_formula():
    # The oracle itself against the formula written out for one row (so the test above cannot pass vacuously).
    x = np.array([1.0, -0.5, 2.0])
    t = np.array([0.2, 0.0, 0.8])
    alpha, weight, gamma, eps = np.array([0.5, 1.0, 2.0]), np.array([1.5, 0.7, 1.0]), 1.5, 0.3
    p = np.exp(x) / np.exp(x).sum()
    q = (1 - eps) * t + eps / 3
    expected = -np.sum(alpha * weight * q * (1 - p) ** gamma * np.log(p))
    assert ref.focal_loss(x, t, gamma, alpha, weight, label_smoothing=eps) == pytest.approx(expected, rel=1e-14)
    ours = softmaxkit.focal_loss(torch.tensor(x), torch.tensor(t), gamma=gamma, alpha=torch.tensor(alpha),
                                 weight=torch.tensor(weight), label_smoothing=eps)
    assert ours.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("gamma", "label_smoothing", "use_alpha", "use_weight", "temperature", "reduction"), [
    (2.0, 0.0, False, False, 1.0, "mean"),
    (0.5, 0.0, True, False, 1.0, "sum"),
    (0.25, 0.3, True, True, 1.0, "none"),
    (3.0, 0.1, False, True, 0.7, "mean"),
])
def test_probability_targets_gradcheck(gamma, label_smoothing, use_alpha, use_weight, temperature, reduction):
    """Closed-form backward for the logits and for the target (the loss is differentiable in both)."""
    logits, _, num_classes = _make((4, 5))
    target = _soft_target((4, 5), zero_fraction=0.0).requires_grad_()
    alpha = torch.rand(num_classes, dtype=torch.float64) if use_alpha else None
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None

    def function(x, t):
        return softmaxkit.focal_loss(x, t, gamma=gamma, alpha=alpha, weight=weight, reduction=reduction,
                                     label_smoothing=label_smoothing, temperature=temperature)

    assert torch.autograd.gradcheck(function, (logits, target))


def test_probability_targets_gradcheck_k_dimensional():
    logits, _, _ = _make((2, 3, 2, 2))
    target = _soft_target((2, 3, 2, 2), zero_fraction=0.0).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, t: softmaxkit.focal_loss(x, t, gamma=1.5, reduction="none"), (logits, target))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_gamma_zero_is_cross_entropy(shape, use_weight, label_smoothing, reduction):
    logits, _, num_classes = _make(shape)
    target = _soft_target(shape).requires_grad_()
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours = softmaxkit.focal_loss(logits, target, gamma=0.0, **options)
    upstream = torch.rand_like(ours) if reduction == "none" else None
    theirs = F.cross_entropy(logits, target, **options)
    assert_close_f64(ours, theirs)
    ours_grads = torch.autograd.grad(ours, (logits, target), upstream, retain_graph=True)
    for mine, wanted in zip(ours_grads, torch.autograd.grad(theirs, (logits, target), upstream)):
        assert_close_f64(mine, wanted)
    # softmaxkit.cross_entropy: values and logit gradients (its target gradient is 0 where t_c = 0, which
    # F.cross_entropy's and ours are not; reported separately)
    package = softmaxkit.cross_entropy(logits, target, **options)
    assert_close_f64(ours, package)
    assert_close_f64(ours_grads[0], torch.autograd.grad(package, logits, upstream)[0])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_one_hot_probabilities_equal_class_indices(shape, reduction):
    logits, target, num_classes = _make(shape, ignore_fraction=0.0)
    one_hot = F.one_hot(target, num_classes).movedim(-1, 0 if len(shape) == 1 else 1).double()
    alpha = torch.rand(num_classes, dtype=torch.float64)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    options = dict(gamma=1.5, alpha=alpha, weight=weight, reduction=reduction, label_smoothing=0.2, temperature=0.8)
    soft = softmaxkit.focal_loss(logits, one_hot, **options)
    hard = softmaxkit.focal_loss(logits, target, **options)
    assert_close_f64(soft, hard)
    upstream = torch.rand_like(soft) if reduction == "none" else None
    assert_close_f64(_grad(soft, logits, upstream), _grad(hard, logits, upstream))


def test_one_hot_mean_divides_by_rows_not_by_the_summed_weight():
    """F.cross_entropy's rule for probability targets: "mean" is the sum over N, whatever the class weights."""
    logits, target, num_classes = _make((6, 4), ignore_fraction=0.0)
    one_hot = F.one_hot(target, num_classes).double()
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    hard = softmaxkit.focal_loss(logits, target, weight=weight)
    soft = softmaxkit.focal_loss(logits, one_hot, weight=weight)
    assert_close_f64(soft, hard * weight[target].sum() / 6)
    assert_close_f64(softmaxkit.focal_loss(logits, one_hot), softmaxkit.focal_loss(logits, target))


def test_probability_targets_masked_classes_equal_truncated_classes():
    logits, _, _ = _make((6, 7))
    target = torch.zeros(6, 7, dtype=torch.float64)
    target[:, :5] = _soft_target((6, 5))
    masked = logits.detach().clone()
    masked[:, 5:] = -torch.inf
    masked.requires_grad_()
    a = softmaxkit.focal_loss(masked, target, gamma=0.5, reduction="sum")
    b = softmaxkit.focal_loss(logits[:, :5], target[:, :5], gamma=0.5, reduction="sum")
    assert_close_f64(a, b)
    grad = _grad(a, masked)
    assert torch.all(grad[:, 5:] == 0)
    assert_close_f64(grad[:, :5], _grad(b, logits)[:, :5])


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 0.99, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_probability_targets_confident_rows_are_finite(gamma, dtype):
    # p = 1 on the class holding all the target mass (γ < 1: (1 − p)^{γ−1} is infinite there), ±1e4 logits.
    logits = torch.tensor([[1e4, 0.0, -1e4], [0.0, 80.0, 0.0]], dtype=dtype, requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dtype, requires_grad=True)
    loss = softmaxkit.focal_loss(logits, target, gamma=gamma, reduction="sum")
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-30)
    grad_logits, grad_target = torch.autograd.grad(loss, (logits, target))
    assert torch.isfinite(grad_logits).all() and float(grad_logits.abs().max()) <= 1e-30
    # ∂ℓ/∂t_c = −(1 − p_c)^γ log p_c: 0 on the certain class, finite elsewhere (log p ≥ −2e4 here)
    assert torch.isfinite(grad_target).all() and torch.all(grad_target[[0, 1], [0, 1]] == 0)


@pytest.mark.parametrize("gamma", [0.3, 2.0])
def test_probability_targets_large_logits_match_oracle(gamma):
    logits = (torch.randn(6, 5, dtype=torch.float64) * 1e4).requires_grad_()
    target = _soft_target((6, 5), zero_fraction=0.0)
    loss = softmaxkit.focal_loss(logits, target, gamma=gamma, label_smoothing=0.1)
    grad = _grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    options = dict(gamma=gamma, label_smoothing=0.1)
    assert_close_f64(loss, ref.focal_loss(to_numpy(logits), to_numpy(target), **options))
    assert_close_f64(grad, ref.focal_loss_grad(to_numpy(logits), to_numpy(target), **options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_probability_targets_low_precision_error_budget(dtype, gamma):
    logits = (torch.randn(64, 33, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = _soft_target((64, 33), dtype=dtype)
    oracle = ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=gamma, reduction="none")
    oracle_grad = ref.focal_loss_grad(to_numpy(logits), to_numpy(target), gamma=gamma, reduction="sum")
    ours = softmaxkit.focal_loss(logits, target, gamma=gamma, reduction="none")
    peer = naive_soft_focal(logits, target, gamma, reduction="none")
    eps = torch.finfo(dtype).eps
    # Slack: one ulp of the dtype at each value (both results are rounded to it once at the end).
    assert_within_budget(ours, peer, oracle, tol=float(eps * np.abs(oracle).max()))
    grad = _grad(ours.sum(), logits)
    assert_within_budget(grad, _grad(peer.sum(), logits), oracle_grad, tol=float(eps * np.abs(oracle_grad).max()))
    assert ours.dtype == dtype and grad.dtype == dtype


@given(
    rows=st.integers(1, 5),
    classes=st.integers(1, 6),
    gamma=st.floats(0.0, 4.0),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    zero_fraction=st.sampled_from([0.0, 0.5]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_probability_targets_property_matches_oracle(rows, classes, gamma, smoothing, scale, zero_fraction,
                                                     reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale).requires_grad_()
    target = _soft_target((rows, classes), zero_fraction=zero_fraction, generator=generator)
    options = dict(gamma=gamma, label_smoothing=smoothing, reduction=reduction)
    loss = softmaxkit.focal_loss(logits, target, **options)
    assert_close_f64(loss, ref.focal_loss(to_numpy(logits), to_numpy(target), **options), atol=1e-11)
    assert torch.all(loss >= 0)
    assert_close_f64(_grad(loss.sum(), logits),
                     ref.focal_loss_grad(to_numpy(logits), to_numpy(target), **options,
                                         grad_output=np.ones(rows) if reduction == "none" else None), atol=1e-11)


def test_probability_targets_taken_as_given_like_cross_entropy():
    """Neither F.cross_entropy nor softmaxkit.cross_entropy checks that targets are non-negative rows summing
    to 1; focal loss (a generalisation of them at γ = 0) does not either, and applies the formula as is."""
    logits, _, _ = _make((4, 3))
    target = torch.tensor([[0.5, 0.9, 0.0], [-0.2, 1.0, 0.2], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert_close_f64(softmaxkit.focal_loss(logits, target, gamma=0.0, reduction="none"),
                     F.cross_entropy(logits, target, reduction="none"))
    loss = softmaxkit.focal_loss(logits, target, gamma=2.0, reduction="none")
    assert_close_f64(loss, ref.focal_loss(to_numpy(logits), to_numpy(target), gamma=2.0, reduction="none"))
    assert loss[3] == 0  # an all-zero row contributes nothing, but still counts in "mean"'s N
    assert_close_f64(softmaxkit.focal_loss(logits, target, gamma=2.0), loss.sum() / 4)


def test_probability_targets_module_inputs_and_double_backward():
    logits, _, num_classes = _make((5, 4))
    target = _soft_target((5, 4))
    alpha = torch.rand(num_classes, dtype=torch.float64)
    before = (logits.detach().clone(), target.clone(), alpha.clone())
    options = dict(gamma=1.5, alpha=alpha, reduction="sum", label_smoothing=0.1, temperature=1.3)
    module = softmaxkit.nn.FocalLoss(**options)
    loss = module(logits, target)
    assert torch.equal(loss, softmaxkit.focal_loss(logits, target, **options))
    loss.backward()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(target, before[1]) and torch.equal(alpha, before[2])
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.functional.hessian(lambda x: softmaxkit.focal_loss(x, target), logits.detach())


@pytest.mark.parametrize(("target", "kwargs"), [
    (torch.ones(3, 4, dtype=torch.long), {}),  # an integer tensor of the logits' shape
    (torch.ones(3, 5), {}),  # probabilities of the wrong shape
    (torch.ones(4, 4), {}),
    (torch.full((3, 4), 0.25), dict(ignore_index=0)),  # ignore_index is not supported with probabilities
    (torch.full((3, 4), 0.25), dict(ignore_index=2)),
    (torch.tensor([0.0, 1.0, 2.0]), {}),  # float class indices
])
@pytest.mark.parametrize("loss_fn", ["focal_loss", "poly1_cross_entropy"])
def test_bad_targets_raise_the_same_errors_as_cross_entropy(target, kwargs, loss_fn):
    logits = torch.randn(3, 4)
    with pytest.raises((ValueError, TypeError)) as theirs:
        softmaxkit.cross_entropy(logits, target, **kwargs)
    with pytest.raises(theirs.type, match=f"^{__import__('re').escape(str(theirs.value))}$"):
        getattr(softmaxkit, loss_fn)(logits, target, **kwargs)


def test_bad_target_messages():
    logits = torch.randn(3, 4)
    # the probability shape with an integer dtype: the dtype is the problem, and the message says so
    with pytest.raises(TypeError, match=r"holds class probabilities and must be floating point, but has dtype "
                                        r"torch\.int64"):
        softmaxkit.focal_loss(logits, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`ignore_index` is not supported with class-probability targets"):
        softmaxkit.focal_loss(logits, torch.full((3, 4), 0.25), ignore_index=1)
    # a negative ignore_index is accepted (and unused), as in cross_entropy
    soft = torch.full((3, 4), 0.25)
    assert torch.equal(softmaxkit.focal_loss(logits, soft, ignore_index=-1), softmaxkit.focal_loss(logits, soft))
