"""Precision of the sparse family at extreme widths, non-finite rows, and the float64 sparse oracle.

* Wide near-uniform fp32 rows (an LLM vocabulary at initialisation): the maps' rows must sum to 1 within
  1e-4 at any width on every implementation (the thresholds are solved in float64), and each entry must
  match the float64 oracle to a few fp32 ulps of the entry size (``1e-7`` absolute here: entries ~1e-5).
* α-entmax rows without a threshold (a NaN, a +inf, every entry −inf) follow PyTorch's softmax: NaN out,
  NaN gradient; a target on a −inf class has an infinite loss.
* The Fenchel-Young losses divide by the temperature in fp32 for fp16/bf16 logits.
* The oracle (``softmaxkit.reference``) shifts by the row max, never raises on finite input, and is exact
  against rational arithmetic (``fractions.Fraction``).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference
from softmaxkit.backends.cpu import sparse as cpu_sparse

MAPS = {"sparsemax": softmaxkit.sparsemax, "entmax15": softmaxkit.entmax15}
ORACLES = {"sparsemax": reference.sparsemax, "entmax15": reference.entmax15}
LOSSES = {
    "sparsemax_loss": softmaxkit.sparsemax_loss,
    "entmax15_loss": softmaxkit.entmax15_loss,
    "entmax_bisect_loss": softmaxkit.entmax_bisect_loss,
}
IMPLS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not cpu_sparse.available(torch.float32), reason="no CPU sparse kernel here"))]


def _near_uniform(num_classes: int) -> torch.Tensor:
    """The reported rows: zeros with one entry at 0.08 (support = every entry), plus a jittered one."""
    x = torch.zeros(2, num_classes)
    x[0, 0] = 0.08
    x[1] = 1e-3 * torch.randn(num_classes, generator=torch.Generator().manual_seed(0))
    return x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("num_classes", [50_000, 70_001])
def test_wide_near_uniform_rows_sum_to_one(kind, impl, num_classes):
    x = _near_uniform(num_classes)
    p = MAPS[kind](x, impl=impl)
    sums = p.double().sum(dim=1)
    assert torch.all((sums - 1).abs() <= 1e-4), sums
    expected = ORACLES[kind](x.double().numpy())
    assert np.abs(p.double().numpy() - expected).max() <= 1e-7


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
def test_wide_near_uniform_losses_match_oracle(kind, impl):
    x = _near_uniform(50_000).requires_grad_()
    target = torch.tensor([0, 7])
    loss = LOSSES[f"{kind}_loss"](x, target, reduction="none", impl=impl)
    # the oracle's map, and ℓ = ⟨p − e_y, x⟩ + H(p), ∂ℓ/∂x = p − e_y, in float64 (no (C, C) one-hot matrix)
    z = x.detach().double().numpy()
    p = ORACLES[kind](z)
    onehot = np.zeros_like(p)
    onehot[np.arange(2), target.numpy()] = 1.0
    entropy = (1 - (p * p).sum(1)) / 2 if kind == "sparsemax" else (1 - (p * np.sqrt(p)).sum(1)) / 0.75
    expected = ((p - onehot) * z).sum(1) + entropy
    np.testing.assert_allclose(loss.detach().double().numpy(), expected, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert np.abs(x.grad.double().numpy() - (p - onehot)).max() <= 1e-7


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
def test_triton_wide_near_uniform_rows_sum_to_one(kind):
    pytest.importorskip("triton")
    from softmaxkit.backends.triton.sparse import triton_entmax

    x = torch.zeros(1, 20_000)  # the interpreter runs a Python loop per block: 20k columns take seconds
    x[0, 0] = 0.08
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = triton_entmax(x.to(device), kind).cpu()
    assert abs(p.double().sum().item() - 1) <= 1e-4
    assert np.abs(p.double().numpy() - ORACLES[kind](x.double().numpy())).max() <= 1e-7


# ------------------------------------------------------------------------------- non-finite α-entmax rows
NAN, INF = math.nan, math.inf


def _non_finite_rows() -> torch.Tensor:
    return torch.tensor([[1.0, NAN, 0.0], [1.0, INF, 0.0], [-INF, -INF, -INF], [1.0, 2.0, -INF]])


def test_entmax_bisect_loss_non_finite_rows_are_nan():
    x = _non_finite_rows().requires_grad_()
    target = torch.tensor([0, 0, 0, 2])
    loss = softmaxkit.entmax_bisect_loss(x, target, reduction="none")
    assert torch.isnan(loss[:3]).all(), loss
    assert loss[3] == INF  # a target on a −inf class, as F.cross_entropy
    assert torch.isnan(softmaxkit.entmax_bisect_loss(x, target)).item()
    # softmax cross-entropy (α = 1) and PyTorch agree on the same rows
    reference_loss = torch.nn.functional.cross_entropy(x.detach(), target, reduction="none")
    assert torch.isnan(reference_loss[:3]).all() and reference_loss[3] == INF
    loss[:3].sum().backward()
    assert torch.isnan(x.grad[:3]).all()


@pytest.mark.parametrize("alpha", [1.5, 1.2, 3.0])
def test_entmax_bisect_non_finite_rows_have_nan_gradient(alpha):
    x = _non_finite_rows().requires_grad_()
    p = softmaxkit.entmax_bisect(x, alpha=alpha)
    assert torch.isnan(p[:3]).all()
    (p * torch.arange(12.0).reshape(4, 3)).sum().backward()
    assert torch.isnan(x.grad[:3]).all(), x.grad  # as torch.softmax's gradient on those rows
    assert torch.isfinite(x.grad[3]).all()
    softmax_x = _non_finite_rows().requires_grad_()
    (torch.softmax(softmax_x, dim=1) * torch.arange(12.0).reshape(4, 3)).sum().backward()
    assert torch.isnan(softmax_x.grad[:3]).all()


# ------------------------------------------------------------------------------- temperature in fp32
@pytest.mark.parametrize("name", list(LOSSES))
def test_fp16_temperature_upcasts_before_dividing(name):
    x = torch.tensor([[700.0, 0.0, -3.0]], dtype=torch.float16)
    target = torch.tensor([0])
    loss = LOSSES[name](x, target, temperature=0.01)
    assert loss.dtype == torch.float16
    assert loss.item() == 0.0  # z = (70000, 0, -300): one-hot, loss exactly 0 (fp16 70000 is inf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_low_precision_temperature_equals_fp32_rounded_once(name, dtype):
    x = (torch.randn(6, 9, generator=torch.Generator().manual_seed(3)) * 3).to(dtype).requires_grad_()
    target = torch.arange(6) % 9
    loss = LOSSES[name](x, target, reduction="none", temperature=0.3)
    expected = LOSSES[name](x.detach().float(), target, reduction="none", temperature=0.3)
    torch.testing.assert_close(loss, expected.to(dtype), atol=0, rtol=0)


# ------------------------------------------------------------------------------- the float64 oracle
def test_oracle_extreme_row_does_not_raise():
    row = [[3e38, -3e38, 0.0]]
    np.testing.assert_array_equal(reference.sparsemax(row), [[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(reference.entmax15(row), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(reference.entmax_bisect(row, alpha=1.5), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(reference.sparsemax([[1e300, 1e300, -1e300]]), [[0.5, 0.5, 0.0]])


def _exact_sparsemax(row: list[float]) -> list[Fraction]:
    """Sparsemax in rational arithmetic: the sorted-prefix rule with exact sums."""
    values = [Fraction(v) for v in row]
    ordered = sorted(values, reverse=True)
    total, k, chosen = Fraction(0), 1, ordered[0]
    for j, value in enumerate(ordered, start=1):
        total += value
        if 1 + j * value > total:
            k, chosen = j, total
    tau = (chosen - 1) / k
    return [max(v - tau, Fraction(0)) for v in values]


MAGNITUDES = st.sampled_from([1.0, 1e-3, 1e4, 1e15, 1e100, 1e300])


@settings(max_examples=150, deadline=None)
@given(
    base=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=12),
    shift=st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False),
    scale=MAGNITUDES,
)
def test_oracle_sparsemax_exact_for_any_finite_row(base, shift, scale):
    row = [shift + scale * b for b in base]
    if not all(math.isfinite(v) for v in row):
        return
    got = reference.sparsemax([row])[0]
    exact = _exact_sparsemax(row)
    # exact up to the rounding of each output (and of x − τ): a few ulps of 1
    assert max(abs(float(g) - float(e)) for g, e in zip(got, exact)) <= 4e-16 * len(row)
    assert abs(math.fsum(got) - 1.0) <= 4e-16 * len(row)


@settings(max_examples=150, deadline=None)
@given(
    base=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=12),
    shift=st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False),
    scale=MAGNITUDES,
)
def test_oracle_entmax_never_raises_and_sums_to_one(base, shift, scale):
    row = np.array([shift + scale * b for b in base])
    if not np.isfinite(row).all():
        return
    for p in (reference.entmax15(row[None])[0], reference.entmax_bisect(row[None], alpha=1.7)[0]):
        assert np.isfinite(p).all() and (p >= 0).all()
        assert abs(math.fsum(p) - 1.0) <= 1e-12
    # shift invariance where the shift is exact in float64
    if scale == 1.0 and abs(shift) < 1e6:
        shifted = reference.entmax15((row - np.floor(shift))[None])[0]
        np.testing.assert_allclose(reference.entmax15(row[None])[0], shifted, atol=1e-9)
