"""Comparison helpers shared by the tests.

Tolerances, justified by dtype:

* float64 torch vs the float64 NumPy oracle: ``1e-10`` relative (a few hundred ulps at 2.2e-16 each,
  covering the different summation orders of long reductions).
* float32: ``1e-5`` relative (a few ulps of 1.2e-7 times the ~10-100 terms that accumulate error).
* fp16/bf16: never a guessed tolerance: an *error budget*, ``|fast − oracle| <= |torch_same_dtype −
  oracle| + tol`` (:func:`assert_within_budget`).
"""

from __future__ import annotations

import numpy as np
import torch

F64_RTOL, F64_ATOL = 1e-10, 1e-12
F32_RTOL, F32_ATOL = 1e-5, 1e-6


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def assert_close_f64(actual, expected, rtol: float = F64_RTOL, atol: float = F64_ATOL) -> None:
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=rtol, atol=atol)


def assert_close_f32(actual, expected, rtol: float = F32_RTOL, atol: float = F32_ATOL) -> None:
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=rtol, atol=atol)


def assert_within_budget(fast, peer, oracle, tol: float) -> None:
    """Error budget: the fast path may be at most ``tol`` worse than the peer in the same dtype."""
    fast, peer, oracle = to_numpy(fast), to_numpy(peer), to_numpy(oracle)
    budget = np.abs(peer - oracle) + tol
    excess = np.abs(fast - oracle) - budget
    assert np.all(excess <= 0), f"error budget exceeded by up to {excess.max():.3g} (tol {tol})"


def expect_error(message: str, call) -> None:
    """``call()`` raises a ``ValueError`` whose message contains ``message`` (for code that must raise the same
    error on every rank of a process group, where ``pytest.raises`` in one worker would not say which rank)."""
    try:
        call()
    except ValueError as error:
        assert message in str(error), f"expected {message!r} in {error}"
    else:
        raise AssertionError(f"no ValueError raised, expected {message!r}")
