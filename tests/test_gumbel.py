"""softmaxkit.gumbel_softmax: the float64 oracle given the same noise, reproducibility, the Gumbel-max
distribution, straight-through gradients, safe noise, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import softmaxkit
from softmaxkit import reference as ref
from softmaxkit.functional.gumbel import gumbel_noise

from ._helpers import assert_close_f64, to_numpy


def _generator(seed=1234):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("shape", "dim"), [((5,), 0), ((4, 6), -1), ((4, 6), 0), ((2, 3, 5), 1)], ids=str)
@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_matches_oracle_given_the_noise(shape, dim, tau):
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ours = softmaxkit.gumbel_softmax(logits, tau=tau, dim=dim, generator=_generator())
    noise = gumbel_noise(logits.shape, torch.float64, logits.device, _generator())
    assert_close_f64(ours, ref.gumbel_softmax(to_numpy(logits), to_numpy(noise), tau, axis=dim))
    assert_close_f64(ours.sum(dim), np.ones(ours.sum(dim).shape))
    # Gradient: the softmax Jacobian at y, scaled by 1/τ.
    upstream = torch.randn_like(ours)
    (grad,) = torch.autograd.grad(ours, logits, upstream)
    y = np.moveaxis(to_numpy(ours), dim, -1)
    expected = np.einsum("...ij,...j->...i", ref.softmax_jacobian(y), np.moveaxis(to_numpy(upstream), dim, -1)) / tau
    assert_close_f64(grad, np.moveaxis(expected, -1, dim))


def test_noise_is_standard_gumbel():
    noise = gumbel_noise((200_000,), torch.float64, torch.device("cpu"), _generator()).numpy()
    # Kolmogorov-Smirnov against the standard Gumbel; with 2e5 samples a p-value < 1e-3 would flag a real
    # bias (the seed is fixed, so the test is deterministic).
    assert stats.kstest(noise, "gumbel_r").pvalue > 1e-3
    assert_close_f64(noise.mean(), np.euler_gamma, rtol=1e-2)


def test_noise_is_finite_at_the_ends_of_the_uniform(monkeypatch):
    real_rand = torch.rand

    def extreme_rand(shape, generator=None, dtype=None, device=None):
        out = real_rand(shape, generator=generator, dtype=dtype, device=device)
        out.view(-1)[0] = 0.0  # torch.rand may return exactly 0
        out.view(-1)[1] = 1.0  # and, guarded anyway, 1
        return out

    monkeypatch.setattr(torch, "rand", extreme_rand)
    for dtype in (torch.float32, torch.float64):
        noise = gumbel_noise((4,), dtype, torch.device("cpu"), None)
        assert torch.isfinite(noise).all()
    sample = softmaxkit.gumbel_softmax(torch.zeros(4), tau=0.01)
    assert torch.isfinite(sample).all()


def test_reproducible_with_a_generator():
    logits = torch.randn(3, 7)
    a = softmaxkit.gumbel_softmax(logits, generator=_generator(7))
    b = softmaxkit.gumbel_softmax(logits, generator=_generator(7))
    c = softmaxkit.gumbel_softmax(logits, generator=_generator(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hard_samples_follow_softmax():
    # Gumbel-max: argmax(x + g) ~ softmax(x). Chi-square over 40000 draws; p < 1e-3 would flag a real bias.
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -torch.inf], dtype=torch.float64)
    draws = 40_000
    samples = softmaxkit.gumbel_softmax(logits.expand(draws, 5), hard=True, tau=0.5, generator=_generator())
    counts = samples.sum(0).numpy()
    assert counts[4] == 0  # a masked class is never drawn
    expected = torch.softmax(logits, 0).numpy()[:4] * draws
    assert stats.chisquare(counts[:4], expected).pvalue > 1e-3


def test_hard_is_one_hot_with_the_soft_gradient():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    hard = softmaxkit.gumbel_softmax(logits, tau=0.7, hard=True, generator=_generator())
    soft = softmaxkit.gumbel_softmax(logits, tau=0.7, hard=False, generator=_generator())
    assert torch.all((hard == 0) | (hard == 1)) and torch.all(hard.sum(-1) == 1)
    assert torch.equal(hard.argmax(-1), soft.argmax(-1))
    upstream = torch.randn(6, 5, dtype=torch.float64)
    (g_hard,) = torch.autograd.grad(hard, logits, upstream)
    (g_soft,) = torch.autograd.grad(soft, logits, upstream)
    assert_close_f64(g_hard, g_soft)


def test_small_tau_approaches_one_hot_and_extremes_are_finite():
    logits = torch.randn(4, 6, dtype=torch.float64)
    soft = softmaxkit.gumbel_softmax(logits, tau=1e-3, generator=_generator())
    hard = softmaxkit.gumbel_softmax(logits, tau=1e-3, hard=True, generator=_generator())
    assert float((soft - hard).abs().max()) < 1e-6
    big = torch.randn(4, 6) * 1e4
    big.requires_grad_()
    out = softmaxkit.gumbel_softmax(big, tau=0.1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    logits = torch.randn(8, 10).to(dtype)
    out = softmaxkit.gumbel_softmax(logits, generator=_generator())
    # noise and normalisation in fp32, one rounding to the dtype: equals the fp32 result rounded.
    reference32 = softmaxkit.gumbel_softmax(logits.float(), generator=_generator())
    assert out.dtype == dtype and torch.equal(out, reference32.to(dtype))
    hard = softmaxkit.gumbel_softmax(logits, hard=True, generator=_generator())
    assert torch.all(hard.sum(-1) == 1)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(tau=0.0), ValueError, r"`tau` must be a finite number > 0, but got 0.0"),
    (dict(hard=1), TypeError, r"`hard` must be a bool, but got int"),
    (dict(dim=2), ValueError, r"`dim` must lie in \[-2, 1\] for a 2-d input, but got 2"),
    (dict(generator=0), TypeError, r"`generator` must be a torch.Generator or None, but got int"),
])
def test_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        softmaxkit.gumbel_softmax(torch.randn(2, 3), **kwargs)
