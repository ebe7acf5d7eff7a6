"""topk_softmax against the float64 oracle: values, gradients, ties, dims, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_oracle_values_and_vjp(dim, k):
    x = torch.randn(5, 6, 5, dtype=torch.float64, requires_grad=True)
    out = softmaxkit.topk_softmax(x, k, dim)
    assert_close_f64(out, ref.topk_softmax(x.detach().numpy(), k, axis=dim))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert_close_f64(grad, ref.topk_softmax_vjp(x.detach().numpy(), k, upstream.numpy(), axis=dim))
    nonzero = (out != 0).sum(dim)
    assert torch.all(nonzero <= k)
    assert_close_f64(out.sum(dim), torch.ones_like(out.sum(dim)))


def test_exact_zeros_and_k_equal_c_is_softmax():
    x = torch.randn(4, 6, dtype=torch.float64)
    out = softmaxkit.topk_softmax(x, 3)
    assert int((out == 0).sum()) == 4 * 3
    assert_close_f64(softmaxkit.topk_softmax(x, 6), torch.softmax(x, -1))


def test_ties_are_broken_towards_the_lower_index():
    x = torch.tensor([[1.0, 3.0, 1.0, 1.0, 3.0]])
    out = softmaxkit.topk_softmax(x, 3)
    assert (out[0] != 0).tolist() == [True, True, False, False, True]
    np.testing.assert_array_equal(ref.topk_mask(x.numpy(), 3), (out != 0).numpy())
    all_equal = softmaxkit.topk_softmax(torch.zeros(2, 4), 2)
    assert all_equal.tolist() == [[0.5, 0.5, 0.0, 0.0]] * 2


@given(rows=st.integers(1, 5), classes=st.integers(1, 9), data=st.data(), ties=st.booleans())
def test_property_against_oracle(rows, classes, data, ties):
    k = data.draw(st.integers(1, classes))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=generator, dtype=torch.float64)
    if ties:
        x = x.round()  # many equal values
    x.requires_grad_(True)
    out = softmaxkit.topk_softmax(x, k)
    assert_close_f64(out, ref.topk_softmax(x.detach().numpy(), k))
    out.pow(2).sum().backward()
    q = out.detach().numpy()
    assert_close_f64(x.grad, ref.topk_softmax_vjp(x.detach().numpy(), k, 2 * q))


def test_gradcheck_and_large_values():
    x = torch.tensor([[0.3, -1.2, 2.1, 0.7], [1.7, 0.2, -0.4, 3.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmaxkit.topk_softmax(t, 2), (x,))
    big = softmaxkit.topk_softmax(torch.tensor([1e4, -1e4, 5e3]), 2)
    assert torch.isfinite(big).all() and big.tolist() == [1.0, 0.0, 0.0]


def test_low_precision_and_minus_inf():
    x = torch.tensor([[2.0, -torch.inf, 1.0, 0.5]], dtype=torch.bfloat16)
    out = softmaxkit.topk_softmax(x, 2)
    assert out.dtype == torch.bfloat16 and out[0, 1] == 0 and out[0, 3] == 0
    assert softmaxkit.topk_softmax(torch.tensor([0.0, -torch.inf]), 2).tolist() == [1.0, 0.0]


def test_module_and_validation():
    x = torch.randn(3, 4)
    assert torch.equal(softmaxkit.nn.TopKSoftmax(2)(x), softmaxkit.topk_softmax(x, 2))
    assert "k=2" in repr(softmaxkit.nn.TopKSoftmax(2))
    with pytest.raises(ValueError, match="`k` must lie in \\[1, 4\\]"):
        softmaxkit.topk_softmax(x, 5)
    with pytest.raises(ValueError, match="`k`"):
        softmaxkit.topk_softmax(x, 0)
    with pytest.raises(TypeError, match="`k`"):
        softmaxkit.topk_softmax(x, 2.0)
    with pytest.raises(TypeError, match="`x`"):
        softmaxkit.topk_softmax(x.long(), 2)
    with pytest.raises(ValueError, match="`dim`"):
        softmaxkit.topk_softmax(x, 2, dim=2)
    with pytest.raises(ValueError, match="`k`"):
        softmaxkit.nn.TopKSoftmax(0)
