"""Triton sparsemax / 1.5-entmax kernels against the NumPy float64 oracle and the torch implementation.

Without CUDA they run under ``TRITON_INTERPRET=1``, where each bisection step is a Python-level loop: rows
stay short (C = 40, and C = 1100 once for the multi-block path with the interpreter's 1024-column blocks).
Tolerances: float64 at 1e-10 against the oracle (the threshold is solved exactly on the support after
bisection); float32 at 1e-6 absolute (probabilities are ≤ 1); fp16/bf16 within the error budget of the
torch path in that dtype.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import softmaxkit
from softmaxkit import reference

from ._helpers import assert_close_f64, assert_within_budget

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from softmaxkit.backends.triton.sparse import triton_entmax  # noqa: E402

ORACLES = {"sparsemax": reference.sparsemax, "entmax15": reference.entmax15}
TORCH = {"sparsemax": softmaxkit.sparsemax, "entmax15": softmaxkit.entmax15}


def _jacobian_vector(p: np.ndarray, g: np.ndarray, kind: str) -> np.ndarray:
    """Oracle backward: s ⊙ g − s (Σ s g)/Σ s, s = 1[p > 0] (sparsemax) or √p (entmax15)."""
    s = (p > 0).astype(np.float64) if kind == "sparsemax" else np.sqrt(p)
    return s * g - s * (s * g).sum(-1, keepdims=True) / s.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("num_classes", [1, 40, 1100])
def test_float64_matches_oracle(kind, num_classes):
    x = (torch.randn(3, num_classes, dtype=torch.float64) * 3).to(DEVICE)
    x[0, 0] = -float("inf") if num_classes > 1 else x[0, 0]
    leaf = x.clone().requires_grad_()
    p = triton_entmax(leaf, kind)
    g = torch.randn_like(p)
    (grad,) = torch.autograd.grad(p, leaf, g)
    expected = ORACLES[kind](x.cpu().numpy())
    assert_close_f64(p, expected)
    assert_close_f64(grad, _jacobian_vector(expected, g.cpu().numpy(), kind))
    assert_close_f64(p.sum(-1), np.ones(3))


@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
def test_float32_matches_torch_path_and_ties(kind):
    x = torch.randn(4, 40).to(DEVICE)
    x[1] = 0.5  # all tied: uniform
    x[2, :3] = 4.0  # a tie at the top
    p = triton_entmax(x, kind)
    expected = TORCH[kind](x)
    np.testing.assert_allclose(p.cpu().numpy(), expected.cpu().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p[1].cpu().numpy(), np.full(40, 1 / 40), rtol=1e-6)


@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_budget(kind, dtype):
    x = (torch.randn(3, 40) * 2).to(DEVICE, dtype)
    p = triton_entmax(x, kind)
    peer = TORCH[kind](x)
    oracle = ORACLES[kind](x.cpu().double().numpy())
    assert p.dtype == dtype
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # one rounding of a probability ≤ 1
    assert_within_budget(p, peer, oracle, tol=unit)


def test_gradcheck_and_non_contiguous():
    # fast_mode: directional derivatives instead of the full Jacobian (each interpreted call costs ~0.1 s)
    x = torch.randn(2, 7, dtype=torch.float64).to(DEVICE).requires_grad_()
    for kind in ("sparsemax", "entmax15"):
        assert torch.autograd.gradcheck(lambda v, kind=kind: triton_entmax(v, kind), (x,), eps=1e-6, atol=1e-8,
                                        fast_mode=True)
    columns = torch.randn(7, 3, dtype=torch.float64).to(DEVICE).t()  # class stride != 1
    assert_close_f64(triton_entmax(columns, "sparsemax"), reference.sparsemax(columns.cpu().numpy()))


def test_bad_kind_is_rejected():
    with pytest.raises(ValueError, match="`kind` must be"):
        triton_entmax(torch.randn(2, 3).to(DEVICE), "softmax")


@pytest.mark.gpu
def test_public_functions_use_the_kernels_on_cuda():
    x = torch.randn(64, 32000, device="cuda")
    torch.testing.assert_close(softmaxkit.sparsemax(x), triton_entmax(x, "sparsemax"))
    torch.testing.assert_close(softmaxkit.entmax15(x), triton_entmax(x, "entmax15"))
