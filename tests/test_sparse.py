"""sparsemax, entmax15, entmax_bisect and their Fenchel-Young losses.

Checked against the float64 NumPy oracle (sort + KKT check per row, bisection to full precision), the
``entmax`` package (the peer, test-only), gradcheck of every custom backward (inputs and α), the invariances
(α = 2 is sparsemax, α = 1.5 entmax15, α = 1 softmax; any dim equals moving it last; ignore equals dropping
rows; −inf masks equal truncation) and an error budget in bf16/fp16.

On CPU the maps and losses of sparsemax / 1.5-entmax run on the compiled kernel by default
(``softmaxkit.backends.cpu.sparse``, tested in depth in test_cpu_sparse.py); the ``path`` fixture runs the
tests that check results once on it and once on the PyTorch path, and ``torch_path`` pins the tests of the
PyTorch solver's internals to that path.

Tolerances: float64 to 1e-10 relative (tests/_helpers.py); float32 vs the package to 1e-5 relative with a 1e-6
absolute floor (both solve in float32); bf16/fp16: |ours − oracle| <= |peer − oracle| + one ulp of the output
dtype (ours is solved in fp32 and rounded once).
"""

from __future__ import annotations

import entmax as peer
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softmaxkit
from softmaxkit import reference as ref
from softmaxkit.backends.cpu import sparse as cpu_sparse
from softmaxkit.backends.torch import sparse as backend

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget, to_numpy

MAPS = {
    "sparsemax": (softmaxkit.sparsemax, ref.sparsemax, 2.0),
    "entmax15": (softmaxkit.entmax15, ref.entmax15, 1.5),
}
PEER_MAPS = {"sparsemax": peer.sparsemax, "entmax15": peer.entmax15}
LOSSES = {
    "sparsemax": (softmaxkit.sparsemax_loss, ref.sparsemax_loss, ref.sparsemax_loss_grad, peer.sparsemax_loss),
    "entmax15": (softmaxkit.entmax15_loss, ref.entmax15_loss, ref.entmax15_loss_grad, peer.entmax15_loss),
}


def _force_torch_path(monkeypatch):
    monkeypatch.setattr(cpu_sparse, "available", lambda dtype=torch.float32: False)


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """The test runs on the CPU kernel (the default where it can be built) and on the PyTorch path."""
    if request.param == "torch":
        _force_torch_path(monkeypatch)
    elif not cpu_sparse.available(torch.float64):
        pytest.skip("no CPU kernel could be built: the default path is the PyTorch one")
    return request.param


@pytest.fixture
def torch_path(monkeypatch):
    """Pins a test of the PyTorch solver's internals to that path."""
    _force_torch_path(monkeypatch)


def _grad(out, x, upstream=None):
    (g,) = torch.autograd.grad(out, x, grad_outputs=upstream)
    return g


def _jacobian_vector(p: np.ndarray, alpha: float, v: np.ndarray) -> np.ndarray:
    """``J v`` for rows ``(N, C)`` with the oracle's Jacobian formula, without forming ``(N, C, C)``."""
    s = np.where(p > 0, np.abs(p) ** (2.0 - alpha), 0.0)
    return s * v - s * np.sum(s * v, axis=-1, keepdims=True) / s.sum(axis=-1, keepdims=True)


def _x(shape, scale=2.0, dtype=torch.float64):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


# ------------------------------------------------------------------------------ the maps vs the oracle
@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize(("shape", "dim"), [((7,), 0), ((1, 1), -1), ((5, 7), -1), ((5, 7), 0), ((3, 4, 5), 1),
                                            ((3, 4, 5), -3), ((2, 3, 4, 5), 2)], ids=str)
def test_maps_match_oracle_any_dim(name, shape, dim):
    function, oracle, alpha = MAPS[name]
    x = _x(shape)
    p = function(x, dim)
    expected = oracle(to_numpy(x), axis=dim)
    assert_close_f64(p, expected)
    assert_close_f64(p.sum(dim), np.ones(p.sum(dim).shape))
    upstream = torch.randn_like(p)
    # Backward: Jᵀ g with the oracle's Jacobian (symmetric), along the moved dimension.
    jacobian = ref.entmax_jacobian(np.moveaxis(expected, dim, -1), alpha)
    expected_grad = np.einsum("...ij,...j->...i", jacobian, np.moveaxis(to_numpy(upstream), dim, -1))
    assert_close_f64(_grad(p, x, upstream), np.moveaxis(expected_grad, -1, dim))


@pytest.mark.parametrize("alpha", [1.0, 1.001, 1.25, 1.5, 2.0, 3.5])
@pytest.mark.parametrize(("shape", "dim"), [((6,), 0), ((5, 9), -1), ((4, 3, 5), 1)], ids=str)
def test_entmax_bisect_matches_oracle(alpha, shape, dim):
    x = _x(shape)
    p = softmaxkit.entmax_bisect(x, alpha, dim)
    expected = ref.entmax_bisect(to_numpy(x), alpha, axis=dim)
    assert_close_f64(p, expected)
    upstream = torch.randn_like(p)
    jacobian = ref.entmax_jacobian(np.moveaxis(expected, dim, -1), alpha)
    expected_grad = np.einsum("...ij,...j->...i", jacobian, np.moveaxis(to_numpy(upstream), dim, -1))
    assert_close_f64(_grad(p, x, upstream), np.moveaxis(expected_grad, -1, dim), atol=1e-11)


def test_oracle_is_the_projection():
    # The oracle itself: sparsemax(x) is the closest point of the simplex to x (checked against random points).
    rng = np.random.default_rng(0)
    x = rng.normal(size=6) * 2
    p = ref.sparsemax(x)
    others = rng.dirichlet(np.ones(6) * 0.3, size=2000)
    assert np.all(np.linalg.norm(others - x, axis=1) >= np.linalg.norm(p - x) - 1e-12)
    # entmax15 maximises <p, x> + H_1.5(p) over the simplex.
    q = ref.entmax15(x)
    objective = lambda r: r @ x + ref.tsallis_entropy(r, 1.5)  # noqa: E731
    assert all(objective(q) >= objective(r) - 1e-12 for r in others)


# ------------------------------------------------------------------------------ the top-k solver's paths
@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("name", MAPS)
def test_every_solver_path_is_exact(name):
    function, oracle, _ = MAPS[name]
    kind = backend.SPARSEMAX if name == "sparsemax" else backend.ENTMAX15
    first = backend.FIRST_K[kind]
    # C = 1000: rows with a small support finish in the first top-k; a row with a mid-size support needs the
    # second (k = first·GROWTH); tiny-scale logits (dense support) fail both and go to the full sort.
    rows = [torch.randn(1000, dtype=torch.float64) * 3, torch.randn(1000, dtype=torch.float64) * 1e-3,
            torch.linspace(0, 0.9, 1000, dtype=torch.float64) * (1 if name == "sparsemax" else 4)]
    x = torch.stack(rows + [torch.randn(1000, dtype=torch.float64) * 2 for _ in range(3)])
    support = (function(x) > 0).sum(1)
    assert support[0] < first < support[2] < first * backend.GROWTH < support[1]
    assert_close_f64(function(x), oracle(x.numpy()))


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("name", MAPS)
def test_support_path_and_dense_path_agree(name):
    # Unit-scale logits: every support is found by top-k and outputs / gradients are built by scatter over
    # the (N, K) support; one tiny-scale row (dense support) sends the whole batch down the dense path.
    function, oracle, alpha = MAPS[name]
    loss_function, loss_oracle, loss_grad_oracle, _ = LOSSES[name]
    sparse_x = _x((5, 700))
    dense_x = torch.cat([sparse_x.detach(), torch.randn(1, 700, dtype=torch.float64) * 1e-4]).requires_grad_()
    kind = backend.SPARSEMAX if name == "sparsemax" else backend.ENTMAX15
    assert backend.solve_threshold(sparse_x.detach(), kind, keep_support=True).index is not None
    assert backend.solve_threshold(dense_x.detach(), kind, keep_support=True).index is None
    target = torch.tensor([3, 1, 4, 1, 5, 9])
    target[1] = -100
    for x in (sparse_x, dense_x):
        upstream = torch.randn(x.shape, dtype=torch.float64)
        p = function(x)
        assert_close_f64(p, oracle(to_numpy(x)))
        expected = np.einsum("nij,nj->ni", ref.entmax_jacobian(oracle(to_numpy(x)), alpha), upstream.numpy())
        assert_close_f64(_grad(p, x, upstream), expected)
        rows = x.shape[0]
        loss = loss_function(x, target[:rows], reduction="none")
        assert_close_f64(loss, loss_oracle(to_numpy(x), target[:rows].numpy(), reduction="none"))
        weights = torch.rand(rows, dtype=torch.float64)
        assert_close_f64(_grad(loss, x, weights), loss_grad_oracle(to_numpy(x), target[:rows].numpy(), reduction="none",
                                                                  grad_output=weights.numpy()))


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("shape", [(40, 7), (15, 300), (6, 4096)], ids=str)
def test_row_chunks_and_row_splits(monkeypatch, shape):
    # ~1 KiB chunks: every chunked loop (full sorts, dense forward/backward, losses) runs over many chunks;
    # mixed scales make some rows narrow (block filter, C >= 4096), some wide, some dense.
    import softmaxkit._core.rows as ce_backend  # where chunk_rows reads CHUNK_BYTES

    monkeypatch.setattr(ce_backend, "CHUNK_BYTES", 1024)
    scales = torch.tensor([3.0, 0.3, 1.0, 1e-4, 10.0]).repeat(shape[0])[: shape[0], None].double()
    x = (torch.randn(shape, dtype=torch.float64) * scales).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0],))
    upstream = torch.randn(shape, dtype=torch.float64)
    for name, (function, oracle, alpha) in MAPS.items():
        expected = oracle(to_numpy(x))
        assert_close_f64(function(x), expected)
        assert_close_f64(_grad(function(x), x, upstream), _jacobian_vector(expected, alpha, upstream.numpy()))
        loss_function, loss_oracle, loss_grad_oracle, _ = LOSSES[name]
        assert_close_f64(loss_function(x, target, reduction="none"),
                         loss_oracle(to_numpy(x), target.numpy(), reduction="none"))
        assert_close_f64(_grad(loss_function(x, target), x), loss_grad_oracle(to_numpy(x), target.numpy()))
    if shape[1] < 100:
        assert_close_f64(softmaxkit.entmax_bisect(x, 1.3), ref.entmax_bisect(to_numpy(x), 1.3))


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize(("name", "small"), [("sparsemax", 0.01), ("entmax15", 0.15)])
def test_block_filter_with_narrow_and_wide_rows(name, small):
    # C = 8192: block maxima of 32 entries; large-scale rows keep a few blocks ("narrow", solved by Newton on
    # them), small-scale rows keep most blocks ("wide", solved on the whole row) yet have supports < C/4 so
    # theirs are kept too; merged, all exact.
    scales = torch.tensor([[4.0], [small], [2.0], [small]], dtype=torch.float64)
    x = (torch.randn(4, 8192, dtype=torch.float64) * scales).requires_grad_()
    upstream = torch.randn(4, 8192, dtype=torch.float64)
    function, oracle, alpha = MAPS[name]
    kind = backend.SPARSEMAX if name == "sparsemax" else backend.ENTMAX15
    block_max = x.detach().view(4, 256, 32).amax(2)
    lower, done = backend._newton_exact(block_max, kind, None)
    kept_blocks = (block_max > lower[:, None]).sum(1)
    assert done.all() and kept_blocks[[0, 2]].max() <= 128 < kept_blocks[[1, 3]].min()  # narrow / wide
    assert backend.solve_threshold(x.detach(), kind, keep_support=True).index is not None
    expected = oracle(to_numpy(x))
    assert_close_f64(function(x), expected)
    assert_close_f64(_grad(function(x), x, upstream), _jacobian_vector(expected, alpha, upstream.numpy()))


def test_newton_threshold_is_exact_on_hard_rows():
    # ties, −inf, a single entry, all-equal rows, huge and tiny scales: the closed form on the settled support
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, -torch.inf, 0.0], [0.5, -torch.inf, -torch.inf, -torch.inf],
                         [1e4, -1e4, 0.0, 1e4 - 0.5], [1e-9, 2e-9, 0.0, -1e-9]], dtype=torch.float64)
    for name, (_, oracle, _) in MAPS.items():
        kind = backend.SPARSEMAX if name == "sparsemax" else backend.ENTMAX15
        tau, done = backend._newton_exact(rows, kind, None)
        assert done.all()
        p = backend.probabilities(rows, tau, kind)
        assert_close_f64(p, oracle(rows.numpy()), atol=1e-15)


@pytest.mark.usefixtures("path")
def test_backward_does_not_write_into_the_upstream_gradient():
    # one tiny-scale row: dense path; 60 rows of 20000 classes: two row chunks of ~4 MiB
    x = torch.cat([torch.randn(59, 20000), torch.randn(1, 20000) * 1e-4]).requires_grad_()
    upstream = torch.randn(60, 20000)
    before = upstream.clone()
    for function in (softmaxkit.sparsemax, softmaxkit.entmax15):  # (entmax_bisect shares this backward)
        _grad(function(x), x, upstream)
        assert torch.equal(upstream, before)


def test_entmax_bisect_solver_paths():
    x = torch.stack([torch.randn(600, dtype=torch.float64) * 5, torch.randn(600, dtype=torch.float64) * 1e-3])
    alpha = torch.tensor([[1.5], [1.0]], dtype=torch.float64)
    p = softmaxkit.entmax_bisect(x, alpha)
    assert_close_f64(p, ref.entmax_bisect(x.numpy(), alpha.numpy()))


# ------------------------------------------------------------------------------ parity with the entmax package
@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (4, 10), (3, 2000)], ids=str)
def test_maps_match_entmax_package(name, dtype, shape):
    function, _, _ = MAPS[name]
    x = _x(shape, dtype=dtype)
    ours, theirs = function(x), PEER_MAPS[name](x, dim=-1)
    upstream = torch.randn_like(ours)
    check = assert_close_f64 if dtype == torch.float64 else assert_close_f32
    check(ours, theirs)
    check(_grad(ours, x, upstream), _grad(theirs, x, upstream))


@pytest.mark.parametrize("alpha", [1.1, 1.5, 2.0, 3.0])
def test_entmax_bisect_matches_entmax_package(alpha):
    x = _x((5, 30))
    ours, theirs = softmaxkit.entmax_bisect(x, alpha), peer.entmax_bisect(x, alpha)
    upstream = torch.randn_like(ours)
    assert_close_f64(ours, theirs)
    assert_close_f64(_grad(ours, x, upstream), _grad(theirs, x, upstream))


def test_alpha_gradient_matches_entmax_package():
    x = _x((4, 8))
    a1 = torch.tensor([[1.2], [1.5], [2.0], [2.5]], dtype=torch.float64, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_()
    upstream = torch.randn(4, 8, dtype=torch.float64)
    g1 = _grad(softmaxkit.entmax_bisect(x, a1), a1, upstream)
    g2 = _grad(peer.entmax_bisect(x, a2), a2, upstream)
    assert_close_f64(g1, g2, rtol=1e-8)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_losses_match_entmax_package(name, dtype):
    ours_fn, _, _, theirs_fn = LOSSES[name]
    x = _x((6, 50), dtype=dtype)
    target = torch.randint(0, 50, (6,))
    ours, theirs = ours_fn(x, target, reduction="none"), theirs_fn(x, target)
    check = assert_close_f64 if dtype == torch.float64 else assert_close_f32
    check(ours, theirs)
    check(_grad(ours.sum(), x), _grad(theirs.sum(), x))


def test_entmax_bisect_loss_matches_entmax_package():
    x = _x((6, 20))
    target = torch.randint(0, 20, (6,))
    assert_close_f64(softmaxkit.entmax_bisect_loss(x, target, 1.3, reduction="none"),
                     peer.entmax_bisect_loss(x, target, 1.3))


def test_avoids_entmax_package_bugs():
    x = _x((4, 6))
    target = torch.tensor([1, -100, 2, 0])
    # The package's loss modules mask ignore_index only when it is >= 0: -100 targets reach scatter_add.
    with pytest.raises(RuntimeError):
        peer.SparsemaxLoss(ignore_index=-100)(x, target)
    loss = softmaxkit.sparsemax_loss(x, target)
    keep = target != -100
    assert_close_f64(loss, softmaxkit.sparsemax_loss(x[keep], target[keep]))
    # Negative dim with the package's partial sort (k) permutes the wrong axis; ours equals moving the dim.
    y = _x((3, 50, 4))
    assert_close_f64(softmaxkit.sparsemax(y, -2), softmaxkit.sparsemax(y.transpose(1, 2), -1).transpose(1, 2))
    # Bisection in half precision: the package bisects in bf16 itself and lands far from the answer (here
    # errors of ~0.1 at α = 4); ours solves in fp32 and is within one bf16 rounding of the float64 oracle.
    h = torch.randn(4, 300).to(torch.bfloat16)
    expected = ref.entmax_bisect(to_numpy(h), 4.0)
    ours_error = np.abs(to_numpy(softmaxkit.entmax_bisect(h, 4.0)) - expected).max()
    peer_error = np.abs(to_numpy(peer.entmax_bisect(h, 4.0)) - expected).max()
    assert ours_error <= torch.finfo(torch.bfloat16).eps / 2 * expected.max() + 1e-7
    assert peer_error > 10 * ours_error


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", MAPS)
def test_gradcheck_maps(name):
    function = MAPS[name][0]
    x = _x((4, 6, 3))
    assert torch.autograd.gradcheck(lambda t: function(t, 1), (x,))


@pytest.mark.parametrize("alpha", [1.0, 1.3, 2.0, 2.8])
def test_gradcheck_entmax_bisect_x(alpha):
    x = _x((3, 5))
    assert torch.autograd.gradcheck(lambda t: softmaxkit.entmax_bisect(t, alpha, n_iter=80), (x,))


def test_gradcheck_entmax_bisect_alpha():
    x = _x((6, 5))
    # one α per row, from just above softmax (gradcheck steps α by ±1e-6; α >= 1) through near-1 (the stable branch) to beyond sparsemax
    alpha = torch.tensor([[1.000002], [1.0001], [1.2], [1.5], [2.0], [3.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a: softmaxkit.entmax_bisect(t, a, n_iter=80), (x, alpha))
    scalar = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: softmaxkit.entmax_bisect(x.detach(), a, n_iter=80), (scalar,))
    # any dim, α broadcast along the other axes
    y = _x((2, 4, 3))
    beta = torch.tensor([[[1.4]], [[1.9]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a: softmaxkit.entmax_bisect(t, a, dim=1, n_iter=80), (y, beta))


def test_alpha_derivative_matches_textbook_and_limit():
    x = torch.randn(5, 7, dtype=torch.float64) * 2
    p = softmaxkit.entmax_bisect(x, 1.6)
    ours = backend.entmax_alpha_derivative(p, torch.full((5, 1), 0.6, dtype=torch.float64))
    assert_close_f64(ours, ref.entmax_alpha_derivative(p.numpy(), 1.6), atol=1e-12)
    # α = 1: the limit −p(log²p − Σ p log²p)/2, and continuity just above 1 (where the textbook form cancels).
    q = torch.softmax(x, -1)
    log_q = torch.log(q)
    limit = -q * (log_q**2 - (q * log_q**2).sum(-1, keepdim=True)) / 2
    assert_close_f64(backend.entmax_alpha_derivative(q, torch.zeros(5, 1, dtype=torch.float64)), limit)
    near = softmaxkit.entmax_bisect(x, 1 + 1e-7)
    assert_close_f64(backend.entmax_alpha_derivative(near, torch.full((5, 1), 1e-7, dtype=torch.float64)), limit,
                     rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_losses(name, reduction):
    function = LOSSES[name][0]
    x = _x((2, 5, 3))
    target = torch.tensor([[0, -100, 4], [2, 2, 1]])
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda t: function(t, target, weight=weight, reduction=reduction, temperature=0.7), (x,))


def test_gradcheck_entmax_bisect_loss_with_alpha():
    x = _x((5, 4))
    target = torch.tensor([0, 3, -100, 1, 1])
    alpha = torch.tensor([[1.000002], [1.001], [1.5], [2.0], [2.6]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, a: softmaxkit.entmax_bisect_loss(t, target, a, reduction="sum", n_iter=80), (x, alpha))


def test_loss_alpha_derivative_matches_oracle():
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    alpha = torch.tensor([[1.3], [1.3], [1.3], [1.3]], dtype=torch.float64, requires_grad=True)
    loss = softmaxkit.entmax_bisect_loss(x, target, alpha, reduction="sum")
    assert_close_f64(_grad(loss, alpha)[:, 0], ref.entmax_bisect_loss_alpha_derivative(x.numpy(), target, 1.3),
                     atol=1e-12)


# ------------------------------------------------------------------------------ losses vs the oracle
@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(7,), (5, 7), (3, 4, 2)], ids=str)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_losses_match_oracle(name, shape, use_weight, reduction, temperature):
    function, oracle, oracle_grad, _ = LOSSES[name]
    x = _x(shape)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    target = torch.randint(0, num_classes, () if len(shape) == 1 else (shape[0], *shape[2:]))
    if target.dim():
        target.view(-1)[1] = -100
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.5 if use_weight else None
    options = dict(weight=weight, reduction=reduction, temperature=temperature)
    np_options = dict(weight=None if weight is None else weight.numpy(), reduction=reduction, temperature=temperature)
    loss = function(x, target, **options)
    assert_close_f64(loss, oracle(to_numpy(x), to_numpy(target), **np_options))
    upstream = torch.rand_like(loss) if reduction == "none" else None
    expected = oracle_grad(to_numpy(x), to_numpy(target), **np_options,
                           grad_output=None if upstream is None else to_numpy(upstream))
    assert_close_f64(_grad(loss, x, upstream), expected)


@pytest.mark.parametrize("alpha", [1.0, 1.2, 1.5, 2.0, 3.0])
def test_entmax_bisect_loss_matches_oracle(alpha):
    x = _x((6, 5))
    target = torch.tensor([0, 1, -100, 4, 2, 2])
    loss = softmaxkit.entmax_bisect_loss(x, target, alpha, reduction="none")
    assert_close_f64(loss, ref.entmax_bisect_loss(to_numpy(x), to_numpy(target), alpha, reduction="none"))


@pytest.mark.usefixtures("path")
def test_loss_invariances():
    x = _x((6, 5))
    target = torch.tensor([0, 1, 3, 4, 2, 2])
    # α = 1 is cross-entropy, α = 2 sparsemax loss, α = 1.5 the 1.5-entmax loss.
    assert_close_f64(softmaxkit.entmax_bisect_loss(x, target, 1.0), F.cross_entropy(x, target))
    assert_close_f64(softmaxkit.entmax_bisect_loss(x, target, 2.0), softmaxkit.sparsemax_loss(x, target))
    assert_close_f64(softmaxkit.entmax_bisect_loss(x, target, 1.5), softmaxkit.entmax15_loss(x, target))
    g1 = _grad(softmaxkit.entmax_bisect_loss(x, target, 1.0), x)
    assert_close_f64(g1, _grad(F.cross_entropy(x, target), x))


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", LOSSES)
def test_ignore_equals_dropping_rows(name):
    function = LOSSES[name][0]
    x = _x((8, 5))
    target = torch.tensor([0, 7, 1, 7, 2, 3, 4, 0]) % 5
    target[[1, 3]] = 3
    keep = target != 3
    full = function(x, target, ignore_index=3)
    assert_close_f64(full, function(x[keep], target[keep], ignore_index=3))
    grad = _grad(full, x)
    assert torch.all(grad[~keep] == 0)
    everything = torch.full_like(target, -100)
    zero = function(x, everything)
    assert zero.item() == 0.0 and torch.all(_grad(zero, x) == 0)


@pytest.mark.usefixtures("path")
def test_masked_classes_equal_truncation():
    x = _x((4, 7))
    masked = x.detach().clone()
    masked[:, 5:] = -torch.inf
    masked.requires_grad_()
    target = torch.tensor([0, 1, 2, 4])
    for function in (softmaxkit.sparsemax, softmaxkit.entmax15, lambda t: softmaxkit.entmax_bisect(t, 1.3)):
        out = function(masked)
        assert torch.all(out[:, 5:] == 0)
        assert_close_f64(out[:, :5], function(x[:, :5]))
        assert torch.isfinite(_grad(out, masked, torch.randn_like(out))).all()
    for function in (softmaxkit.sparsemax_loss, softmaxkit.entmax15_loss,
                     lambda t, y: softmaxkit.entmax_bisect_loss(t, y, 1.7)):
        loss = function(masked, target)
        assert_close_f64(loss, function(x[:, :5], target))
        assert torch.isfinite(_grad(loss, masked)).all()


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits(dtype):
    x = (torch.randn(4, 9, dtype=torch.float64) * 1e4).to(dtype).requires_grad_()
    target = torch.randint(0, 9, (4,))
    for function in (softmaxkit.sparsemax, softmaxkit.entmax15, lambda t: softmaxkit.entmax_bisect(t, 1.25)):
        out = function(x)
        assert torch.isfinite(out).all()
        assert torch.isfinite(_grad(out, x, torch.randn_like(out))).all()
    for function in (softmaxkit.sparsemax_loss, softmaxkit.entmax15_loss):
        loss = function(x, target)
        assert torch.isfinite(loss) and torch.isfinite(_grad(loss, x)).all()


# ------------------------------------------------------------------------------ low precision
@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_budget(name, dtype):
    function, oracle, _ = MAPS[name]
    x = (torch.randn(32, 300, dtype=torch.float64) * 2).to(dtype)
    expected = oracle(to_numpy(x))
    ours = function(x)
    theirs = PEER_MAPS[name](x, dim=-1)  # the package, sorting and summing in the low-precision dtype
    assert ours.dtype == dtype
    assert_within_budget(ours, theirs, expected, tol=float(torch.finfo(dtype).eps))


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bisect_and_losses(dtype):
    x = (torch.randn(16, 40, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, 40, (16,))
    eps = torch.finfo(dtype).eps
    expected = ref.entmax_bisect(to_numpy(x), 1.5)
    assert_within_budget(softmaxkit.entmax_bisect(x, 1.5), peer.entmax_bisect(x, 1.5), expected, tol=float(eps))
    for name in LOSSES:
        function, oracle, oracle_grad, peer_loss = LOSSES[name]
        ours = function(x, target, reduction="none")
        theirs = peer_loss(x, target)
        values = oracle(to_numpy(x), to_numpy(target), reduction="none")
        assert_within_budget(ours, theirs, values, tol=float(eps * np.abs(values).max()))
        grad = _grad(ours.sum(), x)
        peer_grad = _grad(theirs.sum(), x)
        expected_grad = oracle_grad(to_numpy(x), to_numpy(target), reduction="sum")
        assert_within_budget(grad, peer_grad, expected_grad, tol=float(eps))


# ------------------------------------------------------------------------------ invariances of the maps
def test_entmax_bisect_special_alphas():
    x = _x((5, 8))
    upstream = torch.randn(5, 8, dtype=torch.float64)
    for alpha, other in ((2.0, softmaxkit.sparsemax), (1.5, softmaxkit.entmax15), (1.0, lambda t: torch.softmax(t, -1))):
        ours = softmaxkit.entmax_bisect(x, alpha)
        assert_close_f64(ours, other(x), atol=1e-13)
        assert_close_f64(_grad(ours, x, upstream), _grad(other(x), x, upstream), atol=1e-12)


@pytest.mark.usefixtures("path")
def test_shift_invariance_and_support():
    x = _x((4, 6))
    for function in (softmaxkit.sparsemax, softmaxkit.entmax15):
        assert_close_f64(function(x + 123.0), function(x), atol=1e-12)
    # sparsemax keeps exactly the entries above τ, which lies in [max − 1, max − 1/C)
    p = softmaxkit.sparsemax(x).detach()
    top = x.detach().max(1, keepdim=True).values
    kept = x.detach()[p > 0]
    assert torch.all(kept > (top - 1).expand_as(x)[p > 0])


@given(rows=st.integers(1, 4), classes=st.integers(1, 40), scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]),
       alpha=st.floats(1.0, 3.0), seed=st.integers(0, 2**16))
def test_property_maps_match_oracle(rows, classes, scale, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale
    assert_close_f64(softmaxkit.sparsemax(x), ref.sparsemax(x.numpy()), atol=1e-12)
    assert_close_f64(softmaxkit.entmax15(x), ref.entmax15(x.numpy()), atol=1e-12)
    assert_close_f64(softmaxkit.entmax_bisect(x, alpha), ref.entmax_bisect(x.numpy(), alpha), rtol=1e-9, atol=1e-12)


@given(rows=st.integers(1, 4), classes=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_property_losses_non_negative_and_zero_with_margin(rows, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=generator)
    for function in (softmaxkit.sparsemax_loss, softmaxkit.entmax15_loss):
        assert torch.all(function(x, target, reduction="none") >= -1e-12)
    # A margin of 1 (sparsemax) / 2 (entmax15) over every other class makes p one-hot and the loss 0.
    wide = x.clone()
    wide[torch.arange(rows), target] = x.max(1).values + 2.0
    assert float(softmaxkit.sparsemax_loss(wide, target, reduction="sum").abs()) < 1e-12
    assert float(softmaxkit.entmax15_loss(wide, target, reduction="sum").abs()) < 1e-12


# ------------------------------------------------------------------------------ inputs, modules, validation
@pytest.mark.usefixtures("path")
def test_inputs_not_mutated_and_empty_input():
    x = _x((3, 5))
    before = x.detach().clone()
    for function in (softmaxkit.sparsemax, softmaxkit.entmax15, lambda t: softmaxkit.entmax_bisect(t, 1.2)):
        function(x).sum().backward()
    softmaxkit.sparsemax_loss(x, torch.tensor([0, 1, 2])).backward()
    assert torch.equal(x.detach(), before)
    assert softmaxkit.sparsemax(torch.empty(0, 4)).shape == (0, 4)
    assert softmaxkit.sparsemax(torch.tensor(3.0)).item() == 1.0


def test_modules_equal_functions():
    x = _x((3, 4, 5))
    assert torch.equal(softmaxkit.nn.Sparsemax(1)(x), softmaxkit.sparsemax(x, 1))
    assert torch.equal(softmaxkit.nn.Entmax15(-1)(x), softmaxkit.entmax15(x, -1))
    assert torch.equal(softmaxkit.nn.EntmaxBisect(1.3, 0)(x), softmaxkit.entmax_bisect(x, 1.3, 0))
    logits = _x((6, 4))
    target = torch.tensor([0, 1, 2, 3, -100, 1])
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    options = dict(weight=weight, reduction="sum", temperature=1.5)
    assert torch.equal(softmaxkit.nn.SparsemaxLoss(**options)(logits, target),
                       softmaxkit.sparsemax_loss(logits, target, **options))
    assert torch.equal(softmaxkit.nn.Entmax15Loss(**options)(logits, target),
                       softmaxkit.entmax15_loss(logits, target, **options))
    assert torch.equal(softmaxkit.nn.EntmaxBisectLoss(1.7, **options)(logits, target),
                       softmaxkit.entmax_bisect_loss(logits, target, 1.7, **options))


def test_learnable_alpha_module():
    alpha = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    module = softmaxkit.nn.EntmaxBisect(alpha)
    assert list(module.parameters()) == [alpha]
    x = torch.randn(3, 5, dtype=torch.float64)
    (module(x) * torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
    loss_module = softmaxkit.nn.EntmaxBisectLoss(torch.nn.Parameter(torch.tensor([[1.4], [1.6], [2.2]],
                                                                                 dtype=torch.float64)))
    loss_module(x, torch.tensor([0, 1, 2])).backward()
    assert loss_module.alpha.grad.shape == (3, 1)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda x: softmaxkit.entmax_bisect(x, 0.5), ValueError, r"`alpha` must be a finite number >= 1 \(1 is softmax, 2 sparsemax\), but got 0.5"),
    (lambda x: softmaxkit.entmax_bisect(x, float("inf")), ValueError, r"`alpha` must be a finite number >= 1"),
    (lambda x: softmaxkit.entmax_bisect(x, torch.tensor([[1.5], [0.9], [1.5]])), ValueError, r"`alpha` must be finite and >= 1 everywhere .* but holds 0.8999"),
    (lambda x: softmaxkit.entmax_bisect(x, torch.ones(4) * 1.5), ValueError, r"`alpha` must be a single value or broadcastable to \(3, 1\)"),
    (lambda x: softmaxkit.entmax_bisect(x, torch.tensor(2)), TypeError, r"`alpha` given as a tensor must have a floating-point dtype"),
    (lambda x: softmaxkit.entmax_bisect(x, 1.5, n_iter=0), ValueError, r"`n_iter` must be an int >= 1, but got 0"),
    (lambda x: softmaxkit.sparsemax(x, 2), ValueError, r"`dim` must lie in \[-2, 1\] for a 2-d input, but got 2"),
    (lambda x: softmaxkit.entmax15(x.long()), TypeError, r"`x` must have a floating-point dtype"),
    (lambda x: softmaxkit.sparsemax_loss(x, torch.tensor([0, 1])), ValueError, r"`target` must have shape \(3,\)"),
    (lambda x: softmaxkit.entmax15_loss(x, torch.tensor([0, 1, 4])), ValueError, r"class indices in \[0, 4\) or ignore_index=-100, but holds 4 at position 2"),
    (lambda x: softmaxkit.sparsemax_loss(x, x), TypeError, r"`target` of sparsemax_loss must hold class indices"),
    (lambda x: softmaxkit.entmax_bisect_loss(x, torch.tensor([0, 1, 2]), 0.0), ValueError, r"`alpha` must be a finite number >= 1"),
    (lambda x: softmaxkit.sparsemax_loss(x, torch.tensor([0, 1, 2]), reduction="elementwise_mean"), ValueError, r"`reduction` must be one of"),
    (lambda x: softmaxkit.entmax15_loss(x, torch.tensor([0, 1, 2]), temperature=-1.0), ValueError, r"`temperature` must be a finite number > 0"),
])
def test_validation(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4))


@pytest.mark.usefixtures("path")
def test_double_backward_raises_instead_of_returning_zeros():
    x = torch.randn(3, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    for function in (lambda t: softmaxkit.sparsemax(t).pow(2).sum(), lambda t: softmaxkit.entmax15_loss(t, target)):
        with pytest.raises(RuntimeError, match="once differentiable"):
            torch.autograd.functional.hessian(function, x)
