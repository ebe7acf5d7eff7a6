"""linear_cross_entropy: the float64 oracle, the naive matmul + cross_entropy, PyTorch's own op, gradcheck,
chunk-size invariance, low precision within an error budget, extremes, and bad input.

Tolerances: float64 against the NumPy oracle 1e-10 relative (``_helpers.F64_RTOL``: the chunked path sums
the same terms in a different order); float64 chunked vs unchunked 1e-12 (same maths, only the row
grouping of the matmuls changes); float32 against PyTorch 1e-5 relative / 1e-6 absolute (``F32_*``);
fp16/bf16 within an error budget next to PyTorch's naive path in the same dtype.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as torch_F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref
from softmaxkit.backends.cpu import cross_entropy as cpu_ce
from softmaxkit.backends.torch.linear_cross_entropy import default_chunk_rows
from softmaxkit.nn import LinearCrossEntropyHead, LinearCrossEntropyLoss

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget, to_numpy

#: the two chunk loops: each chunk's CE by the CPU C kernel ("cpu", what "auto" takes on CPU) or by torch ops
CHUNKED = [pytest.param("cpu", marks=pytest.mark.skipif(
    not cpu_ce.available(), reason="no C compiler for the CPU kernel")), "torch"]

OPTION_GRID = [
    dict(),
    dict(class_weight=True),
    dict(label_smoothing=0.2),
    dict(label_smoothing=0.1, class_weight=True),
    dict(temperature=0.7),
    dict(z_loss=1e-2),
    dict(softcap=2.5),
    dict(softcap=3.0, temperature=1.5, z_loss=1e-3, label_smoothing=0.05, class_weight=True),
]


def _problem(rows_shape=(7,), hidden_size=5, num_classes=11, dtype=torch.float64, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows_shape, hidden_size, generator=g, dtype=dtype)
    weight = torch.randn(num_classes, hidden_size, generator=g, dtype=dtype)
    bias = torch.randn(num_classes, generator=g, dtype=dtype)
    target = torch.randint(0, num_classes, rows_shape, generator=g)
    if ignore and target.numel() > 2:
        target.view(-1)[1] = -100
    class_weight = torch.rand(num_classes, generator=g, dtype=dtype) + 0.5
    return hidden, weight, bias, target, class_weight


def _options(spec, class_weight):
    options = dict(spec)
    options["class_weight"] = class_weight if options.pop("class_weight", False) else None
    return options


def _ref_options(options):
    return {("class_weight" if k == "class_weight" else k): (to_numpy(val) if torch.is_tensor(val) else val)
            for k, val in options.items()}


def _loss_and_grads(fn, hidden, weight, bias, target, upstream=None, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    loss = fn(h, w, target, bias=b, **options)
    total = loss.sum() if upstream is None else (loss * upstream).sum()
    grads = torch.autograd.grad(total, leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", OPTION_GRID, ids=lambda s: ",".join(s) or "plain")
def test_float64_matches_oracle_values_and_all_gradients(reduction, spec, impl):
    hidden, weight, bias, target, class_weight = _problem(rows_shape=(2, 5))
    options = _options(spec, class_weight)
    upstream = torch.randn(2, 5, dtype=torch.float64) if reduction == "none" else None
    loss, grads = _loss_and_grads(
        softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream, reduction=reduction,
        chunk_size=3, impl=impl, **options,
    )
    ref_options = _ref_options(options)
    expected = ref.linear_cross_entropy(to_numpy(hidden), to_numpy(weight), to_numpy(target), to_numpy(bias),
                                        reduction=reduction, **ref_options)
    expected_grads = ref.linear_cross_entropy_grad(
        to_numpy(hidden), to_numpy(weight), to_numpy(target), to_numpy(bias), reduction=reduction,
        grad_output=None if upstream is None else to_numpy(upstream), **ref_options,
    )
    assert loss.shape == ((2, 5) if reduction == "none" else ())
    assert_close_f64(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        assert_close_f64(actual, wanted)


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("spec", [dict(), OPTION_GRID[-1]], ids=["plain", "all-options"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_chunk_size_from_1_to_n_equals_the_naive_path(spec, reduction, impl):
    hidden, weight, bias, target, class_weight = _problem(rows_shape=(9,), hidden_size=3, num_classes=13)
    options = _options(spec, class_weight)
    upstream = torch.randn(9, dtype=torch.float64) if reduction == "none" else None
    naive, naive_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                         impl="composite", reduction=reduction, **options)
    for chunk in range(1, 10):
        loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                      chunk_size=chunk, reduction=reduction, impl=impl, **options)
        assert_close_f64(loss, naive, rtol=1e-12)
        for actual, wanted in zip(grads, naive_grads):
            assert_close_f64(actual, wanted, rtol=1e-12)


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_torch_linear_then_cross_entropy(dtype, reduction, impl):
    hidden, weight, bias, target, class_weight = _problem((6,), 8, 37, dtype=dtype)
    upstream = torch.randn(6, dtype=dtype) if reduction == "none" else None
    options = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1)

    def torch_path(h, w, y, bias, class_weight, **kw):
        return torch_F.cross_entropy(torch_F.linear(h, w, bias), y, weight=class_weight, **kw)

    expected, expected_grads = _loss_and_grads(torch_path, hidden, weight, bias, target, upstream,
                                               class_weight=class_weight, **options)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                  class_weight=class_weight, chunk_size=4, impl=impl, **options)
    check = assert_close_f64 if dtype == torch.float64 else assert_close_f32
    check(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        check(actual, wanted)


@pytest.mark.parametrize("chunked", [True, False], ids=["torch-chunked", "torch-reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "bias+weight+ignore"])
def test_equals_torch_functional_linear_cross_entropy(chunked, reduction, with_extras):
    from torch.nn import LinearCrossEntropyOptions

    hidden, weight, bias, target, class_weight = _problem((10,), 6, 23, dtype=torch.float64)
    upstream = torch.randn(10, dtype=torch.float64) if reduction == "none" else None
    if not with_extras:
        bias, class_weight = None, None
        target = target.clamp(min=0)
    torch_options = LinearCrossEntropyOptions(batch_chunk_size=4) if chunked else None

    def torch_op(h, w, y, bias):
        return torch_F.linear_cross_entropy(h, w, y, linear_bias=bias, weight=class_weight, reduction=reduction,
                                            ignore_index=-100, options=torch_options)

    expected, expected_grads = _loss_and_grads(torch_op, hidden, weight, bias, target, upstream)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                  class_weight=class_weight, reduction=reduction, chunk_size=3)
    assert_close_f64(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        assert_close_f64(actual, wanted)


@pytest.mark.parametrize(("liger_options", "options"), [
    ({}, {}),
    ({"lse_square_scale": 1e-3}, {"z_loss": 1e-3}),
    ({"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ({"reduction": "sum"}, {"reduction": "sum"}),
    # Liger's soft-cap and class-weight kernels do not run under Triton's interpreter (a float where its code
    # expects a tensor): checked where its kernels compile
    pytest.param({"softcap": 5.0}, {"softcap": 5.0}, marks=pytest.mark.gpu),
    pytest.param({"ce_weight": "random"}, {"class_weight": "random"}, marks=pytest.mark.gpu),
], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_equals_liger_kernel_fused_linear_cross_entropy(liger_options, options, with_bias):
    """Liger-Kernel's fused linear cross-entropy (its Triton kernels: on CUDA, or interpreted on CPU-only
    machines, conftest) gives the same fp32 loss and gradients, ignored rows included."""
    pytest.importorskip("triton")
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, bias, target, class_weight = _problem((37,), 24, 300, dtype=torch.float32)
    hidden, weight, bias, target, class_weight = (t.to(device) for t in (hidden, weight, bias, target, class_weight))
    bias = bias if with_bias else None
    liger_options, options = dict(liger_options), dict(options)
    if liger_options.get("ce_weight") == "random":
        liger_options["ce_weight"], options["class_weight"] = class_weight, class_weight

    def liger_op(h, w, y, bias):
        return liger.liger_fused_linear_cross_entropy(h, w, y, bias=bias, ignore_index=-100, **liger_options)

    expected, expected_grads = _loss_and_grads(liger_op, hidden, weight, bias, target)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, **options)
    assert_close_f32(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        assert_close_f32(actual, wanted)


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", [dict(), OPTION_GRID[3], OPTION_GRID[-1]], ids=["plain", "smooth+w", "all"])
def test_gradcheck_float64(reduction, spec, impl):
    hidden, weight, bias, target, class_weight = _problem((4,), 3, 6)
    options = _options(spec, class_weight)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (hidden, weight, bias))

    def fn(h, w, b):
        return softmaxkit.linear_cross_entropy(h, w, target, bias=b, reduction=reduction, chunk_size=3, impl=impl,
                                               **options)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradients_only_for_inputs_that_need_them():
    hidden, weight, bias, target, _ = _problem()
    w = weight.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(hidden, w, target, bias=bias, chunk_size=2)
    (grad_weight,) = torch.autograd.grad(loss, [w])
    _, expected = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, impl="composite")
    assert_close_f64(grad_weight, expected[1])
    h = hidden.clone().requires_grad_()
    (grad_hidden,) = torch.autograd.grad(softmaxkit.linear_cross_entropy(h, weight, target, bias=bias), [h])
    assert_close_f64(grad_hidden, expected[0])


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Inside an autograd Function, ``needs_input_grad`` ignores ``torch.no_grad()``; evaluation must still
    skip building the gradients (a third of the matmuls, and ``C × D`` of memory)."""
    import softmaxkit._core.linear as backend

    built = []
    original = backend._Accumulators

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "_Accumulators", counting)
    hidden, weight, bias, target, _ = _problem()
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        evaluated = softmaxkit.linear_cross_entropy(hidden, w, target, bias=bias)
    assert built == [] and not evaluated.requires_grad
    trained = softmaxkit.linear_cross_entropy(hidden, w, target, bias=bias)
    assert built == [1] and torch.equal(trained.detach(), evaluated)


def test_large_chunks_use_mm_into_the_loop_buffer_where_mkl_is_native(monkeypatch):
    # on an Intel CPU with MKL, beyond 32 MiB of chunk logits torch.mm computes the chunk (run J)
    import softmaxkit._core.linear as backend

    monkeypatch.setattr(backend, "use_onednn", lambda weight: True)
    weight = torch.zeros(70_000, 1)
    for native, small, large in ((True, True, False), (False, True, True)):
        monkeypatch.setattr(backend, "_MKL_NATIVE", native)
        assert backend.onednn_for_chunks(weight, 64) is small  # 64 × 70000 × 4 B = 17 MiB
        assert backend.onednn_for_chunks(weight, 128) is large  # 34 MiB
    monkeypatch.setattr(backend, "use_onednn", lambda weight: False)
    assert backend.onednn_for_chunks(weight, 64) is False
    monkeypatch.setattr(backend, "_MKL_NATIVE", None)
    assert backend._mkl_native() in (True, False)


@pytest.mark.parametrize("tile_classes", [4096, 50])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_onednn_and_mm_matmul_paths_agree_in_float32(monkeypatch, reduction, tile_classes):
    """fp32 on CPU uses oneDNN's linear for the logits and the gradient matmuls (faster than MKL sgemm here),
    in vocabulary tiles copied into the loop's buffer or ∂W (50: five tiles of 211 classes, the last one
    ragged); torch.mm is the fallback. Both equal PyTorch's naive path to float32 tolerance."""
    import softmaxkit._core.linear as backend

    if not backend.onednn_linear_available():
        pytest.skip("oneDNN's linear is not available on this CPU / build")
    monkeypatch.setattr(backend, "ONEDNN_TILE_CLASSES", tile_classes)
    monkeypatch.setattr(backend, "ONEDNN_GRAD_TILE_ROWS", tile_classes)  # ∂W's oneDNN tiles too (ragged at 50)
    hidden, weight, bias, target, class_weight = _problem((37,), 16, 211, dtype=torch.float32)
    upstream = torch.randn(37) if reduction == "none" else None
    options = dict(class_weight=class_weight, label_smoothing=0.1, softcap=5.0, reduction=reduction, chunk_size=8)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(backend, "use_onednn", lambda weight, enabled=enabled: enabled)
        results.append(_loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                       **options))
    expected = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                               impl="composite", **options)
    for loss, grads in results:
        assert_close_f32(loss, expected[0])
        for actual, wanted in zip(grads, expected[1]):
            assert_close_f32(actual, wanted)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_gradients_of_ignored_nan_rows_are_those_of_dropping_them(monkeypatch, reduction, with_bias):
    """The oneDNN ∂W tiles (copied in by the first chunk, added by the rest) and ∂h over several chunks and
    tiles: NaN/±inf padding rows change nothing, in the forward-built (mean) and recomputing (none) backward."""
    import softmaxkit._core.linear as backend

    if not backend.onednn_linear_available():
        pytest.skip("oneDNN's linear is not available on this CPU / build")
    monkeypatch.setattr(backend, "ONEDNN_GRAD_TILE_ROWS", 5)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 6, generator=g)
    weight = torch.randn(13, 6, generator=g)
    bias = torch.randn(13, generator=g) if with_bias else None
    target = torch.randint(0, 13, (10,), generator=g)
    target[[0, 4, 8]] = -100  # row 0: the first chunk's, whose ∂W tiles are copied, not added
    hidden[0], hidden[4, 2], hidden[8, 0] = torch.nan, torch.inf, -torch.inf
    keep = target != -100
    assert backend.use_onednn(weight)

    def run(h, t):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = softmaxkit.linear_cross_entropy(h, w, t, bias=bias, reduction=reduction, chunk_size=3)
        (loss.sum() if reduction == "none" else loss).backward()
        return loss.detach(), h.grad, w.grad

    loss, grad_h, grad_w = run(hidden, target)
    kept = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden[keep].double(), weight.double(),
                           None if bias is None else bias.double(), target[keep], None, reduction=reduction,
                           impl="composite")
    if reduction == "none":
        assert torch.all(loss[~keep] == 0)
        loss = loss[keep]
    assert_close_f32(loss, kept[0].float())
    assert torch.all(grad_h[~keep] == 0)
    assert_close_f32(grad_h[keep], kept[1][0].float())
    assert_close_f32(grad_w, kept[1][1].float())


@pytest.mark.parametrize("impl", CHUNKED)
def test_onednn_fills_the_loop_buffer_in_tiles_never_a_chunk_sized_tensor(monkeypatch, impl):
    """oneDNN's linear allocates its output: the loop asks it for one vocabulary tile at a time, so no
    chunk-sized tensor is made per chunk (whose freed blocks glibc may keep resident next to the next one)."""
    import softmaxkit._core.linear as backend

    if not backend.onednn_linear_available():
        pytest.skip("oneDNN's linear is not available on this CPU / build")
    monkeypatch.setattr(backend, "ONEDNN_TILE_CLASSES", 64)
    made = []
    real = backend._onednn_linear

    def recording(x, weight, bias):
        out = real(x, weight, bias)
        made.append(tuple(out.shape))
        return out

    monkeypatch.setattr(backend, "_onednn_linear", recording)
    hidden, weight, bias, target, _ = _problem((40,), 16, 211, dtype=torch.float32)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, None,
                                  impl=impl, chunk_size=16)
    assert made and all(rows <= 16 and classes <= 64 for rows, classes in made)
    kept = int((target != -100).sum())  # the loop visits the kept rows only (one is ignored)
    assert sum(rows * classes for rows, classes in made) == kept * 211  # each chunk's logits once, all of them
    expected = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, None,
                               impl="composite")
    assert_close_f32(loss, expected[0])
    for actual, wanted in zip(grads, expected[1]):
        assert_close_f32(actual, wanted)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    hidden, weight, bias, target, _ = _problem()
    w = weight.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(hidden, w, target, bias=bias)
    (first,) = torch.autograd.grad(loss * 2.0, [w], retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2.0, [w])
    assert torch.equal(first, second)


def test_inputs_are_not_mutated():
    hidden, weight, bias, target, class_weight = _problem()
    copies = [t.clone() for t in (hidden, weight, bias, target, class_weight)]
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    for reduction in ("mean", "none"):
        loss = softmaxkit.linear_cross_entropy(h, w, target, bias=b, class_weight=class_weight, softcap=2.0,
                                               temperature=0.5, reduction=reduction)
        loss.sum().backward()
    for original, now in zip(copies, (h, w, b, target, class_weight)):
        assert torch.equal(original, now.detach())


def test_probability_targets_equal_the_oracle():
    hidden, weight, bias, _, class_weight = _problem((5,), 4, 7)
    soft = torch.softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, soft,
                                  class_weight=class_weight, label_smoothing=0.1)
    expected = ref.linear_cross_entropy(to_numpy(hidden), to_numpy(weight), to_numpy(soft), to_numpy(bias),
                                        class_weight=to_numpy(class_weight), label_smoothing=0.1)
    expected_grads = ref.linear_cross_entropy_grad(to_numpy(hidden), to_numpy(weight), to_numpy(soft),
                                                   to_numpy(bias), class_weight=to_numpy(class_weight),
                                                   label_smoothing=0.1)
    assert_close_f64(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        assert_close_f64(actual, wanted)


def test_unbatched_hidden_and_empty_batch():
    hidden, weight, bias, target, _ = _problem((3,), ignore=False)
    single = softmaxkit.linear_cross_entropy(hidden[0], weight, target[0], bias=bias, reduction="none")
    assert single.shape == ()
    assert_close_f64(single, softmaxkit.linear_cross_entropy(hidden[:1], weight, target[:1], bias=bias))
    w = weight.clone().requires_grad_()
    empty = softmaxkit.linear_cross_entropy(hidden[:0], w, target[:0])
    assert empty.item() == 0.0
    (grad,) = torch.autograd.grad(empty, [w])
    assert torch.count_nonzero(grad) == 0
    assert softmaxkit.linear_cross_entropy(hidden[:0], weight, target[:0], reduction="none").shape == (0,)


def test_ignored_rows_equal_dropped_rows_and_all_ignored_is_zero():
    hidden, weight, bias, target, class_weight = _problem((8,), ignore=False)
    target[[2, 5]] = -100
    keep = target != -100
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target,
                                  class_weight=class_weight, label_smoothing=0.1, z_loss=1e-3)
    dropped, dropped_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden[keep], weight, bias,
                                             target[keep], class_weight=class_weight, label_smoothing=0.1,
                                             z_loss=1e-3)
    assert_close_f64(loss, dropped, rtol=1e-12)
    assert_close_f64(grads[0][keep], dropped_grads[0], rtol=1e-12)
    assert torch.count_nonzero(grads[0][~keep]) == 0
    for actual, wanted in zip(grads[1:], dropped_grads[1:]):
        assert_close_f64(actual, wanted, rtol=1e-12)

    everything_ignored = torch.full_like(target, -100)
    for reduction in ("mean", "sum"):
        loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, everything_ignored,
                                      reduction=reduction, z_loss=1e-2)
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite_and_minus_inf_bias_equals_truncated_classes(dtype):
    hidden, weight, bias, target, _ = _problem((6,), 4, 9, dtype=dtype, ignore=False)
    scaled = hidden * 2500.0  # logits of order ±1e4
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, scaled, weight, bias, target, softcap=None)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    expected = torch_F.cross_entropy(torch_F.linear(scaled.double(), weight.double(), bias.double()), target)
    assert_close_f32(loss.double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)

    target = target % 6
    masked_bias = bias.clone()
    masked_bias[6:] = -torch.inf
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, masked_bias, target)
    truncated, truncated_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight[:6], bias[:6],
                                                 target)
    # Same maths; only the matmul's blocking over 9 vs 6 classes may reorder the sums of ∂h (float32 ulps).
    assert_close_f32(loss, truncated)
    assert_close_f32(grads[0], truncated_grads[0])
    assert_close_f32(grads[1][:6], truncated_grads[1])
    assert torch.count_nonzero(grads[1][6:]) == 0


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [dict(), OPTION_GRID[-1]], ids=["plain", "all-options"])
def test_low_precision_within_error_budget_of_torch(dtype, spec, impl):
    """The budget: |ours − oracle| ≤ |torch naive in the same dtype − oracle| + tol.

    ``tol`` is a few units of the dtype's rounding at the size of the quantity (the loss and gradients are
    O(1)/N), since ours and PyTorch's round at different points (PyTorch rounds the logits and their
    gradient to the low dtype, ours keeps them in fp32 and accumulates ∂W over chunks in fp32).
    """
    hidden, weight, bias, target, class_weight = _problem((24,), 16, 97, dtype=torch.float64, ignore=False)
    options = _options(spec, class_weight.to(dtype))
    low = [t.to(dtype) for t in (hidden, weight, bias)]
    exact = [t.to(dtype).double() for t in (hidden, weight, bias)]  # the oracle sees the rounded inputs
    oracle, oracle_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, *exact, target, impl="composite",
                                           **{k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items()})
    ours, ours_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, *low, target, chunk_size=7, impl=impl,
                                       **options)

    def torch_path(h, w, y, bias, class_weight=None, label_smoothing=0.0, **extra):
        return softmaxkit.cross_entropy(torch_F.linear(h, w, bias), y, weight=class_weight,
                                        label_smoothing=label_smoothing, impl="composite", **extra)

    peer, peer_grads = _loss_and_grads(torch_path, *low, target, **options)
    unit = torch.finfo(dtype).eps
    assert_within_budget(ours, peer, oracle, tol=4 * unit * max(1.0, abs(oracle.item())))
    for mine, theirs, exact_grad in zip(ours_grads, peer_grads, oracle_grads):
        scale = exact_grad.abs().max().item()
        assert_within_budget(mine, theirs, exact_grad, tol=4 * unit * scale)


def test_low_precision_accumulation_in_the_weights_dtype_is_selectable():
    """bf16 accumulation rounds the running ∂W once per chunk (≤ half a bf16 ulp of the running sum each
    time); fp32 accumulation rounds once at the end, so it is never worse."""
    hidden, weight, bias, target, _ = _problem((32,), 8, 50, ignore=False)
    low = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    _, fp32_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, *low, target, chunk_size=1)
    _, bf16_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, *low, target, chunk_size=1,
                                    accumulation_dtype=torch.bfloat16)
    _, exact = _loss_and_grads(softmaxkit.linear_cross_entropy, *[t.double() for t in low], target)
    assert all(g.dtype == torch.bfloat16 for g in bf16_grads + fp32_grads)
    scale = exact[1].abs().max().item()
    bf16_error = (bf16_grads[1].double() - exact[1]).abs().max().item()
    fp32_error = (fp32_grads[1].double() - exact[1]).abs().max().item()
    assert fp32_error <= bf16_error
    assert bf16_error <= fp32_error + 32 * 2**-9 * scale


@pytest.mark.parametrize("impl", CHUNKED)
def test_bf16_weight_gradient_rounds_each_chunk_product_once_unless_fp32_accumulation_is_asked(impl):
    """Default (``accumulation_dtype=None``) on CPU: each chunk's ``Gᵀ h`` is one bf16 matmul, summed in fp32
    (``_core.linear.rounded_products``); explicit fp32 keeps the products in fp32. Normwise, the default's ∂W is
    within twice the error of autograd's single bf16 matmul over all rows (one extra rounding per chunk, sums of
    independent roundings), and fp32 products are never worse than it (the final rounding to bf16 only)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(96, 32, generator=g).bfloat16()
    weight = (torch.randn(300, 32, generator=g) * 0.3).bfloat16()
    target = torch.randint(0, 300, (96,), generator=g)

    def weight_grad(fn, h, w, **options):
        w = w.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(h, w, target, **options), [w])
        return grad.double()

    exact = weight_grad(softmaxkit.linear_cross_entropy, hidden.double(), weight.double(), impl="composite")
    autograd = weight_grad(lambda h, w, t: torch_F.cross_entropy(torch_F.linear(h, w).float(), t), hidden, weight)
    default = weight_grad(softmaxkit.linear_cross_entropy, hidden, weight, impl=impl, chunk_size=8)
    wide = weight_grad(softmaxkit.linear_cross_entropy, hidden, weight, impl=impl, chunk_size=8,
                       accumulation_dtype=torch.float32)

    def error(grad):
        return ((grad - exact).norm() / exact.norm()).item()

    assert error(wide) <= error(default)
    assert error(default) <= 2 * error(autograd) + 2**-9
    assert error(wide) <= error(autograd) + 2**-10


@pytest.mark.parametrize("dtype, auto", [(torch.float32, "torch"), (torch.float64, "torch"),
                                         (torch.bfloat16, "cpu"), (torch.float16, "cpu")])
def test_auto_takes_the_cpu_chunk_kernel_for_low_precision_only(dtype, auto):
    """``auto`` picks the C-kernel op for bf16/fp16 and the torch passes for fp32/fp64 (level or faster there,
    docs/benchmarks.md runs K-M); ``impl="cpu"`` still names the kernel for fp32, and both give the same loss."""
    from softmaxkit import backends

    if not cpu_ce.available(dtype):
        pytest.skip("no C compiler for the CPU kernel")
    hidden, weight = torch.randn(6, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    target = torch.tensor([0, 4, 2, 1, 3, 0])
    request = backends.Request.of(hidden, weight, None, target)
    assert backends.select("linear_cross_entropy", "auto", request).name == auto
    assert backends.select("linear_cross_entropy", "cpu", request).name == "cpu"
    if dtype in (torch.float32, torch.float64):
        named = softmaxkit.linear_cross_entropy(hidden, weight, target, impl="cpu")
        chosen = softmaxkit.linear_cross_entropy(hidden, weight, target)
        torch.testing.assert_close(named, chosen, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_cpu_kernel_keeps_bf16_chunks_in_bf16_and_fp16_takes_the_torch_passes(monkeypatch):
    """The C kernel serves class indices with fp32/fp64 weights and bf16 with rounded products; the bf16 chunk
    loop then holds no fp32 ``r × C`` buffer. fp16, an explicit fp32 accumulation for bf16 and probability
    targets compute each chunk's CE in the core's torch passes inside the same op."""
    if not cpu_ce.available(torch.bfloat16):
        pytest.skip("no C compiler for the CPU kernel")
    import softmaxkit._core.linear as core
    from softmaxkit.backends.cpu.linear_cross_entropy import CpuChunkKernel

    kernel = CpuChunkKernel()
    options = core.CrossEntropyOptions(num_classes=7)
    for dtype, expected in ((torch.float32, True), (torch.float64, True), (torch.bfloat16, True),
                            (torch.float16, False)):
        assert kernel.serves(torch.zeros(7, 3, dtype=dtype), options, False, core.LOCAL) is expected
    wide = core.CrossEntropyOptions(num_classes=7, accumulation_dtype=torch.float32)
    assert not kernel.serves(torch.zeros(7, 3, dtype=torch.bfloat16), wide, False, core.LOCAL)
    assert not kernel.serves(torch.zeros(7, 3), options, True, core.LOCAL)
    assert not kernel.serves(torch.zeros(7, 3), options, False, object())

    allocations = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        allocations.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    monkeypatch.setattr(core.torch, "empty", empty)
    hidden = torch.randn(40, 8).bfloat16().requires_grad_()
    weight = torch.randn(500, 8).bfloat16().requires_grad_()
    target = torch.randint(0, 500, (40,))
    softmaxkit.linear_cross_entropy(hidden, weight, target, impl="cpu", chunk_size=16).backward()
    # r × C buffers (the kernel's per-worker scratch rows, (workers, C), are not chunk-sized)
    chunks = [(shape, dtype) for shape, dtype in allocations if len(shape) == 2 and shape == (16, 500)]
    assert chunks == [((16, 500), torch.bfloat16)]


@given(
    rows=st.integers(1, 9),
    hidden_size=st.integers(1, 6),
    num_classes=st.integers(1, 12),
    chunk=st.integers(1, 10),
    smoothing=st.sampled_from([0.0, 0.3]),
    softcap=st.sampled_from([None, 1.5]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(rows, hidden_size, num_classes, chunk, smoothing, softcap, reduction, seed):
    hidden, weight, bias, target, _ = _problem((rows,), hidden_size, num_classes, seed=seed, ignore=rows > 3)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target,
                                  chunk_size=chunk, label_smoothing=smoothing, softcap=softcap, reduction=reduction)
    kw = dict(label_smoothing=smoothing, softcap=softcap, reduction=reduction)
    args = [to_numpy(t) for t in (hidden, weight, target, bias)]
    assert_close_f64(loss, ref.linear_cross_entropy(*args, **kw))
    for actual, wanted in zip(grads, ref.linear_cross_entropy_grad(*args, **kw)):
        assert_close_f64(actual, wanted)


def test_composite_impl_supports_double_backward():
    hidden, weight, bias, target, _ = _problem((4,), 3, 5)
    h = hidden.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(h, weight, target, bias=bias, impl="composite")
    (grad,) = torch.autograd.grad(loss, [h], create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), [h])
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_module_equals_function_and_keeps_class_weight_in_state_dict():
    hidden, weight, bias, target, class_weight = _problem()
    module = LinearCrossEntropyLoss(class_weight=class_weight, label_smoothing=0.1, z_loss=1e-3, chunk_size=2)
    assert "class_weight" in module.state_dict()
    expected = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, class_weight=class_weight,
                                               label_smoothing=0.1, z_loss=1e-3)
    assert_close_f64(module(hidden, weight, target, bias), expected, rtol=1e-12)
    # inplace_backward changes nothing here (no caller-visible logits), and leaves the inputs alone
    inplace = LinearCrossEntropyLoss(class_weight=class_weight, label_smoothing=0.1, z_loss=1e-3, chunk_size=2,
                                     inplace_backward=True)
    h = hidden.clone().requires_grad_()
    loss = inplace(h, weight, target, bias)
    loss.backward()
    assert_close_f64(loss, expected, rtol=1e-12)
    assert torch.equal(h.detach(), hidden) and h.grad is not None


def test_head_module_holds_the_projection_and_equals_the_function():
    hidden, weight, bias, target, class_weight = _problem()
    head = LinearCrossEntropyHead(weight.shape[1], weight.shape[0], bias=True, dtype=torch.float64,
                                  class_weight=class_weight, label_smoothing=0.1, chunk_size=2)
    assert {name for name, _ in head.named_parameters()} == {"weight", "bias"}
    assert head.weight.shape == weight.shape and "class_weight" in head.state_dict()
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    expected = softmaxkit.linear_cross_entropy(h, w, target, bias=b, class_weight=class_weight, label_smoothing=0.1,
                                               impl="composite")
    expected.backward()
    loss = head(hidden, target)
    loss.backward()
    assert_close_f64(loss, expected, rtol=1e-12)
    assert_close_f64(head.weight.grad, w.grad, rtol=1e-12)
    assert_close_f64(head.bias.grad, b.grad, rtol=1e-12)
    assert LinearCrossEntropyHead(4, 3).bias is None and "bias=False" in repr(LinearCrossEntropyHead(4, 3))
    with pytest.raises(ValueError, match="`in_features` and `num_classes` must be >= 1"):
        LinearCrossEntropyHead(0, 3)
    with pytest.raises(TypeError, match="`bias` must be a bool"):
        LinearCrossEntropyHead(4, 3, bias=None)
    with pytest.raises(ValueError, match="`impl` must be one of"):
        LinearCrossEntropyHead(4, 3, impl="cuda")


def test_default_chunk_rows():
    # D/2 rows (the chunk's fp32 logits half of ∂W), within [64, 1024] rows and 256 MiB of fp32 logits
    assert default_chunk_rows(8192, 50_000, 512) == 256
    assert default_chunk_rows(8192, 32_000, 256) == 128
    assert default_chunk_rows(8192, 32_000, 256, element_size=2) == 384  # bf16 kernel chunks: 3D/2
    assert default_chunk_rows(10, 50_000, 512) == 10
    assert default_chunk_rows(100_000, 10, 8) == 64
    assert default_chunk_rows(100_000, 32_000, 4096) == 1024
    assert default_chunk_rows(8192, 256_000, 4096) == 256
    assert default_chunk_rows(8192, 10_000_000, 64) == 64


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(hidden=torch.randn(3, 4)), ValueError, "`hidden` has 4 features"),
        (dict(weight=torch.randn(5)), ValueError, "`weight` must have shape (C, D)"),
        (dict(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "`weight` has dtype torch.float64"),
        (dict(bias=torch.randn(4)), ValueError, "`bias` must have shape (5,)"),
        (dict(target=torch.tensor([0, 5, 1])), ValueError, "holds 5 at position 1"),
        (dict(target=torch.tensor([0, 1])), ValueError, "`target` must have shape (3,)"),
        (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer dtype"),
        (dict(chunk_size=0), ValueError, "`chunk_size` must be None or an int >= 1"),
        (dict(impl="cuda"), ValueError, "`impl` must be one of"),
        (dict(inplace_backward="yes"), TypeError, "`inplace_backward` must be a bool"),
        (dict(accumulation_dtype=torch.int32), TypeError, "`accumulation_dtype`"),
        (dict(class_weight=torch.ones(4)), ValueError, "`class_weight` must be a 1-d tensor"),
        (dict(label_smoothing=1.5), ValueError, "`label_smoothing`"),
        (dict(hidden=torch.randn(3, 3).long()), TypeError, "`hidden` must have a floating-point dtype"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, error, message):
    args = dict(hidden=torch.randn(3, 3), weight=torch.randn(5, 3), target=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(error, match=_escape(message)):
        softmaxkit.linear_cross_entropy(hidden, weight, target, **args)


def _escape(message: str) -> str:
    import re

    return re.escape(message)


def test_grid_of_odd_shapes_against_oracle():
    for rows, hidden_size, num_classes in itertools.product((1, 3), (1, 7), (1, 2, 31)):
        hidden, weight, bias, target, _ = _problem((rows,), hidden_size, num_classes, ignore=False)
        loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, chunk_size=2)
        args = [to_numpy(t) for t in (hidden, weight, target, bias)]
        assert_close_f64(loss, ref.linear_cross_entropy(*args))
        for actual, wanted in zip(grads, ref.linear_cross_entropy_grad(*args)):
            assert_close_f64(actual, wanted)


def test_docstring_examples_run():
    import doctest

    import softmaxkit.functional.linear_cross_entropy as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ class-probability targets
# The chunked path reads an (r, C) slice of the (N, C) target per row chunk; a = w ⊙ ((1 − ε)t + ε/C),
# "mean" divides by the number of rows (cross_entropy's and F.cross_entropy's rule for probabilities).


def _soft_target(rows_shape, num_classes, dtype=torch.float64, seed=1, zero_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*rows_shape, num_classes, generator=g, dtype=torch.float64)
    keep = (torch.rand(scores.shape, generator=g) >= zero_fraction) | (scores == scores.amax(-1, keepdim=True))
    t = torch.where(keep, scores.exp(), torch.zeros_like(scores))
    return (t / t.sum(-1, keepdim=True)).to(dtype)


def _naive_soft(h, w, t, bias=None, class_weight=None, **options):
    """``cross_entropy(hidden @ W.T + b, t)``: the (N, C) logits held whole."""
    num_classes = w.shape[0]
    logits = (h @ w.T + (0 if bias is None else bias)).reshape(-1, num_classes)
    loss = softmaxkit.cross_entropy(logits, t.reshape(-1, num_classes), weight=class_weight, impl="composite",
                                    **options)
    return loss.reshape(h.shape[:-1]) if options.get("reduction") == "none" else loss


def _grads_with_target(fn, hidden, weight, bias, target, upstream=None, **options):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias, target)]
    loss = fn(leaves[0], leaves[1], leaves[3], bias=leaves[2], **options)
    total = loss.sum() if upstream is None else (loss * upstream).sum()
    return loss.detach(), torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", OPTION_GRID, ids=lambda s: ",".join(s) or "plain")
def test_probability_targets_chunked_equal_oracle_and_naive(reduction, spec):
    hidden, weight, bias, _, class_weight = _problem(rows_shape=(2, 5))
    target = _soft_target((2, 5), weight.shape[0])
    options = _options(spec, class_weight)
    upstream = torch.randn(2, 5, dtype=torch.float64) if reduction == "none" else None
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                  reduction=reduction, chunk_size=3, impl="torch", **options)
    ref_options = _ref_options(options)
    args = (to_numpy(hidden), to_numpy(weight), to_numpy(target), to_numpy(bias))
    assert loss.shape == ((2, 5) if reduction == "none" else ())
    assert_close_f64(loss, ref.linear_cross_entropy(*args, reduction=reduction, **ref_options))
    expected_grads = ref.linear_cross_entropy_grad(*args, reduction=reduction, **ref_options,
                                                   grad_output=None if upstream is None else to_numpy(upstream))
    for actual, wanted in zip(grads, expected_grads):
        assert_close_f64(actual, wanted)
    naive, naive_grads = _loss_and_grads(_naive_soft, hidden, weight, bias, target, upstream, reduction=reduction,
                                         **options)
    assert_close_f64(loss, naive)
    for actual, wanted in zip(grads, naive_grads):
        assert_close_f64(actual, wanted)


@pytest.mark.parametrize("spec", [dict(), OPTION_GRID[-1]], ids=["plain", "all-options"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_every_chunk_size_equals_composite(spec, reduction):
    hidden, weight, bias, _, class_weight = _problem(rows_shape=(9,), hidden_size=3, num_classes=13)
    target = _soft_target((9,), 13)
    options = _options(spec, class_weight)
    upstream = torch.randn(9, dtype=torch.float64) if reduction == "none" else None
    naive, naive_grads = _grads_with_target(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                            impl="composite", reduction=reduction, **options)
    for chunk in range(1, 10):
        loss, grads = _grads_with_target(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                         chunk_size=chunk, reduction=reduction, **options)
        assert_close_f64(loss, naive, rtol=1e-12)
        for actual, wanted in zip(grads[:3], naive_grads[:3]):
            assert_close_f64(actual, wanted, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", [dict(), OPTION_GRID[3], OPTION_GRID[-1]], ids=["plain", "smooth+w", "all"])
def test_probability_targets_gradcheck_float64(reduction, spec):
    """The closed-form chunked backward for hidden, weight, bias and the target itself."""
    hidden, weight, bias, _, class_weight = _problem((4,), 3, 6)
    target = _soft_target((4,), 6, zero_fraction=0.0)
    options = _options(spec, class_weight)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (hidden, weight, bias, target))

    def fn(h, w, b, t):
        return softmaxkit.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=3, impl="torch",
                                               **options)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_gradient_equals_torch_cross_entropy(reduction):
    """∂ℓ/∂t = −(1 − ε) w_c log p_c, also where t_c = 0 (where the composite path's torch.where gives 0)."""
    hidden, weight, bias, _, class_weight = _problem((7,), 4, 9)
    target = _soft_target((7,), 9, zero_fraction=0.5)
    upstream = torch.randn(7, dtype=torch.float64) if reduction == "none" else None
    options = dict(label_smoothing=0.1, reduction=reduction)

    def torch_path(h, w, t, bias, class_weight):
        return torch_F.cross_entropy(torch_F.linear(h, w, bias), t, weight=class_weight, **options)

    expected, expected_grads = _grads_with_target(torch_path, hidden, weight, bias, target, upstream,
                                                  class_weight=class_weight)
    loss, grads = _grads_with_target(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, upstream,
                                     class_weight=class_weight, chunk_size=3, **options)
    assert_close_f64(loss, expected)
    for actual, wanted in zip(grads, expected_grads):
        assert_close_f64(actual, wanted)


def _allocations(fn):
    """Every CPU allocation (bytes > 0) and free (< 0) PyTorch's allocator made while ``fn`` ran, in order,
    from the profiler's per-allocation ``[memory]`` records (not per-op net figures, so a temporary that an
    op allocates and frees inside itself is seen too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    sizes = [e.nbytes() for e in events]
    live = peak = 0
    for size in sizes:
        live += size
        peak = max(peak, live)
    return sizes, peak


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_allocate_nothing_logits_sized(reduction):
    """What this proves: within forward + backward, no single allocation through PyTorch's CPU allocator reaches
    half of one (N, C) fp32 logits tensor, and the peak of the memory allocated during the call stays below
    half of one; the composite path, run the same way, allocates (N, C) tensors (so the check can fail). It
    does not see memory a BLAS / oneDNN library allocates outside PyTorch's allocator."""
    num_rows, hidden_size, num_classes, chunk = 1024, 8, 400, 32  # logits 1.6 MB; oneDNN scratch ~0.2 MB
    hidden, weight, bias, _, class_weight = _problem((num_rows,), hidden_size, num_classes, dtype=torch.float32)
    target = _soft_target((num_rows,), num_classes, dtype=torch.float32)  # exists before: not counted
    logits_bytes = num_rows * num_classes * 4
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    options = dict(bias=leaves[2], class_weight=class_weight, label_smoothing=0.1, softcap=5.0, z_loss=1e-3,
                   reduction=reduction, chunk_size=chunk)

    def run(impl):
        def step():
            softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, impl=impl, **options).sum().backward()
        return _allocations(step)

    sizes, peak = run("auto")
    assert max(sizes) < logits_bytes / 2 and peak < logits_bytes / 2
    composite_sizes, composite_peak = run("composite")
    assert max(composite_sizes) >= logits_bytes and composite_peak >= 2 * logits_bytes


def test_probability_targets_largest_allocation_is_one_chunk(monkeypatch):
    """Chunk-size accounting on the torch.mm path (oneDNN's linear allocates its own scratch): the largest
    allocation of forward + backward is exactly the chunk's r × C fp32 logits buffer, since C·D, N·D < r·C."""
    import softmaxkit._core.linear as backend

    monkeypatch.setattr(backend, "use_onednn", lambda weight: False)
    num_rows, hidden_size, num_classes, chunk = 300, 6, 250, 20
    hidden, weight, bias, _, class_weight = _problem((num_rows,), hidden_size, num_classes, dtype=torch.float32)
    target = _soft_target((num_rows,), num_classes, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]

    def step():
        softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], class_weight=class_weight,
                                        label_smoothing=0.2, temperature=0.7, chunk_size=chunk).backward()

    sizes, _ = _allocations(step)
    assert max(sizes) == chunk * num_classes * 4


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_gradient_is_the_only_target_sized_allocation(reduction):
    """When the target requires a gradient, ∂ℓ/∂t (target-shaped) is built chunk by chunk: the only
    allocations of the target's size are that gradient (and, for a scalar loss, its upstream-scaled copy)."""
    num_rows, num_classes = 1024, 300  # 1.2 MB target; oneDNN's linear allocates ~0.2 MB of its own scratch
    hidden, weight, bias, _, _ = _problem((num_rows,), 8, num_classes, dtype=torch.float32)
    target = _soft_target((num_rows,), num_classes, dtype=torch.float32).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]

    def step():
        loss = softmaxkit.linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], reduction=reduction,
                                               chunk_size=16)
        loss.sum().backward()

    sizes, _ = _allocations(step)
    target_bytes = num_rows * num_classes * 4
    assert all(size == target_bytes for size in sizes if size >= target_bytes / 2)
    assert sum(size == target_bytes for size in sizes) <= (2 if reduction == "mean" else 1)
    assert target.grad is not None and target.grad.shape == target.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [dict(), OPTION_GRID[-1]], ids=["plain", "all-options"])
def test_probability_targets_low_precision_within_error_budget(dtype, spec):
    """|ours − oracle| ≤ |naive matmul + cross_entropy in the same dtype − oracle| + 4 units of the dtype's
    rounding at the size of the quantity (as the class-index test above)."""
    hidden, weight, bias, _, class_weight = _problem((24,), 16, 97, dtype=torch.float64, ignore=False)
    target = _soft_target((24,), 97, dtype=dtype)
    options = _options(spec, class_weight.to(dtype))
    low = [t.to(dtype) for t in (hidden, weight, bias)]
    exact = [t.to(dtype).double() for t in (hidden, weight, bias)]
    exact_options = {k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items()}
    oracle, oracle_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, *exact, target.double(),
                                           impl="composite", **exact_options)
    ours, ours_grads = _loss_and_grads(softmaxkit.linear_cross_entropy, *low, target, chunk_size=7, **options)
    peer, peer_grads = _loss_and_grads(_naive_soft, *low, target, **options)
    unit = torch.finfo(dtype).eps
    assert ours.dtype == dtype
    assert_within_budget(ours, peer, oracle, tol=4 * unit * max(1.0, abs(oracle.item())))
    for mine, theirs, exact_grad in zip(ours_grads, peer_grads, oracle_grads):
        assert_within_budget(mine, theirs, exact_grad, tol=4 * unit * exact_grad.abs().max().item())


def test_probability_targets_masked_classes_equal_truncated_classes():
    hidden, weight, bias, _, _ = _problem((6,), 4, 9, ignore=False)
    target = torch.zeros(6, 9, dtype=torch.float64)
    target[:, :6] = _soft_target((6,), 6)
    masked_bias = bias.clone()
    masked_bias[6:] = -torch.inf
    loss, grads = _grads_with_target(softmaxkit.linear_cross_entropy, hidden, weight, masked_bias, target,
                                     chunk_size=4, z_loss=1e-3, label_smoothing=0.0)
    truncated, truncated_grads = _grads_with_target(softmaxkit.linear_cross_entropy, hidden, weight[:6], bias[:6],
                                                    target[:, :6], chunk_size=4, z_loss=1e-3)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close_f64(loss, truncated)
    assert_close_f64(grads[0], truncated_grads[0])
    assert_close_f64(grads[1][:6], truncated_grads[1])
    assert torch.count_nonzero(grads[1][6:]) == 0 and torch.count_nonzero(grads[3][:, 6:]) == 0
    assert_close_f64(grads[3][:, :6], truncated_grads[3])


def test_probability_targets_extreme_logits_stay_finite():
    hidden, weight, bias, _, _ = _problem((6,), 4, 9, dtype=torch.float32, ignore=False)
    target = _soft_target((6,), 9, dtype=torch.float32)
    scaled = hidden * 2500.0  # logits of order ±1e4
    loss, grads = _grads_with_target(softmaxkit.linear_cross_entropy, scaled, weight, bias, target)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    expected = torch_F.cross_entropy(torch_F.linear(scaled.double(), weight.double(), bias.double()), target.double())
    assert_close_f32(loss.double(), expected)


@given(
    rows=st.integers(1, 9),
    hidden_size=st.integers(1, 6),
    num_classes=st.integers(1, 12),
    chunk=st.integers(1, 10),
    smoothing=st.sampled_from([0.0, 0.3]),
    softcap=st.sampled_from([None, 1.5]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_probability_targets_property_matches_oracle(rows, hidden_size, num_classes, chunk, smoothing, softcap,
                                                     z_loss, reduction, seed):
    hidden, weight, bias, _, _ = _problem((rows,), hidden_size, num_classes, seed=seed)
    target = _soft_target((rows,), num_classes, seed=seed)
    kw = dict(label_smoothing=smoothing, softcap=softcap, z_loss=z_loss, reduction=reduction)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, chunk_size=chunk,
                                  **kw)
    args = [to_numpy(t) for t in (hidden, weight, target, bias)]
    assert_close_f64(loss, ref.linear_cross_entropy(*args, **kw))
    for actual, wanted in zip(grads, ref.linear_cross_entropy_grad(*args, **kw)):
        assert_close_f64(actual, wanted)


def test_probability_targets_routing_inputs_module_and_no_grad(monkeypatch):
    import softmaxkit._core.linear as backend

    hidden, weight, bias, _, class_weight = _problem((3, 4))
    target = _soft_target((3, 4), weight.shape[0])
    copies = [t.clone() for t in (hidden, weight, bias, target, class_weight)]
    # "auto" and "torch" take the chunked loop; "composite" does not
    import softmaxkit.backends._linear_ops as op_module

    calls = []
    original = op_module.linear_forward
    monkeypatch.setattr(op_module, "linear_forward",
                        lambda *args, **kwargs: calls.append(args[3].shape) or original(*args, **kwargs))
    results = {impl: softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, class_weight=class_weight,
                                                     label_smoothing=0.1, impl=impl)
               for impl in ("auto", "torch", "composite")}
    assert calls == [(12, weight.shape[0])] * 2
    assert_close_f64(results["auto"], results["composite"])
    for original_tensor, now in zip(copies, (hidden, weight, bias, target, class_weight)):
        assert torch.equal(original_tensor, now)
    # the module passes them through
    module = LinearCrossEntropyLoss(class_weight=class_weight, label_smoothing=0.1, chunk_size=2)
    assert_close_f64(module(hidden, weight, target, bias), results["auto"], rtol=1e-12)
    # evaluation under no_grad builds no gradient
    built = []
    monkeypatch.setattr(backend, "_Accumulators", lambda *a, **k: built.append(1))
    with torch.no_grad():
        evaluated = softmaxkit.linear_cross_entropy(hidden, weight.clone().requires_grad_(), target, bias=bias,
                                                    class_weight=class_weight, label_smoothing=0.1)
    assert built == [] and not evaluated.requires_grad
    assert_close_f64(evaluated, results["auto"])


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(impl="triton"), ValueError, "handles class-index targets, not class probabilities; implementations "
                                      "that can serve this call: 'auto', 'torch', 'composite'"),
    (dict(impl="triton_fused"), ValueError, "handles class-index targets, not class probabilities; "
                                            "implementations that can serve this call: 'auto', 'torch', 'composite'"),
    (dict(ignore_index=0), ValueError, "`ignore_index` is not supported with class-probability targets"),
    (dict(target=torch.ones(3, 5, dtype=torch.long)), ValueError, "`target` must have shape (3,)"),
    (dict(target=torch.ones(3, 4)), ValueError, "(3, 5) (class probabilities)"),
])
def test_probability_targets_bad_input(kwargs, error, message):
    args = dict(hidden=torch.randn(3, 3), weight=torch.randn(5, 3), target=torch.full((3, 5), 0.2))
    args.update(kwargs)
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(error, match=_escape(message)):
        softmaxkit.linear_cross_entropy(hidden, weight, target, **args)


def test_probability_targets_taken_as_given_like_cross_entropy():
    """Unnormalised and negative targets are not rejected (cross_entropy's rule): the chunked path equals the
    oracle on them too, values and gradients."""
    hidden, weight, bias, _, class_weight = _problem((5,), 3, 6)
    target = torch.randn(5, 6, dtype=torch.float64)
    options = dict(class_weight=class_weight, label_smoothing=0.1, z_loss=1e-2)
    loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, chunk_size=2,
                                  **options)
    args = [to_numpy(t) for t in (hidden, weight, target, bias)]
    assert_close_f64(loss, ref.linear_cross_entropy(*args, **_ref_options(options)))
    for actual, wanted in zip(grads, ref.linear_cross_entropy_grad(*args, **_ref_options(options))):
        assert_close_f64(actual, wanted)


@pytest.mark.parametrize("impl", ["auto", *CHUNKED, "composite"])
def test_hidden_size_zero_gives_the_bias_only_loss(impl):
    """D = 0: the logits are the bias alone; every path handles it (reshape(-1, 0) would be ambiguous)."""
    hidden = torch.randn(2, 3, 0, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 1, 4], [2, -100, 3]])
    loss = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, impl=impl)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    expected = torch_F.cross_entropy(bias.expand(6, 5), target.reshape(-1))
    (expected_bias_grad,) = torch.autograd.grad(expected, bias)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert grads[0].shape == hidden.shape and grads[1].shape == weight.shape
    torch.testing.assert_close(grads[2], expected_bias_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nan_and_inf_hidden_rows_that_are_ignored_change_nothing(reduction, with_bias, impl):
    # padding rows may hold anything: their loss and gradients must be exactly those of dropping them, in the
    # forward-built (mean) and the recomputing (none) backward, over several chunks, with and without a bias
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 6, dtype=torch.float64, generator=g)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=g)
    bias = torch.randn(13, dtype=torch.float64, generator=g) if with_bias else None
    target = torch.randint(0, 13, (10,), generator=g)
    target[[1, 4, 8]] = -100
    hidden[1], hidden[4, 2], hidden[8, 0] = torch.nan, torch.inf, -torch.inf
    keep = target != -100

    def run(h, w, t):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = softmaxkit.linear_cross_entropy(h, w, t, bias=bias, reduction=reduction, chunk_size=3, impl=impl)
        (loss.sum() if reduction == "none" else loss).backward()
        return loss.detach(), h.grad, w.grad

    loss, grad_h, grad_w = run(hidden, weight, target)
    kept_loss, kept_h, kept_w = run(hidden[keep], weight, target[keep])
    if reduction == "none":
        assert torch.all(loss[~keep] == 0)
        loss = loss[keep]
    assert_close_f64(loss, kept_loss)
    assert torch.all(grad_h[~keep] == 0)
    assert_close_f64(grad_h[keep], kept_h)
    assert_close_f64(grad_w, kept_w)


def _recording_chunk_rows(monkeypatch):
    """The rows of every chunk of logits the chunk loops form (forward and recomputing backward)."""
    import softmaxkit._core.linear as core

    seen = []
    real = core._chunk_logits

    def recording(out, hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return real(out, hidden, *args, **kwargs)

    monkeypatch.setattr(core, "_chunk_logits", recording)
    return seen


@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_chunk_loop_visits_only_kept_rows_and_equals_dropping_the_ignored_ones(monkeypatch, impl, dtype,
                                                                                   reduction):
    # padding and prompt rows cost no matmul and no cross-entropy: the loop gathers the kept rows, and the
    # gradients are bit for bit those of the batch without the ignored rows (same chunks, same sums), their
    # loss and ∂h rows exactly 0, whatever they held; the reduced loss sums the rows' losses with the ignored
    # rows' zeros among them, so only its summation order differs (a few ulps of the compute dtype)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(23, 8, generator=g).to(dtype)
    weight = (torch.randn(37, 8, generator=g) * 0.5).to(dtype)
    bias = torch.randn(37, generator=g).to(dtype)
    class_weight = (torch.rand(37, generator=g) + 0.5).to(dtype)
    target = torch.randint(0, 37, (23,), generator=g)
    target[[0, 3, 4, 5, 11, 17, 22]] = -100  # the first and last rows too
    hidden[0], hidden[4, 1], hidden[22, 7] = torch.nan, torch.inf, -torch.inf
    keep = target != -100
    options = dict(bias=bias, class_weight=class_weight, label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                   reduction=reduction, chunk_size=4, impl=impl)

    def run(h, t):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = softmaxkit.linear_cross_entropy(h, w, t, **options)
        (loss.sum() if reduction == "none" else loss).backward()
        return loss.detach(), h.grad, w.grad

    seen = _recording_chunk_rows(monkeypatch)
    loss, grad_h, grad_w = run(hidden, target)
    kept = int(keep.sum())
    assert sum(seen) == kept * (2 if reduction == "none" else 1)  # "none" recomputes each chunk in backward
    seen.clear()
    dropped_loss, dropped_h, dropped_w = run(hidden[keep], target[keep])
    assert sum(seen) == kept * (2 if reduction == "none" else 1)
    if reduction == "none":
        assert torch.all(loss[~keep] == 0)
        loss = loss[keep]
    if reduction == "none":
        assert torch.equal(loss, dropped_loss)
    else:
        torch.testing.assert_close(loss, dropped_loss, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    assert torch.all(grad_h[~keep] == 0)
    assert torch.equal(grad_h[keep], dropped_h)
    assert torch.equal(grad_w, dropped_w)


@pytest.mark.parametrize("impl", CHUNKED)
def test_all_or_no_rows_ignored_through_the_kept_rows_loop(monkeypatch, impl):
    hidden, weight, bias, target, _ = _problem((9,), 4, 7, dtype=torch.float32, ignore=False)
    seen = _recording_chunk_rows(monkeypatch)
    for reduction in ("mean", "none"):
        seen.clear()
        loss, grads = _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias,
                                      torch.full_like(target, -100), reduction=reduction, impl=impl, chunk_size=4)
        assert seen == [] and torch.count_nonzero(loss) == 0
        assert all(torch.count_nonzero(grad) == 0 for grad in grads)
    seen.clear()
    _loss_and_grads(softmaxkit.linear_cross_entropy, hidden, weight, bias, target, impl=impl, chunk_size=4)
    assert seen == [4, 4, 1]  # every row kept: the loop runs over the batch itself


@pytest.mark.parametrize("impl", CHUNKED)
def test_compiled_calls_skip_ignored_rows_inside_the_op(monkeypatch, impl):
    # the op's kernel runs on real tensors under torch.compile (fullgraph): it still skips the ignored rows,
    # which a caller could not drop in the graph without a data-dependent shape
    hidden, weight, bias, target, _ = _problem((12,), 6, 17, dtype=torch.float32, ignore=False)
    target[[2, 3, 9]] = -100

    def loss_of(h, w):
        return softmaxkit.linear_cross_entropy(h, w, target, bias=bias, impl=impl, chunk_size=5)

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = _loss_and_grads(lambda h, w, t, bias=None, **kw: loss_of(h, w), hidden, weight,
                                              None, target)
    seen = _recording_chunk_rows(monkeypatch)
    compiled_loss, compiled_grads = _loss_and_grads(lambda h, w, t, bias=None, **kw: compiled(h, w), hidden,
                                                    weight, None, target)
    assert seen == [5, 4]  # 9 kept rows in chunks of 5
    assert_close_f32(compiled_loss, eager_loss)
    for actual, expected in zip(compiled_grads, eager_grads):
        assert_close_f32(actual, expected)
