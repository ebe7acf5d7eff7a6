"""softmaxkit.cross_entropy: parity with PyTorch and the float64 oracle, gradcheck, invariances, extremes.

Tolerances: float64 against the oracle / PyTorch to 1e-10 relative (see tests/_helpers.py); float32 to 1e-5
relative; fp16/bf16 through an error budget against PyTorch in the same dtype.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref
from softmaxkit.functional.cross_entropy import IMPLS

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget, to_numpy

#: every CPU implementation of the 1-d/2-d class-index path (Triton has its own interpreter tests).
ROW_IMPLS = [impl for impl in IMPLS if impl not in ("auto", "triton")]
ALL_IMPLS = ["auto", *ROW_IMPLS]


def _grad(loss: torch.Tensor, x: torch.Tensor, upstream: torch.Tensor | None = None) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
    return g


def _make(shape, num_classes, dtype=torch.float64, probabilities=False, ignore_fraction=0.25, scale=2.0):
    """Logits of ``shape`` (classes on dim 1, or dim 0 when 1-d) and a matching target."""
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    class_dim = 0 if len(shape) == 1 else 1
    if probabilities:
        target = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, class_dim).to(dtype)
        return logits, target
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, num_classes, target_shape)
    if ignore_fraction and target.dim() > 0:
        target[torch.rand(target_shape) < ignore_fraction] = -100
    return logits, target


SHAPES = [(7,), (1, 1), (5, 7), (6, 3, 4), (2, 5, 3, 2)]
WEIGHTS = [None, "positive", "signed"]


def _weight(kind, num_classes, dtype=torch.float64):
    if kind is None:
        return None
    w = torch.rand(num_classes, dtype=torch.float64) + 0.25
    if kind == "signed":
        w[::2] = -w[::2]
    return w.to(dtype)


# ------------------------------------------------------------------------------ parity with PyTorch
# Row impls take 1-d/2-d logits; K-d logits go through "auto"/"composite" (the row impls reject them, tested
# in test_validation_messages).
SHAPE_IMPLS = [(shape, impl) for shape in SHAPES for impl in ALL_IMPLS
               if len(shape) <= 2 or impl in ("auto", "composite")]


@pytest.mark.parametrize(("shape", "impl"), SHAPE_IMPLS, ids=str)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_class_indices(shape, impl, weight_kind, label_smoothing, reduction):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits, target = _make(shape, num_classes)
    if weight_kind == "signed" and reduction == "mean":
        # PyTorch divides by Σ w_y, which signed weights can make ~0; keep it well away from 0.
        weight = _weight("positive", num_classes)
    else:
        weight = _weight(weight_kind, num_classes)
    if reduction == "mean" and target.dim() > 0 and bool((target == -100).all()):
        target.view(-1)[0] = 0  # the all-ignored case is the one deliberate difference, tested below
    options = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours = softmaxkit.cross_entropy(logits, target, impl=impl, **options)
    theirs = F.cross_entropy(logits, target, **options)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close_f64(ours, theirs)
    upstream = torch.randn_like(theirs)
    assert_close_f64(_grad(ours, logits, upstream), _grad(theirs, logits, upstream))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_probability_targets(shape, weighted, label_smoothing, reduction):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits, target = _make(shape, num_classes, probabilities=True)
    weight = _weight("positive", num_classes) if weighted else None
    options = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours = softmaxkit.cross_entropy(logits, target, **options)
    theirs = F.cross_entropy(logits, target, **options)
    assert ours.shape == theirs.shape
    assert_close_f64(ours, theirs)
    upstream = torch.randn_like(theirs)
    assert_close_f64(_grad(ours, logits, upstream), _grad(theirs, logits, upstream))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 3])
def test_matches_torch_ignore_index_values(impl, ignore_index):
    logits, _ = _make((9, 5), 5)
    target = torch.tensor([0, 1, 2, 3, 4, ignore_index, 1, ignore_index, 2])
    ours = softmaxkit.cross_entropy(logits, target, ignore_index=ignore_index, impl=impl, label_smoothing=0.1)
    theirs = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=0.1)
    assert_close_f64(ours, theirs)
    assert_close_f64(_grad(ours, logits), _grad(theirs, logits))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_float32_matches_torch(impl):
    logits, target = _make((64, 1000), 1000, dtype=torch.float32)
    weight = _weight("positive", 1000, torch.float32)
    for options in (dict(), dict(weight=weight, label_smoothing=0.1)):
        ours = softmaxkit.cross_entropy(logits, target, impl=impl, **options)
        theirs = F.cross_entropy(logits, target, **options)
        assert_close_f32(ours, theirs)
        assert_close_f32(_grad(ours, logits), _grad(theirs, logits), atol=1e-8)


@pytest.mark.parametrize(("liger_options", "options"), [
    ({}, {}),
    ({"lse_square_scale": 1e-3}, {"z_loss": 1e-3}),
    ({"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ({"reduction": "sum"}, {"reduction": "sum"}),
    # Liger's soft-cap kernel does not run under Triton's interpreter: checked where its kernels compile
    pytest.param({"softcap": 5.0}, {"softcap": 5.0}, marks=pytest.mark.gpu),
], ids=str)
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_equals_liger_kernel_cross_entropy(liger_options, options, impl):
    """Liger-Kernel's cross-entropy (its Triton kernel: on CUDA, or interpreted on CPU-only machines, conftest)
    gives the same fp32 loss and gradient, ignored rows included. Liger writes its gradient into the logits, so
    it gets a copy."""
    pytest.importorskip("triton")
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, target = _make((37, 300), 300, dtype=torch.float32, scale=3.0)
    logits, target = logits.detach().to(device), target.to(device)
    leaf = logits.clone().requires_grad_()
    expected = liger.liger_cross_entropy(leaf.clone(), target, ignore_index=-100, **liger_options)
    (expected_grad,) = torch.autograd.grad(expected, [leaf])
    x = logits.clone().requires_grad_()
    loss = softmaxkit.cross_entropy(x, target, impl=impl, **options)
    assert_close_f32(loss, expected.detach())
    assert_close_f32(_grad(loss, x), expected_grad)


def test_non_contiguous_logits():
    base = torch.randn(7, 12, dtype=torch.float64)
    logits = base[:, ::2].requires_grad_()  # stride 2 along classes
    target = torch.randint(0, 6, (7,))
    for impl in ALL_IMPLS:
        if impl == "cpu":  # the kernel needs unit class stride: named explicitly, it says so
            with pytest.raises(ValueError, match="`impl='cpu'` needs logits whose class dimension has stride 1"):
                softmaxkit.cross_entropy(logits, target, impl=impl)
            continue
        ours = softmaxkit.cross_entropy(logits, target, impl=impl)
        theirs = F.cross_entropy(logits, target)
        assert_close_f64(ours, theirs)
        assert_close_f64(_grad(ours, logits), _grad(theirs, logits))


# ------------------------------------------------------------------ the extras against the oracle
EXTRAS = [
    dict(zip(("temperature", "z_loss", "softcap", "label_smoothing", "weight"), values))
    for values in itertools.product([1.0, 0.5, 3.0], [0.0, 1e-3], [None, 5.0], [0.0, 0.15], [None, "positive"])
]


@pytest.mark.parametrize("extras", EXTRAS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_extras_match_reference(extras, reduction, impl):
    logits, target = _make((6, 5), 5, scale=4.0)
    extras = dict(extras)
    extras["weight"] = _weight(extras["weight"], 5)
    loss = softmaxkit.cross_entropy(logits, target, reduction=reduction, impl=impl, **extras)
    np_extras = {k: (to_numpy(v) if isinstance(v, torch.Tensor) else v) for k, v in extras.items()}
    expected = ref.cross_entropy(to_numpy(logits), to_numpy(target), reduction=reduction, **np_extras)
    assert_close_f64(loss, expected)
    upstream = torch.randn_like(loss) if reduction == "none" else None
    expected_grad = ref.cross_entropy_grad(
        to_numpy(logits), to_numpy(target), reduction=reduction,
        grad_output=None if upstream is None else to_numpy(upstream), **np_extras,
    )
    assert_close_f64(_grad(loss, logits, upstream), expected_grad)


@pytest.mark.parametrize("shape", [(4, 3, 2), (6,)], ids=str)
@pytest.mark.parametrize("probabilities", [False, True])
def test_extras_match_reference_kdim_and_probabilities(shape, probabilities):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits, target = _make(shape, num_classes, probabilities=probabilities)
    extras = dict(temperature=0.8, z_loss=0.01, softcap=4.0, label_smoothing=0.1)
    loss = softmaxkit.cross_entropy(logits, target, **extras)
    assert_close_f64(loss, ref.cross_entropy(to_numpy(logits), to_numpy(target), **extras))
    assert_close_f64(_grad(loss, logits), ref.cross_entropy_grad(to_numpy(logits), to_numpy(target), **extras))


def test_temperature_scales_gradient_by_inverse_temperature():
    # ∂ℓ/∂x = (p(x/T) − y)/T: at T the gradient equals that of x/T at T=1, divided by T.
    logits, target = _make((4, 6), 6, ignore_fraction=0)
    temperature = 2.5
    g_t = _grad(softmaxkit.cross_entropy(logits, target, temperature=temperature), logits)
    scaled = (logits.detach() / temperature).requires_grad_()
    g_1 = _grad(softmaxkit.cross_entropy(scaled, target), scaled)
    assert_close_f64(g_t, g_1 / temperature)


# --------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_every_option(impl, reduction):
    logits, target = _make((4, 5), 5, scale=1.0)
    weight = _weight("positive", 5)

    def fn(x):
        return softmaxkit.cross_entropy(
            x, target, weight=weight, reduction=reduction, label_smoothing=0.2, temperature=0.7, z_loss=0.05,
            softcap=3.0, impl=impl,
        )

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


def test_gradcheck_probability_targets_kdim():
    logits, target = _make((2, 4, 3), 4, probabilities=True, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda x: softmaxkit.cross_entropy(x, target, label_smoothing=0.1, z_loss=0.1, temperature=1.5), (logits,)
    )


def test_composite_supports_double_backward():
    logits, target = _make((3, 4), 4, scale=1.0)
    assert torch.autograd.gradgradcheck(
        lambda x: softmaxkit.cross_entropy(x, target, impl="composite", z_loss=0.1, softcap=2.0), (logits,)
    )


@pytest.mark.parametrize("impl", [impl for impl in ALL_IMPLS if impl != "composite"])
def test_fused_paths_refuse_double_backward_instead_of_returning_zeros(impl):
    logits, target = _make((3, 4), 4, ignore_fraction=0)
    with pytest.raises(RuntimeError, match="once differentiable; for higher-order gradients"):
        torch.autograd.functional.hessian(lambda x: softmaxkit.cross_entropy(x, target, impl=impl), logits.detach())
    hessian = torch.autograd.functional.hessian(
        lambda x: softmaxkit.cross_entropy(x, target, impl="composite"), logits.detach()
    )
    assert hessian.abs().sum() > 0


# ------------------------------------------------------------------------------- the 0-not-NaN rule
@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_mean_is_zero_with_zero_gradient(impl, weighted):
    logits, _ = _make((4, 6), 6)
    target = torch.full((4,), -100)
    weight = _weight("positive", 6) if weighted else None
    loss = softmaxkit.cross_entropy(logits, target, weight=weight, impl=impl, label_smoothing=0.1, z_loss=0.1)
    assert loss.item() == 0.0
    assert torch.all(_grad(loss, logits) == 0)
    assert torch.isnan(F.cross_entropy(logits, target, weight=weight))  # PyTorch's behaviour, for contrast


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_batch(impl):
    logits = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    assert softmaxkit.cross_entropy(logits, target, impl=impl).item() == 0.0
    assert softmaxkit.cross_entropy(logits, target, impl=impl, reduction="none").shape == (0,)
    assert _grad(softmaxkit.cross_entropy(logits, target, impl=impl, reduction="sum"), logits).shape == (0, 5)


# ------------------------------------------------------------------------------------------ extremes
@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_huge_logits_give_finite_correct_results(impl, dtype):
    # fp16 tops out at 65504: the largest loss here is 2·big, so keep it representable.
    big = 3e4 if dtype == torch.float16 else 1e4
    logits = torch.tensor([[big, -big, 0.0], [-big, -big, big], [big, big, -big]], dtype=dtype).requires_grad_()
    target = torch.tensor([1, 2, 0])
    loss = softmaxkit.cross_entropy(logits, target, impl=impl, reduction="none")
    grad = _grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    expected = ref.cross_entropy(to_numpy(logits), to_numpy(target), reduction="none")
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-2)
    np.testing.assert_allclose(
        to_numpy(grad), ref.cross_entropy_grad(to_numpy(logits), to_numpy(target), reduction="sum"), atol=1e-2
    )


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_negative_infinity_masks_classes(impl):
    logits = torch.tensor([[1.0, -float("inf"), 0.5, -float("inf")], [0.2, 0.1, -float("inf"), 3.0]],
                          dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2, 3])
    loss = softmaxkit.cross_entropy(logits, target, impl=impl, z_loss=0.01, temperature=0.9)
    grad = _grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[0, 1] == 0 and grad[0, 3] == 0 and grad[1, 2] == 0
    assert_close_f64(loss, F.cross_entropy(logits.detach() / 0.9, target)
                     + 0.01 * torch.logsumexp(logits.detach() / 0.9, 1).pow(2).mean())


# --------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_error_budget(impl, dtype, reduction):
    logits64, target = _make((32, 300), 300, scale=3.0)
    logits = logits64.detach().to(dtype).requires_grad_()
    oracle_logits = to_numpy(logits)  # the oracle sees exactly the rounded inputs
    options = dict(reduction=reduction, label_smoothing=0.1)
    ours = softmaxkit.cross_entropy(logits, target, impl=impl, **options)
    theirs = F.cross_entropy(logits, target, **options)
    assert ours.dtype == theirs.dtype == dtype
    eps = torch.finfo(dtype).eps
    expected = ref.cross_entropy(oracle_logits, to_numpy(target), **options)
    # tol: one rounding of the result to `dtype` (eps/2 relative), from our fp32 internals.
    assert_within_budget(ours, theirs, expected, tol=eps * (np.abs(expected) + 1e-6))
    upstream = torch.ones_like(ours)
    expected_grad = ref.cross_entropy_grad(oracle_logits, to_numpy(target), grad_output=to_numpy(upstream),
                                           **options)
    assert_within_budget(
        _grad(ours, logits, upstream), _grad(theirs, logits, upstream), expected_grad,
        tol=eps * (np.abs(expected_grad) + 1e-3 * np.abs(expected_grad).max()),
    )


# ----------------------------------------------------------------------------- hypothesis invariances
@st.composite
def batches(draw, max_rows=12, max_classes=9):
    rows = draw(st.integers(1, max_rows))
    classes = draw(st.integers(1, max_classes))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 1e3]))
    logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale
    target = torch.randint(0, classes, (rows,), generator=generator)
    ignore = torch.rand(rows, generator=generator) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    target[ignore] = -100
    return logits, target


OPTION_STRATEGY = st.fixed_dictionaries(
    {
        "label_smoothing": st.sampled_from([0.0, 0.1, 1.0]),
        "temperature": st.sampled_from([1.0, 0.5, 2.0]),
        "z_loss": st.sampled_from([0.0, 1e-3]),
        "softcap": st.sampled_from([None, 10.0]),
    }
)


@given(batches(), OPTION_STRATEGY, st.sampled_from(ALL_IMPLS))
def test_matches_oracle_property(batch, options, impl):
    logits, target = batch
    logits.requires_grad_()
    loss = softmaxkit.cross_entropy(logits, target, impl=impl, **options)
    assert_close_f64(loss, ref.cross_entropy(to_numpy(logits), to_numpy(target), **options), atol=1e-9)
    assert_close_f64(_grad(loss, logits), ref.cross_entropy_grad(to_numpy(logits), to_numpy(target), **options),
                     atol=1e-12)


@given(batches(), OPTION_STRATEGY, st.sampled_from(ALL_IMPLS))
def test_ignore_equals_dropping_rows(batch, options, impl):
    logits, target = batch
    kept = target != -100
    full = softmaxkit.cross_entropy(logits, target, impl=impl, **options)
    dropped = softmaxkit.cross_entropy(logits[kept], target[kept], impl=impl, **options)
    assert_close_f64(full, dropped)
    per_row = softmaxkit.cross_entropy(logits, target, impl=impl, reduction="none", **options)
    assert torch.all(per_row[~kept] == 0)


@given(batches(max_classes=6), st.integers(1, 5), st.sampled_from(ALL_IMPLS))
def test_negative_infinity_masking_equals_truncation(batch, extra, impl):
    logits, target = batch
    target = torch.where(target == -100, target, target % logits.shape[1])
    masked = torch.cat([logits, torch.full((logits.shape[0], extra), -float("inf"), dtype=logits.dtype)], 1)
    masked.requires_grad_()
    loss_masked = softmaxkit.cross_entropy(masked, target, impl=impl, z_loss=1e-3)
    loss_truncated = softmaxkit.cross_entropy(logits, target, impl=impl, z_loss=1e-3)
    assert_close_f64(loss_masked, loss_truncated)
    grad = _grad(loss_masked, masked)
    assert torch.all(grad[:, logits.shape[1]:] == 0)


@given(batches(max_rows=40), st.integers(1, 41), OPTION_STRATEGY)
def test_chunked_equals_unchunked(batch, chunk_size, options):
    logits, target = batch
    logits.requires_grad_()
    whole = softmaxkit.cross_entropy(logits, target, impl="torch", **options)
    chunked = softmaxkit.cross_entropy(logits, target, impl="torch", chunk_size=chunk_size, **options)
    assert_close_f64(chunked, whole)
    assert_close_f64(_grad(chunked, logits), _grad(whole, logits))


@given(batches(), st.sampled_from([0.0, 0.2]), st.sampled_from(["sum", "none"]), st.booleans())
def test_integer_labels_equal_one_hot_probabilities(batch, label_smoothing, reduction, weighted):
    logits, target = batch
    target = torch.where(target == -100, torch.zeros_like(target), target)
    weight = _weight("positive", logits.shape[1]) if weighted else None
    one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    options = dict(weight=weight, label_smoothing=label_smoothing, reduction=reduction, z_loss=1e-3)
    assert_close_f64(softmaxkit.cross_entropy(logits, target, **options),
                     softmaxkit.cross_entropy(logits, one_hot, **options))


# --------------------------------------------------------------------------- memory and mutation
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_inputs_are_not_mutated(impl):
    logits, target = _make((5, 8), 8)
    weight = _weight("positive", 8)
    before = (logits.detach().clone(), target.clone(), weight.clone())
    loss = softmaxkit.cross_entropy(logits, target, weight=weight, impl=impl, softcap=3.0, temperature=2.0)
    _grad(loss, logits)
    for after, original in zip((logits, target, weight), before):
        assert torch.equal(after.detach(), original)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(softcap=4.0, temperature=0.7, label_smoothing=0.1, z_loss=1e-3)])
def test_inplace_backward_writes_gradient_into_logits(dtype, options):
    leaf = torch.randn(6, 9, dtype=torch.float64).to(dtype).requires_grad_()
    target = torch.tensor([0, 3, -100, 8, 1, 2])
    expected = _grad(softmaxkit.cross_entropy(leaf, target, **options), leaf)
    logits = leaf * 1  # a non-leaf, as a model's output would be
    version = logits._version
    loss = softmaxkit.cross_entropy(logits, target, inplace_backward=True, **options)
    grad = _grad(loss, leaf)
    assert torch.equal(grad, expected)
    assert logits._version > version
    assert torch.equal(logits.detach(), expected)  # the buffer now holds the gradient


def test_inplace_backward_detects_other_uses_of_logits():
    leaf = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    logits = leaf * 1
    other = (logits**2).sum()  # saves logits for its own backward
    loss = softmaxkit.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_path_keeps_no_logits_sized_state():
    logits, target = _make((64, 500), 500)
    loss = softmaxkit.cross_entropy(logits, target, impl="torch", label_smoothing=0.1, softcap=5.0)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    big = [t for t in saved if t.numel() >= logits.numel() and t.data_ptr() != logits.data_ptr()]
    assert big == []


# --------------------------------------------------------------------------------------- module
def test_module_equals_function_and_registers_weight():
    weight = _weight("positive", 6)
    module = softmaxkit.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, z_loss=1e-3, temperature=2.0)
    logits, target = _make((5, 6), 6)
    assert_close_f64(module(logits, target), softmaxkit.cross_entropy(
        logits, target, weight=weight, label_smoothing=0.1, z_loss=1e-3, temperature=2.0))
    assert "weight" in module.state_dict()
    assert "label_smoothing=0.1" in repr(module)
    torch_module = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    ours = softmaxkit.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    assert_close_f64(ours(logits, target), torch_module(logits, target))


# ----------------------------------------------------------------------------------- validation
def test_validation_messages():
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    ce = softmaxkit.cross_entropy
    with pytest.raises(ValueError, match=r"`target` must hold class indices in \[0, 5\) or ignore_index=-100, "
                                         r"but holds 5 at position 2"):
        ce(logits, torch.tensor([0, 1, 5, 3]))
    with pytest.raises(ValueError, match="but holds -3 at position 0"):
        ce(logits, torch.tensor([-3, 1, 2, 3]))
    with pytest.raises(TypeError, match="`target` of shape \\(4,\\) holds class indices and must have an integer"):
        ce(logits, target.float())
    with pytest.raises(ValueError, match=r"`target` must have shape \(4,\) \(class indices\) or \(4, 5\)"):
        ce(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="`logits` must have a floating-point dtype"):
        ce(torch.ones(4, 5, dtype=torch.long), target)
    with pytest.raises(TypeError, match="`logits` must be a torch.Tensor"):
        ce(np.zeros((4, 5)), target)
    with pytest.raises(ValueError, match="`reduction` must be one of 'mean', 'sum', 'none', but got 'avg'"):
        ce(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, but got 0.0"):
        ce(logits, target, temperature=0)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0, but got -1.0"):
        ce(logits, target, temperature=-1.0)
    with pytest.raises(ValueError, match=r"`label_smoothing` must lie in \[0, 1\], but got 1.5"):
        ce(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"`label_smoothing` must lie in \[0, 1\], but got -0.1"):
        ce(logits, target, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="`softcap` must be a finite number > 0, but got 0.0"):
        ce(logits, target, softcap=0.0)
    with pytest.raises(ValueError, match="`z_loss` must be a finite number >= 0, but got -1.0"):
        ce(logits, target, z_loss=-1)
    with pytest.raises(ValueError, match=r"`weight` must be a 1-d tensor with one entry per class \(5\), but has "
                                         r"shape \(4,\)"):
        ce(logits, target, weight=torch.ones(4))
    with pytest.raises(TypeError, match="`weight` must have a floating-point dtype"):
        ce(logits, target, weight=torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="`impl` must be one of"):
        ce(logits, target, impl="cuda")
    with pytest.raises(ValueError, match="`impl='torch'` handles 1-d or 2-d logits"):
        ce(torch.randn(2, 5, 3), torch.zeros(2, 3, dtype=torch.long), impl="torch")
    with pytest.raises(ValueError, match="`ignore_index` is not supported with class-probability targets"):
        ce(logits, torch.softmax(logits, 1), ignore_index=0)
    with pytest.raises(ValueError, match="`logits` must have at least 1 dimension"):
        ce(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        ce(logits, target, ignore_index=1.5)
    with pytest.raises(ValueError, match="`inplace_backward=True` needs"):
        ce(logits, target, impl="composite", inplace_backward=True)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_target_gradient_matches_torch_where_target_is_zero(label_smoothing, weighted):
    """∂ℓ/∂t_c = −(1−ε)·w_c·log p_c / N for every class, including those the target gives 0 (where a
    `where(t == 0, 0, t·log p)` guard would wrongly give 0)."""
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(6, 7, dtype=torch.float64), dim=1)
    target[:, [0, 3]] = 0.0
    target.requires_grad_()
    weight = torch.rand(7, dtype=torch.float64) + 0.5 if weighted else None
    options = {"weight": weight, "label_smoothing": label_smoothing}
    loss = softmaxkit.cross_entropy(logits, target, impl="composite", **options)
    expected = F.cross_entropy(logits, target, **options)
    grads = torch.autograd.grad(loss, (logits, target))
    expected_grads = torch.autograd.grad(expected, (logits, target))
    assert_close_f64(loss, expected.detach().numpy())
    assert_close_f64(grads[0], expected_grads[0].numpy())
    assert_close_f64(grads[1], expected_grads[1].numpy())
    assert torch.all(grads[1][:, [0, 3]] != 0)


def test_probability_target_over_masked_class_is_finite():
    """A −inf logit the target gives 0: the loss is finite (PyTorch's is NaN from 0·(−inf)), the logits'
    gradient is p − t, and the target's gradient there is 0 by convention (its limit is +inf)."""
    logits = torch.tensor([[1.0, -float("inf"), 0.5]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.25, 0.0, 0.75]], dtype=torch.float64, requires_grad=True)
    loss = softmaxkit.cross_entropy(logits, target, impl="composite")
    grad_logits, grad_target = torch.autograd.grad(loss, (logits, target))
    p = torch.softmax(logits.detach(), dim=1)
    log_p = torch.log_softmax(logits.detach()[:, [0, 2]], dim=1)
    assert_close_f64(loss, -(target.detach()[:, [0, 2]] * log_p).sum().numpy())
    assert_close_f64(grad_logits, (p - target.detach()).numpy())
    assert grad_target[0, 1] == 0 and torch.isfinite(grad_target).all()
    assert_close_f64(grad_target[:, [0, 2]], (-log_p).numpy())
