"""Non-finite logits through the compiled CPU cross-entropy kernel follow ``F.cross_entropy``.

PyTorch's semantics are the anchor: a row holding +inf or NaN has a NaN loss and NaN gradients (``+inf − inf``
inside the shifted exponent), a row of only −inf has a NaN loss, a target on a −inf class gives +inf, and
finite rows next to them are unaffected. Checked in every dtype the kernel has, with the options that enter
the row statistics (label smoothing, z-loss, class weights, temperature), through ``cross_entropy`` and the
composed ``poly1_cross_entropy``. Finite entries are compared with PyTorch at the dtype's tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softmaxkit
from softmaxkit.backends.cpu import _build
from softmaxkit.backends.cpu import cross_entropy as cpu_ce

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
pytestmark = pytest.mark.skipif(not all(cpu_ce.available(d) for d in DTYPES),
                                reason=f"no CPU kernel: {_build.failure_reason}")
INF, NAN = float("inf"), float("nan")
LOGITS = [[1.0, INF, 0.0], [INF, 2.0, 3.0], [INF, INF, 0.0], [-INF, -INF, -INF], [1.0, NAN, 2.0],
          [NAN, NAN, NAN], [1.0, 2.0, -INF], [-INF, 2.0, 3.0], [0.5, -1.0, 2.0], [-INF, INF, 1.0]]
TARGET = [0, 0, 2, 1, 0, 1, 2, 1, 2, 1]
OPTIONS = [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"weight": [0.5, 2.0, 1.0]}, {"temperature": 0.5},
           {"label_smoothing": 0.2, "z_loss": 1e-3, "weight": [1.0, 0.3, 2.0]}]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _torch_loss(x, target, reduction, weight=None, label_smoothing=0.0, z_loss=0.0, temperature=1.0):
    z = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x) / temperature
    if not z_loss:
        return F.cross_entropy(z, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss = F.cross_entropy(z, target, weight=weight, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.logsumexp(z, 1) ** 2
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (weight[target].sum() if weight is not None else len(target))


def _assert_same(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)
    assert torch.equal(torch.isposinf(actual), torch.isposinf(expected)), (actual, expected)
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), (actual, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_finite_rows_follow_pytorch(dtype, options, reduction):
    options = dict(options)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if "weight" in options:
        options["weight"] = torch.tensor(options["weight"], dtype=work)
    target = torch.tensor(TARGET)
    results = []
    for function in (
        lambda x: softmaxkit.cross_entropy(x, target, reduction=reduction, impl="cpu", **options),
        lambda x: _torch_loss(x, target, reduction, **options),
    ):
        x = torch.tensor(LOGITS, dtype=dtype, requires_grad=True)
        loss = function(x)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (expected_loss, expected_grad) = results
    _assert_same(loss, expected_loss, TOL[dtype])
    if reduction == "none":  # reduced losses put every row's NaN into every gradient
        _assert_same(grad, expected_grad, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_reported_case_and_poly1(dtype):
    x = torch.tensor([[1.0, INF, 0.0], [INF, 2.0, 3.0], [INF, INF, 0.0], [1.0, 2.0, 3.0]], dtype=dtype)
    target = torch.tensor([0, 0, 2, 1])
    for function in (softmaxkit.cross_entropy, softmaxkit.poly1_cross_entropy):
        logits = x.clone().requires_grad_()
        loss = function(logits, target, reduction="none")
        loss.sum().backward()
        assert torch.isnan(loss[:3]).all() and torch.isfinite(loss[3])
        assert torch.isnan(logits.grad[:3]).all() and torch.isfinite(logits.grad[3]).all()
        assert torch.isnan(function(x, target))  # the mean is NaN, never −inf


def test_softcap_makes_plus_inf_finite_like_pytorch():
    x = torch.tensor([[1.0, INF, 0.0], [INF, 2.0, 3.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    loss = softmaxkit.cross_entropy(x, target, softcap=5.0, reduction="none", impl="cpu")
    torch.testing.assert_close(loss, F.cross_entropy(5 * torch.tanh(x / 5), target, reduction="none"))
