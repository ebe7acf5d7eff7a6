"""AdaptiveSoftmax: state dicts both ways with torch.nn.AdaptiveLogSoftmaxWithLoss, equal outputs, losses,
gradients, log_prob and predict; the float64 oracle; the pruned predict; bad input.

Tolerances: float64 1e-10 relative (``_helpers``); float32 against PyTorch 1e-5 / 1e-6 (``F32_*``): both
compute the same matmuls, only the loss's log-softmax is fused differently.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softmaxkit.nn import AdaptiveSoftmax
from softmaxkit.reference.adaptive import adaptive_log_prob, adaptive_softmax_loss

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget, to_numpy

CONFIGS = [
    dict(in_features=16, n_classes=200, cutoffs=[10, 50, 120], div_value=2.0, head_bias=True),
    dict(in_features=9, n_classes=31, cutoffs=[1], div_value=4.0, head_bias=False),
    dict(in_features=12, n_classes=57, cutoffs=[5, 6, 40], div_value=1.5, head_bias=False),
]


def _pair(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(**config).to(dtype)
    ours = AdaptiveSoftmax(**config).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _oracle_parameters(module):
    tail = [(to_numpy(p.weight), to_numpy(o.weight)) for p, o in module.tail]
    bias = None if module.head.bias is None else to_numpy(module.head.bias)
    return to_numpy(module.head.weight), bias, tail, module.cutoffs[:-1]


@pytest.mark.parametrize("config", CONFIGS, ids=["3-clusters+bias", "1-cluster", "tiny-cluster"])
def test_state_dict_loads_both_ways_with_the_same_keys_and_shapes(config):
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(**config)
    ours = AdaptiveSoftmax(**config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(AdaptiveSoftmax(**config).state_dict())
    for name in ("in_features", "n_classes", "cutoffs", "div_value", "head_bias", "shortlist_size", "n_clusters",
                 "head_size"):
        assert getattr(ours, name) == getattr(theirs, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=["3-clusters+bias", "1-cluster", "tiny-cluster"])
def test_forward_log_prob_predict_and_gradients_equal_pytorch(config, dtype):
    ours, theirs = _pair(config, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, config["in_features"], generator=g, dtype=dtype) * 2
    y = torch.randint(0, config["n_classes"], (40,), generator=g)
    check = assert_close_f64 if dtype == torch.float64 else assert_close_f32
    out_ours, out_theirs = ours(x, y), theirs(x, y)
    check(out_ours.output, out_theirs.output)
    check(out_ours.loss, out_theirs.loss)
    # clusters no target falls in are unused by both (their gradient is None in both)
    grads_ours = torch.autograd.grad(out_ours.loss, list(ours.parameters()), allow_unused=True)
    grads_theirs = torch.autograd.grad(out_theirs.loss, list(theirs.parameters()), allow_unused=True)
    for a, b in zip(grads_ours, grads_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            check(a, b)
    check(ours.log_prob(x), theirs.log_prob(x))
    assert torch.equal(ours.predict(x), theirs.predict(x))


def test_matches_float64_oracle_and_rows_normalise():
    config = CONFIGS[0]
    ours, _ = _pair(config)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(25, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 200, (25,), generator=g)
    params = _oracle_parameters(ours)
    expected_output, expected_loss = adaptive_softmax_loss(to_numpy(x), to_numpy(y), *params)
    result = ours(x, y)
    assert_close_f64(result.output, expected_output)
    assert_close_f64(result.loss, expected_loss)
    log_p = ours.log_prob(x)
    assert_close_f64(log_p, adaptive_log_prob(to_numpy(x), *params))
    assert_close_f64(torch.logsumexp(log_p, dim=1), torch.zeros(25, dtype=torch.float64), atol=1e-13)


def test_gradcheck_float64():
    ours, _ = _pair(CONFIGS[2])
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, 7, 39, 40, 56])  # shortlist, the one-class cluster, and both other clusters
    # no custom backward here (the cross-entropy's own is gradchecked in its tests): a random projection
    # of the Jacobian (fast_mode) checks the composition; the loss is −mean(output)
    assert torch.autograd.gradcheck(lambda h: ours(h, y).output, (x,), fast_mode=True)


def test_unbatched_input_and_empty_batch():
    ours, theirs = _pair(CONFIGS[0])
    x, y = torch.randn(16, dtype=torch.float64), torch.tensor(77)
    assert_close_f64(ours(x, y).output, theirs(x, y).output)
    assert ours(x, y).output.shape == ()
    assert ours.predict(x).shape == () and ours.log_prob(x).shape == (200,)
    empty = ours(torch.randn(0, 16, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    assert empty.output.shape == (0,) and empty.loss.item() == 0.0  # PyTorch gives NaN here


def test_predict_skips_clusters_a_row_cannot_need(monkeypatch):
    """With a confident head, rows whose best shortlist class beats every cluster's total probability never
    evaluate a tail; the answer is still the argmax of log_prob."""
    ours, _ = _pair(CONFIGS[0])
    with torch.no_grad():
        ours.head.weight[:10] *= 8  # shortlist logits dominate for most rows
    calls = []
    for cluster in ours.tail:
        cluster.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(64, 16, dtype=torch.float64)
    predicted = ours.predict(x)
    evaluated = sum(calls)
    calls.clear()
    log_p = ours.log_prob(x)
    assert sum(calls) == 3 * 64  # log_prob evaluates every cluster for every row
    assert torch.equal(predicted, log_p.argmax(dim=1))
    assert evaluated < 0.5 * 3 * 64


_PAIRS: dict[int, tuple] = {}


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_property_predict_equals_argmax_of_log_prob(seed, rows, scale):
    if seed % 3 not in _PAIRS:  # three parameter sets, built once
        _PAIRS[seed % 3] = _pair(CONFIGS[2], seed=seed % 3)[0]
    ours = _PAIRS[seed % 3]
    x = torch.randn(rows, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    assert torch.equal(ours.predict(x), ours.log_prob(x).argmax(dim=1))  # PyTorch parity: the test above


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_error_budget(dtype):
    """|ours − oracle| ≤ |PyTorch's module in ``dtype`` − oracle| + 4 ulp at the loss's size."""
    ours, theirs = _pair(CONFIGS[0], dtype=torch.float64)
    x = torch.randn(32, 16, dtype=torch.float64)
    y = torch.randint(0, 200, (32,))
    oracle = ours(x, y)
    ours_low, theirs_low = ours.to(dtype), theirs.to(dtype)
    x_low = x.to(dtype)
    mine, peer = ours_low(x_low, y), theirs_low(x_low, y)
    tol = 4 * torch.finfo(dtype).eps
    assert_within_budget(mine.loss, peer.loss, oracle.loss, tol=tol * abs(oracle.loss.item()))
    assert_within_budget(mine.output, peer.output, oracle.output, tol=tol * oracle.output.abs().max().item())


def test_extreme_inputs_stay_finite():
    ours, _ = _pair(CONFIGS[0], dtype=torch.float32)
    x = (torch.randn(8, 16) * 1e3).requires_grad_()
    y = torch.tensor([0, 9, 10, 49, 50, 119, 120, 199])
    out = ours(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: AdaptiveSoftmax(8, 10, [5, 3]), ValueError, "`cutoffs` must be unique ints sorted"),
        (lambda: AdaptiveSoftmax(8, 10, [10]), ValueError, "[1, n_classes - 1] = [1, 9]"),
        (lambda: AdaptiveSoftmax(8, 10, []), ValueError, "`cutoffs` must be a non-empty sequence"),
        (lambda: AdaptiveSoftmax(8, 10, [2, 2]), ValueError, "`cutoffs` must be unique"),
        (lambda: AdaptiveSoftmax(0, 10, [2]), ValueError, "`in_features` must be an int >= 1"),
        (lambda: AdaptiveSoftmax(8, 10, [2])(torch.randn(3, 7), torch.zeros(3, dtype=torch.long)), ValueError,
         "`input` must have shape (N, 8)"),
        (lambda: AdaptiveSoftmax(8, 10, [2])(torch.randn(3, 8), torch.tensor([0, 10, 1])), ValueError,
         "holds 10 at position 1"),
        (lambda: AdaptiveSoftmax(8, 10, [2])(torch.randn(3, 8), torch.tensor([0, 1])), ValueError,
         "`target` must have shape (3,)"),
        (lambda: AdaptiveSoftmax(8, 10, [2])(torch.randn(3, 8), torch.zeros(3)), TypeError, "integer dtype"),
    ],
)
def test_bad_input_raises_clear_errors(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_docstring_examples_run():
    import doctest

    import softmaxkit.adaptive as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
