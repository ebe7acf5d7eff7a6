"""``impl="triton_fused"`` as custom ops: shifted-form precision, ignored non-finite rows, compile, opcheck.

The fused kernels run under ``TRITON_INTERPRET=1`` on CPU tensors here (conftest), so shapes are tiny; they
still span several 16-wide tiles and both forward vocabulary ranges (``splits=2`` under the interpreter), so
the shifted combination of ranges is exercised.

Shift invariance: the hidden states and weights hold small multiples of 1/2 and the bias is a large
constant ``c`` plus multiples of 1/4, so every fp32 logit ``h·W + b`` is exact (its ulp at ``|c| ≤ 2^22`` is
at most 1/2 … 1/4 of the grid): any error then comes from how the loss is formed, not from rounding the
logits. The shifted form ``(m − z_y) + log s`` keeps fp32 round-off at a few ulps of ``log s`` (≈ 1e-6); the
form ``LSE − z_y`` loses an ulp of ``c`` (1e-3 at 1e4, 0.06 at 1e6), so the test tells the two apart.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo

import softmaxkit
from softmaxkit import reference as ref

from ._helpers import assert_close_f64, to_numpy

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import softmaxkit.backends.triton.fused_linear_cross_entropy  # noqa: E402  (registers the ops)

N, D, C = 19, 5, 37


def _oracle(hidden, weight, bias, target, **options):
    """Loss and (∂h, ∂W, ∂b) in float64 from the reference cross-entropy of ``h Wᵀ + b`` (unit upstream)."""
    h, w = to_numpy(hidden), to_numpy(weight)
    logits = h @ w.T + to_numpy(bias)
    y = to_numpy(target)
    kwargs = {
        "weight": None if options.get("class_weight") is None else to_numpy(options["class_weight"]),
        "reduction": options.get("reduction", "mean"),
        "label_smoothing": options.get("label_smoothing", 0.0),
    }
    loss = ref.cross_entropy(logits, y, **kwargs)
    grad = ref.cross_entropy_grad(logits, y, **kwargs, **(
        {"grad_output": np.ones(len(y))} if kwargs["reduction"] == "none" else {}))
    return np.asarray(loss), [grad @ w, grad.T @ h, grad.sum(0)]


def _loss_and_grads(hidden, weight, bias, target, impl, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], impl=impl, **options)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach(), grads


def _dyadic(shift, seed=0):
    """fp32 inputs whose logits are exact in fp32 and sit at ``shift`` (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (N, D), generator=generator).float() / 2
    weight = torch.randint(-3, 4, (C, D), generator=generator).float() / 2
    bias = shift + torch.randint(-8, 9, (C,), generator=generator).float() / 4
    target = torch.randint(0, C, (N,), generator=generator)
    target[4] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), target.to(DEVICE)


@pytest.mark.parametrize("shift", [1e4, -1e4, 1e6, 2.0**22])
@pytest.mark.parametrize(("reduction", "options"), [
    ("mean", {}),
    ("none", {"label_smoothing": 0.1}),
    ("sum", {"label_smoothing": 0.2, "class_weight": "dyadic"}),
], ids=str)
def test_shift_invariance_float32(shift, reduction, options):
    """Loss and gradients at logits offset by a large constant: within a few fp32 ulps of the O(1) quantities
    (and of impl="torch"'s error), independent of the offset."""
    hidden, weight, bias, target = _dyadic(shift)
    options = {**options, "reduction": reduction}
    if options.get("class_weight") == "dyadic":
        options["class_weight"] = (torch.arange(C) % 4 + 1).float().to(DEVICE) / 2
    loss, grads = _loss_and_grads(hidden, weight, bias, target, "triton_fused", **options)
    torch_loss, torch_grads = _loss_and_grads(hidden, weight, bias, target, "torch", **options)
    expected, expected_grads = _oracle(hidden, weight, bias, target, **options)
    error = np.abs(to_numpy(loss).astype(np.float64) - expected).max()
    torch_error = np.abs(to_numpy(torch_loss).astype(np.float64) - expected).max()
    scale = max(1.0, np.abs(expected).max())
    # fp32: a few ulps (2^-23 ≈ 1.2e-7) of the O(1)..O(N) loss, times the ~C terms of log s
    assert error <= max(4 * torch_error, 2e-6 * scale), (error, torch_error)
    for grad, torch_grad, reference in zip(grads, torch_grads, expected_grads):
        bound = np.abs(reference).max()
        g_error = np.abs(to_numpy(grad).astype(np.float64) - reference).max()
        t_error = np.abs(to_numpy(torch_grad).astype(np.float64) - reference).max()
        assert g_error <= max(4 * t_error, 1e-5 * bound), (g_error, t_error)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}], ids=str)
def test_ignored_rows_with_non_finite_hidden_states_give_zero(bad, reduction, options):
    """An ignored row whose hidden state is NaN/±inf: its loss and ∂h row are exactly 0, and ∂W, ∂b and the
    other rows' values equal the oracle on the same batch with that row zeroed."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, D, generator=generator, dtype=torch.float64)
    weight = torch.randn(C, D, generator=generator, dtype=torch.float64)
    bias = torch.randn(C, generator=generator, dtype=torch.float64)
    target = torch.randint(0, C, (N,), generator=generator)
    target[[3, 17]] = -100
    poisoned = hidden.clone()
    poisoned[3] = bad
    poisoned[17, 1] = bad
    options = {**options, "reduction": reduction}
    loss, grads = _loss_and_grads(poisoned.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), target.to(DEVICE),
                                  "triton_fused", **options)
    clean = hidden.clone()
    clean[[3, 17]] = 0.0
    expected, expected_grads = _loss_and_grads(clean.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE),
                                               target.to(DEVICE), "triton_fused", **options)
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(g).all() for g in grads)
    if reduction == "none":
        assert (loss[[3, 17]] == 0).all()
    assert (grads[0][[3, 17]] == 0).all()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)


def test_clean_batch_matches_oracle_with_an_ignored_nan_row():
    """The reference for the test above is itself the oracle (float64, every option off but smoothing)."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, D, generator=generator, dtype=torch.float64)
    weight = torch.randn(C, D, generator=generator, dtype=torch.float64)
    bias = torch.randn(C, generator=generator, dtype=torch.float64)
    target = torch.randint(0, C, (N,), generator=generator)
    target[5] = -100
    expected, expected_grads = _oracle(hidden, weight, bias, target, label_smoothing=0.1)
    hidden[5] = float("nan")
    loss, grads = _loss_and_grads(hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), target.to(DEVICE),
                                  "triton_fused", label_smoothing=0.1)
    assert_close_f64(loss, expected)
    expected_grads[0][5] = 0.0
    for grad, reference in zip(grads, expected_grads):
        assert_close_f64(grad, reference)


def test_non_ignored_nan_row_gives_nan():
    """A NaN hidden state on a counted row propagates (PyTorch's semantics), it is not hidden."""
    hidden, weight, bias, target = _dyadic(0.0)
    hidden[0, 0] = float("nan")
    loss = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl="triton_fused", reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()


def _break_count(function, *args) -> int:
    dynamo.reset()
    explanation = dynamo.explain(function)(*args)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traces_without_graph_breaks_and_equals_eager(reduction):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(5, 4, generator=generator).to(DEVICE).requires_grad_()
    target = torch.tensor([0, 4, -100, 2, 1, 3], device=DEVICE)

    def function(h, w):
        return softmaxkit.linear_cross_entropy(h, w, target, impl="triton_fused", reduction=reduction,
                                               label_smoothing=0.1, z_loss=1e-3)

    assert _break_count(function, hidden, weight) == 0

    def value_and_grads(fn):
        leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
        loss = fn(*leaves)
        return (loss.detach(), *torch.autograd.grad(loss.sum(), leaves))

    dynamo.reset()
    eager = value_and_grads(function)
    compiled = value_and_grads(torch.compile(function, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_fake_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.randn(7, 4, device=DEVICE)
        weight = torch.randn(9, 4, device=DEVICE)
        target = torch.zeros(7, dtype=torch.long, device=DEVICE)
        loss, stats = torch.ops.softmaxkit.fused_linear_cross_entropy_triton(
            hidden, weight, None, target, None, -100, "none", 0.0, 1.0, 0.0, None, None, None, None, None)
    assert loss.shape == (7,) and stats.shape == (2, 7) and stats.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    """``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch) of both ops."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True)
    class_weight = torch.rand(7, generator=generator, dtype=torch.float64) + 0.5
    target = torch.tensor([0, 3, -100, 6, 2])
    scalars = (-100, reduction, 0.1, 1.5, 1e-3, 4.0, None, None)
    torch.library.opcheck(torch.ops.softmaxkit.fused_linear_cross_entropy_triton.default,
                          (hidden, weight, bias, target, class_weight, *scalars, 2, None))
    with torch.no_grad():
        _, stats = torch.ops.softmaxkit.fused_linear_cross_entropy_triton(
            hidden, weight, bias, target, class_weight, *scalars, 2, None)
    grad_output = torch.rand(5 if reduction == "none" else (), generator=generator, dtype=torch.float64)
    torch.library.opcheck(torch.ops.softmaxkit.fused_linear_cross_entropy_triton_backward.default,
                          (grad_output, hidden.detach(), weight.detach(), bias.detach(), target, class_weight, stats,
                           *scalars, None, True, True, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_fake_kernels_give_the_real_dtypes(reduction):
    """bf16 inputs: both Triton linear-CE ops return the loss in fp32 (the compute dtype; the public function
    rounds it, or keeps it under autocast), and their fake kernels say so (``opcheck``'s fake-tensor test)."""
    import softmaxkit.backends.triton.linear_cross_entropy  # noqa: F401  (registers the chunked op)

    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(9, 6, generator=generator).to(DEVICE, torch.bfloat16)
    weight = torch.randn(11, 6, generator=generator).to(DEVICE, torch.bfloat16)
    target = torch.tensor([0, 3, -100, 6, 2, 10, 1, 1, 4], device=DEVICE)
    scalars = (-100, reduction, 0.1, 1.0, 1e-3, None, None, None)
    fused_args = (hidden, weight, None, target, None, *scalars, None, None)
    loss, stats = torch.ops.softmaxkit.fused_linear_cross_entropy_triton(*fused_args)
    assert loss.dtype == stats.dtype == torch.float32
    torch.library.opcheck(torch.ops.softmaxkit.fused_linear_cross_entropy_triton.default, fused_args,
                          test_utils=("test_schema", "test_faketensor"))
    if reduction == "mean":  # the chunked Triton op serves the scalar reductions
        chunked_args = (hidden, weight, None, target, None, *scalars, True, True, False)
        assert torch.ops.softmaxkit.linear_cross_entropy_triton(*chunked_args)[0].dtype == torch.float32
        torch.library.opcheck(torch.ops.softmaxkit.linear_cross_entropy_triton.default, chunked_args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("constant", [1e30, -1e30, 3e38])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"label_smoothing": 0.3, "class_weight": "ones"}],
                         ids=str)
def test_constant_rows_at_huge_magnitude_give_log_c(constant, options):
    """Logits all equal to ``c`` (zero hidden states, constant bias): loss ``log C`` (``LSE − z_y`` gives 0 or
    inf − inf) and gradient ``(1/C − onehot) W``, whatever ``c``."""
    num_classes = 40
    hidden = torch.zeros(3, 4, device=DEVICE)
    weight = torch.randn(num_classes, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    bias = torch.full((num_classes,), constant, device=DEVICE)
    target = torch.tensor([0, 5, 39], device=DEVICE)
    if options.get("class_weight") == "ones":
        options = {**options, "class_weight": torch.ones(num_classes, device=DEVICE)}
    loss, (grad_hidden, _, _) = _loss_and_grads(hidden, weight, bias, target, "triton_fused", reduction="none",
                                                **options)
    torch.testing.assert_close(loss, torch.full((3,), np.log(num_classes), dtype=torch.float32, device=DEVICE),
                               rtol=2e-7, atol=0)
    eps = options.get("label_smoothing", 0.0)
    onehot = torch.nn.functional.one_hot(target, num_classes).float()
    expected = (1.0 / num_classes - (1 - eps) * onehot - eps / num_classes) @ weight
    torch.testing.assert_close(grad_hidden, expected, rtol=1e-5, atol=1e-6)
