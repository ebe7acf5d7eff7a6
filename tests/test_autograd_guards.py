"""Ops with a fused closed-form backward refuse a double backward instead of silently returning zeros."""

from __future__ import annotations

import pytest
import torch

import softmaxkit

MESSAGE = "once differentiable; for higher-order gradients"


def test_linear_cross_entropy_refuses_hessian():
    hidden = torch.randn(4, 3, dtype=torch.float64)
    weight = torch.randn(5, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.functional.hessian(lambda h: softmaxkit.linear_cross_entropy(h, weight, target), hidden)


def test_hierarchical_softmax_refuses_hessian():
    module = softmaxkit.nn.HierarchicalSoftmax(3, torch.tensor([5, 4, 3, 2, 1])).double()
    hidden = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.functional.hessian(lambda h: module(h, target), hidden)


def test_first_order_gradients_still_flow():
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64)
    loss = softmaxkit.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 4]))
    (grad,) = torch.autograd.grad(loss, hidden)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ weight.T, torch.tensor([0, 1, 2, 4])),
                                   hidden)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
