"""Cross-entropy family at extreme magnitudes, on every path: shift invariance, constant rows, huge smoothed
rows, ignored non-finite rows, overflow to ±inf, in-place backward on overlapping logits, option types.

The exact answers are derived by hand (shift invariance: the loss of ``z + c`` is the loss of ``z``; a constant
row gives ``log C`` and ``p = 1/C``), so these tests do not depend on an oracle that could share the bug.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import softmaxkit

#: every cross-entropy path; the Triton kernels run interpreted on CPU tensors (TRITON_INTERPRET=1, conftest)
CE_IMPLS = ["auto", "cpu", "torch", "composite"] + (["triton"] if importlib.util.find_spec("triton") else [])
LINEAR_IMPLS = ["auto", "torch", "composite"] + (["triton", "triton_fused"] if "triton" in CE_IMPLS else [])


def _loss_grad(function, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = function(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("shift", [1e4, 1e8, 1e30])
def test_shift_invariance(impl, shift, dtype):
    torch.manual_seed(0)
    base = torch.randn(16, 50, dtype=torch.float64)
    target = torch.randint(0, 50, (16,))
    expected_loss, expected_grad = _loss_grad(F.cross_entropy, base, target, reduction="none")
    shifted = (base + shift).to(dtype)
    # the shifted logits as rounded in `dtype`: their exact loss is that of (shifted − shift) in float64
    exact_loss, exact_grad = _loss_grad(F.cross_entropy, shifted.double() - shift, target, reduction="none")
    loss, grad = _loss_grad(softmaxkit.cross_entropy, shifted, target, impl=impl, reduction="none")
    peer_loss, peer_grad = _loss_grad(F.cross_entropy, shifted, target, reduction="none")
    eps = torch.finfo(dtype).eps
    # within a small constant × PyTorch's own error (plus a few ulps of the result)
    loss_budget = 4 * (peer_loss.double() - exact_loss).abs().max() + 64 * eps * exact_loss.abs().max()
    grad_budget = 4 * (peer_grad.double() - exact_grad).abs().max() + 64 * eps
    assert (loss.double() - exact_loss).abs().max() <= loss_budget
    assert (grad.double() - exact_grad).abs().max() <= grad_budget
    del expected_loss, expected_grad


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("shift", [1e4, 1e7])
def test_linear_cross_entropy_fp32_shift_invariance(impl, shift):
    """Issue 14, case 2 for linear CE (26× PyTorch's error at a shift of 1e7 when formed as LSE − z_y): fp32
    logits ``h Wᵀ + b`` with ``h = I`` (so every path computes the same logits, ``fl(W + b)``, exactly), against
    the float64 loss of those logits; within a small constant × PyTorch's own error."""
    torch.manual_seed(0)
    num_rows, num_classes = 16, 50
    base = torch.randn(num_rows, num_classes, dtype=torch.float64)
    target = torch.randint(0, num_classes, (num_rows,))
    weight = base.t().float().contiguous().requires_grad_()  # (C, D = N)
    bias = torch.full((num_classes,), shift)
    hidden = torch.eye(num_rows)
    logits = (weight.detach().t() + bias).contiguous()  # fl(W + b): what h·Wᵀ + b is on every path
    exact_loss, exact_grad = _loss_grad(F.cross_entropy, logits.double(), target, reduction="none")
    peer_loss, peer_grad = _loss_grad(F.cross_entropy, logits, target, reduction="none")
    loss = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl=impl, reduction="none")
    (grad_weight,) = torch.autograd.grad(loss.sum(), weight)
    eps = torch.finfo(torch.float32).eps
    loss_budget = 4 * (peer_loss.double() - exact_loss).abs().max() + 64 * eps * exact_loss.abs().max()
    grad_budget = 4 * (peer_grad.double() - exact_grad).abs().max() + 64 * eps
    assert (loss.detach().double() - exact_loss).abs().max() <= loss_budget
    assert (grad_weight.t().double() - exact_grad).abs().max() <= grad_budget


@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("shift", [1e4, 1e8])
def test_shift_invariance_with_temperature_and_poly1(impl, shift):
    """Issue 14, case 2 reaches temperature and poly1_cross_entropy: fp32 logits + c, T = 0.7, against the
    float64 loss of the same fp32 logits; within a small constant × PyTorch's own error."""
    torch.manual_seed(1)
    target = torch.randint(0, 40, (12,))
    logits = (torch.randn(12, 40, dtype=torch.float64) + shift).float()
    eps = torch.finfo(torch.float32).eps

    def peer(x, temperature=0.7, poly=False):
        z = x / temperature
        loss = F.cross_entropy(z, target, reduction="none")
        return loss + (1 - torch.exp(-loss)) if poly else loss

    for poly in (False, True):
        if poly:
            ours = lambda x: softmaxkit.poly1_cross_entropy(x, target, temperature=0.7, reduction="none")  # noqa: E731
        else:
            ours = lambda x: softmaxkit.cross_entropy(x, target, temperature=0.7, impl=impl,  # noqa: E731
                                                      reduction="none")
        exact_loss, exact_grad = _loss_grad(lambda x, poly=poly: peer(x, poly=poly), logits.double())
        peer_loss, peer_grad = _loss_grad(lambda x, poly=poly: peer(x, poly=poly), logits)
        loss, grad = _loss_grad(ours, logits)
        loss_budget = 4 * (peer_loss.double() - exact_loss).abs().max() + 64 * eps * exact_loss.abs().max()
        grad_budget = 4 * (peer_grad.double() - exact_grad).abs().max() + 64 * eps
        assert (loss.double() - exact_loss).abs().max() <= loss_budget, poly
        assert (grad.double() - exact_grad).abs().max() <= grad_budget, poly


@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("value", [0.0, 1e30, -1e30, 3e38])
def test_constant_rows_give_log_c(impl, value):
    logits = torch.full((3, 7), value)
    target = torch.tensor([0, 3, 6])
    loss, grad = _loss_grad(softmaxkit.cross_entropy, logits, target, impl=impl, reduction="none")
    torch.testing.assert_close(loss, torch.full((3,), math.log(7)))
    expected = torch.full((3, 7), 1 / 7) - F.one_hot(target, 7)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("impl", CE_IMPLS)
def test_label_smoothing_with_huge_logits(impl):
    logits = torch.full((1, 14), 1.7e38)
    loss = softmaxkit.cross_entropy(logits, torch.tensor([3]), label_smoothing=0.5, impl=impl)
    expected = F.cross_entropy(logits.double(), torch.tensor([3]), label_smoothing=0.5)
    torch.testing.assert_close(loss.double(), expected)
    torch.testing.assert_close(loss.double(), torch.tensor(math.log(14), dtype=torch.float64))


@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ignored_rows_with_non_finite_logits_give_zero(impl, bad):
    logits = torch.randn(4, 6)
    logits[1] = bad
    target = torch.tensor([2, -100, 0, 5])
    for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"weight": torch.rand(6)}):
        loss, grad = _loss_grad(softmaxkit.cross_entropy, logits, target, impl=impl, reduction="none", **options)
        assert loss[1] == 0 and torch.isfinite(loss).all()
        assert (grad[1] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_poly1_ignored_non_finite_row_leaves_the_batch_finite(bad):
    logits = torch.randn(4, 6)
    logits[2] = bad
    target = torch.tensor([2, 1, -100, 5])
    loss, grad = _loss_grad(softmaxkit.poly1_cross_entropy, logits, target, epsilon=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[2] == 0).all()
    kept = [0, 1, 3]
    expected = softmaxkit.poly1_cross_entropy(logits[kept], target[kept], epsilon=1.0)
    torch.testing.assert_close(loss, expected)


OTHER_LOSSES = {
    "focal": lambda x, y, **kw: softmaxkit.focal_loss(x, y, **kw),
    "focal_smoothed": lambda x, y, **kw: softmaxkit.focal_loss(x, y, gamma=0.5, label_smoothing=0.1,
                                                              alpha=torch.linspace(0.5, 1.5, 6), **kw),
    "entmax_bisect_loss": lambda x, y, **kw: softmaxkit.entmax_bisect_loss(x, y, 1.3, **kw),
    "sparsemax_loss": lambda x, y, **kw: softmaxkit.sparsemax_loss(x, y, **kw),
    "entmax15_loss": lambda x, y, **kw: softmaxkit.entmax15_loss(x, y, **kw),
}


@pytest.mark.parametrize("name", list(OTHER_LOSSES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_other_losses_ignored_non_finite_rows_give_zero(name, bad):
    """Issue 14, case 8 beyond cross-entropy: an ignored padding row holding NaN/±inf gives loss and gradient
    exactly 0 (focal's closed-form backward gave 0·NaN there), and the other rows are unaffected."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    logits[1] = bad
    target = torch.tensor([2, -100, 0, 5])
    kept = [0, 2, 3]
    for reduction in ("none", "mean"):
        loss, grad = _loss_grad(OTHER_LOSSES[name], logits, target, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and (grad[1] == 0).all()
        expected, expected_grad = _loss_grad(OTHER_LOSSES[name], logits[kept], target[kept], reduction=reduction)
        torch.testing.assert_close(loss[kept] if reduction == "none" else loss, expected)
        torch.testing.assert_close(grad[kept], expected_grad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampled_softmax_ignored_non_finite_hidden(bad):
    """Issue 14, case 8: an ignored row's NaN/inf hidden state stays out of the loss, ∂h and ∂W."""
    torch.manual_seed(0)
    hidden = torch.randn(5, 4)
    weight = torch.randn(40, 4, requires_grad=True)
    target = torch.tensor([1, -100, 3, 0, 6])
    hidden[1] = bad
    hidden.requires_grad_()
    kept = [0, 2, 3, 4]
    for reduction in ("mean", "none"):
        def run(h, y, reduction=reduction):
            return softmaxkit.sampled_softmax_loss(h, weight, y, num_sampled=8, reduction=reduction,
                                                   generator=torch.Generator().manual_seed(3))
        loss = run(hidden, target)
        grad_hidden, grad_weight = torch.autograd.grad(loss.sum(), (hidden, weight))
        assert torch.isfinite(loss).all() and torch.isfinite(grad_weight).all()
        assert torch.isfinite(grad_hidden).all() and (grad_hidden[1] == 0).all()
        clean = hidden.detach()[kept].requires_grad_()
        expected = run(clean, target[kept])
        expected_hidden, expected_weight = torch.autograd.grad(expected.sum(), (clean, weight))
        torch.testing.assert_close(loss[kept] if reduction == "none" else loss, expected)
        torch.testing.assert_close(grad_hidden[kept], expected_hidden)
        torch.testing.assert_close(grad_weight, expected_weight)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_cross_entropy_ignored_non_finite_hidden(impl, bad):
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    target = torch.tensor([1, -100, 3, 0, 6])
    with torch.no_grad():
        hidden[1] = bad
    for reduction in ("mean", "none"):
        loss = softmaxkit.linear_cross_entropy(hidden, weight, target, impl=impl, reduction=reduction)
        grad_hidden, grad_weight = torch.autograd.grad(loss.sum(), (hidden, weight))
        assert torch.isfinite(loss).all()
        assert torch.isfinite(grad_hidden).all() and (grad_hidden[1] == 0).all()
        assert torch.isfinite(grad_weight).all()


@pytest.mark.parametrize("impl", CE_IMPLS)
def test_overflow_gives_inf_not_nan(impl):
    # m − z_y = 3e38 − (−3e38) overflows: the true loss is +inf
    logits = torch.tensor([[3e38, -3e38, 0.0]])
    loss = softmaxkit.cross_entropy(logits, torch.tensor([1]), impl=impl)
    assert loss.item() == float("inf")
    # the sum before the mean overflows fp32 while the mean fits
    logits = torch.tensor([[3e38, -3e38], [3e38, -3e38]])
    loss = softmaxkit.cross_entropy(logits, torch.tensor([1, 1]), impl=impl)
    assert torch.isinf(loss) and loss > 0
    rows = torch.tensor([[2e38, -1e38], [2e38, -1e38]])
    loss = softmaxkit.cross_entropy(rows, torch.tensor([1, 1]), impl=impl)
    torch.testing.assert_close(loss.double(), torch.tensor(3e38, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_plus_inf_rows_are_nan_on_every_path(impl, dtype):
    """Issue 14, case 1 (the reported rows) on every path and dtype: PyTorch's NaN loss and NaN gradient rows
    (the kernel once gave 87, −inf, 88.69 with finite gradients), finite rows beside them unaffected."""
    inf = float("inf")
    logits = torch.tensor([[1.0, inf, 0.0], [inf, 2.0, 3.0], [inf, inf, 0.0], [0.5, -1.0, 2.0]])
    target = torch.tensor([0, 0, 2, 1])
    expected, expected_grad = _loss_grad(F.cross_entropy, logits.double(), target, reduction="none")
    for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}):
        loss, grad = _loss_grad(softmaxkit.cross_entropy, logits.to(dtype), target, impl=impl, reduction="none",
                                **options)
        assert torch.isnan(loss[:3]).all() and torch.isnan(grad[:3]).any(dim=1).all()
        assert torch.isfinite(loss[3]) and torch.isfinite(grad[3]).all()
        assert torch.isnan(softmaxkit.cross_entropy(logits.to(dtype), target, impl=impl, **options))
        if not options:
            tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2e-2)
            torch.testing.assert_close(loss[3].double(), expected[3], rtol=tol, atol=tol)
            torch.testing.assert_close(grad[3].double(), expected_grad[3], rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", CE_IMPLS)
def test_z_loss_square_fits_where_the_loss_fits(impl):
    """Issue 14, case 9: ``λ·LSE²`` at LSE = 2e19 (LSE² = 4e38 is beyond fp32, λ·LSE² = 4e34 is not)."""
    logits = torch.full((2, 5), 2e19)
    target = torch.tensor([0, 3])
    loss, grad = _loss_grad(softmaxkit.cross_entropy, logits, target, impl=impl, reduction="none", z_loss=1e-4)
    lse = 2e19 + math.log(5)
    torch.testing.assert_close(loss.double(), torch.full((2,), math.log(5) + 1e-4 * lse * lse, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # ∂ℓ/∂z = (1 + 2λ LSE) p − onehot, p = 1/5
    expected = torch.full((2, 5), (1 + 2e-4 * lse) / 5, dtype=torch.float64) - F.one_hot(target, 5)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", [impl for impl in CE_IMPLS if impl != "composite"])
@pytest.mark.parametrize("view", ["expanded", "overlapping"])
def test_inplace_backward_refuses_overlapping_logits(impl, view):
    if view == "expanded":
        logits = torch.randn(1, 6).expand(4, 6)
    else:
        logits = torch.randn(30).as_strided((4, 6), (3, 1))
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="`inplace_backward=True` writes the gradient over `logits`"):
        softmaxkit.cross_entropy(logits, target, impl=impl, inplace_backward=True)


def test_composite_refuses_inplace_backward():
    logits = torch.randn(4, 6)
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="`inplace_backward=True` needs a fused path"):
        softmaxkit.cross_entropy(logits, target, impl="composite", inplace_backward=True)
    with pytest.raises(ValueError, match="`inplace_backward=True` needs a fused path"):
        softmaxkit.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 3), target, impl="composite",
                                        inplace_backward=True)


@pytest.mark.parametrize("value", [0, -3, 2.5, "4", True])
def test_chunk_size_must_be_a_positive_int(value):
    logits, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises((TypeError, ValueError), match="`chunk_size`"):
        softmaxkit.cross_entropy(logits, target, chunk_size=value)


@pytest.mark.parametrize("value", ["no", 0, 1, None, torch.tensor(True)])
def test_inplace_backward_must_be_a_bool(value):
    logits, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="`inplace_backward` must be a bool"):
        softmaxkit.cross_entropy(logits, target, inplace_backward=value)
    with pytest.raises(TypeError, match="`inplace_backward` must be a bool"):
        softmaxkit.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 3), target, inplace_backward=value)


@pytest.mark.parametrize("shift", [1e7, 1e30])
def test_probability_targets_and_k_dim_are_shift_invariant(shift):
    torch.manual_seed(0)
    base = torch.randn(4, 9, 3, dtype=torch.float64)
    soft = torch.softmax(torch.randn(4, 9, 3, dtype=torch.float64), dim=1)
    hard = torch.randint(0, 9, (4, 3))
    shifted = base + shift
    exact = shifted - shift  # exact in fp64 (Sterbenz): the logits the shifted input really holds, unshifted
    for target in (soft, hard):
        expected, expected_grad = _loss_grad(F.cross_entropy, exact, target, label_smoothing=0.1)
        loss, grad = _loss_grad(softmaxkit.cross_entropy, shifted, target, label_smoothing=0.1)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["auto", "torch", "composite"])
def test_linear_cross_entropy_is_shift_invariant(impl):
    """A constant bias shifts every logit of a row: the loss and ∂h, ∂W must not change (fp64, shift 1e7)."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 30, (12,))
    bias = torch.full((30,), 1e7, dtype=torch.float64)
    expected = softmaxkit.linear_cross_entropy(hidden, weight, target, impl="composite", label_smoothing=0.1)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl=impl, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (hidden, weight))
    # the logits h·w + 1e7 are rounded to fp64 (ulp 2e-9): that rounding, not the loss formula, bounds the error
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-7)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ rows mixing ±3e38 (z − m beyond fp32's range)
# At fp32 ``z − m`` reaches −6.8e38 for a row [3e38, −3e38]: it overflows to −inf, and so does PyTorch's loss
# (``F.cross_entropy`` gives inf for every case below, NaN for a target of zero weight on such a class), although
# the loss (the target's weight on that class times a huge finite number) fits. PyTorch is no anchor here: the
# exact float64 oracle (softmaxkit.reference, itself checked against mpmath in tests/test_reference.py) is, its
# value rounded to fp32 (+inf only where the exact loss is beyond fp32's range).

def _extreme_rows():
    wide = torch.full((1, 1500), -3e38)  # 1500 classes: two of the interpreted Triton kernel's 1024-column blocks
    wide[0, ::3] = torch.randn(500, generator=torch.Generator().manual_seed(0))
    wide[0, 1200] = 3e38  # the running shift moves from ~1 to 3e38 in the second block
    return {
        "pair": (torch.tensor([[3e38, -3e38], [3e38, -3e38]]), torch.tensor([0, 1])),
        "one_against_many": (torch.tensor([[3e38] + [-3e38] * 13]), torch.tensor([0])),
        "three_kinds": (torch.tensor([[3e38, 0.0, -3e38, 1.0]]), torch.tensor([1])),
        "two_blocks": (wide, torch.tensor([1200])),
    }


def _exact(logits, target, **options):
    weight = options.pop("weight", None)
    x, y = logits.double().numpy(), target.numpy()
    w = None if weight is None else weight.double().numpy()
    loss = softmaxkit.reference.cross_entropy(x, y, w, reduction="none", **options)
    grad = softmaxkit.reference.cross_entropy_grad(x, y, w, reduction="none", **options)
    return torch.from_numpy(loss).float().double(), torch.from_numpy(grad)  # the loss as rounded to fp32


def _assert_extreme_close(loss, grad, exact_loss, exact_grad):
    loss = loss.double()
    assert torch.equal(torch.isposinf(loss), torch.isposinf(exact_loss)), (loss, exact_loss)
    finite = torch.isfinite(exact_loss)
    # one fp32 rounding of a result combined in float64 (or of two exact halves), plus the ε/C, (1 − ε) products
    torch.testing.assert_close(loss[finite], exact_loss[finite], rtol=4e-7, atol=0)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("row", ["pair", "one_against_many", "three_kinds", "two_blocks"])
@pytest.mark.parametrize("options", [{"label_smoothing": 0.1}, {"label_smoothing": 0.5},
                                     {"label_smoothing": 0.2, "weighted": True}], ids=str)
def test_label_smoothing_at_opposite_extremes(impl, row, options):
    """Issue 14, case 5 (and 9) at ±3e38: Σ_c w_c (z_c − m) overflows fp32 although (ε/C)·Σ fits."""
    logits, target = _extreme_rows()[row]
    options = dict(options)
    if options.pop("weighted", False):
        options["weight"] = torch.linspace(0.25, 2.0, logits.shape[1])
    loss, grad = _loss_grad(softmaxkit.cross_entropy, logits, target, impl=impl, reduction="none", **options)
    _assert_extreme_close(loss, grad, *_exact(logits, target, **options))



@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("row", ["pair", "one_against_many", "two_blocks"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_label_smoothing_at_opposite_extremes(impl, row, weighted):
    """The same rows as the logits of a linear layer (h = 1, W = the row): loss and ∂W as the oracle's (class
    weights up to 8: the fused kernel's scaled tile sums hold weights up to 2¹⁷/BLOCK_N)."""
    logits, target = _extreme_rows()[row]
    logits, target = logits[:1], target[:1]
    weight = logits[0][:, None].clone().requires_grad_()
    hidden = torch.ones(1, 1)
    class_weight = torch.linspace(0.25, 8.0, logits.shape[1]) if weighted else None
    loss = softmaxkit.linear_cross_entropy(hidden, weight, target, impl=impl, reduction="sum", label_smoothing=0.1,
                                           class_weight=class_weight)
    (grad_weight,) = torch.autograd.grad(loss, weight)
    exact_loss, exact_grad = _exact(logits, target, label_smoothing=0.1, weight=class_weight)
    _assert_extreme_close(loss.reshape(1), grad_weight.t(), exact_loss, exact_grad)


PROBABILITY_CASES = [
    ([3e38, -3e38], [0.9, 0.1]),
    ([3e38, -3e38], [0.5, 0.5]),
    ([3e38, -3e38], [1.0, 0.0]),  # PyTorch: NaN (0·(−inf)); the exact loss is 0
    ([3e38, 0.0, -3e38], [0.7, 0.3, 0.0]),  # PyTorch: NaN; exact 9e37
    ([-3e38, 3e38, float("-inf")], [0.25, 0.75, 0.0]),  # a masked class without target mass counts 0
]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("row", "probabilities"), PROBABILITY_CASES)
def test_probability_targets_at_opposite_extremes(row, probabilities, label_smoothing):
    """Issue 14 item: soft-label cross-entropy of rows mixing ±3e38 on every path that takes probability
    targets (composite cross_entropy; chunked and composite linear CE), against the oracle (PyTorch gives
    inf or NaN here)."""
    logits, target = torch.tensor([row]), torch.tensor([probabilities])
    exact_loss, exact_grad = _exact(logits, target, label_smoothing=label_smoothing)
    for impl in ("auto", "composite"):
        loss, grad = _loss_grad(softmaxkit.cross_entropy, logits, target, impl=impl, reduction="none",
                                label_smoothing=label_smoothing)
        # the masked class: ∂ℓ/∂z = A·p − a = −ε/C (0 without smoothing); the loss is inf with smoothing
        _assert_extreme_close(loss, grad, exact_loss, exact_grad)
    if torch.isinf(logits).any():  # a −inf logit as h = 1 times a −inf weight: ∂h is 0·(−inf) in the matmul
        return
    for impl in ("auto", "torch", "composite"):
        weight = logits[0][:, None].clone().requires_grad_()
        loss = softmaxkit.linear_cross_entropy(torch.ones(1, 1), weight, target, impl=impl, reduction="sum",
                                               label_smoothing=label_smoothing)
        (grad_weight,) = torch.autograd.grad(loss, weight)
        _assert_extreme_close(loss.reshape(1), grad_weight.t(), exact_loss, exact_grad)
