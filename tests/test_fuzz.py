"""Extreme-value fuzz of the softmax family against the exact float64 oracle and PyTorch.

Every case is a magnitude *kind* × dtype × shape × seed (the logits are drawn from the seed, so Hypothesis
shrinks the parameters, not the numbers):

* ``normal`` (N(0, 3²)), ``shift`` (normal + c for c up to 1e30: shift invariance), ``huge`` (±1e4..3e38,
  clipped to the dtype), ``constant`` rows at any magnitude, ``mixed`` (normal with a few huge entries),
  ``subnormal``, ``ties`` (small integers), ``uniform_bump`` (a near-uniform row with one bump, the LLM
  initialisation case), and the non-finite ``neginf`` (masked classes), ``posinf`` and ``nan``.

The precision target: for finite input every loss and gradient is within ``8 ×`` PyTorch's own error (the
same op in the same dtype, against the oracle) plus a few ulps of the dtype at the result's scale, and is
finite wherever the maths is finite (such non-finite results are counted in the failure message). For
non-finite input the non-finite pattern equals PyTorch's (NaN in, NaN out; a target on a −inf class is
+inf). The sparse maps' rows sum to 1 within 1e-4 (fp32/fp64) at any width. The C kernels' unusual layouts
(expanded, strided, transposed) run in a subprocess, so a crash fails the test instead of the session.

Profiles: the conftest's ``ci`` profile (the default) runs a few thousand cases in total, ``dev`` ~2.5×,
``fuzz`` (``HYPOTHESIS_PROFILE=fuzz``) ~50× that.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FINITE_KINDS = ("normal", "shift", "huge", "constant", "mixed", "subnormal", "ties", "uniform_bump")
NONFINITE_KINDS = ("neginf", "posinf", "nan")
KINDS = FINITE_KINDS + NONFINITE_KINDS
#: examples per test: the active profile's max_examples times this (ci: 40 → 480 per test, ~2000 in all)
SCALE = 12
FACTOR = 8.0  # "a small constant × PyTorch's own error"


def _examples() -> int:
    return settings().max_examples * SCALE


def _fuzz(test):
    return settings(max_examples=_examples(), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(test)


def make_logits(kind: str, dtype: torch.dtype, rows: int, cols: int, seed: int) -> torch.Tensor:
    """The logits of one case (deterministic in its arguments)."""
    rng = np.random.default_rng(seed)
    top = float(torch.finfo(dtype).max) / 2
    base = rng.normal(size=(rows, cols)) * 3
    if kind == "normal":
        x = base
    elif kind == "shift":
        x = base + rng.choice([1e3, 1e4, 1e6, 1e8, 1e30, -1e8])
    elif kind == "huge":
        x = rng.choice([-1.0, 1.0], size=(rows, cols)) * 10 ** rng.uniform(4, 38.4, size=(rows, cols))
    elif kind == "extreme":  # ±1e37..max, unclipped: z − m and Σ (z − m) beyond fp32's range (fp32 compute)
        # float64 takes fp32's range: at ±1e308 the float64 oracle itself overflows (docs/design.md)
        top = float(torch.finfo(torch.float32 if dtype == torch.float64 else dtype).max)
        x = rng.choice([-1.0, 1.0], size=(rows, cols)) * top * rng.uniform(0.03, 1.0, size=(rows, cols))
    elif kind == "constant":
        x = np.full((rows, cols), rng.choice([0.0, -7.5, 1e4, 1e8, 1e30, 3e38, -3e38]))
    elif kind == "mixed":
        x = base.copy()
        mask = rng.random((rows, cols)) < 0.3
        x[mask] = rng.choice([-1.0, 1.0], size=mask.sum()) * 10 ** rng.uniform(3, 30, size=mask.sum())
    elif kind == "subnormal":
        x = rng.normal(size=(rows, cols)) * 1e-41
    elif kind == "ties":
        x = rng.integers(-1, 2, size=(rows, cols)).astype(np.float64)
    elif kind == "uniform_bump":
        x = np.zeros((rows, cols))
        x[:, 0] = rng.uniform(0.01, 0.2)
    else:
        x = base.copy()
        mask = rng.random((rows, cols)) < 0.3
        x[mask] = {"neginf": -np.inf, "posinf": np.inf, "nan": np.nan}[kind]
    x = np.clip(x, -top, top) if kind not in ("posinf", "neginf", "extreme") else x
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _bad(actual, expected, baseline, tol, dtype) -> tuple[np.ndarray, int]:
    """Failures of ``|actual − exact| <= FACTOR·(PyTorch's error) + tol`` where exact is finite, and the count
    of non-finite results there; where exact is not finite the values must agree exactly.

    PyTorch's error is its largest over the row for per-class outputs (probabilities, gradients) and over the
    batch for per-row losses (as the issue measures it): a rounding that happens to land PyTorch near the exact
    value of one entry is luck, not its error level."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.broadcast_to(np.asarray(expected, dtype=np.float64), actual.shape)
    top = float(torch.finfo(dtype).max)
    overflow = top + math.ldexp(_eps(dtype), math.floor(math.log2(top))) / 2  # max + half an ulp rounds to inf
    with np.errstate(invalid="ignore"):  # an exact value beyond the dtype's range is ±inf in that dtype
        expected = np.where(np.abs(expected) >= overflow, np.sign(expected) * np.inf, expected)
    baseline = np.broadcast_to(np.asarray(baseline, dtype=np.float64), actual.shape)
    finite = np.isfinite(expected)
    with np.errstate(invalid="ignore"):
        baseline_error = np.where(np.isfinite(baseline) & finite, np.abs(baseline - expected), 0.0)
        if baseline_error.ndim:
            axis = -1 if baseline_error.ndim > 1 else None
            baseline_error = np.broadcast_to(baseline_error.max(axis=axis, keepdims=True), actual.shape)
        allowed = FACTOR * baseline_error + tol
        error = np.abs(actual - expected)
    bad = finite & ~(error <= allowed)
    same_nonfinite = (np.isnan(actual) & np.isnan(expected)) | (actual == expected)
    bad |= ~finite & ~same_nonfinite
    return bad, int(np.sum(finite & ~np.isfinite(actual)))


def _assert_close(name, actual, expected, baseline, tol, dtype):
    bad, nonfinite = _bad(actual, expected, baseline, tol, dtype)
    if bad.any():
        actual = np.asarray(actual, dtype=np.float64)
        where = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} entries off ({nonfinite} non-finite where the maths is finite); first at "
            f"{where}: got {actual[where]!r}, exact {np.broadcast_to(expected, actual.shape)[where]!r}, PyTorch "
            f"{np.broadcast_to(baseline, actual.shape)[where]!r}, tol {np.broadcast_to(tol, actual.shape)[where]!r}")


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _loss_and_grad(function, x):
    x = x.detach().clone().requires_grad_()
    loss = function(x)
    (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    return loss.detach(), (torch.zeros_like(x) if grad is None else grad)


cases = st.tuples(st.sampled_from(KINDS), st.sampled_from(DTYPES), st.integers(1, 6),
                  st.sampled_from([1, 2, 3, 5, 17, 64, 300]), st.integers(0, 2**31 - 1))


# ------------------------------------------------------------------------------------------ softmax family
@_fuzz
@given(case=cases, op=st.sampled_from(["softmax", "log_softmax", "logsumexp"]),
       temperature=st.sampled_from([1.0, 0.5, 3.0]))
def test_fuzz_softmax_log_softmax_logsumexp(case, op, temperature):
    kind, dtype, rows, cols, seed = case
    x = make_logits(kind, dtype, rows, cols, seed)
    x64 = _f64(x)
    if op == "logsumexp":
        temperature = 1.0
        ours, theirs, exact = softmaxkit.logsumexp(x, -1), torch.logsumexp(x, -1), ref.logsumexp(x64)
        scale = np.abs(exact)
    else:
        ours = getattr(softmaxkit, op)(x, -1, temperature=temperature)
        theirs = getattr(torch, op)(x.float() / temperature if dtype in (torch.float16, torch.bfloat16)
                                    else x / temperature, -1).to(dtype)
        exact = getattr(ref, op)(x64, temperature=temperature)
        scale = np.abs(exact) if op == "log_softmax" else np.maximum(np.abs(exact), 1.0 / cols)
    _assert_close(f"{op}[{kind}, {dtype}]", _f64(ours), exact, _f64(theirs), 4 * _eps(dtype) * (1 + scale), dtype)


# ------------------------------------------------------------------------------------------ cross-entropy
def _torch_cross_entropy(x, target, weight, label_smoothing, temperature, z_loss, softcap):
    """The same loss from PyTorch's own ops in the input dtype (per row): the error baseline."""
    z = x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    loss = F.cross_entropy(z, target, weight=None if weight is None else weight.to(z.dtype), reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, -1) ** 2 * (target != -100)
    return loss


ce_options = st.fixed_dictionaries({
    "label_smoothing": st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    "temperature": st.sampled_from([1.0, 1.0, 0.7, 2.0]),
    "z_loss": st.sampled_from([0.0, 0.0, 1e-4]),
    "softcap": st.sampled_from([None, None, 30.0]),
    "weighted": st.booleans(),
    "ignore": st.booleans(),
})


#: the cross-entropy paths also take the unclipped ``extreme`` kind (label smoothing's Σ (z − m) beyond fp32)
ce_cases = st.tuples(st.sampled_from((*KINDS, "extreme")), st.sampled_from(DTYPES), st.integers(1, 6),
                     st.sampled_from([1, 2, 3, 5, 17, 64, 300]), st.integers(0, 2**31 - 1))


@_fuzz
@given(case=ce_cases, options=ce_options, impl=st.sampled_from(["auto", "torch", "composite"]),
       target_seed=st.integers(0, 2**16))
def test_fuzz_cross_entropy(case, options, impl, target_seed):
    _check_cross_entropy(case, options, impl, target_seed)


#: the Triton kernels run interpreted on CPU tensors (TRITON_INTERPRET=1, conftest): ~0.1 s a case, so a small
#: profile (ci: 80 cases) over few rows; 1500 classes take two of the interpreter's 1024-column blocks, so the
#: online shift moves between blocks (the label-smoothing sum is carried across that move)
triton_cases = st.tuples(st.sampled_from((*KINDS, *("extreme",) * 6)), st.sampled_from(DTYPES), st.integers(1, 3),
                         st.sampled_from([1, 2, 3, 17, 300, 1500]), st.integers(0, 2**31 - 1))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@settings(max_examples=2 * settings().max_examples, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=triton_cases, options=ce_options, target_seed=st.integers(0, 2**16))
def test_fuzz_triton_cross_entropy(case, options, target_seed):
    _check_cross_entropy(case, options, "triton", target_seed)


def _check_cross_entropy(case, options, impl, target_seed):
    kind, dtype, rows, cols, seed = case
    if kind == "extreme" and options["temperature"] < 1:
        # not yet handled on any path (PyTorch neither): x/T itself overflows fp32 (z = ±inf, NaN loss) where
        # the exact loss is finite; docs/design.md "Numerical method" states the limit
        options = {**options, "temperature": 1.0}
    x = make_logits(kind, dtype, rows, cols, seed)
    rng = np.random.default_rng(target_seed)
    target = torch.from_numpy(rng.integers(0, cols, size=rows))
    if options["ignore"]:
        target[0] = -100
    work = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.from_numpy(rng.uniform(0.2, 2.0, size=cols)).to(work) if options["weighted"] else None
    kwargs = {k: options[k] for k in ("label_smoothing", "temperature", "z_loss", "softcap")}
    loss, grad = _loss_and_grad(lambda v: softmaxkit.cross_entropy(v, target, weight=weight, reduction="none",
                                                                   impl=impl, **kwargs), x)
    torch_loss, torch_grad = _loss_and_grad(lambda v: _torch_cross_entropy(v, target, weight, **kwargs), x)
    x64, w64 = _f64(x), None if weight is None else _f64(weight)
    with np.errstate(all="ignore"):
        exact = ref.cross_entropy(x64, target.numpy(), w64, reduction="none", **kwargs)
        exact_grad = ref.cross_entropy_grad(x64, target.numpy(), w64, reduction="none", **kwargs)
    eps = _eps(dtype)
    name = f"cross_entropy[{kind}, {dtype}, impl={impl}, {options}]"
    _assert_close(name + " loss", _f64(loss), exact, _f64(torch_loss), 8 * eps * (1 + np.abs(exact)), dtype)
    # ∂ℓ/∂z_j = (A + 2λ·LSE)·p_j − a_j: a few ulps of the terms it is formed from (p_y − 1 cancels)
    with np.errstate(all="ignore"):
        s = x64 if kwargs["softcap"] is None else kwargs["softcap"] * np.tanh(x64 / kwargs["softcap"])
        p = ref.softmax(s, temperature=kwargs["temperature"])
        valid = (target.numpy() != -100)[:, None]
        w = np.ones(cols) if w64 is None else w64
        onehot = np.eye(cols)[np.where(valid[:, 0], target.numpy(), 0)]
        eps_smooth = kwargs["label_smoothing"]
        a = w * ((1 - eps_smooth) * onehot + eps_smooth / cols) * valid
        lse = np.abs(ref.logsumexp(s / kwargs["temperature"]))[:, None] if kwargs["z_loss"] else 0.0
        terms = (a.sum(1, keepdims=True) + 2 * kwargs["z_loss"] * lse) * p + a
        terms = np.where(np.isfinite(terms), terms, 0.0) / kwargs["temperature"]
    row_scale = np.nanmax(np.where(np.isfinite(exact_grad), np.abs(exact_grad), 0), axis=1, keepdims=True)
    _assert_close(name + " grad", _f64(grad), exact_grad, _f64(torch_grad), 8 * eps * (row_scale + terms + 1e-30),
                  dtype)


# ------------------------------------------------------------------------------------------ poly-1 and focal
@_fuzz
@given(case=cases, op=st.sampled_from(["poly1", "focal"]), gamma=st.sampled_from([0.0, 2.0]),
       temperature=st.sampled_from([1.0, 0.5]), target_seed=st.integers(0, 2**16))
def test_fuzz_poly1_and_focal(case, op, gamma, temperature, target_seed):
    kind, dtype, rows, cols, seed = case
    x = make_logits(kind, dtype, rows, cols, seed)
    target = torch.from_numpy(np.random.default_rng(target_seed).integers(0, cols, size=rows))

    def torch_version(v):
        z = (v.float() if dtype in (torch.float16, torch.bfloat16) else v) / temperature
        log_p = torch.log_softmax(z, -1).gather(1, target[:, None])[:, 0]
        p = log_p.exp()
        return (-log_p + (1 - p)) if op == "poly1" else -((1 - p) ** gamma) * log_p

    if op == "poly1":
        ours = lambda v: softmaxkit.poly1_cross_entropy(v, target, reduction="none", temperature=temperature)  # noqa: E731
        exact = lambda a: ref.poly1_cross_entropy(a, target.numpy(), reduction="none", temperature=temperature)  # noqa: E731
        exact_g = lambda a: ref.poly1_cross_entropy_grad(a, target.numpy(), reduction="none", temperature=temperature)  # noqa: E731
    else:
        ours = lambda v: softmaxkit.focal_loss(v, target, gamma=gamma, reduction="none", temperature=temperature)  # noqa: E731
        exact = lambda a: ref.focal_loss(a, target.numpy(), gamma=gamma, reduction="none", temperature=temperature)  # noqa: E731
        exact_g = lambda a: ref.focal_loss_grad(a, target.numpy(), gamma=gamma, reduction="none",  # noqa: E731
                                                temperature=temperature)
    loss, grad = _loss_and_grad(ours, x)
    torch_loss, torch_grad = _loss_and_grad(torch_version, x)
    with np.errstate(all="ignore"):
        expected, expected_grad = exact(_f64(x)), exact_g(_f64(x))
    eps = _eps(dtype)
    name = f"{op}[{kind}, {dtype}, gamma={gamma}, T={temperature}]"
    _assert_close(name + " loss", _f64(loss), expected, _f64(torch_loss), 8 * eps * (1 + np.abs(expected)), dtype)
    row_scale = np.nanmax(np.where(np.isfinite(expected_grad), np.abs(expected_grad), 0), axis=1, keepdims=True)
    # the gradient is formed from terms of size ~1/T (p − onehot and the modulating factor): their ulps
    _assert_close(name + " grad", _f64(grad), expected_grad, _f64(torch_grad), 8 * eps * (row_scale + 1 / temperature),
                  dtype)


# ------------------------------------------------------------------------------------------ sparse maps
@_fuzz
@given(kind=st.sampled_from(FINITE_KINDS), dtype=st.sampled_from((torch.float32, torch.float64)),
       rows=st.integers(1, 4), cols=st.sampled_from([1, 2, 3, 17, 300, 5000, 50000]), seed=st.integers(0, 2**31 - 1),
       op=st.sampled_from(["sparsemax", "entmax15"]))
def test_fuzz_sparse_maps_sum_to_one(kind, dtype, rows, cols, seed, op):
    if cols >= 5000:
        rows = 1
    x = make_logits(kind, dtype, rows, cols, seed)
    p = getattr(softmaxkit, op)(x, -1)
    p64 = _f64(p)
    assert np.all(np.isfinite(p64)), f"{op}[{kind}, {dtype}, C={cols}]: non-finite output for finite input"
    assert np.all(p64 >= 0), f"{op}[{kind}, {dtype}, C={cols}]: negative probabilities"
    sums = p64.sum(-1)
    assert np.all(np.abs(sums - 1) <= 1e-4), f"{op}[{kind}, {dtype}, C={cols}]: rows sum to {sums.tolist()}"
    x64 = _f64(x)
    spread = np.max(x64, -1) - np.min(x64, -1)
    if cols <= 300 and np.all(spread < 1e3):  # the oracle at moderate range: same maths
        exact = getattr(ref, op)(x64)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        np.testing.assert_allclose(p64, exact, atol=tol, err_msg=f"{op}[{kind}, {dtype}, C={cols}]")


# ------------------------------------------------------------------------------------------ crash-prone paths
_LAYOUTS = textwrap.dedent("""
    import numpy as np, torch, softmaxkit, torch.nn.functional as F
    rng = np.random.default_rng(SEED)
    failures = []
    for case in range(CASES):
        rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 70))
        dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16][case % 4]
        base = torch.from_numpy(rng.normal(size=(rows, cols)) * 4).to(dtype)
        layout = case % 3
        if layout == 0:
            x = base[:1].expand(rows, cols)          # stride-0 rows
        elif layout == 1:
            x = torch.from_numpy(rng.normal(size=(rows, 2 * cols)) * 4).to(dtype)[:, ::2]  # strided classes
        else:
            x = base.t().contiguous().t()            # column-major
        target = torch.from_numpy(rng.integers(0, cols, size=rows))
        for impl in ("auto", "cpu"):
            leaf = x.detach().clone().requires_grad_()
            try:
                loss = softmaxkit.cross_entropy(leaf, target, impl=impl)
            except ValueError:  # an explicit impl may refuse a layout it cannot serve (never garbage)
                if impl == "cpu" and x.stride(1) != 1:
                    continue
                raise
            loss.backward()
            ref_leaf = x.detach().clone().to(torch.float64).requires_grad_()
            ref_loss = F.cross_entropy(ref_leaf, target)
            ref_loss.backward()
            tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
            if not (abs(loss.item() - ref_loss.item()) <= tol * (1 + abs(ref_loss.item()))
                    and torch.allclose(leaf.grad.double(), ref_leaf.grad, atol=tol * 2, rtol=tol)):
                failures.append((case, layout, str(dtype), impl))
        for op in ("sparsemax", "entmax15"):
            p = getattr(softmaxkit, op)(x.float(), -1)
            if not torch.allclose(p.sum(-1), torch.ones(rows), atol=1e-4):
                failures.append((case, layout, op))
    print("FAILURES", failures)
""")


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_crash_prone_layouts_in_a_subprocess(seed):
    cases = min(400, 4 * settings().max_examples)
    code = _LAYOUTS.replace("SEED", str(seed)).replace("CASES", str(cases))
    env = {**os.environ, "PYTHONPATH": str(Path(softmaxkit.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                            env=env)
    assert result.returncode == 0, f"the subprocess died (exit {result.returncode}): {result.stderr[-2000:]}"
    assert "FAILURES []" in result.stdout, result.stdout[-2000:]
