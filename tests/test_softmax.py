"""softmax, log_softmax, logsumexp and nn.Softmax: parity with PyTorch and the oracle, dims, extremes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64, assert_within_budget, to_numpy

FUNCTIONS = [
    (softmaxkit.softmax, torch.softmax, ref.softmax),
    (softmaxkit.log_softmax, torch.log_softmax, ref.log_softmax),
]


@pytest.mark.parametrize(("ours", "theirs", "oracle"), FUNCTIONS, ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(7,), (1, 1), (3, 5), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_matches_torch_and_oracle_on_every_dim(ours, theirs, oracle, shape, temperature):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for dim in range(-len(shape), len(shape)):
        out = ours(x, dim, temperature=temperature)
        assert_close_f64(out, theirs(x / temperature, dim))
        assert_close_f64(out, oracle(to_numpy(x), axis=dim, temperature=temperature))
        upstream = torch.randn_like(out)
        (g_ours,) = torch.autograd.grad(out, x, upstream)
        (g_theirs,) = torch.autograd.grad(theirs(x / temperature, dim), x, upstream)
        assert_close_f64(g_ours, g_theirs)


@given(st.integers(1, 4), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_any_dim_equals_moving_it_last(ndim, dim_seed, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in torch.randint(1, 5, (ndim,), generator=generator))
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    dim = dim_seed % ndim
    moved = softmaxkit.softmax(x.movedim(dim, -1), -1).movedim(-1, dim)
    assert_close_f64(softmaxkit.softmax(x, dim), moved)


def test_softmax_jacobian_through_autograd_equals_reference():
    x = torch.tensor([2.0, 1.0, 0.1], dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: softmaxkit.softmax(v), x)
    assert_close_f64(jacobian, ref.softmax_jacobian(ref.softmax(to_numpy(x))))


def test_gradcheck():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: softmaxkit.softmax(v, 0, temperature=0.7), (x,))
    assert torch.autograd.gradcheck(lambda v: softmaxkit.log_softmax(v, 1, temperature=2.0), (x,))
    assert torch.autograd.gradcheck(lambda v: softmaxkit.logsumexp(v, 1), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_extreme_logits_and_masks(dtype):
    big = 3e4 if dtype == torch.float16 else 1e4
    x = torch.tensor([[big, -big, 0.0], [-float("inf"), 1.0, -float("inf")], [big, big, -big]], dtype=dtype)
    p = softmaxkit.softmax(x)
    assert torch.isfinite(p).all()
    np.testing.assert_allclose(to_numpy(p), ref.softmax(to_numpy(x)), atol=1e-3)
    log_p = softmaxkit.log_softmax(x)
    assert not torch.isnan(log_p).any()
    assert log_p[1, 0] == -float("inf") and log_p[1, 1] == 0
    lse = softmaxkit.logsumexp(x.to(torch.float32))
    np.testing.assert_allclose(to_numpy(lse), ref.logsumexp(to_numpy(x)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_low_precision_error_budget(dtype, temperature):
    x = (torch.randn(16, 200) * 3).to(dtype)
    expected = ref.softmax(to_numpy(x), temperature=temperature)
    ours = softmaxkit.softmax(x, temperature=temperature)
    assert ours.dtype == dtype
    theirs = torch.softmax(x / temperature, -1)  # PyTorch divides in the input dtype first
    eps = torch.finfo(dtype).eps
    assert_within_budget(ours, theirs, expected, tol=eps * (np.abs(expected) + 1e-6))


def test_dtype_argument_matches_torch():
    x = torch.randn(4, 6, dtype=torch.float32)
    out = softmaxkit.softmax(x, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert_close_f64(out, torch.softmax(x, -1, dtype=torch.float64))
    out = softmaxkit.log_softmax(x, temperature=2.0, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert_close_f64(out, torch.log_softmax(x.double() / 2.0, -1))


def test_logsumexp_keepdim_and_dims():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for dim in (-3, -1, 0, 1, 2):
        assert_close_f64(softmaxkit.logsumexp(x, dim), torch.logsumexp(x, dim))
        assert softmaxkit.logsumexp(x, dim, keepdim=True).shape == torch.logsumexp(x, dim, keepdim=True).shape
    assert softmaxkit.logsumexp(torch.tensor([1e4, 1e4])).item() == pytest.approx(1e4 + np.log(2))


def test_module_equals_function():
    x = torch.randn(3, 5)
    module = softmaxkit.nn.Softmax(0, temperature=2.0)
    assert torch.equal(module(x), softmaxkit.softmax(x, 0, temperature=2.0))
    assert "temperature=2.0" in repr(module)


def test_validation_messages():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`dim` must lie in \[-2, 1\] for a 2-d input, but got 2"):
        softmaxkit.softmax(x, 2)
    with pytest.raises(TypeError, match="`dim` must be an int, but got float"):
        softmaxkit.log_softmax(x, 1.0)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, but got 0.0"):
        softmaxkit.softmax(x, temperature=0.0)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, but got inf"):
        softmaxkit.softmax(x, temperature=float("inf"))
    with pytest.raises(TypeError, match="`x` must have a floating-point dtype, but has dtype torch.int64"):
        softmaxkit.softmax(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor, but got list"):
        softmaxkit.logsumexp([1.0, 2.0])
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, but got -1.0"):
        softmaxkit.nn.Softmax(temperature=-1)
