"""The comparison losses (hinge, MSE, one-vs-rest sigmoid) and top-k softmax against the float64 oracle,
PyTorch's own ops, gradcheck, validation and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f32, assert_close_f64

INDEX_LOSSES = {
    "multi_margin_loss": ({}, ref.multi_margin_loss, ref.multi_margin_loss_grad),
    "multi_margin_loss_p2": ({"p": 2, "margin": 0.5}, ref.multi_margin_loss, ref.multi_margin_loss_grad),
    "crammer_singer_loss": ({}, ref.crammer_singer_loss, ref.crammer_singer_loss_grad),
    "softmax_mse_loss": ({}, ref.softmax_mse_loss, ref.softmax_mse_loss_grad),
    "score_mse_loss": ({}, ref.score_mse_loss, ref.score_mse_loss_grad),
    "multilabel_soft_margin_loss": ({}, ref.multilabel_soft_margin_loss, ref.multilabel_soft_margin_loss_grad),
}
PROBABILITY_LOSSES = ("softmax_mse_loss", "score_mse_loss", "multilabel_soft_margin_loss")


def _function(name):
    return getattr(softmaxkit, name.removesuffix("_p2"))


def _data(shape, num_classes, scale=3.0, dtype=torch.float64, ignore=False):
    logits = (scale * torch.randn(*shape[:1], num_classes, *shape[1:], dtype=dtype)).requires_grad_(True)
    target = torch.randint(0, num_classes, shape)
    if ignore:
        target[::3] = -100
    return logits, target


def _oracle(name, logits, target, reduction, grad_output=None, **extra):
    kwargs, loss, grad = INDEX_LOSSES[name]
    arguments = dict(kwargs, **extra)
    x, y = logits.detach().numpy(), target.numpy()
    return (loss(x, y, reduction=reduction, **arguments),
            grad(x, y, reduction=reduction, grad_output=grad_output, **arguments))


# ------------------------------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("name", list(INDEX_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7,), (4, 3), ()])
def test_matches_oracle(name, reduction, shape):
    num_classes = 5
    if shape == ():
        logits = (3 * torch.randn(num_classes, dtype=torch.float64)).requires_grad_(True)
        target = torch.tensor(2)
    else:
        logits, target = _data(shape, num_classes, ignore=True)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5
    kwargs = INDEX_LOSSES[name][0]
    out = _function(name)(logits, target, weight=weight, reduction=reduction, **kwargs)
    expected, expected_grad = _oracle(name, logits, target, reduction, weight=weight.numpy())
    assert_close_f64(out, expected)
    upstream = torch.rand_like(out)
    (grad,) = torch.autograd.grad(out, logits, upstream)
    _, expected_grad = _oracle(name, logits, target, reduction, weight=weight.numpy(),
                               grad_output=upstream.numpy() if reduction == "none" else None)
    if reduction != "none":
        expected_grad = expected_grad * float(upstream)
    assert_close_f64(grad, expected_grad)


@pytest.mark.parametrize("name", PROBABILITY_LOSSES)
def test_probability_targets_match_oracle(name):
    logits = (2 * torch.randn(6, 4, 3, dtype=torch.float64)).requires_grad_(True)
    target = torch.softmax(torch.randn(6, 4, 3, dtype=torch.float64), dim=1)
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    out = _function(name)(logits, target, weight=weight, reduction="sum")
    loss, grad = INDEX_LOSSES[name][1:]
    assert_close_f64(out, loss(logits.detach().numpy(), target.numpy(), weight=weight.numpy(), reduction="sum"))
    out.backward()
    assert_close_f64(logits.grad, grad(logits.detach().numpy(), target.numpy(), weight=weight.numpy(),
                                       reduction="sum"))


@pytest.mark.parametrize("name", PROBABILITY_LOSSES)
def test_one_hot_probabilities_equal_class_indices(name):
    logits, target = _data((9,), 4)
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    function = _function(name)
    by_index = function(logits, target, weight=weight, reduction="none")
    by_onehot = function(logits, F.one_hot(target, 4).double(), weight=weight, reduction="none")
    assert_close_f64(by_index, by_onehot)


@given(
    rows=st.integers(1, 6), classes=st.integers(1, 7), scale=st.sampled_from([0.1, 1.0, 10.0, 1e3]),
    seed=st.integers(0, 2**16), name=st.sampled_from(list(INDEX_LOSSES)),
)
def test_property_against_oracle(rows, classes, scale, seed, name):
    generator = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(rows, classes, generator=generator, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, classes, (rows,), generator=generator)
    out = _function(name)(logits, target, reduction="sum", **INDEX_LOSSES[name][0])
    expected, expected_grad = _oracle(name, logits, target, "sum")
    assert_close_f64(out, expected, atol=1e-9)
    out.backward()
    assert_close_f64(logits.grad, expected_grad, atol=1e-9)


# ------------------------------------------------------------------------------------- PyTorch parity
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_margin_equals_pytorch(p, reduction, weighted):
    logits, target = _data((11,), 6)
    weight = torch.rand(6, dtype=torch.float64) + 0.2 if weighted else None
    ours = softmaxkit.multi_margin_loss(logits, target, p=p, margin=0.7, weight=weight, reduction=reduction)
    theirs = F.multi_margin_loss(logits, target, p=p, margin=0.7, weight=weight, reduction=reduction)
    assert_close_f64(ours, theirs)
    upstream = torch.rand_like(ours)
    assert_close_f64(torch.autograd.grad(ours, logits, upstream)[0], torch.autograd.grad(theirs, logits, upstream)[0])


def test_multi_margin_float32_and_unbatched_equal_pytorch():
    logits = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    assert_close_f32(softmaxkit.multi_margin_loss(logits, target), F.multi_margin_loss(logits, target))
    x, y = logits[0].detach(), target[0]
    assert_close_f32(softmaxkit.multi_margin_loss(x, y, reduction="none"), F.multi_margin_loss(x, y, reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_losses_equal_pytorch_mse(reduction):
    logits, target = _data((10,), 4)
    onehot = F.one_hot(target, 4).double()
    theirs = F.mse_loss(logits, onehot, reduction="none").mean(1)
    theirs_softmax = F.mse_loss(torch.softmax(logits, 1), onehot, reduction="none").mean(1)
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda x: x}[reduction]
    assert_close_f64(softmaxkit.score_mse_loss(logits, target, reduction=reduction), reduce(theirs))
    assert_close_f64(softmaxkit.softmax_mse_loss(logits, target, reduction=reduction), reduce(theirs_softmax))
    assert_close_f64(softmaxkit.score_mse_loss(logits, target), F.mse_loss(logits, onehot))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sigmoid_loss_equals_pytorch(reduction):
    logits = (4 * torch.randn(12, 5, dtype=torch.float64)).requires_grad_(True)
    multi_hot = (torch.rand(12, 5) < 0.4).double()
    weight = torch.rand(5, dtype=torch.float64) + 0.3
    ours = softmaxkit.multilabel_soft_margin_loss(logits, multi_hot, weight=weight, reduction=reduction)
    theirs = F.multilabel_soft_margin_loss(logits, multi_hot, weight=weight, reduction=reduction)
    assert_close_f64(ours, theirs)
    upstream = torch.rand_like(ours)
    assert_close_f64(torch.autograd.grad(ours, logits, upstream)[0], torch.autograd.grad(theirs, logits, upstream)[0])
    bce = F.binary_cross_entropy_with_logits(logits, multi_hot, reduction="none").mean(1)
    assert_close_f64(softmaxkit.multilabel_soft_margin_loss(logits, multi_hot, reduction="none"), bce)


# ------------------------------------------------------------------------------------- gradients, edges
@pytest.mark.parametrize("name", list(INDEX_LOSSES))
def test_gradcheck(name):
    # scores apart by more than the finite-difference step, so no hinge sits on a kink
    logits = torch.tensor([[0.3, -1.2, 2.1, 0.75], [1.7, 0.2, -0.45, 3.3], [-0.9, 0.1, 0.6, -2.2]],
                          dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2, 0, -100])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    kwargs = INDEX_LOSSES[name][0]
    function = _function(name)
    assert torch.autograd.gradcheck(lambda x: function(x, target, weight=weight, **kwargs), (logits,))
    assert torch.autograd.gradgradcheck(lambda x: function(x, target, reduction="sum", **kwargs), (logits,))


@pytest.mark.parametrize("name", PROBABILITY_LOSSES)
def test_gradcheck_probability_target(name):
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t: _function(name)(x, t), (logits, target))


@pytest.mark.parametrize("name", list(INDEX_LOSSES))
def test_all_ignored_mean_is_zero_with_zero_gradient(name):
    logits, _ = _data((4,), 3)
    target = torch.full((4,), -100)
    out = _function(name)(logits, target, **INDEX_LOSSES[name][0])
    out.backward()
    assert out.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", list(INDEX_LOSSES))
def test_ignore_index_equals_dropping_rows(name):
    logits, target = _data((9,), 4)
    target[[1, 4]] = 7
    kwargs = INDEX_LOSSES[name][0]
    kept = target != 7
    out = _function(name)(logits, target, ignore_index=7, **kwargs)
    assert_close_f64(out, _function(name)(logits[kept], target[kept], **kwargs))


@pytest.mark.parametrize("name", list(INDEX_LOSSES))
def test_large_logits_are_finite(name):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], requires_grad=True)
    out = _function(name)(logits, torch.tensor([1, 0]), **INDEX_LOSSES[name][0])
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all()


def test_low_precision_is_computed_in_float32():
    logits, target = _data((16,), 5, dtype=torch.float32)
    for name in INDEX_LOSSES:
        kwargs = INDEX_LOSSES[name][0]
        half = _function(name)(logits.detach().bfloat16(), target, **kwargs)
        assert half.dtype == torch.bfloat16
        full = _function(name)(logits.detach().bfloat16().float(), target, **kwargs)
        assert abs(float(half) - float(full)) <= 8e-3 * max(1.0, abs(float(full)))


def test_crammer_singer_ties_share_the_gradient():
    logits = torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    softmaxkit.crammer_singer_loss(logits, torch.tensor([2])).backward()
    assert logits.grad.tolist() == [[0.5, 0.5, -1.0]]
    np.testing.assert_array_equal(ref.crammer_singer_loss_grad(logits.detach().numpy(), [2]), [[0.5, 0.5, -1.0]])


def test_hinge_gradient_is_piecewise_constant_and_zero_past_the_margin():
    z = torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    softmaxkit.multi_margin_loss(z, torch.tensor([0])).backward()
    assert torch.all(z.grad == 0)  # margins met: no gradient, whatever the probabilities


def test_one_class_crammer_singer_is_zero():
    logits = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    out = softmaxkit.crammer_singer_loss(logits, torch.zeros(3, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0 and torch.all(logits.grad == 0)


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", list(INDEX_LOSSES))
def test_validation_names_the_argument(name):
    function, kwargs = _function(name), INDEX_LOSSES[name][0]
    logits = torch.randn(3, 4)
    with pytest.raises(TypeError, match="`logits`"):
        function(logits.long(), torch.tensor([0, 1, 2]), **kwargs)
    with pytest.raises(ValueError, match="`target`.*holds 4"):
        function(logits, torch.tensor([0, 1, 4]), **kwargs)
    with pytest.raises(ValueError, match="`reduction`"):
        function(logits, torch.tensor([0, 1, 2]), reduction="avg", **kwargs)
    with pytest.raises(ValueError, match="`weight`"):
        function(logits, torch.tensor([0, 1, 2]), weight=torch.ones(3), **kwargs)
    with pytest.raises(ValueError, match="`target` must have shape"):
        function(logits, torch.tensor([0, 1]), **kwargs)
    with pytest.raises(TypeError, match="`target`"):
        function(logits, [0, 1, 2], **kwargs)


def test_option_validation():
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="`p` must be 1 or 2"):
        softmaxkit.multi_margin_loss(logits, target, p=3)
    with pytest.raises(TypeError, match="`margin`"):
        softmaxkit.crammer_singer_loss(logits, target, margin="1")
    with pytest.raises(TypeError, match="`target` of multi_margin_loss"):
        softmaxkit.multi_margin_loss(logits, torch.rand(3, 4))
    with pytest.raises(ValueError, match="`target` of softmax_mse_loss"):
        softmaxkit.softmax_mse_loss(logits, torch.rand(3, 5))
    with pytest.raises(ValueError, match="`ignore_index`"):
        softmaxkit.score_mse_loss(logits, torch.rand(3, 4), ignore_index=0)


# ------------------------------------------------------------------------------------- modules
def test_modules_call_the_functions():
    logits, target = _data((5,), 4)
    weight = torch.rand(4, dtype=torch.float64)
    pairs = [
        (softmaxkit.nn.MultiMarginLoss(p=2, margin=0.5, weight=weight), softmaxkit.multi_margin_loss,
         {"p": 2, "margin": 0.5, "weight": weight}),
        (softmaxkit.nn.CrammerSingerLoss(reduction="sum"), softmaxkit.crammer_singer_loss, {"reduction": "sum"}),
        (softmaxkit.nn.SoftmaxMSELoss(), softmaxkit.softmax_mse_loss, {}),
        (softmaxkit.nn.ScoreMSELoss(ignore_index=1), softmaxkit.score_mse_loss, {"ignore_index": 1}),
        (softmaxkit.nn.MultilabelSoftMarginLoss(reduction="none"), softmaxkit.multilabel_soft_margin_loss,
         {"reduction": "none"}),
    ]
    for module, function, kwargs in pairs:
        assert_close_f64(module(logits, target), function(logits, target, **kwargs))
        assert repr(module)
    with pytest.raises(ValueError, match="`reduction`"):
        softmaxkit.nn.SoftmaxMSELoss(reduction="bad")


# ------------------------------------------------------------------------------------- torch.compile
def test_compile_without_graph_breaks():
    import torch._dynamo

    logits, target = torch.randn(6, 5), torch.randint(0, 5, (6,))

    def everything(x, y):
        total = softmaxkit.multi_margin_loss(x, y) + softmaxkit.crammer_singer_loss(x, y)
        total = total + softmaxkit.softmax_mse_loss(x, y) + softmaxkit.score_mse_loss(x, y)
        total = total + softmaxkit.multilabel_soft_margin_loss(x, y)
        return total + softmaxkit.topk_softmax(x, 2).sum()

    explanation = torch._dynamo.explain(everything)(logits, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons
