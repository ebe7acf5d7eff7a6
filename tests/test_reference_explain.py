"""softmaxkit.reference.explain: the Jacobian spectrum, saturation with logit scale, the 1/T factor —
against closed forms and against PyTorch autograd. float64 throughout: 1e-10 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from softmaxkit import reference as ref

from ._helpers import assert_close_f64


def test_eigenvalues_closed_forms():
    for num_classes in (2, 5, 11):
        values = ref.jacobian_eigenvalues(np.full(num_classes, 1.0 / num_classes))
        assert_close_f64(values, [0.0] + [1.0 / num_classes] * (num_classes - 1), atol=1e-15)
    p = np.array([0.2, 0.8])
    assert_close_f64(ref.jacobian_eigenvalues(p), [0.0, 2 * 0.2 * 0.8], atol=1e-15)
    # a one-hot p: the softmax is flat (all eigenvalues 0)
    assert_close_f64(ref.jacobian_eigenvalues(np.eye(4)[1]), np.zeros(4), atol=1e-15)


@given(classes=st.integers(2, 12), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_eigenvalue_properties(classes, seed, scale):
    rng = np.random.default_rng(seed)
    p = ref.softmax(rng.normal(size=classes) * scale)
    values = ref.jacobian_eigenvalues(p)
    assert abs(values[0]) < 1e-14  # the zero mode along (1, ..., 1)
    assert_close_f64(values.sum(), 1 - np.sum(p**2), atol=1e-14)  # trace
    ordered = np.sort(p)
    # interlacing of a rank-one downdate: λ_1 <= p_(1) <= λ_2 <= ... <= λ_C <= p_(C)
    assert np.all(values <= ordered + 1e-14)
    assert np.all(values[1:] >= ordered[:-1] - 1e-14)


def test_eigenvalues_batch():
    p = ref.softmax(np.random.default_rng(0).normal(size=(3, 4)))
    values = ref.jacobian_eigenvalues(p)
    assert values.shape == (3, 4)
    assert_close_f64(values[1], ref.jacobian_eigenvalues(p[1]))


def test_gradient_norm_vs_scale_matches_autograd():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
    target = np.array([0, 2])
    scales = [0.0, 0.5, 1.0, 4.0, 50.0]
    norms = ref.gradient_norm_vs_scale(logits, target, scales)
    assert norms.shape == (5, 2)
    for row, s in enumerate(scales):
        z = torch.tensor(s * logits, requires_grad=True)
        (grad,) = torch.autograd.grad(F.cross_entropy(z, torch.tensor(target), reduction="sum"), z)
        assert_close_f64(norms[row], grad.norm(dim=1).numpy())


def test_gradient_norm_saturation_limits():
    logits = np.array([3.0, 1.0, 0.0])
    norms_right = ref.gradient_norm_vs_scale(logits, 0, [0.0, 1.0, 10.0, 1000.0])
    norms_wrong = ref.gradient_norm_vs_scale(logits, 2, [0.0, 1000.0])
    assert_close_f64(norms_right[0], np.sqrt((1 - 1 / 3) ** 2 + 2 / 9))  # uniform p at scale 0
    assert np.all(np.diff(norms_right) < 0) and norms_right[-1] < 1e-12
    assert_close_f64(norms_wrong[-1], np.sqrt(2.0))


@pytest.mark.parametrize("logits", [np.array([1.5, -0.5, 0.2, 0.0]), np.array([[1.0, 2.0, 0.0], [0.0, -3.0, 1.0]])])
def test_temperature_gradient_factor_matches_autograd(logits):
    target = np.array(1) if logits.ndim == 1 else np.array([1, 0])
    temperatures = [0.25, 1.0, 3.0]
    out = ref.temperature_gradient_factor(logits, target, temperatures)
    assert_close_f64(out["chain_factor"], 1 / np.array(temperatures))
    for row, t in enumerate(temperatures):
        x = torch.tensor(logits, requires_grad=True)
        loss = F.cross_entropy(x / t, torch.tensor(target), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        assert_close_f64(out["gradient_norm"][row], grad.norm(dim=-1).numpy())
        assert_close_f64(out["residual_norm"][row], (grad * t).norm(dim=-1).numpy())


def test_temperature_gradient_factor_validation():
    with pytest.raises(ValueError, match=r"`temperatures` must all be > 0"):
        ref.temperature_gradient_factor([1.0, 0.0], 0, [1.0, 0.0])
