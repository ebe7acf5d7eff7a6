"""softmaxkit.poly1_cross_entropy: float64 oracle (which sums q·p over all classes, independently of the
``p_t = (1 − ε)p_y + ε/C`` shortcut), gradcheck, invariances, error budget, validation.

Tolerances: float64 to 1e-10 relative (tests/_helpers.py); bf16/fp16 through an error budget against a
hand-written Poly-1 in the same dtype, with one output ulp of slack.
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


def _make(shape, ignore_fraction=0.25, scale=2.0, dtype=torch.float64):
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, num_classes, target_shape)
    if ignore_fraction and target.dim() > 0:
        target[torch.rand(target_shape) < ignore_fraction] = -100
        target.view(-1)[0] = 0
    return logits, target, num_classes


def _grad(loss, x, upstream=None):
    (g,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
    return g


def naive_poly1(logits, target, epsilon, reduction="mean"):
    """Leng et al.'s reference code in PyTorch: CE + ε(1 − p_t) with p_t = Σ onehot·softmax."""
    ce = F.cross_entropy(logits, target, reduction="none")
    p_t = torch.softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    loss = ce + epsilon * (1 - p_t)
    return loss if reduction == "none" else loss.mean()


@pytest.mark.parametrize("shape", [(7,), (1, 1), (5, 7), (4, 3, 5)], ids=str)
@pytest.mark.parametrize(("epsilon", "use_weight", "label_smoothing"),
                         list(itertools.product([-1.0, 0.0, 2.0], [False, True], [0.0, 0.3])))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle(shape, epsilon, use_weight, label_smoothing, reduction):
    logits, target, num_classes = _make(shape)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(epsilon=epsilon, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss = softmaxkit.poly1_cross_entropy(logits, target, **options)
    np_options = {k: (to_numpy(o) if isinstance(o, torch.Tensor) else o) for k, o in options.items()}
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), **np_options))
    upstream = torch.rand_like(loss) if reduction == "none" else None
    expected = ref.poly1_cross_entropy_grad(to_numpy(logits), to_numpy(target), **np_options,
                                            grad_output=None if upstream is None else to_numpy(upstream))
    assert_close_f64(_grad(loss, logits, upstream), expected)


def test_temperature_matches_oracle():
    logits, target, _ = _make((6, 5))
    loss = softmaxkit.poly1_cross_entropy(logits, target, epsilon=0.5, temperature=2.0, label_smoothing=0.1)
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), epsilon=0.5,
                                                   temperature=2.0, label_smoothing=0.1))
    assert_close_f64(_grad(loss, logits), ref.poly1_cross_entropy_grad(
        to_numpy(logits), to_numpy(target), epsilon=0.5, temperature=2.0, label_smoothing=0.1))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    logits, target, num_classes = _make((4, 5), ignore_fraction=0.3)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: softmaxkit.poly1_cross_entropy(x, target, epsilon=1.5, weight=weight, label_smoothing=0.2,
                                                 temperature=1.3, reduction=reduction), (logits,))


def test_epsilon_zero_is_cross_entropy():
    logits, target, num_classes = _make((6, 3, 2))
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    ours = softmaxkit.poly1_cross_entropy(logits, target, epsilon=0.0, weight=weight, label_smoothing=0.1)
    theirs = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    assert_close_f64(ours, theirs)
    assert_close_f64(_grad(ours, logits), _grad(theirs, logits))


def test_matches_paper_code():
    logits, target, _ = _make((8, 6), ignore_fraction=0.0)
    ours = softmaxkit.poly1_cross_entropy(logits, target, epsilon=1.0)
    theirs = naive_poly1(logits, target, 1.0)
    assert_close_f64(ours, theirs)
    assert_close_f64(_grad(ours, logits), _grad(theirs, logits))


def test_ignored_rows_equal_dropped_rows_and_all_ignored_is_zero():
    logits, target, _ = _make((9, 4), ignore_fraction=0.0)
    target[[0, 3]] = -100
    keep = target != -100
    assert_close_f64(softmaxkit.poly1_cross_entropy(logits, target),
                     softmaxkit.poly1_cross_entropy(logits[keep], target[keep]))
    everything_ignored = torch.full_like(target, -100)
    loss = softmaxkit.poly1_cross_entropy(logits, everything_ignored, label_smoothing=0.2)
    assert loss.item() == 0.0
    assert torch.all(_grad(loss, logits) == 0)


def test_extremes_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, -torch.inf]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 0])
    loss = softmaxkit.poly1_cross_entropy(logits, target)
    grad = _grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_budget(dtype):
    logits = (torch.randn(64, 33, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 33, (64,))
    oracle = ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), epsilon=1.0, reduction="none")
    ours = softmaxkit.poly1_cross_entropy(logits, target, epsilon=1.0, reduction="none")
    peer = naive_poly1(logits, target, 1.0, reduction="none")
    eps = torch.finfo(dtype).eps
    assert_within_budget(ours, peer, oracle, tol=float(eps * np.abs(oracle).max()))
    oracle_grad = ref.poly1_cross_entropy_grad(to_numpy(logits), to_numpy(target), epsilon=1.0, reduction="sum")
    assert_within_budget(_grad(ours.sum(), logits), _grad(peer.sum(), logits), oracle_grad,
                         tol=float(eps * np.abs(oracle_grad).max()))


@given(rows=st.integers(1, 5), classes=st.integers(1, 6), epsilon=st.floats(-1.0, 5.0),
       smoothing=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16))
def test_property_matches_oracle_and_is_non_negative(rows, classes, epsilon, smoothing, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, classes, (rows,), generator=generator)
    loss = softmaxkit.poly1_cross_entropy(logits, target, epsilon=epsilon, label_smoothing=smoothing, reduction="none")
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), epsilon=epsilon,
                                                   label_smoothing=smoothing, reduction="none"), atol=1e-11)
    # −log p_t >= 1 − p_t, so ε >= −1 keeps the loss non-negative (without smoothing the bound is exact).
    if smoothing == 0.0:
        assert torch.all(loss >= -1e-12)


def test_module_and_validation():
    logits, target, num_classes = _make((5, 4))
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    options = dict(epsilon=0.5, weight=weight, reduction="sum", label_smoothing=0.1, temperature=0.8)
    module = softmaxkit.nn.Poly1Loss(**options)
    assert torch.equal(module(logits, target), softmaxkit.poly1_cross_entropy(logits, target, **options))
    with pytest.raises(ValueError, match=r"`epsilon` must lie in \[-1, inf\), but got -1.5"):
        softmaxkit.poly1_cross_entropy(logits, target, epsilon=-1.5)
    with pytest.raises(ValueError, match=r"`epsilon` must lie in \[-1, inf\), but got inf"):
        softmaxkit.poly1_cross_entropy(logits, target, epsilon=float("inf"))
    with pytest.raises(TypeError, match=r"`target` of shape \(5,\) holds class indices and must have an integer"):
        softmaxkit.poly1_cross_entropy(logits, target.double())
    with pytest.raises(ValueError, match=r"`weight` must be a 1-d tensor with one entry per class"):
        softmaxkit.poly1_cross_entropy(logits, target, weight=torch.ones(2, dtype=torch.float64))


# ------------------------------------------------------------------------------ class-probability targets
# ℓ = CE(x, t) + ε w̄ (1 − ⟨q, p⟩), q = (1 − ε_s)t + ε_s/C, w̄ = Σ_c w_c t_c (1 for a distribution without
# class weights); "mean" divides by the number of rows, as F.cross_entropy does for probability targets.


def _soft_target(shape, dtype=torch.float64, zero_fraction=0.3, generator=None):
    class_dim = 0 if len(shape) == 1 else 1
    scores = torch.randn(shape, dtype=torch.float64, generator=generator)
    keep = (torch.rand(shape, generator=generator) >= zero_fraction) | (scores == scores.amax(class_dim, keepdim=True))
    t = torch.where(keep, scores.exp(), torch.zeros_like(scores))
    return (t / t.sum(class_dim, keepdim=True)).to(dtype)


def naive_soft_poly1(logits, target, epsilon, reduction="mean"):
    """Leng et al.'s reference code for label distributions: pt = Σ labels·softmax, CE with soft labels."""
    ce = F.cross_entropy(logits, target, reduction="none")
    p_t = (target * torch.softmax(logits, dim=1)).sum(1)
    loss = ce + epsilon * (1 - p_t)
    return loss if reduction == "none" else loss.mean()


@pytest.mark.parametrize("shape", [(7,), (1, 1), (5, 7), (4, 3, 5)], ids=str)
@pytest.mark.parametrize(("epsilon", "use_weight", "label_smoothing"),
                         list(itertools.product([-1.0, 0.0, 2.0], [False, True], [0.0, 0.3])))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match_oracle(shape, epsilon, use_weight, label_smoothing, reduction):
    logits, _, num_classes = _make(shape)
    target = _soft_target(shape)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(epsilon=epsilon, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss = softmaxkit.poly1_cross_entropy(logits, target, **options)
    np_options = {k: (to_numpy(o) if isinstance(o, torch.Tensor) else o) for k, o in options.items()}
    expected = ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), **np_options)
    assert loss.shape == (np.shape(expected) if reduction == "none" else ())
    assert_close_f64(loss, expected)
    upstream = torch.rand_like(loss) if reduction == "none" else None
    expected_grad = ref.poly1_cross_entropy_grad(to_numpy(logits), to_numpy(target), **np_options,
                                                 grad_output=None if upstream is None else to_numpy(upstream))
    assert_close_f64(_grad(loss, logits, upstream), expected_grad)


def test_probability_targets_are_the_papers_definition():
    """Without class weights and smoothing: CE(x, t) + ε(1 − Σ_c t_c p_c), the paper's code."""
    logits, _, _ = _make((8, 6))
    target = _soft_target((8, 6))
    for epsilon in (-1.0, 1.0, 3.0):
        ours = softmaxkit.poly1_cross_entropy(logits, target, epsilon=epsilon, reduction="none")
        theirs = naive_soft_poly1(logits, target, epsilon, reduction="none")
        assert_close_f64(ours, theirs)
        assert_close_f64(_grad(ours.sum(), logits), _grad(theirs.sum(), logits))


def test_probability_target_oracle_is_the_formula():
    x, t, w = np.array([1.0, -0.5, 2.0]), np.array([0.2, 0.0, 0.8]), np.array([1.5, 0.7, 1.0])
    eps_s, epsilon = 0.3, 2.0
    p = np.exp(x) / np.exp(x).sum()
    q = (1 - eps_s) * t + eps_s / 3
    expected = -np.sum(w * q * np.log(p)) + epsilon * np.sum(w * t) * (1 - np.sum(q * p))
    assert ref.poly1_cross_entropy(x, t, epsilon, w, label_smoothing=eps_s) == pytest.approx(expected, rel=1e-14)
    ours = softmaxkit.poly1_cross_entropy(torch.tensor(x), torch.tensor(t), epsilon=epsilon, weight=torch.tensor(w),
                                          label_smoothing=eps_s)
    assert ours.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_gradcheck(reduction):
    logits, _, num_classes = _make((4, 5))
    target = _soft_target((4, 5), zero_fraction=0.0).requires_grad_()
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, t: softmaxkit.poly1_cross_entropy(x, t, epsilon=1.5, weight=weight, label_smoothing=0.2,
                                                    temperature=1.3, reduction=reduction), (logits, target))


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_epsilon_zero_is_cross_entropy(use_weight, reduction):
    logits, _, num_classes = _make((6, 3, 2))
    target = _soft_target((6, 3, 2)).requires_grad_()
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(weight=weight, label_smoothing=0.1, reduction=reduction)
    ours = softmaxkit.poly1_cross_entropy(logits, target, epsilon=0.0, **options)
    theirs = F.cross_entropy(logits, target, **options)
    assert_close_f64(ours, theirs)
    upstream = torch.rand_like(ours) if reduction == "none" else None
    # gradients for the logits and for the target (also where t_c = 0: −(1 − ε_s) w_c log p_c)
    for mine, wanted in zip(torch.autograd.grad(ours, (logits, target), upstream),
                            torch.autograd.grad(theirs, (logits, target), upstream)):
        assert_close_f64(mine, wanted)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_one_hot_probabilities_equal_class_indices(reduction):
    logits, target, num_classes = _make((5, 4, 3), ignore_fraction=0.0)
    one_hot = F.one_hot(target, num_classes).movedim(-1, 1).double()
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    options = dict(epsilon=1.5, weight=weight, reduction=reduction, label_smoothing=0.2, temperature=0.8)
    soft = softmaxkit.poly1_cross_entropy(logits, one_hot, **options)
    hard = softmaxkit.poly1_cross_entropy(logits, target, **options)
    assert_close_f64(soft, hard)
    upstream = torch.rand_like(soft) if reduction == "none" else None
    assert_close_f64(_grad(soft, logits, upstream), _grad(hard, logits, upstream))
    # "mean": the same without class weights; with them it divides by N rather than Σ w_y (F.cross_entropy's rule)
    assert_close_f64(softmaxkit.poly1_cross_entropy(logits, one_hot), softmaxkit.poly1_cross_entropy(logits, target))
    w_y = weight[target]
    assert_close_f64(softmaxkit.poly1_cross_entropy(logits, one_hot, weight=weight),
                     softmaxkit.poly1_cross_entropy(logits, target, weight=weight) * w_y.sum() / w_y.numel())


def test_probability_targets_masked_classes_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0, -torch.inf], [0.0, 0.0, 3.0, -torch.inf]], dtype=torch.float64,
                          requires_grad=True)
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.2, 0.3, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = softmaxkit.poly1_cross_entropy(logits, target, label_smoothing=0.0)
    grad_logits, grad_target = torch.autograd.grad(loss, (logits, target))
    assert torch.isfinite(loss) and torch.isfinite(grad_logits).all() and torch.isfinite(grad_target).all()
    assert grad_logits[:, 3].abs().max() == 0
    # at the masked class only ∂w̄/∂t_c = w_c survives: ε(1 − p_t)/N (the CE term's −log p_c·0 is taken as 0)
    p_t = (target * torch.softmax(logits, 1)).sum(1).detach()
    assert_close_f64(grad_target[:, 3], (1 - p_t) / 2)
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target)))
    assert_close_f64(grad_logits, ref.poly1_cross_entropy_grad(to_numpy(logits), to_numpy(target)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probability_targets_low_precision_error_budget(dtype):
    logits = (torch.randn(64, 33, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = _soft_target((64, 33), dtype=dtype)
    oracle = ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), epsilon=1.0, reduction="none")
    ours = softmaxkit.poly1_cross_entropy(logits, target, epsilon=1.0, reduction="none")
    peer = naive_soft_poly1(logits, target, 1.0, reduction="none")
    eps = torch.finfo(dtype).eps
    assert_within_budget(ours, peer, oracle, tol=float(eps * np.abs(oracle).max()))
    oracle_grad = ref.poly1_cross_entropy_grad(to_numpy(logits), to_numpy(target), epsilon=1.0, reduction="sum")
    assert_within_budget(_grad(ours.sum(), logits), _grad(peer.sum(), logits), oracle_grad,
                         tol=float(eps * np.abs(oracle_grad).max()))
    assert ours.dtype == dtype


@given(rows=st.integers(1, 5), classes=st.integers(1, 6), epsilon=st.floats(-1.0, 5.0),
       smoothing=st.sampled_from([0.0, 0.2]), zero_fraction=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16))
def test_probability_targets_property(rows, classes, epsilon, smoothing, zero_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3
    target = _soft_target((rows, classes), zero_fraction=zero_fraction, generator=generator)
    options = dict(epsilon=epsilon, label_smoothing=smoothing, reduction="none")
    loss = softmaxkit.poly1_cross_entropy(logits, target, **options)
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), **options), atol=1e-11)
    # CE(t) >= −log⟨t, p⟩ (Jensen) >= 1 − ⟨t, p⟩, so ε >= −1 keeps the loss non-negative without smoothing.
    if smoothing == 0.0:
        assert torch.all(loss >= -1e-12)


def test_probability_targets_module_and_inputs():
    logits, _, num_classes = _make((5, 4))
    target = _soft_target((5, 4))
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    before = (logits.detach().clone(), target.clone())
    options = dict(epsilon=0.5, weight=weight, reduction="sum", label_smoothing=0.1, temperature=0.8)
    loss = softmaxkit.nn.Poly1Loss(**options)(logits, target)
    assert torch.equal(loss, softmaxkit.poly1_cross_entropy(logits, target, **options))
    loss.backward()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(target, before[1])
    with pytest.raises(ValueError, match=r"`ignore_index` is not supported with class-probability targets"):
        softmaxkit.poly1_cross_entropy(logits, target, ignore_index=0)


def test_probability_targets_taken_as_given_like_cross_entropy():
    """No sign or normalisation check (cross_entropy and F.cross_entropy make none): the formula as written,
    with w̄ = Σ_c w_c t_c, and ε = 0 still equal to F.cross_entropy."""
    logits, _, _ = _make((4, 5))
    target = torch.randn(4, 5, dtype=torch.float64)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    loss = softmaxkit.poly1_cross_entropy(logits, target, epsilon=2.0, weight=weight, reduction="none")
    assert_close_f64(loss, ref.poly1_cross_entropy(to_numpy(logits), to_numpy(target), epsilon=2.0,
                                                   weight=to_numpy(weight), reduction="none"))
    assert_close_f64(softmaxkit.poly1_cross_entropy(logits, target, epsilon=0.0, weight=weight),
                     F.cross_entropy(logits, target, weight=weight))
