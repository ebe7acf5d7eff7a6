"""softmaxkit.distillation_loss: T = 1 equals KL (PyTorch's kl_div), T² scaling, the float64 oracle, gradcheck,
mixing with hard-label CE, masked classes, error budget, validation.

Tolerances: float64 to 1e-10 relative (tests/_helpers.py); bf16 through an error budget against PyTorch's
kl_div in the same dtype with one output ulp of slack.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64, assert_within_budget, to_numpy


def _pair(shape, dtype=torch.float64, scale=2.0):
    student = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def torch_kd(student, teacher, temperature, reduction="batchmean", class_dim=1):
    return temperature**2 * F.kl_div(F.log_softmax(student / temperature, class_dim),
                                     F.log_softmax(teacher / temperature, class_dim),
                                     reduction=reduction, log_target=True)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 2, 2)], ids=str)
def test_temperature_one_is_plain_kl(shape):
    student, teacher = _pair(shape)
    ours = softmaxkit.distillation_loss(student, teacher)
    theirs = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")
    assert_close_f64(ours, theirs)
    assert_close_f64(_grad(ours, student), _grad(theirs, student))


@pytest.mark.parametrize("temperature", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("shape", [(6,), (5, 7), (3, 4, 2)], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_matches_oracle(temperature, shape, reduction):
    student, teacher = _pair(shape)
    loss = softmaxkit.distillation_loss(student, teacher, temperature=temperature, reduction=reduction)
    assert_close_f64(loss, ref.distillation_loss(to_numpy(student), to_numpy(teacher), temperature, reduction))
    expected_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if reduction == "none":
        assert loss.shape == expected_shape
    else:
        grad = _grad(loss, student)
        assert_close_f64(grad, ref.distillation_loss_grad(to_numpy(student), to_numpy(teacher), temperature,
                                                          reduction))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_equals_t_squared_kl_div(temperature):
    student, teacher = _pair((6, 5, 3))
    for reduction in ("batchmean", "sum"):
        ours = softmaxkit.distillation_loss(student, teacher, temperature=temperature, reduction=reduction)
        assert_close_f64(ours, torch_kd(student, teacher, temperature, reduction))
    # Our "mean" is per distribution; kl_div's "mean" also divides by C.
    ours = softmaxkit.distillation_loss(student, teacher, temperature=temperature, reduction="mean")
    assert_close_f64(ours / 5, torch_kd(student, teacher, temperature, "mean"))


def test_gradient_scale_does_not_vanish_with_temperature():
    # ∂ℓ/∂s = T(σ − π) and σ − π = O(1/T): the T² keeps the gradient O(1) as T grows (Hinton et al.).
    student, teacher = _pair((4, 6))
    norms = [float(_grad(softmaxkit.distillation_loss(student, teacher, temperature=t), student).norm())
             for t in (10.0, 100.0, 1000.0)]
    assert max(norms) / min(norms) < 1.05


def test_gradcheck():
    student, teacher = _pair((3, 4))
    teacher.requires_grad_()
    target = torch.tensor([0, -100, 3])
    assert torch.autograd.gradcheck(
        lambda s, t: softmaxkit.distillation_loss(s, t, temperature=2.5, target=target, alpha=0.3, reduction="none"),
        (student, teacher))


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_mix_with_hard_labels(reduction):
    student, teacher = _pair((6, 5))
    target = torch.tensor([0, 1, -100, 4, 2, 2])
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    loss = softmaxkit.distillation_loss(student, teacher, temperature=3.0, reduction=reduction, target=target,
                                        alpha=0.7, weight=weight)
    expected = ref.distillation_loss(to_numpy(student), to_numpy(teacher), 3.0, reduction, to_numpy(target), 0.7,
                                     to_numpy(weight))
    assert_close_f64(loss, expected)
    alpha_zero = softmaxkit.distillation_loss(student, teacher, temperature=3.0, reduction=reduction,
                                              target=target, alpha=0.0)
    ce_reduction = "mean" if reduction in ("mean", "batchmean") else reduction
    assert_close_f64(alpha_zero, F.cross_entropy(student, target, reduction=ce_reduction))


def test_masked_teacher_class_gives_no_nan():
    student, teacher = _pair((3, 4))
    teacher = teacher.clone()
    teacher[:, 2] = -torch.inf
    loss = softmaxkit.distillation_loss(student, teacher, temperature=2.0)
    grad = _grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_f64(loss, ref.distillation_loss(to_numpy(student), to_numpy(teacher), 2.0))
    # Both masked in the same place: equals the loss on the remaining classes.
    both = student.detach().clone()
    both[:, 2] = -torch.inf
    keep = [0, 1, 3]
    assert_close_f64(softmaxkit.distillation_loss(both, teacher, temperature=2.0),
                     softmaxkit.distillation_loss(student[:, keep], teacher[:, keep], temperature=2.0))


def test_student_impossible_where_teacher_is_not_is_infinite():
    student = torch.tensor([[0.0, -torch.inf]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert float(softmaxkit.distillation_loss(student, teacher)) == float("inf")


def test_extreme_logits_finite():
    student, teacher = _pair((4, 5), scale=1e4)
    loss = softmaxkit.distillation_loss(student, teacher, temperature=2.0)
    assert torch.isfinite(loss) and torch.isfinite(_grad(loss, student)).all()
    assert_close_f64(loss, ref.distillation_loss(to_numpy(student), to_numpy(teacher), 2.0))


@given(rows=st.integers(1, 4), classes=st.integers(1, 6), temperature=st.floats(0.25, 20.0), seed=st.integers(0, 2**16))
def test_property_non_negative_and_zero_at_equality(rows, classes, temperature, seed):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3
    loss = softmaxkit.distillation_loss(student, teacher, temperature=temperature, reduction="none")
    assert torch.all(loss >= -1e-12)
    assert_close_f64(loss, ref.distillation_loss(to_numpy(student), to_numpy(teacher), temperature, "none"), atol=1e-11)
    same = softmaxkit.distillation_loss(student, student + 5.0, temperature=temperature, reduction="none")
    assert float(same.abs().max()) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_budget(dtype):
    student, teacher = _pair((32, 17), dtype=dtype)
    oracle = ref.distillation_loss(to_numpy(student), to_numpy(teacher), 2.0, "none")
    ours = softmaxkit.distillation_loss(student, teacher, temperature=2.0, reduction="none")
    peer = torch_kd(student, teacher, 2.0, reduction="none").sum(1)
    assert ours.dtype == dtype
    assert_within_budget(ours, peer, oracle, tol=float(torch.finfo(dtype).eps * np.abs(oracle).max()))


def test_inputs_not_mutated_and_module():
    student, teacher = _pair((4, 3))
    before = student.detach().clone(), teacher.clone()
    target = torch.tensor([0, 1, 2, 0])
    module = softmaxkit.nn.DistillationLoss(temperature=2.0, reduction="sum", alpha=0.5, label_smoothing=0.1)
    loss = module(student, teacher, target)
    loss.backward()
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher, before[1])
    assert torch.equal(loss, softmaxkit.distillation_loss(student, teacher, temperature=2.0, reduction="sum",
                                                          target=target, alpha=0.5, label_smoothing=0.1))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(temperature=0.0), ValueError, r"`temperature` must be a finite number > 0, but got 0.0"),
    (dict(reduction="elementwise_mean"), ValueError, r"`reduction` must be one of 'batchmean', 'mean', 'sum', 'none'"),
    (dict(alpha=0.5), ValueError, r"`alpha` mixes the distillation term with cross-entropy on `target`, but no `target`"),
    (dict(target=torch.tensor([0, 1])), ValueError, r"`alpha` \(the weight of the distillation term, in \[0, 1\]\) is required"),
    (dict(target=torch.tensor([0, 1]), alpha=1.5), ValueError, r"`alpha` must lie in \[0, 1\], but got 1.5"),
])
def test_validation(kwargs, error, match):
    student, teacher = _pair((2, 3))
    with pytest.raises(error, match=match):
        softmaxkit.distillation_loss(student, teacher, **kwargs)


def test_validation_of_shapes():
    with pytest.raises(ValueError, match=r"`teacher_logits` must have the same shape as `student_logits` \(2, 3\)"):
        softmaxkit.distillation_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"`teacher_logits` must have a floating-point dtype"):
        softmaxkit.distillation_loss(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))
