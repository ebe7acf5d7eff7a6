"""The compiled CPU kernel of cross_entropy (impl="cpu"): oracle, PyTorch parity, fused vs deferred passes,
threads, dtypes, extremes, and the fallback where no kernel can be built.

Tolerances: float64 against the float64 oracle at 1e-10 (tests/_helpers.py); the kernel's fp32 exp is a
polynomial within 2 ulp of the true value, so float32 results meet the same 1e-5 relative bound as
torch's; fp16/bf16 use the error budget against PyTorch in the same dtype.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference
from softmaxkit.backends.cpu import _build
from softmaxkit.backends.cpu import cross_entropy as cpu_ce

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget

pytestmark = pytest.mark.skipif(
    not all(cpu_ce.available(dtype) for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)),
    reason=f"no CPU kernel: {_build.failure_reason}",
)

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"temperature": 0.6, "z_loss": 1e-2},
    {"softcap": 2.5, "label_smoothing": 0.2},
    {"softcap": 30.0, "temperature": 1.7, "z_loss": 1e-3, "label_smoothing": 0.05},
]


def _make(num_rows, num_classes, dtype=torch.float64, scale=3.0):
    logits = (torch.randn(num_rows, num_classes, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, num_classes, (num_rows,))
    if num_rows > 2:
        target[1] = -100
    return logits, target


def _loss_and_grad(logits, target, impl, grad_output=None, **options):
    x = logits.detach().clone().requires_grad_()
    loss = softmaxkit.cross_entropy(x, target, impl=impl, **options)
    upstream = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad


def _oracle(logits, target, weight=None, reduction="mean", grad_output=None, **options):
    x = logits.detach().to(torch.float64).numpy()
    w = None if weight is None else weight.to(torch.float64).numpy()
    loss = reference.cross_entropy(x, target.numpy(), w, reduction=reduction, **options)
    upstream = None if grad_output is None else grad_output.to(torch.float64).numpy()
    grad = reference.cross_entropy_grad(x, target.numpy(), w, reduction=reduction, grad_output=upstream, **options)
    return loss, grad


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
# class counts around the kernel's tile (512) and lane (16) sizes, so tails and the target's tile vary
@pytest.mark.parametrize("num_classes", [1, 17, 512, 1031])
def test_float64_matches_oracle(options, reduction, weighted, num_classes):
    logits, target = _make(5, num_classes)
    target[0] = num_classes - 1
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if weighted else None
    upstream = torch.rand(5, dtype=torch.float64) if reduction == "none" else None
    loss, grad = _loss_and_grad(logits, target, "cpu", upstream, weight=weight, reduction=reduction, **options)
    expected_loss, expected_grad = _oracle(logits, target, weight, reduction, upstream, **options)
    assert_close_f64(loss, expected_loss)
    assert_close_f64(grad, expected_grad)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_float32_matches_oracle_and_torch(options):
    logits, target = _make(16, 3001, torch.float32)
    loss, grad = _loss_and_grad(logits, target, "cpu", **options)
    expected_loss, expected_grad = _oracle(logits, target, **options)
    assert_close_f32(loss, expected_loss)
    # gradient entries are O(1/N); compare against the largest magnitude (fp32 rounding of p − y)
    np.testing.assert_allclose(grad.double().numpy(), expected_grad, rtol=0, atol=1e-6 * np.abs(expected_grad).max())
    if options == {}:
        x = logits.clone().requires_grad_()
        torch_loss = F.cross_entropy(x, target)
        (torch_grad,) = torch.autograd.grad(torch_loss, x)
        assert_close_f32(loss, torch_loss.detach())
        np.testing.assert_allclose(grad.numpy(), torch_grad.numpy(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 5.0, "z_loss": 1e-3}], ids=str)
def test_low_precision_within_budget_of_torch(dtype, options):
    logits, target = _make(12, 2049, dtype, scale=4.0)
    loss, grad = _loss_and_grad(logits, target, "cpu", reduction="none", **options)
    peer_loss, peer_grad = _loss_and_grad(logits, target, "composite", reduction="none", **options)
    oracle_loss, oracle_grad = _oracle(logits, target, reduction="none", **options)
    assert loss.dtype == grad.dtype == dtype
    # budget: one rounding of the result to `dtype` (2^-8 bf16, 2^-11 fp16 relative) on top of the peer's error
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert_within_budget(loss, peer_loss, oracle_loss, tol=unit * np.abs(oracle_loss).max())
    assert_within_budget(grad, peer_grad, oracle_grad, tol=unit * np.abs(oracle_grad).max())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_and_deferred_gradients_are_bitwise_equal(reduction):
    """Forward-fused gradient (grad mode on) == the backward-pass gradient (inplace) == a repeated backward."""
    logits, target = _make(9, 700, torch.float32)
    options = {"label_smoothing": 0.1, "softcap": 4.0, "z_loss": 1e-3, "reduction": reduction}
    _, fused = _loss_and_grad(logits, target, "cpu", **options)
    x = logits.clone().requires_grad_()
    y = x * 1
    torch.autograd.grad(softmaxkit.cross_entropy(y, target, impl="cpu", inplace_backward=True, **options), x)
    assert torch.equal(y.detach(), fused)
    x = logits.clone().requires_grad_()
    loss = softmaxkit.cross_entropy(x, target, impl="cpu", **options)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, fused) and torch.equal(second, fused)


def test_upstream_gradient_scales_the_fused_gradient():
    logits, target = _make(6, 300)
    x = logits.clone().requires_grad_()
    loss = softmaxkit.cross_entropy(x, target, impl="cpu", label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss * 3.5, x)
    _, expected = _oracle(logits, target, label_smoothing=0.1)
    assert_close_f64(grad, 3.5 * expected)


def test_backward_accumulates_into_grad_attribute():
    logits, target = _make(4, 50)
    x = logits.clone().requires_grad_()
    softmaxkit.cross_entropy(x, target, impl="cpu").backward()
    softmaxkit.cross_entropy(x, target, impl="cpu").backward()
    _, expected = _oracle(logits, target)
    assert_close_f64(x.grad, 2 * expected)


def test_threads_split_rows_without_changing_results():
    logits, target = _make(67, 2000, torch.float32)  # above the parallel threshold (65536 elements)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_and_grad(logits, target, "cpu", label_smoothing=0.1)
        torch.set_num_threads(3)
        three = _loss_and_grad(logits, target, "cpu", label_smoothing=0.1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_extreme_logits_and_masks(dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4], [0.0, -float("inf"), 2.0, -float("inf")]])
    if dtype == torch.float16:
        logits = logits.clamp(-6e4, 6e4)
    logits = logits.to(dtype)
    target = torch.tensor([1, 3, 2])
    loss, grad = _loss_and_grad(logits, target, "cpu", reduction="none", z_loss=1e-4)
    expected_loss, expected_grad = _oracle(logits, target, reduction="none", z_loss=1e-4)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    scale = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    np.testing.assert_allclose(loss.double().numpy(), expected_loss, rtol=scale, atol=scale)
    np.testing.assert_allclose(grad.double().numpy(), expected_grad, rtol=0, atol=scale)


def test_all_ignored_gives_zero_loss_and_gradient():
    logits, _ = _make(4, 33)
    target = torch.full((4,), -100)
    loss, grad = _loss_and_grad(logits, target, "cpu", label_smoothing=0.3, z_loss=0.1)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_non_contiguous_classes_fall_back_to_torch_path():
    logits, target = _make(30, 7)
    transposed = logits.t().contiguous().t()  # column-major: class stride != 1
    assert not cpu_ce.supports(transposed)
    loss, grad = _loss_and_grad(transposed, target, "auto")
    expected_loss, expected_grad = _oracle(logits, target)
    assert_close_f64(loss, expected_loss)
    assert_close_f64(grad, expected_grad)
    # named explicitly, the kernel says why it cannot serve (it never silently becomes another path)
    with pytest.raises(ValueError, match="`impl='cpu'` needs logits whose class dimension has stride 1"):
        _loss_and_grad(transposed, target, "cpu")


def test_inputs_are_not_mutated():
    logits, target = _make(5, 40, torch.float32)
    weight = torch.rand(40)
    copies = (logits.clone(), target.clone(), weight.clone())
    _loss_and_grad(logits, target, "cpu", weight=weight, label_smoothing=0.1)
    assert torch.equal(logits, copies[0]) and torch.equal(target, copies[1]) and torch.equal(weight, copies[2])


def test_auto_picks_the_kernel_on_cpu(monkeypatch):
    calls = []
    original = cpu_ce.cpu_cross_entropy
    monkeypatch.setattr(cpu_ce, "cpu_cross_entropy", lambda *a: calls.append(1) or original(*a))
    logits, target = _make(3, 10)
    softmaxkit.cross_entropy(logits, target)
    assert calls == [1]


def test_fallback_when_no_compiler(monkeypatch, tmp_path):
    """Where nothing can be built, load() says why and every impl still gives the right answer."""
    monkeypatch.setattr(_build, "_libraries", {})
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    monkeypatch.setattr(_build, "_warned", set())
    monkeypatch.setenv("SOFTMAXKIT_CACHE_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert not cpu_ce.available()
    assert "no C compiler" in _build.failure_reason
    logits, target = _make(4, 9)
    loss, grad = _loss_and_grad(logits, target, "auto", label_smoothing=0.1)
    expected_loss, expected_grad = _oracle(logits, target, label_smoothing=0.1)
    assert_close_f64(loss, expected_loss)
    assert_close_f64(grad, expected_grad)
    with pytest.raises(ValueError, match="`impl='cpu'` no C compiler or cached kernel library"):
        _loss_and_grad(logits, target, "cpu", label_smoothing=0.1)


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "_libraries", {})
    monkeypatch.setenv("SOFTMAXKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(_build, "_compile", lambda compiler, flags, target, variant, source: "error: simulated")
    monkeypatch.setattr(_build, "_warned", set())
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert _build.load() is None
    assert "simulated" in _build.failure_reason


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(_build, "_libraries", {})
    monkeypatch.setenv("SOFTMAXKIT_CPU_KERNELS", "0")
    assert _build.load() is None and "SOFTMAXKIT_CPU_KERNELS" in _build.failure_reason


def test_build_is_cached(monkeypatch, tmp_path):
    """A second process (simulated by resetting the module state) reuses the cached library, no compile."""
    monkeypatch.setenv("SOFTMAXKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_libraries", {})
    assert _build.load("f64") is not None
    monkeypatch.setattr(_build, "_libraries", {})
    monkeypatch.setattr(_build, "_compile", lambda *args: pytest.fail("compiled again despite the cache"))
    assert _build.load("f64") is not None
    assert len(list(tmp_path.glob("cross_entropy_f64_*.so"))) == 1


@given(
    rows=st.integers(1, 6),
    classes=st.integers(1, 70),
    smoothing=st.sampled_from([0.0, 0.3]),
    temperature=st.floats(0.25, 4.0),
    softcap=st.sampled_from([None, 1.5, 20.0]),
    z_loss=st.sampled_from([0.0, 0.01]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(rows, classes, smoothing, temperature, softcap, z_loss, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, dtype=torch.float64, generator=generator) * 5
    target = torch.randint(-1, classes, (rows,), generator=generator)  # -1 as the ignore_index
    options = {"label_smoothing": smoothing, "temperature": temperature, "softcap": softcap, "z_loss": z_loss,
               "ignore_index": -1, "reduction": "sum"}
    loss, grad = _loss_and_grad(logits, target, "cpu", **options)
    expected_loss, expected_grad = _oracle(logits, target, **options)
    assert_close_f64(loss, expected_loss, atol=1e-10)
    assert_close_f64(grad, expected_grad, atol=1e-12)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_works_in_a_forked_child():
    """A child forked after the thread pool exists (e.g. a DataLoader worker) gets a fresh pool, not a hang."""
    logits, target = _make(67, 2000, torch.float32)  # large enough to use the pool
    expected = _loss_and_grad(logits, target, "cpu")[0]
    pid = os.fork()
    if pid == 0:  # child: exit status 0 if it computes the same loss
        try:
            # torch's own OpenMP pool is not fork-safe (DataLoader workers run with 1 thread for that reason);
            # keep torch at 1 thread but make our kernel split rows over 2 workers, from the inherited pool
            torch.set_num_threads(1)
            cpu_ce._threads = lambda: 2
            os._exit(0 if torch.equal(_loss_and_grad(logits, target, "cpu")[0], expected) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("num_classes", [1, 37, 700, 1031])
def test_streamed_gradient_equals_the_cached_store(monkeypatch, dtype, num_classes):
    """Large fresh gradients are written with non-temporal stores (unaligned heads and tails by ordinary
    stores): the values must be bitwise those of the ordinary path, for every dtype and row alignment."""
    logits, target = _make(13, num_classes, dtype)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    expected = _loss_and_grad(logits, target, "cpu", **options)
    monkeypatch.setattr(cpu_ce, "_STREAM_MIN_BYTES", 0)
    streamed = _loss_and_grad(logits, target, "cpu", **options)
    assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    x = logits[:, : max(1, num_classes - 1)]  # rows that start at every alignment (odd row stride)
    x_target = target.clamp(max=x.shape[1] - 1)
    monkeypatch.setattr(cpu_ce, "_STREAM_MIN_BYTES", 1 << 62)
    expected = _loss_and_grad(x, x_target, "cpu", reduction="sum")
    monkeypatch.setattr(cpu_ce, "_STREAM_MIN_BYTES", 0)
    assert torch.equal(_loss_and_grad(x, x_target, "cpu", reduction="sum")[1], expected[1])
