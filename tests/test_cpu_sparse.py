"""The compiled CPU kernel of sparsemax, 1.5-entmax and their Fenchel-Young losses (softmaxkit.backends.cpu.sparse).

Checked against the float64 NumPy oracle (values and gradients), gradcheck of both custom backwards, the
PyTorch path (forced by making ``available`` return False) and the ``entmax`` package, in all four dtypes;
plus the kernel's own hard cases: class counts around its tile (512) and lane (16) sizes, ties and all-equal
rows (every entry a candidate: the qsort branch), rows that need many filter passes, ±1e4 logits, −inf
masks, non-finite rows, rows of length 1, empty batches, non-contiguous input, threads, what is saved for
backward, and the fallback where no kernel can be built.

Tolerances: float64 1e-10 relative (tests/_helpers.py: a few hundred ulps for sums over the support);
float32 1e-5 relative with an absolute floor of 4 ulps of the row's largest |logit| (``p = x − τ`` is one
rounded subtraction of numbers of that size in each path, so logits at scale 30 carry ~1e-5 absolute error in
``p`` whichever way ``τ`` is found); fp16/bf16: the error budget |kernel − oracle| <=
|torch path − oracle| + one ulp of the output dtype at the output's scale (both solve in fp32 and round
once; the map's backward reads the rounded output).
"""

from __future__ import annotations

import contextlib

import entmax as peer
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref
from softmaxkit.backends.cpu import _build
from softmaxkit.backends.cpu import sparse as cpu_sparse

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget, to_numpy

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
pytestmark = pytest.mark.skipif(
    not all(cpu_sparse.available(dtype) for dtype in DTYPES), reason=f"no CPU kernel: {_build.failure_reason}"
)

MAPS = {"sparsemax": (softmaxkit.sparsemax, ref.sparsemax, 2.0), "entmax15": (softmaxkit.entmax15, ref.entmax15, 1.5)}
LOSSES = {
    "sparsemax": (softmaxkit.sparsemax_loss, ref.sparsemax_loss, ref.sparsemax_loss_grad, peer.sparsemax_loss),
    "entmax15": (softmaxkit.entmax15_loss, ref.entmax15_loss, ref.entmax15_loss_grad, peer.entmax15_loss),
}
PEER_MAPS = {"sparsemax": peer.sparsemax, "entmax15": peer.entmax15}


@contextlib.contextmanager
def torch_path():
    """Within the block softmaxkit uses its PyTorch path (as where no compiler is found)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_sparse, "available", lambda dtype=torch.float32: False)
        yield


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls reaching the kernel's two entry points, to prove a test ran on it."""
    calls = []
    entmax, fenchel_young = cpu_sparse.cpu_entmax, cpu_sparse.cpu_fenchel_young
    monkeypatch.setattr(cpu_sparse, "cpu_entmax", lambda *a: calls.append("map") or entmax(*a))
    monkeypatch.setattr(cpu_sparse, "cpu_fenchel_young", lambda *a: calls.append("loss") or fenchel_young(*a))
    return calls


def _grad(out, x, upstream=None):
    (g,) = torch.autograd.grad(out, x, grad_outputs=upstream)
    return g


def _jacobian_vector(p: np.ndarray, alpha: float, v: np.ndarray) -> np.ndarray:
    """``J v`` along the last axis with the oracle's Jacobian ``diag(s) − s sᵀ/Σs``, ``s = p^{2−α}`` on the support."""
    s = np.where(p > 0, np.abs(p) ** (2.0 - alpha), 0.0)
    return s * v - s * np.sum(s * v, axis=-1, keepdims=True) / s.sum(axis=-1, keepdims=True)


def _rows(num_rows, num_classes, dtype=torch.float64, scales=(0.01, 1.0, 3.0, 30.0)):
    """Rows at mixed scales (dense, medium and one-hot-like supports), in ``dtype``, requiring grad."""
    scale = torch.tensor(scales, dtype=torch.float64).repeat(num_rows)[:num_rows, None]
    return (torch.randn(num_rows, num_classes, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _assert_close_f32_at_scale(actual, expected, x):
    """float32: 1e-5 relative, absolute floor 4 ulps of max |x| (see the module docstring)."""
    finite = x.detach()[torch.isfinite(x.detach())]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    assert_close_f32(actual, expected, atol=max(1e-6, 4 * float(torch.finfo(torch.float32).eps) * scale))


def _map_and_grad(function, x, upstream):
    p = function(x)
    return p.detach(), _grad(p, x, upstream)


# ------------------------------------------------------------------------------ maps vs the oracle
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("num_classes", [1, 2, 17, 512, 1031, 5000])
def test_maps_match_oracle_float64(name, num_classes, kernel_calls):
    function, oracle, alpha = MAPS[name]
    x = _rows(6, num_classes)
    upstream = torch.randn(6, num_classes, dtype=torch.float64)
    p, grad = _map_and_grad(function, x, upstream)
    expected = oracle(to_numpy(x))
    assert_close_f64(p, expected)
    assert_close_f64(p.sum(1), np.ones(6))
    assert_close_f64(grad, _jacobian_vector(expected, alpha, upstream.numpy()))
    assert kernel_calls == ["map"]


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("num_classes", [3, 1000])
def test_maps_match_oracle_float32(name, num_classes):
    function, oracle, alpha = MAPS[name]
    x = _rows(8, num_classes, torch.float32)
    upstream = torch.randn(8, num_classes)
    p, grad = _map_and_grad(function, x, upstream)
    assert p.dtype == grad.dtype == torch.float32
    expected = oracle(to_numpy(x))
    _assert_close_f32_at_scale(p, expected, x)
    _assert_close_f32_at_scale(grad, _jacobian_vector(expected, alpha, to_numpy(upstream)), x)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize(("shape", "dim"), [((7,), 0), ((3, 4, 5), 0), ((3, 4, 5), 1), ((3, 4, 5), -1)], ids=str)
def test_any_dim_equals_moving_it_last(name, shape, dim):
    function, oracle, alpha = MAPS[name]
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    upstream = torch.randn(shape, dtype=torch.float64)
    p, grad = _map_and_grad(lambda t: function(t, dim), x, upstream)
    expected = oracle(to_numpy(x), axis=dim)
    assert_close_f64(p, expected)
    moved = _jacobian_vector(np.moveaxis(expected, dim, -1), alpha, np.moveaxis(upstream.numpy(), dim, -1))
    assert_close_f64(grad, np.moveaxis(moved, -1, dim))


@pytest.mark.parametrize("name", MAPS)
def test_non_contiguous_input_and_upstream(name):
    function, _, _ = MAPS[name]
    base = torch.randn(40, 600, dtype=torch.float64) * 2
    views = {"transposed": base.t(), "strided rows": base[::3], "strided classes": base[:, ::2]}
    for view in views.values():
        x = view.clone().requires_grad_()  # same strides as the view: clone keeps them
        dense = view.contiguous().requires_grad_()
        upstream = torch.randn(view.shape[1], view.shape[0], dtype=torch.float64).t()  # non-contiguous too
        p, grad = _map_and_grad(function, x, upstream)
        q, dense_grad = _map_and_grad(function, dense, upstream.contiguous())
        assert torch.equal(p, q) and torch.equal(grad, dense_grad)


# ------------------------------------------------------------------------------ losses vs the oracle
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_classes", [1, 17, 1031])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_losses_match_oracle_float64(name, num_classes, reduction, weighted, kernel_calls):
    function, oracle, oracle_grad, _ = LOSSES[name]
    x = _rows(6, num_classes)
    target = torch.randint(0, num_classes, (6,))
    target[2] = -100
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if weighted else None
    loss = function(x, target, weight=weight, reduction=reduction)
    options = dict(weight=None if weight is None else weight.numpy(), reduction=reduction)
    assert_close_f64(loss, oracle(to_numpy(x), target.numpy(), **options))
    upstream = torch.rand(6, dtype=torch.float64) if reduction == "none" else None
    expected = oracle_grad(to_numpy(x), target.numpy(), **options, grad_output=None if upstream is None else upstream.numpy())
    assert_close_f64(_grad(loss, x, upstream), expected)
    assert kernel_calls == ["loss"]


@pytest.mark.parametrize("name", LOSSES)
def test_losses_k_dimensional_temperature_and_float32(name):
    function, oracle, oracle_grad, _ = LOSSES[name]
    x = (torch.randn(3, 9, 4, dtype=torch.float64) * 2).requires_grad_()
    target = torch.randint(0, 9, (3, 4))
    target[0, 1] = -100
    loss = function(x, target, reduction="none", temperature=0.7)
    assert loss.shape == (3, 4)
    assert_close_f64(loss, oracle(to_numpy(x), target.numpy(), reduction="none", temperature=0.7))
    assert_close_f64(_grad(loss.sum(), x), oracle_grad(to_numpy(x), target.numpy(), reduction="sum", temperature=0.7))
    y = _rows(8, 1000, torch.float32)
    target = torch.randint(0, 1000, (8,))
    loss = function(y, target, reduction="none")
    _assert_close_f32_at_scale(loss, oracle(to_numpy(y), target.numpy(), reduction="none"), y)
    _assert_close_f32_at_scale(_grad(loss.sum(), y), oracle_grad(to_numpy(y), target.numpy(), reduction="sum"), y)


@pytest.mark.parametrize("name", LOSSES)
def test_ignore_index_and_empty_batches(name):
    function = LOSSES[name][0]
    x = _rows(8, 30)
    target = torch.randint(0, 30, (8,))
    for ignore_index in (-100, -1, 7):
        target[[1, 4]] = ignore_index
        keep = target != ignore_index
        full = function(x, target, ignore_index=ignore_index)
        assert_close_f64(full, function(x[keep], target[keep], ignore_index=ignore_index))
        grad = _grad(full, x)
        assert torch.all(grad[~keep] == 0)
    everything = torch.full_like(target, -100)
    for reduction in ("mean", "sum"):
        zero = function(x, everything, reduction=reduction)
        assert zero.item() == 0.0 and torch.all(_grad(zero, x) == 0)
    empty = torch.empty(0, 30, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss = function(empty, torch.empty(0, dtype=torch.long), reduction=reduction)
        assert loss.shape == (() if reduction != "none" else (0,)) and float(loss.detach().sum()) == 0.0
        assert _grad(loss.sum(), empty).shape == (0, 30)


# ------------------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("name", MAPS)
def test_gradcheck_maps(name):
    function = MAPS[name][0]
    x = _rows(5, 7)
    assert torch.autograd.gradcheck(function, (x,))
    y = (torch.randn(2, 6, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: function(t, 1), (y,))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_losses(name, reduction):
    function = LOSSES[name][0]
    x = _rows(5, 6)
    target = torch.tensor([0, -100, 5, 2, 2])
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: function(t, target, weight=weight, reduction=reduction), (x,))


# ------------------------------------------------------------------------------ parity: torch path, entmax package
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 300), (4, 5000)], ids=str)
def test_maps_equal_torch_path(name, dtype, shape):
    function, oracle, alpha = MAPS[name]
    x = _rows(*shape, dtype)
    upstream = torch.randn(shape, dtype=torch.float64).to(dtype)
    p, grad = _map_and_grad(function, x, upstream)
    with torch_path():
        q, torch_grad = _map_and_grad(function, x, upstream)
    assert p.dtype == grad.dtype == dtype
    if dtype == torch.float64:
        assert_close_f64(p, q)
        assert_close_f64(grad, torch_grad)
    elif dtype == torch.float32:
        _assert_close_f32_at_scale(p, q, x)
        _assert_close_f32_at_scale(grad, torch_grad, x)
    else:
        eps = float(torch.finfo(dtype).eps)
        expected = oracle(to_numpy(x))
        assert_within_budget(p, q, expected, tol=eps * float(np.abs(expected).max()))
        expected_grad = _jacobian_vector(expected, alpha, to_numpy(upstream))
        assert_within_budget(grad, torch_grad, expected_grad, tol=eps * float(np.abs(expected_grad).max()))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_equal_torch_path(name, dtype):
    function, oracle, oracle_grad, _ = LOSSES[name]
    x = _rows(64, 300, dtype)
    target = torch.randint(0, 300, (64,))
    target[::7] = -100
    weight = torch.rand(300, dtype=torch.float64) + 0.5
    loss = function(x, target, weight=weight, reduction="none")
    grad = _grad(loss.sum(), x)
    with torch_path():
        torch_loss = function(x, target, weight=weight, reduction="none")
        torch_grad = _grad(torch_loss.sum(), x)
    if dtype == torch.float64:
        assert_close_f64(loss, torch_loss)
        assert_close_f64(grad, torch_grad)
    elif dtype == torch.float32:
        _assert_close_f32_at_scale(loss, torch_loss, x)
        _assert_close_f32_at_scale(grad, torch_grad, x)
    else:
        eps = float(torch.finfo(dtype).eps)
        options = dict(weight=weight.numpy())
        values = oracle(to_numpy(x), target.numpy(), reduction="none", **options)
        assert_within_budget(loss, torch_loss, values, tol=eps * float(np.abs(values).max()))
        expected_grad = oracle_grad(to_numpy(x), target.numpy(), reduction="sum", **options)
        assert_within_budget(grad, torch_grad, expected_grad, tol=eps * float(np.abs(expected_grad).max()))


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maps_and_losses_equal_entmax_package(name, dtype):
    x = _rows(6, 2000, dtype, scales=(0.3, 1.0, 3.0))

    def check(actual, expected):
        if dtype == torch.float64:
            assert_close_f64(actual, expected)
        else:
            _assert_close_f32_at_scale(actual, expected, x)

    upstream = torch.randn(6, 2000, dtype=torch.float64).to(dtype)
    ours, theirs = MAPS[name][0](x), PEER_MAPS[name](x, dim=-1)
    check(ours, theirs)
    check(_grad(ours, x, upstream), _grad(theirs, x, upstream))
    target = torch.randint(0, 2000, (6,))
    ours, theirs = LOSSES[name][0](x, target, reduction="none"), LOSSES[name][3](x, target)
    check(ours, theirs)
    check(_grad(ours.sum(), x), _grad(theirs.sum(), x))


# ------------------------------------------------------------------------------ the kernel's hard cases
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("num_classes", [1, 7, 40, 1000, 5000])
def test_ties_and_all_equal_rows(name, num_classes):
    # all-equal rows: every entry is a candidate and in the support (qsort branch past 32 survivors);
    # ties at the max; a narrow band holding every entry (dense support); a row with a dense tied tail
    function, oracle, alpha = MAPS[name]
    rows = [torch.full((num_classes,), 3.0), torch.full((num_classes,), -7.25),
            torch.rand(num_classes) * 1e-3, torch.zeros(num_classes)]
    rows[3][: max(1, num_classes // 3)] = 0.4
    x = torch.stack(rows).double().requires_grad_()
    upstream = torch.randn(x.shape, dtype=torch.float64)
    p, grad = _map_and_grad(function, x, upstream)
    expected = oracle(to_numpy(x))
    assert_close_f64(p, expected, atol=1e-15)
    assert_close_f64(p[:2], np.full((2, num_classes), 1.0 / num_classes))
    assert_close_f64(grad, _jacobian_vector(expected, alpha, upstream.numpy()), atol=1e-12)


@pytest.mark.parametrize("name", MAPS)
def test_rows_needing_many_filter_passes(name):
    # candidates crowding towards max − 1 (geometric gaps) or spread evenly over it (linear ramps: supports of
    # ~45 for sparsemax at 1e-3 spacing, hundreds at 1e-6), where the lower bounds drop few per pass
    function, oracle, _ = MAPS[name]
    j = torch.arange(2000, dtype=torch.float64)
    x = torch.stack([-(1 - 0.5**j), -(1 - 0.97**j) * 1.9, -j * 1e-3, -j * 1e-6, torch.sqrt(j) * -0.04])
    assert_close_f64(function(x), oracle(x.numpy()), atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(dtype):
    x = (torch.randn(6, 300, dtype=torch.float64) * 1e4).to(dtype).requires_grad_()
    x.data[0] = 1e4  # a row of ties at a huge value
    target = torch.randint(0, 300, (6,))
    eps = float(torch.finfo(dtype).eps)
    for name, (function, oracle, _) in MAPS.items():
        p = function(x)
        assert torch.isfinite(p).all() and torch.all(p >= 0)
        assert_close_f64(p.sum(1), np.ones(6), rtol=eps * 2)
        expected = oracle(to_numpy(x))  # the oracle on the same (rounded) logits
        if dtype == torch.float64:
            assert_close_f64(p, expected)
        else:  # |x| ~ 1e4: p = x − τ carries ~1e4 ulps of the logits' dtype; the torch path the same
            with torch_path():
                assert_within_budget(p, function(x), expected, tol=eps)
        assert_close_f64(p[0], np.full(300, 1 / 300), rtol=eps)
        assert torch.isfinite(_grad(p, x, torch.randn_like(p))).all()
        loss = LOSSES[name][0](x, target, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(_grad(loss.sum(), x)).all()


def test_masked_classes_equal_truncation():
    x = _rows(5, 40)
    masked = x.detach().clone()
    masked[:, 25:] = -torch.inf
    masked[3, :] = -torch.inf
    masked[3, 7] = 2.0  # a row with a single finite entry
    masked.requires_grad_()
    truncated = x.detach()[:, :25].clone()
    truncated[3] = -torch.inf
    truncated[3, 7] = 2.0
    truncated.requires_grad_()
    target = torch.tensor([0, 1, 2, 7, 24])
    upstream = torch.randn(5, 40, dtype=torch.float64)
    for name, (function, _, _) in MAPS.items():
        p, grad = _map_and_grad(function, masked, upstream)
        q, truncated_grad = _map_and_grad(function, truncated, upstream[:, :25])
        assert torch.all(p[:, 25:] == 0) and torch.all(grad[:, 25:] == 0)
        assert_close_f64(p[:, :25], q)
        assert_close_f64(grad[:, :25], truncated_grad)
        loss_function = LOSSES[name][0]
        loss = loss_function(masked, target, reduction="none")
        assert_close_f64(loss, loss_function(truncated, target, reduction="none"))
        loss_grad = _grad(loss.sum(), masked)
        assert torch.all(loss_grad[:, 25:] == 0)
        assert_close_f64(loss_grad[:, :25], _grad(loss_function(truncated, target, reduction="sum"), truncated))
        # a target whose logit is −inf has probability 0 and an infinite loss, with a finite gradient
        inf_loss = loss_function(masked, torch.tensor([30, 1, 2, 7, 24]), reduction="none")
        assert inf_loss[0] == torch.inf and torch.isfinite(inf_loss[1:]).all()


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("num_classes", [4, 5, 1000, 8192])  # 8192: the PyTorch path's block filter
def test_non_finite_rows_are_nan_as_on_the_torch_path(name, num_classes):
    # No threshold exists for a row of all −inf, with a NaN, or with +inf. The kernel makes the whole row NaN
    # (output, loss, both gradients); the PyTorch path gives NaN too, in entries that depend on its top-k
    # order. A finite row in the same batch is unaffected.
    function, _, _ = MAPS[name]
    inf, nan = float("inf"), float("nan")
    x = torch.zeros(4, num_classes, dtype=torch.float64)
    x[0] = -inf
    x[1, 1] = nan
    x[2, 0] = inf
    x[3] = torch.randn(num_classes, dtype=torch.float64)
    x[3, 2] = -inf
    x.requires_grad_()
    upstream = torch.randn(4, num_classes, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    p, grad = _map_and_grad(function, x, upstream)
    loss = LOSSES[name][0](x, target, reduction="none")
    loss_grad = _grad(loss.sum(), x)
    with torch_path():
        q, torch_grad = _map_and_grad(function, x, upstream)
        torch_loss = LOSSES[name][0](x, target, reduction="none")
    for ours in (p, grad, loss_grad):
        assert torch.isnan(ours[:3]).all()
    assert torch.isnan(loss[:3]).all() and torch.isnan(torch_loss[:3]).all()
    assert torch.isnan(q[:3]).any(dim=1).all()
    assert_close_f64(p[3], q[3])
    assert_close_f64(grad[3], torch_grad[3])
    assert_close_f64(loss[3], torch_loss[3])


def test_rows_of_length_one_and_empty_batch():
    for function, _, _ in MAPS.values():
        x = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
        p, grad = _map_and_grad(function, x, torch.randn(4, 1, dtype=torch.float64))
        assert torch.equal(p, torch.ones(4, 1, dtype=torch.float64)) and torch.all(grad == 0)
        empty = torch.empty(0, 6, requires_grad=True)
        out = function(empty)
        assert out.shape == (0, 6) and _grad(out.sum(), empty).shape == (0, 6)


def test_threads_split_rows_bitwise_equal():
    x = _rows(300, 700, torch.float32)
    upstream = torch.randn(300, 700)
    target = torch.randint(0, 700, (300,))
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            row = []
            for name, (function, _, _) in MAPS.items():
                row += list(_map_and_grad(function, x, upstream))
                loss = LOSSES[name][0](x, target, reduction="none")
                row += [loss.detach(), _grad(loss.sum(), x)]
            results.append(row)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_saved_tensors_memory():
    # The map saves only its output p; the loss saves the logits and per-row data, nothing else (N, C).
    x = _rows(16, 100)
    target = torch.randint(0, 100, (16,))
    for name, (function, _, _) in MAPS.items():
        saved: list[torch.Tensor] = []

        def pack(tensor, saved=saved):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            p = function(x)
            loss = LOSSES[name][0](x, target)
        assert saved[0].data_ptr() == p.data_ptr() and sum(t.numel() for t in saved if t.numel() == x.numel()) == 2 * x.numel()
        assert [t.shape for t in saved[1:] if t.numel() >= 100] == [x.shape]
        assert sum(t.numel() for t in saved[1:] if t.numel() < 100) <= 4 * 16 + 1
        _grad(loss, x)


def test_inputs_and_upstream_not_mutated():
    x = _rows(5, 600)
    before = x.detach().clone()
    upstream = torch.randn(5, 600, dtype=torch.float64)
    upstream_before = upstream.clone()
    for name, (function, _, _) in MAPS.items():
        _map_and_grad(function, x, upstream)
        LOSSES[name][0](x, torch.tensor([0, 1, 2, 3, 4])).backward()
    assert torch.equal(x.detach(), before) and torch.equal(upstream, upstream_before)


def test_double_backward_raises():
    x = _rows(3, 5)
    for function in (lambda t: softmaxkit.sparsemax(t).pow(2).sum(), lambda t: softmaxkit.entmax15_loss(t, torch.tensor([0, 1, 2]))):
        with pytest.raises(RuntimeError, match="once differentiable"):
            torch.autograd.functional.hessian(function, x)


# ------------------------------------------------------------------------------ properties
@given(rows=st.integers(1, 5), classes=st.integers(1, 80), scale=st.sampled_from([1e-6, 1e-2, 1.0, 10.0, 1e4]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_property_maps_are_distributions_equal_to_oracle_and_torch_path(rows, classes, scale, ties, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale
    if ties:
        x = x.round()
    for function, oracle, _ in MAPS.values():
        p = function(x)
        assert torch.all(p >= 0)
        assert_close_f64(p.sum(1), np.ones(rows))
        assert_close_f64(p, oracle(x.numpy()), atol=1e-12)
        with torch_path():
            assert_close_f64(p, function(x), atol=1e-12)


@given(rows=st.integers(1, 5), classes=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_property_losses_equal_torch_path_and_are_non_negative(rows, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=generator)
    for function, _, _, _ in LOSSES.values():
        loss = function(x, target, reduction="none")
        assert torch.all(loss >= -1e-12)
        grad = _grad(loss.sum(), x)
        assert_close_f64(grad.sum(1), np.zeros(rows), atol=1e-12)  # p − e_y sums to 0
        with torch_path():
            torch_loss = function(x, target, reduction="none")
            assert_close_f64(loss, torch_loss, atol=1e-12)
            assert_close_f64(grad, _grad(torch_loss.sum(), x), atol=1e-12)


# ------------------------------------------------------------------------------ build and fallback
def test_fallback_when_the_kernel_cannot_be_built(monkeypatch, kernel_calls):
    monkeypatch.setattr(_build, "_libraries", {})
    monkeypatch.setenv("SOFTMAXKIT_CPU_KERNELS", "0")
    assert not cpu_sparse.available(torch.float64)
    x = _rows(4, 9)
    assert_close_f64(softmaxkit.entmax15(x), ref.entmax15(to_numpy(x)))
    target = torch.tensor([0, 1, 2, 3])
    assert_close_f64(softmaxkit.sparsemax_loss(x, target), ref.sparsemax_loss(to_numpy(x), target.numpy()))
    assert kernel_calls == []


def test_sparse_library_is_built_and_cached_on_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTMAXKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_libraries", {})
    assert _build.load("f64", source="sparse") is not None
    assert len(list(tmp_path.glob("sparse_f64_*.so"))) == 1
    assert not list(tmp_path.glob("cross_entropy_*.so"))
    monkeypatch.setattr(_build, "_libraries", {})
    monkeypatch.setattr(_build, "_compile", lambda *args: pytest.fail("compiled again despite the cache"))
    assert _build.load("f64", source="sparse") is not None
    with pytest.raises(ValueError, match=r"`source` must be one of \('cross_entropy', 'sparse'\), but got 'nope'"):
        _build.load("f64", source="nope")
