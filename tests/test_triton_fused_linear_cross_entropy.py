"""Fused linear cross-entropy (``impl="triton_fused"``): matmul–log-sum-exp kernel, recomputing backward.

Ground truth is the NumPy float64 oracle: logits ``h Wᵀ + b`` in float64, then
:func:`softmaxkit.reference.cross_entropy` and :func:`~softmaxkit.reference.cross_entropy_grad` (``G``),
from which ``∂h = G W``, ``∂W = Gᵀ h``, ``∂b = Σ_rows G``.

Without CUDA these run under ``TRITON_INTERPRET=1`` on CPU tensors (conftest), so shapes are tiny: the
interpreter's tiles are 16 wide, and C, D, N are chosen not to be multiples of 16 and to span several
tiles and both forward vocabulary ranges. Under the interpreter the kernels' dots take their operands in
fp32 (the interpreter's own bf16 ``tl.dot`` multiplies bit patterns; see ``backends/triton/cross_entropy._dot``),
so CPU runs check fp64, fp32, fp16 and bf16; the LLM-sized bf16 cases are ``gpu``-marked.

Tolerances: fp64 at the oracle tolerance of tests/_helpers.py (1e-10 relative); fp32 at 1e-5 of the largest
entry of each gradient (a few ulps times the ~D and ~C terms summed by the tiles and atomic adds); fp16 and
bf16 within an error budget against the composite path in the same dtype.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64, assert_within_budget, to_numpy

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

#: one rounding of an fp32 result to bf16, relative: 2^-8 round-to-nearest on GPUs; 2^-7 under the interpreter,
#: whose fp32 → bf16 conversion (stores, ``.to``) rounds toward zero (its ``cast_impl`` passes no rounding mode)
BF16_ROUNDING = 2.0**-8 if ON_GPU else 2.0**-7

from softmaxkit._core import CrossEntropyOptions as LinearCrossEntropyConfig  # noqa: E402
from softmaxkit.backends.triton.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402


def _make(num_rows, hidden_size, num_classes, dtype, with_bias=True, scale=1.0):
    hidden = (torch.randn(num_rows, hidden_size, dtype=torch.float64) * scale).to(DEVICE, dtype)
    weight = (torch.randn(num_classes, hidden_size, dtype=torch.float64) / hidden_size**0.5).to(DEVICE, dtype)
    bias = torch.randn(num_classes, dtype=torch.float64).to(DEVICE, dtype) if with_bias else None
    target = torch.randint(0, num_classes, (num_rows,)).to(DEVICE)
    if num_rows > 2:
        target[2] = -100
    return hidden, weight, bias, target


def _loss_and_grads(hidden, weight, bias, target, impl="triton_fused", upstream=1.0, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2] if bias is not None else None,
                                           impl=impl, **options)
    grads = torch.autograd.grad((loss * upstream).sum(), leaves)
    return loss.detach(), grads


def _oracle(hidden, weight, bias, target, upstream=1.0, **options):
    """Loss and (∂h, ∂W[, ∂b]) in NumPy float64 from the reference cross-entropy and its closed-form gradient."""
    h, w = to_numpy(hidden), to_numpy(weight)
    logits = h @ w.T + (to_numpy(bias) if bias is not None else 0.0)
    y = to_numpy(target)
    kwargs = {
        "weight": None if options.get("class_weight") is None else to_numpy(options["class_weight"]),
        "ignore_index": options.get("ignore_index", -100),
        "reduction": options.get("reduction", "mean"),
        "label_smoothing": options.get("label_smoothing", 0.0),
        "temperature": options.get("temperature", 1.0),
        "z_loss": options.get("z_loss", 0.0),
        "softcap": options.get("softcap"),
    }
    loss = ref.cross_entropy(logits, y, **kwargs)
    if kwargs["reduction"] == "none":
        grad = ref.cross_entropy_grad(logits, y, **kwargs, grad_output=to_numpy(upstream))
    else:
        grad = ref.cross_entropy_grad(logits, y, **kwargs) * float(upstream)
    grads = [grad @ w, grad.T @ h] + ([grad.sum(0)] if bias is not None else [])
    return np.asarray(loss), grads


OPTIONS = [
    ("mean", {}),
    ("sum", {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-3, "temperature": 0.8}),
    ("mean", {"label_smoothing": 0.2, "class_weight": "random"}),
    ("none", {"z_loss": 1e-2, "softcap": 2.0}),
    ("mean", {"ignore_index": 3, "class_weight": "random", "temperature": 1.7}),
    ("none", {"label_smoothing": 0.3, "class_weight": "random", "z_loss": 1e-3}),
]


def _options(reduction, options, num_classes, dtype=torch.float64):
    options = {**options, "reduction": reduction}
    if options.get("class_weight") == "random":
        options["class_weight"] = (torch.rand(num_classes, dtype=torch.float64) + 0.5).to(DEVICE, dtype)
    return options


@pytest.mark.parametrize(("reduction", "options"), OPTIONS, ids=str)
def test_float64_matches_oracle(reduction, options):
    """Loss, ∂h, ∂W, ∂b against the float64 oracle, with a non-unit upstream gradient (per row for "none")."""
    hidden, weight, bias, target = _make(37, 20, 45, torch.float64)
    options = _options(reduction, options, 45)
    if "ignore_index" in options:
        target[target == -100] = 3
    upstream = torch.rand(37, dtype=torch.float64).to(DEVICE) if reduction == "none" else 1.7
    loss, grads = _loss_and_grads(hidden, weight, bias, target, upstream=upstream, **options)
    expected, expected_grads = _oracle(hidden, weight, bias, target, upstream=upstream, **options)
    assert_close_f64(loss, expected)
    assert len(grads) == len(expected_grads) == 3
    for grad, reference in zip(grads, expected_grads):
        assert_close_f64(grad, reference)


def test_float64_no_bias_leading_shape_and_non_contiguous():
    """(2, 3, D) hidden, a transposed (non-contiguous) weight view, no bias: the oracle on the flattened rows."""
    hidden = torch.randn(2, 3, 19, dtype=torch.float64, device=DEVICE)
    weight_t = torch.randn(19, 33, dtype=torch.float64, device=DEVICE) / 19**0.5
    target = torch.randint(0, 33, (2, 3), device=DEVICE)
    hidden_leaf, weight_leaf = hidden.clone().requires_grad_(), weight_t.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(hidden_leaf, weight_leaf.t(), target, impl="triton_fused",
                                           label_smoothing=0.1)
    grad_h, grad_wt = torch.autograd.grad(loss, (hidden_leaf, weight_leaf))
    expected, (exp_h, exp_w) = _oracle(hidden.reshape(6, 19), weight_t.t(), None, target.reshape(6),
                                       label_smoothing=0.1)
    assert_close_f64(loss, expected)
    assert grad_h.shape == hidden.shape
    assert_close_f64(grad_h.reshape(6, 19), exp_h)
    assert_close_f64(grad_wt.t(), exp_w)


@pytest.mark.parametrize("splits", [1, 3, 5])
def test_vocabulary_splits_give_the_same_loss(splits):
    """The forward's S vocabulary ranges (here up to 5 for 3 tiles: two ranges are empty) change nothing."""
    hidden, weight, bias, target = _make(21, 9, 40, torch.float64)
    config = LinearCrossEntropyConfig(reduction="none", label_smoothing=0.1, z_loss=1e-3, num_classes=40)
    loss = fused_linear_cross_entropy(hidden, weight, bias, target, None, config, splits=splits)
    expected, _ = _oracle(hidden, weight, bias, target, reduction="none", label_smoothing=0.1, z_loss=1e-3)
    assert_close_f64(loss, expected)


def test_gradcheck_float64():
    """gradcheck of the custom backward (fast mode: random projections), every option switched on."""
    hidden, weight, bias, target = _make(6, 5, 19, torch.float64)
    class_weight = (torch.rand(19, dtype=torch.float64) + 0.5).to(DEVICE)
    leaves = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    for reduction in ("mean", "none"):
        def fn(h, w, b, reduction=reduction):
            return softmaxkit.linear_cross_entropy(
                h, w, target, bias=b, impl="triton_fused", reduction=reduction, class_weight=class_weight,
                label_smoothing=0.1, z_loss=1e-2, softcap=2.5, temperature=0.9,
            )
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_float32_matches_oracle():
    hidden, weight, bias, target = _make(33, 17, 40, torch.float32)
    options = {"label_smoothing": 0.1, "softcap": 4.0, "reduction": "sum"}
    loss, grads = _loss_and_grads(hidden, weight, bias, target, **options)
    expected, expected_grads = _oracle(hidden, weight, bias, target, **options)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    np.testing.assert_allclose(loss.item(), float(expected), rtol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        np.testing.assert_allclose(to_numpy(grad), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float16, 2.0**-11), (torch.bfloat16, BF16_ROUNDING)], ids=str)
@pytest.mark.parametrize("options", [{"label_smoothing": 0.1}, {"z_loss": 1e-3, "softcap": 5.0}], ids=str)
def test_half_precision_within_error_budget(dtype, rounding, options):
    """fp16/bf16 operands, fp32 tiles and accumulators: no worse than the composite path in the same dtype plus
    one rounding to the dtype (``rounding``: its unit roundoff)."""
    hidden, weight, bias, target = _make(40, 24, 36, dtype)
    options = {"reduction": "sum", **options}
    loss, grads = _loss_and_grads(hidden, weight, bias, target, **options)
    peer_loss, peer = _loss_and_grads(hidden, weight, bias, target, impl="composite", **options)
    oracle_loss, oracle = _oracle(hidden, weight, bias, target, **options)
    assert all(g.dtype == dtype for g in grads)
    assert_within_budget(loss, peer_loss, oracle_loss, tol=rounding * abs(float(oracle_loss)))
    for grad, peer_grad, oracle_grad in zip(grads, peer, oracle):
        assert_within_budget(grad, peer_grad, oracle_grad, tol=rounding * np.abs(oracle_grad).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_stay_finite_and_exact(dtype):
    """Logits of order ±1e4 (hidden scaled by 3e3): finite, and equal to the oracle (one-hot softmax rows)."""
    hidden, weight, bias, target = _make(19, 7, 23, dtype, scale=3e3)
    options = {"z_loss": 1e-4, "label_smoothing": 0.05, "reduction": "none"}
    loss, grads = _loss_and_grads(hidden, weight, bias, target, **options)
    expected, expected_grads = _oracle(hidden, weight, bias, target, **options)
    assert to_numpy(loss.abs()).max() > 1e3  # the regime under test is reached
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    for grad, reference in zip(grads, expected_grads):
        np.testing.assert_allclose(to_numpy(grad), reference, rtol=0, atol=rtol * np.abs(reference).max())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_and_no_rows(reduction):
    """Every row ignored: loss 0 and exactly zero gradients (no NaN from 0/0); N = 0 works too."""
    hidden, weight, bias, _ = _make(20, 8, 30, torch.float64)
    ignored = torch.full((20,), -100, device=DEVICE)
    loss, grads = _loss_and_grads(hidden, weight, bias, ignored, reduction=reduction, z_loss=1e-2)
    assert torch.count_nonzero(loss) == 0 and not torch.isnan(loss).any()
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    empty_loss, empty_grads = _loss_and_grads(hidden[:0], weight, bias, ignored[:0], reduction=reduction)
    assert empty_loss.shape == ((0,) if reduction == "none" else ())
    assert torch.count_nonzero(empty_loss) == 0 and all(torch.count_nonzero(g) == 0 for g in empty_grads)


def test_no_grad_partial_grads_and_inputs_untouched():
    hidden, weight, bias, target = _make(20, 8, 30, torch.float64)
    copies = [t.clone() for t in (hidden, weight, bias, target)]
    with torch.no_grad():
        loss = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl="triton_fused")
    expected, expected_grads = _oracle(hidden, weight, bias, target)
    assert_close_f64(loss, expected)
    frozen_weight = weight.clone()  # no requires_grad: only ∂h and ∂b are built
    hidden_leaf, bias_leaf = hidden.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(hidden_leaf, frozen_weight, target, bias=bias_leaf, impl="triton_fused")
    grad_h, grad_b = torch.autograd.grad(loss, (hidden_leaf, bias_leaf))
    assert_close_f64(grad_h, expected_grads[0])
    assert_close_f64(grad_b, expected_grads[2])
    for original, copy in zip((hidden, weight, bias, target), copies):
        assert torch.equal(original, copy)


def test_frozen_hidden_wider_accumulation_and_module():
    """Only ∂W, ∂b wanted (frozen hidden); fp32 inputs with an fp64 ∂W accumulator; the nn module's impl."""
    hidden, weight, bias, target = _make(26, 11, 35, torch.float32)
    weight_leaf, bias_leaf = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(hidden, weight_leaf, target, bias=bias_leaf, impl="triton_fused",
                                           accumulation_dtype=torch.float64, label_smoothing=0.1)
    grad_w, grad_b = torch.autograd.grad(loss, (weight_leaf, bias_leaf))
    expected, expected_grads = _oracle(hidden, weight, bias, target, label_smoothing=0.1)
    assert grad_w.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), float(expected), rtol=1e-5)
    for grad, reference in zip((grad_w, grad_b), expected_grads[1:]):
        np.testing.assert_allclose(to_numpy(grad), reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    module = softmaxkit.nn.LinearCrossEntropyLoss(impl="triton_fused", label_smoothing=0.1)
    np.testing.assert_allclose(module(hidden, weight, target, bias=bias).item(), float(expected), rtol=1e-5)


def test_saves_no_logits_sized_tensor():
    """What autograd keeps between forward and backward: the inputs and O(N) statistics, nothing of N·C size."""
    hidden, weight, bias, target = _make(40, 6, 50, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], impl="triton_fused",
                                               z_loss=1e-3)
    assert saved and max(t.numel() for t in saved) == weight.numel() < 40 * 50
    assert {t.data_ptr() for t in saved} >= {t.data_ptr() for t in leaves}  # the inputs themselves, no copies
    torch.autograd.grad(loss, leaves)


def _filtered(hidden, weight, bias, target, filter_eps, reduction="none", upstream=None):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    config = LinearCrossEntropyConfig(reduction=reduction, z_loss=1e-3, num_classes=weight.shape[0])
    loss = fused_linear_cross_entropy(*leaves, target, None, config, filter_eps=filter_eps)
    return loss.detach(), torch.autograd.grad(loss if upstream is None else (loss * upstream).sum(), leaves)


def test_gradient_filtering_is_opt_in_and_bounded():
    """filter_eps=None or 0 is exact; filter_eps>0 skips whole tiles of negligible G (here the classes past the
    first 16-wide tile, pushed to p ≈ e⁻³⁰ by their bias), within the documented bound, loss unchanged."""
    hidden, weight, bias, target = _make(32, 8, 64, torch.float64)
    bias[16:] -= 30.0
    target[target >= 16] = 5
    upstream = torch.rand(32, dtype=torch.float64, device=DEVICE) + 0.5
    exact_loss, exact = _filtered(hidden, weight, bias, target, None, upstream=upstream)
    zero_loss, zero = _filtered(hidden, weight, bias, target, 0.0, upstream=upstream)
    assert torch.equal(exact_loss, zero_loss) and all(torch.equal(a, b) for a, b in zip(exact, zero))
    filter_eps = 1e-6
    loss, (grad_h, grad_w, grad_b) = _filtered(hidden, weight, bias, target, filter_eps, upstream=upstream)
    assert torch.equal(loss, exact_loss)
    assert torch.count_nonzero(grad_w[16:]) == 0 and torch.count_nonzero(exact[1][16:]) > 0  # tiles skipped
    assert_close_f64(grad_w[:16], exact[1][:16])
    s = to_numpy(upstream)
    h, w = to_numpy(hidden), to_numpy(weight)
    bound_h = filter_eps * s[:, None] * np.abs(w[16:]).sum(0)[None, :]
    bound_w = filter_eps * (s[:, None] * np.abs(h)).sum(0)
    assert np.all(np.abs(to_numpy(grad_h) - to_numpy(exact[0])) <= bound_h)
    assert np.all(np.abs(to_numpy(grad_w[16:]) - to_numpy(exact[1][16:])) <= bound_w[None, :])
    assert np.all(np.abs(to_numpy(grad_b) - to_numpy(exact[2])) <= filter_eps * s.sum())
    with pytest.raises(ValueError, match="`filter_eps` must be None or a finite number >= 0, but got -1.0"):
        _filtered(hidden, weight, bias, target, -1.0)


def test_bad_arguments_raise():
    hidden, weight, _, target = _make(4, 3, 5, torch.float64)
    probabilities = torch.softmax(torch.randn(4, 5, dtype=torch.float64, device=DEVICE), -1)
    with pytest.raises(ValueError, match="impl='triton_fused'.*class-index targets"):
        softmaxkit.linear_cross_entropy(hidden, weight, probabilities, impl="triton_fused")
    with pytest.raises(ValueError, match="`accumulation_dtype` must be None, torch.float32 or torch.float64, but got torch.float16"):
        softmaxkit.linear_cross_entropy(hidden.half(), weight.half(), target, impl="triton_fused",
                                        accumulation_dtype=torch.float16)
    config = LinearCrossEntropyConfig(num_classes=5)
    with pytest.raises(ValueError, match="`splits` must be a positive int or None, but got 0"):
        fused_linear_cross_entropy(hidden, weight, None, target, None, config, splits=0)
    with pytest.raises(ValueError, match="`impl` must be one of .*'triton_fused'"):
        softmaxkit.linear_cross_entropy(hidden, weight, target, impl="fused")


@pytest.mark.skipif(ON_GPU, reason="checks the CPU refusal")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, _, target = _make(4, 3, 5, torch.float64)
    with pytest.raises(ValueError, match="impl='triton_fused'.*needs CUDA tensors.*cpu"):
        softmaxkit.linear_cross_entropy(hidden, weight, target, impl="triton_fused")


@settings(max_examples=25, deadline=None)
@given(
    num_rows=st.integers(1, 20), hidden_size=st.integers(1, 20), num_classes=st.integers(1, 40),
    ignored_fraction=st.sampled_from([0.0, 0.3, 1.0]), with_bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]), label_smoothing=st.sampled_from([0.0, 0.15]),
    softcap=st.sampled_from([None, 5.0]), logit_scale=st.sampled_from([1.0, 100.0]), seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(num_rows, hidden_size, num_classes, ignored_fraction, with_bias, reduction,
                                 label_smoothing, softcap, logit_scale, seed):
    """Any small shape (incl. 1 class, 1 feature, one row), ignore masks, options, large logits: the oracle."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=generator, dtype=torch.float64).mul(logit_scale).to(DEVICE)
    weight = torch.randn(num_classes, hidden_size, generator=generator, dtype=torch.float64).to(DEVICE)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64).to(DEVICE) if with_bias else None
    target = torch.randint(0, num_classes, (num_rows,), generator=generator)
    target[torch.rand(num_rows, generator=generator) < ignored_fraction] = -100
    target = target.to(DEVICE)
    options = {"reduction": reduction, "label_smoothing": label_smoothing, "softcap": softcap}
    loss, grads = _loss_and_grads(hidden, weight, bias, target, **options)
    expected, expected_grads = _oracle(hidden, weight, bias, target, **options)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_f64(loss, expected, atol=1e-12 * max(1.0, np.abs(expected).max()))
    for grad, reference in zip(grads, expected_grads):
        assert_close_f64(grad, reference, atol=1e-12 * max(1.0, np.abs(reference).max()))


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_bfloat16_within_error_budget_of_the_oracle():
    """bf16 at an LLM-like shape: no worse than the bf16 composite path (bf16 logits) plus one bf16 rounding."""
    hidden, weight, bias, target = _make(2048, 512, 32003, torch.bfloat16)
    options = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}
    loss, grads = _loss_and_grads(hidden, weight, bias, target, **options)
    peer_loss, peer = _loss_and_grads(hidden, weight, bias, target, impl="composite", **options)
    exact = [t.to(torch.float64) for t in (hidden, weight, bias)]
    oracle_loss, oracle = _loss_and_grads(*exact, target, impl="composite", **options)
    assert_within_budget(loss, peer_loss, oracle_loss, tol=2.0**-8 * abs(oracle_loss.item()))
    for grad, peer_grad, oracle_grad in zip(grads, peer, oracle):
        assert_within_budget(grad, peer_grad, oracle_grad, tol=2.0**-8 * oracle_grad.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize(("num_rows", "hidden_size", "num_classes"),
                         [(66_000, 32, 32_768), (1_050_000, 2048, 8), (24, 2048, 1_050_000)],
                         ids=["N*C", "N*D", "C*D"])
def test_gpu_more_than_2_to_the_31_elements(num_rows, hidden_size, num_classes):
    """int64 offsets: N·C > 2^31 logits (never materialised), N·D > 2^31 (hidden, ∂h) and C·D > 2^31 (weight,
    ∂W): equal to the chunked torch path in fp32, on the last rows (past element 2^31) and on column sums."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(num_rows, hidden_size, device="cuda", generator=generator)
    weight = torch.randn(num_classes, hidden_size, device="cuda", generator=generator) / hidden_size**0.5
    target = torch.randint(0, num_classes, (num_rows,), device="cuda", generator=generator)
    loss, grads = _loss_and_grads(hidden, weight, None, target, reduction="sum")
    expected, expected_grads = _loss_and_grads(hidden, weight, None, target, impl="torch", reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for grad, reference in zip(grads, expected_grads):
        atol = 1e-5 * reference.abs().max().item()
        torch.testing.assert_close(grad[-2000:], reference[-2000:], rtol=0, atol=atol)
        torch.testing.assert_close(grad.sum(0), reference.sum(0), rtol=1e-4, atol=atol * grad.shape[0] ** 0.5)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """No host sync: forward + backward capture in a CUDA graph; replays on new data give the eager result."""
    hidden, weight, bias, target = _make(512, 64, 1000, torch.float32)
    static = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    static_target = target.clone()

    def step():
        loss = softmaxkit.linear_cross_entropy(static[0], static[1], static_target, bias=static[2],
                                               impl="triton_fused", z_loss=1e-3)
        return (loss, *torch.autograd.grad(loss, static))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    new_hidden, new_weight, new_bias, new_target = _make(512, 64, 1000, torch.float32)
    with torch.no_grad():
        for leaf, value in zip(static, (new_hidden, new_weight, new_bias)):
            leaf.copy_(value)
    static_target.copy_(new_target)
    graph.replay()
    torch.cuda.synchronize()
    expected = _loss_and_grads(new_hidden, new_weight, new_bias, new_target, z_loss=1e-3)
    torch.testing.assert_close(outputs[0], expected[0], rtol=1e-5, atol=0)
    for got, reference in zip(outputs[1:], expected[1]):
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


_COMPILE_FOR_HOPPER = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import re, subprocess, tempfile
import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from softmaxkit.backends.triton import fused_linear_cross_entropy as fused
from softmaxkit.backends.triton import linear_cross_entropy as chunked

def compile_for_sm90(kernel, kind, constants, num_warps, spill_free=True):
    source = ASTSource(kernel, {name: "constexpr" if name in constants else kind(name) for name in kernel.arg_names},
                       constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], kernel
    if not spill_free:
        return
    # the tiles were sized to fit the registers: ptxas must report no spills (an fp64 tile once spilled 276 B)
    ptxas = knobs.nvidia.ptxas_blackwell.path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "kernel.o")],
                             capture_output=True, text=True, check=True)
    spills = re.findall(r"(\d+) bytes spill stores", log.stdout + log.stderr)
    assert spills and all(n == "0" for n in spills), (kernel, constants, log.stdout + log.stderr)

# the fused kernels with bf16 operands (tensor-core dots) and with fp32 operands (IEEE dots), every option on
for operand, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    flags = dict(HAS_BIAS=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True, PARAMS_IN_MEMORY=False,
                 IEEE=fused._ieee_dot(dtype))
    for kernel, blocks, extra in (
        (fused._fused_lce_fwd_kernel, fused._blocks(dtype), {}),
        (fused._fused_lce_bwd_kernel, fused._blocks(dtype, backward=True),
         dict(NEED_HIDDEN=True, NEED_WEIGHT=True, NEED_BIAS=True, HAS_FILTER=False)),
        (fused._fused_lce_bwd_kernel, fused._blocks(dtype, backward=True),
         dict(NEED_HIDDEN=True, NEED_WEIGHT=True, NEED_BIAS=True, HAS_FILTER=True)),
    ):
        def kind(name):
            if name in ("hidden_ptr", "weight_ptr", "bias_ptr"):
                return "*" + operand
            if name == "target_ptr":
                return "*i64"
            if name in ("part_smooth_ptr", "part_weight_ptr"):  # the label-smoothing partials are float64
                return "*fp64"
            if name.endswith("_ptr"):
                return "*fp32"
            return "fp32" if name in ("eps", "inv_t", "softcap", "z_loss", "filter_eps") else "i64"
        compile_for_sm90(kernel, kind, dict(flags, **extra, BLOCK_M=blocks[0], BLOCK_N=blocks[1],
                                            BLOCK_K=blocks[2]), blocks[3])

# the chunked path's weight-gradient kernel: bf16/fp32 operands into fp32, and into fp64 (accumulation_dtype)
for operand, dtype, accumulator in (("bf16", torch.bfloat16, "fp32"), ("fp32", torch.float32, "fp32"),
                                    ("bf16", torch.bfloat16, "fp64")):
    kind = lambda name: {"a_ptr": "*" + operand, "b_ptr": "*" + operand, "c_ptr": "*" + accumulator}.get(name, "i64")
    compile_for_sm90(chunked._accumulate_at_b_kernel, kind,
                     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, IEEE=chunked._ieee_dot(dtype)), 8,
                     spill_free=False)
print("compiled")
'''


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the compiled kernels themselves")
def test_bfloat16_kernels_compile_for_sm90():
    """The interpreter never compiles: check that Triton's code generator and ptxas accept both fused kernels
    with every option on (backward with and without gradient filtering), bf16 and fp32 operands and the GPU
    tile sizes, and the chunked path's weight-gradient kernel (what the CPU-only CI cannot otherwise see)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
