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
    with pytest.raises(TypeError, match=r"`target` of focal_loss must hold class indices with an integer dtype"):
        softmaxkit.focal_loss(logits, torch.softmax(logits, 1))
    with pytest.raises(ValueError, match=r"`target` must have shape \(3,\) \(class indices\) for logits of shape"):
        softmaxkit.focal_loss(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\) or ignore_index=-100, but holds 4 at position 2"):
        softmaxkit.focal_loss(logits, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match=r"`logits` must have a floating-point dtype"):
        softmaxkit.focal_loss(torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]))


def test_double_backward_raises_instead_of_returning_zeros():
    logits, target, _ = _make((3, 4), ignore_fraction=0.0)
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.functional.hessian(lambda x: softmaxkit.focal_loss(x, target), logits.detach())
