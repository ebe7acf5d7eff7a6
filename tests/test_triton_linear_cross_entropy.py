"""Triton linear cross-entropy (chunked matmul + fused CE kernel + fp32 weight-gradient accumulation kernel).

Without CUDA these run under ``TRITON_INTERPRET=1`` on CPU tensors, so shapes are tiny (a few chunks of
16 rows, C and D not multiples of the 16-wide interpreter tiles). Under the interpreter the kernels' dots
take their operands in fp32 (the interpreter's own bf16 ``tl.dot`` multiplies bit patterns; see
``backends/triton/cross_entropy._dot``), so bf16 is checked here as well as fp64/fp32/fp16; the GPU-sized
bf16 case is ``gpu``-marked.

Tolerances: fp64 against the composite path in fp64 (which matches the oracle, tests/test_cross_entropy.py)
at 1e-10; fp32 at 1e-5 of the largest gradient entry; fp16 and bf16 within an error budget.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import softmaxkit

from ._helpers import assert_close_f64, assert_within_budget

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

#: one rounding of an fp32 result to bf16, relative: 2^-8 round-to-nearest on GPUs; 2^-7 under the interpreter,
#: whose fp32 → bf16 conversion (stores, ``.to``) rounds toward zero (its ``cast_impl`` passes no rounding mode)
BF16_ROUNDING = 2.0**-8 if ON_GPU else 2.0**-7


def _make(num_rows, hidden_size, num_classes, dtype, with_bias=True):
    hidden = torch.randn(num_rows, hidden_size, dtype=torch.float64).to(DEVICE, dtype)
    weight = (torch.randn(num_classes, hidden_size, dtype=torch.float64) / hidden_size**0.5).to(DEVICE, dtype)
    bias = torch.randn(num_classes, dtype=torch.float64).to(DEVICE, dtype) if with_bias else None
    target = torch.randint(0, num_classes, (num_rows,)).to(DEVICE)
    target[2] = -100
    return hidden, weight, bias, target


def _loss_and_grads(hidden, weight, bias, target, impl, upstream=1.0, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2] if bias is not None else None,
                                           impl=impl, chunk_size=16, **options)
    grads = torch.autograd.grad((loss * upstream).sum(), leaves)
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("reduction", "options"),
    [
        ("mean", {}),
        ("sum", {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-3, "temperature": 0.8}),
        ("mean", {"label_smoothing": 0.2, "class_weight": "random"}),
        ("none", {"z_loss": 1e-2}),
    ],
    ids=str,
)
def test_float64_matches_composite(reduction, options):
    hidden, weight, bias, target = _make(37, 20, 45, torch.float64)
    if options.get("class_weight") == "random":
        options = {**options, "class_weight": (torch.rand(45, dtype=torch.float64) + 0.5).to(DEVICE)}
    upstream = 1.7 if reduction != "none" else torch.rand(37, dtype=torch.float64).to(DEVICE)
    loss, grads = _loss_and_grads(hidden, weight, bias, target, "triton", upstream, reduction=reduction, **options)
    expected, expected_grads = _loss_and_grads(hidden, weight, bias, target, "composite", upstream,
                                               reduction=reduction, **options)
    assert_close_f64(loss, expected)
    for grad, reference in zip(grads, expected_grads):
        assert_close_f64(grad, reference)


def test_float32_and_no_bias():
    hidden, weight, _, target = _make(33, 17, 40, torch.float32, with_bias=False)
    loss, grads = _loss_and_grads(hidden, weight, None, target, "triton", label_smoothing=0.1)
    expected, expected_grads = _loss_and_grads(hidden, weight, None, target, "composite", label_smoothing=0.1)
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        scale = reference.abs().max().item()
        np.testing.assert_allclose(grad.cpu().numpy(), reference.cpu().numpy(), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float16, 2.0**-11), (torch.bfloat16, BF16_ROUNDING)], ids=str)
def test_half_precision_weight_gradient_accumulates_in_float32(dtype, rounding):
    """fp16/bf16 operands, fp32 accumulator: within the error budget of the composite path in the same dtype
    (half-precision GEMMs) plus one rounding of the result to the dtype (``rounding``: its unit roundoff)."""
    hidden, weight, bias, target = _make(48, 16, 24, dtype)
    loss, grads = _loss_and_grads(hidden, weight, bias, target, "triton", reduction="sum")
    peer_loss, peer = _loss_and_grads(hidden, weight, bias, target, "composite", reduction="sum")
    exact = [t.to(torch.float64) for t in (hidden, weight, bias)]
    oracle_loss, oracle = _loss_and_grads(*exact, target, "composite", reduction="sum")
    assert all(g.dtype == dtype for g in grads)
    assert_within_budget(loss, peer_loss, oracle_loss, tol=rounding * abs(oracle_loss.item()))
    for grad, peer_grad, oracle_grad in zip(grads, peer, oracle):
        assert_within_budget(grad, peer_grad, oracle_grad, tol=rounding * oracle_grad.abs().max().item())


def test_no_grad_forward_and_all_ignored():
    hidden, weight, bias, target = _make(20, 8, 30, torch.float64)
    with torch.no_grad():
        loss = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl="triton", chunk_size=16)
    expected = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl="composite")
    assert_close_f64(loss, expected.detach())
    ignored = torch.full_like(target, -100)
    loss, grads = _loss_and_grads(hidden, weight, bias, ignored, "triton")
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.gpu
def test_gpu_bfloat16_matches_chunked_torch_path():
    hidden, weight, bias, target = _make(4096, 512, 32000, torch.bfloat16)
    loss, grads = _loss_and_grads(hidden, weight, bias, target, "triton")
    expected, expected_grads = _loss_and_grads(hidden, weight, bias, target, "torch")
    torch.testing.assert_close(loss.float(), expected.float(), rtol=1e-2, atol=1e-2)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), reference.float(), rtol=5e-2, atol=5e-2 * reference.abs().max().item())
