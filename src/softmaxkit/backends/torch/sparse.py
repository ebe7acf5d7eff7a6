r"""Sparsemax, 1.5-entmax, α-entmax and their Fenchel-Young losses for 2-D input ``(N, C)``, classes last.

**Threshold search without a full sort.** Every map here is ``p_i = φ(x_i − τ)`` with a per-row threshold
``τ`` such that ``Σ p = 1`` and ``φ = 0`` below a point, so only the largest entries can be in the support.
``p_max <= 1`` gives ``τ >= max(x) − 1`` (sparsemax), ``max(x) − 2`` (1.5-entmax) or ``max(x) − 1/(α−1)``
(α-entmax), and the threshold of any subset of a row's entries is a lower bound on the row's. Two exact,
sort-free-in-the-common-case searches use this:

* long rows (``C >= 4096``, sparsemax / 1.5-entmax): one pass takes block maxima; the exact threshold of the
  block maxima bounds ``τ`` from below and discards every block at or under it; the few blocks left are
  solved by Newton's method (Michelot's algorithm for sparsemax), whose result is made exact by recomputing
  ``τ`` in closed form on the support it found and checking the KKT conditions (:func:`_solve_by_blocks`);
* otherwise: the ``k`` largest entries of each row (``torch.topk``, small ``k``), solved with the
  sorted-prefix conditions of Martins & Astudillo 2016 / Peters et al. 2019, exact when the support found is
  smaller than ``k`` (or, for α-entmax's bisection, when the ``k``-th entry is already under the bound).
  Rows that fail the check are solved again with ``8k`` entries, and finally with a full sort
  (:func:`_solve_rows`).

The result never depends on these guesses, only the time does. When every row's support has been found
this way (and is at most ``C/4`` wide) the output is built from it alone: zeros plus a scatter over
``(N, K)`` entries.

**Custom ops.** The maps are ``torch.ops.softmaxkit.entmax_torch`` (→ ``(p, τ, norm)``) with
``entmax_torch_backward``, the losses ``fenchel_young_torch`` (→ ``(loss, τ, norm, ∂H/∂α)``) with
``fenchel_young_torch_backward``: opaque to ``torch.compile`` (the top-k search has data-dependent shapes),
with fake kernels and the autograd of :mod:`softmaxkit.backends._custom_op`.

**Memory.** Forward allocates the output; backward the gradient; everything else is ``(N, K)`` support data
or works on row chunks of about 4 MiB (:func:`~softmaxkit.backends.torch.cross_entropy.chunk_rows`). The
sparsemax / 1.5-entmax backward reads the saved output ``p``; α-entmax's recomputes ``p`` from the input
and the per-row ``(τ, Σ p)`` instead of saving an fp32 copy, and the Fenchel-Young losses never hold ``p``
outside a chunk (backward recomputes it into the gradient buffer).

**Precision.** fp16/bf16 input is solved and exponentiated in fp32 (the ``entmax`` package bisects in the
low-precision dtype itself and lands up to ~0.1 away from the answer in bf16); float64 stays float64. The
sparsemax / 1.5-entmax thresholds are solved in float64 for every dtype (:func:`threshold_dtype`) and the
backward's row sums run in float64.

**Backward.** On the support, ``∂p/∂x = diag(s) − s sᵀ/Σ s`` with ``s = p^{2−α}``: ``1[p > 0]`` for
sparsemax, ``√p`` for 1.5-entmax. The α-gradient of α-entmax (Correia et al. 2019),

.. math:: \frac{∂p_i}{∂α} = \frac{p_i − \tilde s_i}{δ^2} − \frac{p_i\log p_i − \tilde s_i h}{δ},
          \quad δ = α − 1,\ \tilde s = s/Σ s,\ h = Σ_j p_j \log p_j

cancels catastrophically as ``α → 1``; for ``δ < 1/2`` it is evaluated in the equivalent form
``p_i[(1 − δ L_i) \bar A − A_i (1 − δ h)] / (1 − δ h + δ^2 \bar A)`` with ``L = \log p``,
``A_i = L_i^2 ψ(−δ L_i)``, ``ψ(u) = (e^u − 1 − u)/u^2`` and ``\bar A = Σ_j p_j A_j``, whose limit at
``α = 1`` is ``−p_i(L_i^2 − Σ_j p_j L_j^2)/2``. All α-gradients are computed in float64.

α-entmax is parametrised as ``p_i = [1 + δ(x_i − τ)]_+^{1/δ}`` (the usual ``τ`` shifted by ``1/δ``), which
is continuous at ``δ = 0`` where it is ``exp(x_i − τ)``, softmax with ``τ = LSE(x)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..._core import BISECT, ENTMAX15, SPARSEMAX, chunk_rows, compute_dtype
from ..._reduction import reduce_loss, row_scale
from .._custom_op import differentiable, once_differentiable

#: entries per row tried first by the top-k solvers (``torch.topk`` gets much slower past ~12 on CPU);
#: rows whose support does not fit are retried with ``GROWTH`` times more, then with a full sort once ``k``
#: would exceed a quarter of the row.
FIRST_K = {SPARSEMAX: 8, ENTMAX15: 16, BISECT: 32}
GROWTH = 8


#: the sparse family computes in the one compute dtype of the package (fp32 for fp16/bf16)
work_dtype = compute_dtype


def threshold_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype sparsemax / 1.5-entmax thresholds are solved in: float64 for every input dtype.

    The closed forms sum up to ``C`` near-equal shifted entries; in fp32 that sum (and the rounding of ``τ``
    itself, shared by every entry) is off by enough to make a wide near-uniform row sum to 2 or more, so the
    solve reads the few candidate entries in float64. α-entmax bisects in the work dtype and renormalises.
    """
    return work_dtype(dtype) if kind == BISECT else torch.float64


def _ranks(k: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(1, k + 1, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- solvers on sorted prefixes
def _sparsemax_sorted(values: torch.Tensor, complete: bool, delta):
    """Sparsemax threshold from each row's ``k`` largest entries, sorted descending.

    Support size ``s = max{j : 1 + j v_(j) > Σ_{i<=j} v_(i)}``, ``τ = (Σ_{i<=s} v_(i) − 1)/s``. Exact for the
    whole row when ``s < k`` (the condition failed inside the prefix) or the prefix is the whole row.
    """
    top = values[:, :1]
    shifted = values - top  # <= 0: the cumulative sums stay small and exact
    cumulative = shifted.cumsum(dim=1).sub_(1.0)
    k = values.shape[1]
    support = (_ranks(k, values) * shifted > cumulative).sum(dim=1, keepdim=True).clamp_(min=1)
    tau = cumulative.gather(1, support - 1) / support + top
    solved = torch.ones_like(support[:, 0], dtype=torch.bool) if complete else support[:, 0] < k
    return tau[:, 0], solved, support[:, 0]


def _entmax15_sorted(values: torch.Tensor, complete: bool, delta):
    """1.5-entmax threshold (``p = ((x − τ)/2)_+²``) from sorted row prefixes (Peters et al. 2019, Alg. 2).

    With ``u = (v − v_(1))/2``: ``τ_j = mean_j − sqrt(max(0, (1 − Σ_{i<=j}(u_i − mean_j)²)/j))``; the support
    size is the number of ``j`` with ``τ_j <= u_(j)``. Exact under the same check as sparsemax.
    """
    top = values[:, :1]
    u = (values - top).mul_(0.5)
    k = values.shape[1]
    ranks = _ranks(k, values)
    mean = u.cumsum(dim=1) / ranks
    mean_sq = (u * u).cumsum(dim=1) / ranks
    spread = ranks * (mean_sq - mean * mean)
    tau_j = mean - torch.sqrt(((1.0 - spread) / ranks).clamp_(min=0.0))
    support = (tau_j <= u).sum(dim=1, keepdim=True).clamp_(min=1)
    tau = top + 2.0 * tau_j.gather(1, support - 1)
    solved = torch.ones_like(support[:, 0], dtype=torch.bool) if complete else support[:, 0] < k
    return tau[:, 0], solved, support[:, 0]


def entmax_p(d: torch.Tensor, delta) -> torch.Tensor:
    """``[1 + δ d]_+^{1/δ}`` elementwise (``exp(d)`` at ``δ = 0``); ``delta`` a float or ``(n, 1)`` tensor."""
    if not isinstance(delta, torch.Tensor):
        if delta == 0.0:
            return torch.exp(d)
        if delta == 1.0:
            return (d + 1.0).clamp_(min=0.0)
        return torch.exp(torch.log1p((delta * d).clamp_(min=-1.0)).div_(delta))
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    general = torch.exp(torch.log1p((delta * d).clamp_(min=-1.0)) / safe)
    return torch.where(delta == 0, torch.exp(d), general)


def _q_log(count: int, delta, like: torch.Tensor) -> torch.Tensor:
    """``(1 − count^{−δ})/δ`` (``log count`` at ``δ = 0``): how far above the max the threshold can be."""
    log_count = math.log(max(count, 1))
    if not isinstance(delta, torch.Tensor):
        value = log_count if delta == 0.0 else -math.expm1(-delta * log_count) / delta
        return torch.full((like.shape[0], 1), value, dtype=like.dtype, device=like.device)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    return torch.where(delta == 0, torch.full_like(delta, log_count), -torch.expm1(-delta * log_count) / safe)


def _bisect_sorted(values: torch.Tensor, complete: bool, delta, n_iter: int):
    """α-entmax threshold by bisection on the row prefixes ``values`` (any order).

    ``f(τ) = Σ_i [1 + δ(v_i − τ)]_+^{1/δ} − 1`` decreases in ``τ``; ``f(max) >= 0`` and ``f(max + q) <= 0`` with
    ``q = (1 − k^{−δ})/δ`` (every one of the ``k`` entries is then ``<= 1/k``). Returns the lower end of the
    final bracket (where ``Σ p >= 1``). Exact for the row when the prefix is the whole row or its last entry
    is at or below ``max − 1/δ`` (so every entry left out is 0 for every ``τ >= max``).
    """
    top = values.amax(dim=1, keepdim=True)
    width = _q_log(values.shape[1], delta, values)
    low = top.clone()
    for _ in range(n_iter):
        width = width / 2
        middle = low + width
        excess = entmax_p(values - middle, delta).sum(dim=1, keepdim=True) - 1.0
        low = torch.where(excess >= 0, middle, low)
    if complete:
        solved = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    else:
        bound = top - 1.0 / delta if isinstance(delta, torch.Tensor) or delta > 0 else None
        if bound is None:
            solved = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
        else:
            solved = (values.amin(dim=1, keepdim=True) <= bound)[:, 0]
    return low[:, 0], solved, None


def _rows_of(delta, rows: torch.Tensor | None):
    if rows is None or not isinstance(delta, torch.Tensor):
        return delta
    return delta.index_select(0, rows)


class Solution(NamedTuple):
    """The threshold of every row and, when every row's support was found by top-k, the support itself.

    ``index`` ``(N, K)`` holds positions covering each row's support (``K`` at least the largest support
    size in the batch) and ``values`` ``(N, K)`` the entries there, in the work dtype; padding columns hold
    any position with value ``−inf`` (probability 0). Every entry outside ``index`` has probability 0, so
    outputs and gradients are zeros plus a ``scatter_add_`` over ``(N, K)`` (padding adds 0).
    """

    tau: torch.Tensor
    index: torch.Tensor | None = None
    values: torch.Tensor | None = None


def _pad_columns(tensor: torch.Tensor, width: int, fill: float | None = None) -> torch.Tensor:
    """The first ``width`` columns, padded with ``fill`` (or copies of the last column when None)."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    extra = width - tensor.shape[1]
    pad = tensor[:, -1:].expand(-1, extra) if fill is None else tensor.new_full((tensor.shape[0], extra), fill)
    return torch.cat([tensor, pad], dim=1)


def _merge(parts: list, num_rows: int, like: torch.Tensor) -> Solution:
    """One Solution from the Solutions of disjoint row sets ``[(rows, solution), ...]`` (rows None: all)."""
    tau = torch.empty(num_rows, dtype=parts[0][1].tau.dtype, device=like.device)
    for rows, part in parts:
        if rows is None:
            tau.copy_(part.tau)
        else:
            tau[rows] = part.tau
    if any(part.index is None for _, part in parts):
        return Solution(tau)
    width = max(part.index.shape[1] for _, part in parts)
    index = torch.empty((num_rows, width), dtype=torch.long, device=like.device)
    values = torch.empty((num_rows, width), dtype=tau.dtype, device=like.device)
    for rows, part in parts:
        where = slice(None) if rows is None else rows
        index[where] = _pad_columns(part.index, width)
        values[where] = _pad_columns(part.values, width, -math.inf)
    return Solution(tau, index, values)


#: rows at least this long go through the block filter; on shorter rows ``torch.topk`` with a small ``k``
#: costs about as much as the filter's passes (measured on CPU at C = 1000).
BLOCK_FILTER_MIN_CLASSES = 4096
#: block sizes tried, in order, for the block-maximum filter (C must be a multiple of one, with at least 8
#: blocks; else no filter): 32-40 contiguous entries reduce fast with vector instructions.
BLOCK_SIZES = (32, 40, *range(41, 129), *range(31, 15, -1))
#: Newton steps between exactness checks, and the most rounds before a row falls back to sorting.
NEWTON_STEPS, NEWTON_ROUNDS = 3, 30


def _block_size(num_classes: int) -> int | None:
    if num_classes < BLOCK_FILTER_MIN_CLASSES:
        return None
    for size in BLOCK_SIZES:
        if num_classes % size == 0 and num_classes // size >= 8:
            return size
    return None


def _newton_exact(values: torch.Tensor, kind: str, start: torch.Tensor | None):
    """Exact sparsemax / 1.5-entmax threshold of each row of ``values`` ``(n, M)`` (work dtype), sort-free.

    With ``u = (v − max v)/s`` (``s = 1`` sparsemax, ``2`` 1.5-entmax) the threshold ``t`` solves
    ``F(t) = Σ_i φ(u_i − t) − 1 = 0`` with ``φ(d) = d_+`` or ``d_+²``: ``F`` is convex and decreasing, so
    Newton's method started left of the root (at ``start`` or ``−1``, where ``F >= 0``) climbs monotonically to
    it (for sparsemax this is Michelot's algorithm). Every few steps the support ``S = {u > t}`` is read off and
    the threshold recomputed in closed form on it (``(Σ_S u − 1)/|S|``, or
    ``mean_S − sqrt((1 − Σ_S (u − mean_S)²)/|S|)``); a row is done when that closed form reproduces ``S``
    (the KKT conditions), which makes the result exact, not iterative. Returns ``(τ, done)``, ``τ`` in the
    scale of ``values``.
    """
    top = values.amax(dim=1, keepdim=True)
    scale = 1.0 if kind == SPARSEMAX else 2.0
    u = (values - top) / scale
    t = torch.full_like(top, -1.0)
    if start is not None:
        t = torch.maximum(t, ((start[:, None] - top) / scale).to(t.dtype))
    exact = t.clone()
    done = torch.zeros(values.shape[0], 1, dtype=torch.bool, device=values.device)
    for _ in range(NEWTON_ROUNDS):
        for _ in range(NEWTON_STEPS):
            d = (u - t).clamp_(min=0.0)
            if kind == SPARSEMAX:
                count = torch.sign(d).sum(dim=1, keepdim=True).clamp_(min=1.0)  # float: no bool→int cast
                step = (d.sum(dim=1, keepdim=True) - 1.0) / count
            else:
                slope = 2.0 * d.sum(dim=1, keepdim=True)
                step = ((d * d).sum(dim=1, keepdim=True) - 1.0) / torch.where(slope > 0, slope, 1.0)
            t = torch.where(done, t, t + step)
        support = u > t
        size = torch.sign((u - t).clamp_(min=0.0)).sum(dim=1, keepdim=True).clamp_(min=1.0)
        total = torch.where(support, u, 0.0).sum(dim=1, keepdim=True)
        if kind == SPARSEMAX:
            closed = (total - 1.0) / size
        else:
            mean = total / size
            spread = torch.where(support, (u - mean) ** 2, 0.0).sum(dim=1, keepdim=True)
            closed = mean - torch.sqrt(((1.0 - spread) / size).clamp_(min=0.0))
        consistent = ((u > closed) == support).all(dim=1, keepdim=True)
        exact = torch.where(done, exact, closed)
        done = done | consistent
        if bool(done.all()):
            break
    return (top + scale * exact)[:, 0], done[:, 0]


def _solve_by_blocks(x: torch.Tensor, kind: str, keep_support: bool) -> Solution | None:
    """Sparsemax / 1.5-entmax thresholds from a block-maximum filter, without sorting (None: not applicable).

    1. One pass takes the maximum of every block of ``B`` consecutive entries.
    2. The exact threshold of the block maxima alone is a lower bound ``τ_lo <= τ`` (adding entries to a row
       can only raise its threshold), so a block whose maximum is ``<= τ_lo`` has no entry in the support.
    3. Rows whose remaining blocks cover at most half the row ("narrow") are solved exactly on those blocks
       (:func:`_newton_exact`, started at ``τ_lo``); the others, and any row the Newton rounds do not settle,
       by :func:`_solve_rows` on the whole row.
    """
    num_rows, num_classes = x.shape
    size = _block_size(num_classes)
    if size is None or not x.is_contiguous():
        return None
    work = threshold_dtype(kind, x.dtype)
    block_max = x.view(num_rows, num_classes // size, size).amax(dim=2).to(work)
    if not bool(torch.isfinite(block_max.amax(dim=1)).all()):
        return None  # a row without a threshold (NaN, +inf, all −inf): the top-k path makes it NaN
    lower, settled = _newton_exact(block_max, kind, None)
    # An unsettled row (never seen in practice) keeps the always-valid bound max − 1 (or − 2).
    lower = torch.where(settled, lower, block_max.amax(dim=1) - (1.0 if kind == SPARSEMAX else 2.0))
    count = (block_max > lower[:, None]).sum(dim=1)
    narrow = count * size * 2 <= num_classes
    rows = None if bool(narrow.all()) else narrow.nonzero()[:, 0]
    parts = []
    if rows is None or rows.numel():
        source, maxima, start = (x, block_max, lower) if rows is None else (x[rows], block_max[rows], lower[rows])
        blocks = torch.topk(maxima, int(count.max() if rows is None else count[rows].max()), dim=1,
                            sorted=False).indices
        positions = (blocks[:, :, None] * size + torch.arange(size, device=x.device)).reshape(blocks.shape[0], -1)
        values = source.gather(1, positions).to(work)
        tau, done = _newton_exact(values, kind, start)
        if bool(done.all()):
            parts.append((rows, Solution(tau, positions, values) if keep_support else Solution(tau)))
        else:  # fall back to the whole row for the few unsettled ones
            if rows is None:
                rows = torch.arange(num_rows, device=x.device)
            narrow[rows[~done]] = False
            good = done.nonzero()[:, 0]
            parts.append((rows[good], Solution(tau[good], positions[good], values[good]) if keep_support
                          else Solution(tau[good])))
            rows = rows[good]
    if rows is not None:
        wide_rows = (~narrow).nonzero()[:, 0]
        parts.append((wide_rows, _solve_rows(x[wide_rows], kind, None, 0, keep_support, num_classes // 4)))
    return _merge(parts, num_rows, x)


def solve_threshold(x: torch.Tensor, kind: str, delta=None, n_iter: int = 50, keep_support: bool = False) -> Solution:
    """Per-row threshold ``τ`` ``(N,)`` (fp32 for fp16/bf16 ``x``) of ``kind`` for 2-D ``x``.

    Sparsemax and 1.5-entmax go through the sort-free block filter (:func:`_solve_by_blocks`) when ``C`` has
    a suitable block size; everything else through top-k with an exactness check (:func:`_solve_rows`).
    """
    if kind != BISECT and x.shape[0] > 0:
        solution = _solve_by_blocks(x, kind, keep_support)
        if solution is not None:
            return solution
    return _solve_rows(x, kind, delta, n_iter, keep_support)


def _solve_rows(
    x: torch.Tensor, kind: str, delta, n_iter: int, keep_support: bool, support_limit: int | None = None
) -> Solution:
    """Top-k with an exactness check and a growing ``k`` (see the module docstring); rows still unsolved
    when ``k`` would pass ``C/4`` are fully sorted, a chunk of rows at a time. With ``keep_support``
    (sparsemax and 1.5-entmax) the supports are returned too, unless one is wider than ``support_limit``
    (default ``C/4``: wider supports are cheaper to handle densely).
    """
    num_rows, num_classes = x.shape
    work = threshold_dtype(kind, x.dtype)
    tau = torch.empty(num_rows, dtype=work, device=x.device)
    if num_rows == 0:
        return Solution(tau)
    limit = max(num_classes // 4, 1) if support_limit is None else support_limit

    def solve(values, complete, sub_delta):
        values = values.to(work)
        if kind == SPARSEMAX:
            return _sparsemax_sorted(values, complete, sub_delta)
        if kind == ENTMAX15:
            return _entmax15_sorted(values, complete, sub_delta)
        return _bisect_sorted(values, complete, sub_delta, n_iter)

    if kind == BISECT and not isinstance(delta, torch.Tensor) and delta == 0.0:
        # α = 1 is softmax: the threshold is exactly the log-sum-exp.
        step = chunk_rows(num_rows, num_classes)
        for start in range(0, num_rows, step):
            tau[start : start + step] = torch.logsumexp(x[start : start + step].to(work), dim=1)
        return Solution(tau)

    keep_support = keep_support and kind != BISECT
    parts = []  # (rows, Solution) of the rows each round solved, while the supports are kept

    def keep(rows, indices, values, found, support):
        nonlocal keep_support
        if not keep_support or support.numel() == 0:
            return
        width = int(support.max())
        if width > limit:
            keep_support = False
            return
        parts.append((rows, Solution(found, indices[:, :width], values[:, :width].to(work))))

    rows: torch.Tensor | None = None  # indices of the rows still to solve (None: all)
    sub, sub_delta = x, delta
    k = FIRST_K[kind]
    while True:
        if k * 4 > num_classes:
            # Full sort (bisection needs no order: it runs on the whole row), a chunk of rows at a time.
            step = chunk_rows(sub.shape[0], num_classes)
            for start in range(0, sub.shape[0], step):
                stop = min(start + step, sub.shape[0])
                chunk = sub[start:stop]
                chunk_delta = sub_delta[start:stop] if isinstance(sub_delta, torch.Tensor) else sub_delta
                if kind == BISECT:
                    found, _, _ = solve(chunk, True, chunk_delta)
                else:
                    values, indices = torch.sort(chunk, dim=1, descending=True)
                    found, _, support = solve(values, True, chunk_delta)
                    if rows is not None:
                        chunk_rows_index = rows[start:stop]
                    elif stop - start == num_rows:
                        chunk_rows_index = None  # one chunk holding every row
                    else:
                        chunk_rows_index = torch.arange(start, stop, device=x.device)
                    keep(chunk_rows_index, indices, values, found, support)
                if rows is None:
                    tau[start:stop] = found
                else:
                    tau[rows[start:stop]] = found
            break
        values, indices = torch.topk(sub, k, dim=1, sorted=kind != BISECT)
        found, solved, support = solve(values, False, sub_delta)
        if rows is None:
            tau.copy_(found)
        else:
            tau[rows] = found
        if keep_support:
            if bool(solved.all()):
                keep(rows, indices, values, found, support)
            else:
                chosen = solved.nonzero()[:, 0]
                keep(chosen if rows is None else rows[chosen], indices[chosen], values[chosen], found[chosen],
                     support[chosen])
        unsolved = ~solved
        if not bool(unsolved.any()):
            break
        local = unsolved.nonzero()[:, 0]
        rows = local if rows is None else rows[local]
        sub = x.index_select(0, rows)
        sub_delta = _rows_of(delta, rows)
        k *= GROWTH
    if not keep_support or not parts:
        return Solution(tau)
    if len(parts) == 1 and parts[0][0] is None:  # every row solved at once: views, no copies
        return Solution(tau, parts[0][1].index, parts[0][1].values)
    merged = _merge(parts, num_rows, x)
    return Solution(tau, merged.index, merged.values)


# ----------------------------------------------------------------------------- maps from the threshold
def probabilities(x: torch.Tensor, tau: torch.Tensor, kind: str, delta=None, norm=None, out=None) -> torch.Tensor:
    """``p = φ(x − τ)`` for a chunk: ``x`` ``(n, C)`` in the work dtype, ``tau`` ``(n,)``; written into ``out``
    when given (same shape, the work dtype).

    A float64 ``τ`` with fp32 ``x`` is split as ``τ_hi + τ_lo`` (both fp32) and subtracted in two steps, so
    ``τ``'s float64 precision reaches every entry without an ``(n, C)`` float64 temporary.
    """
    if tau.dtype != x.dtype:
        high = tau.to(x.dtype)
        low = (tau - high.to(tau.dtype)).to(x.dtype)
        out = torch.sub(x, high[:, None], out=out) if out is not None else x - high[:, None]
        out.sub_(low[:, None])
    else:
        out = torch.sub(x, tau[:, None], out=out) if out is not None else x - tau[:, None]
    if kind == SPARSEMAX:
        return out.clamp_(min=0.0)
    if kind == ENTMAX15:
        return out.clamp_(min=0.0).mul_(0.5).square_()
    p = entmax_p(out, delta)
    if norm is not None:
        p = p / norm[:, None]
    if p.data_ptr() != out.data_ptr():
        out.copy_(p)
    return out


def derivative_weights(p: torch.Tensor, kind: str, delta=None) -> torch.Tensor:
    """``s = p^{2−α}`` on the support (0 off it): the diagonal of the Jacobian's ``diag(s) − s sᵀ/Σ s``."""
    if kind == SPARSEMAX:
        return torch.where(p > 0, torch.ones_like(p), p * 0)  # p * 0: a NaN (a row without a solution) stays NaN
    if kind == ENTMAX15:
        return p.sqrt()
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
    return torch.where(positive, torch.exp((1.0 - delta) * log_p), p * 0)


# ----------------------------------------------------------------------------- α-derivatives (float64)
_FACTORIALS = [math.factorial(n) for n in range(16)]


def _psi(u: torch.Tensor) -> torch.Tensor:
    """``ψ(u) = (e^u − 1 − u)/u²``, ``ψ(0) = 1/2``; a Taylor series for ``|u| < 0.1``."""
    small = u.abs() < 0.1
    us = torch.where(small, u, torch.zeros_like(u))
    series = torch.zeros_like(u)
    for n in range(13, 1, -1):  # Σ_{n>=2} u^{n−2}/n!, Horner
        series = series * us + 1.0 / _FACTORIALS[n]
    ul = torch.where(small, torch.ones_like(u), u)
    return torch.where(small, series, (torch.expm1(ul) - ul) / (ul * ul))


def _chi(v: torch.Tensor) -> torch.Tensor:
    """``χ(v) = (1 + (v − 1)e^v)/v²``, ``χ(0) = 1/2``; a Taylor series for ``|v| < 0.1``."""
    small = v.abs() < 0.1
    vs = torch.where(small, v, torch.zeros_like(v))
    series = torch.zeros_like(v)
    for n in range(13, 1, -1):  # Σ_{n>=2} (n − 1)/n! v^{n−2}
        series = series * vs + (n - 1) / _FACTORIALS[n]
    vl = torch.where(small, torch.ones_like(v), v)
    return torch.where(small, series, (1.0 + (vl - 1.0) * torch.exp(vl)) / (vl * vl))


def _log_support(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positive = p > 0
    return positive, torch.where(positive, torch.log(torch.where(positive, p, torch.ones_like(p))), torch.zeros_like(p))


def entmax_alpha_derivative(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``∂p/∂α`` (float64, ``(n, C)``) at the output ``p`` for ``δ = α − 1`` ``(n, 1)``; stable as ``δ → 0``."""
    positive, log_p = _log_support(p)
    h = (p * log_p).sum(dim=1, keepdim=True)
    # Small δ: the cancellation-free form.
    ds = delta.clamp(max=0.5)
    a = log_p * log_p * _psi(-ds * log_p)
    a_bar = (p * a).sum(dim=1, keepdim=True)
    z = 1.0 - ds * h + ds * ds * a_bar
    small = p * ((1.0 - ds * log_p) * a_bar - a * (1.0 - ds * h)) / z
    # Large δ: the textbook form, s̃ = softmax((1 − δ) log p) over the support.
    dl = delta.clamp(min=0.5)
    exponent = torch.where(positive, (1.0 - dl) * log_p, torch.full_like(p, -math.inf))
    s_tilde = torch.softmax(exponent, dim=1)
    large = (p - s_tilde) / (dl * dl) - (p * log_p - s_tilde * h) / dl
    return torch.where(positive, torch.where(delta < 0.5, small, large), torch.zeros_like(p))


def tsallis_entropy(p: torch.Tensor, delta) -> torch.Tensor:
    """``H_α(p) = −(1/α) Σ_i p_i (p_i^δ − 1)/δ`` per row ``(n,)``, Shannon's at ``δ = 0``, without cancellation;
    ``delta`` a float or ``(n, 1)``."""
    positive, log_p = _log_support(p)
    if isinstance(delta, torch.Tensor):
        safe = torch.where(delta == 0, torch.ones_like(delta), delta)
        q = torch.where(delta == 0, log_p, torch.expm1(delta * log_p) / safe)
        alpha = 1.0 + delta[:, 0]
    else:
        q = log_p if delta == 0.0 else torch.expm1(delta * log_p) / delta
        alpha = 1.0 + delta
    return -(torch.where(positive, p * q, torch.zeros_like(p))).sum(dim=1) / alpha


def tsallis_alpha_derivative(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``∂H_α(p)/∂α`` at fixed ``p`` per row (float64): ``Σ p q/α² − Σ p L² χ(δL)/α`` with ``q = (p^δ − 1)/δ``."""
    positive, log_p = _log_support(p)
    alpha = delta + 1.0
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    q = torch.where(delta == 0, log_p, torch.expm1(delta * log_p) / safe)
    first = torch.where(positive, p * q, torch.zeros_like(p)).sum(dim=1, keepdim=True) / (alpha * alpha)
    second = torch.where(positive, p * log_p * log_p * _chi(delta * log_p), torch.zeros_like(p))
    return (first - second.sum(dim=1, keepdim=True) / alpha)[:, 0]


# ----------------------------------------------------------------------------- shared chunk loop helpers
def _delta_rows(delta, start: int, stop: int, dtype: torch.dtype):
    if isinstance(delta, torch.Tensor):
        return delta[start:stop].to(dtype)
    return delta


def _split_alpha(alpha_rows: torch.Tensor | None, scalar_alpha: float | None, work: torch.dtype):
    """``δ = α − 1``: a float, or a detached ``(N, 1)`` tensor in the work dtype."""
    if alpha_rows is None:
        return None if scalar_alpha is None else scalar_alpha - 1.0
    return (alpha_rows.detach().to(work) - 1.0).reshape(-1, 1)


def _normaliser(x: torch.Tensor, tau: torch.Tensor, delta) -> torch.Tensor:
    """``Σ_i p_i(τ)`` per row for α-entmax (≈ 1; dividing by it makes every row sum to 1 exactly)."""
    work = tau.dtype
    total = torch.empty_like(tau)
    step = chunk_rows(*x.shape)
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        chunk = x[start:stop].to(work)
        total[start:stop] = entmax_p(chunk - tau[start:stop, None], _delta_rows(delta, start, stop, work)).sum(dim=1)
    return total


def _support_probabilities(solution: Solution, kind: str) -> torch.Tensor:
    """``p`` at the kept support positions ``(N, K)`` (work dtype)."""
    return probabilities(solution.values, solution.tau, kind)


def _dense_from_support(index: torch.Tensor, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A zero ``(N, C)`` tensor like ``like`` with ``values`` added at ``index`` (one write pass); padding
    columns repeat a position and add 0 there."""
    out = torch.zeros_like(like, memory_format=torch.contiguous_format)
    return out.scatter_add_(1, index, values.to(like.dtype))


# ----------------------------------------------------------------------------- the custom ops
# ``torch.ops.softmaxkit.entmax_torch`` / ``fenchel_young_torch`` and their backward ops. The solvers choose
# ``k`` from the data (top-k with an exactness check), so their intermediate shapes are data-dependent: as
# opaque custom ops with fake kernels they trace (torch.compile, torch.export, FakeTensorMode, meta tensors)
# without a graph break. ``alpha`` is the per-row α ``(N, 1)`` when it is a tensor (it then gets a
# gradient), else None and ``scalar_alpha`` holds the number (ignored for sparsemax / 1.5-entmax).


def _alpha_arguments(alpha: torch.Tensor | None, scalar_alpha: float, kind: str):
    return (alpha, None) if alpha is not None else (None, scalar_alpha if kind == BISECT else None)


@torch.library.custom_op("softmaxkit::entmax_torch", mutates_args=())
def _entmax_op(
    x: torch.Tensor, alpha: torch.Tensor | None, kind: str, scalar_alpha: float, n_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, τ, norm)`` of 2-D rows ``x`` ``(N, C)``: the map, each row's threshold (float64 for sparsemax /
    1.5-entmax, the work dtype for α-entmax) and, for α-entmax, each row's ``Σ p(τ)`` (else empty)."""
    work = work_dtype(x.dtype)
    delta = _split_alpha(*_alpha_arguments(alpha, scalar_alpha, kind), work)
    solution = solve_threshold(x, kind, delta, n_iter, keep_support=True)
    tau = solution.tau
    empty = x.new_empty(0, dtype=work)
    if solution.index is not None:
        return _dense_from_support(solution.index, _support_probabilities(solution, kind), x), tau, empty
    norm = _normaliser(x, tau, delta) if kind == BISECT else empty
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    direct = work == x.dtype
    step = chunk_rows(*x.shape)
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        p = probabilities(
            x[start:stop].to(work), tau[start:stop], kind, _delta_rows(delta, start, stop, work),
            norm[start:stop] if kind == BISECT else None, out=out[start:stop] if direct else None,
        )
        if not direct:
            out[start:stop].copy_(p)
    return out, tau, norm


@_entmax_op.register_fake
def _entmax_fake(x, alpha, kind, scalar_alpha, n_iter):
    work = work_dtype(x.dtype)
    norm = x.new_empty(x.shape[0] if kind == BISECT else 0, dtype=work)
    p = torch.empty_like(x, memory_format=torch.contiguous_format)
    return p, x.new_empty(x.shape[0], dtype=threshold_dtype(kind, x.dtype)), norm


@torch.library.custom_op("softmaxkit::entmax_torch_backward", mutates_args=())
def _entmax_backward_op(
    grad_output: torch.Tensor,
    saved: torch.Tensor,
    tau: torch.Tensor,
    norm: torch.Tensor,
    alpha: torch.Tensor | None,
    kind: str,
    scalar_alpha: float,
    alpha_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂/∂x, ∂/∂α)`` of the map: ``J g = s ⊙ g − s (Σ s g)/Σ s`` with ``s = p^{2−α}``, and, when
    ``alpha_grad``, ``Σ_i g_i ∂p_i/∂α`` per row ``(N, 1)`` (else empty).

    ``saved`` is the output ``p`` for sparsemax / 1.5-entmax, and the input ``x`` for α-entmax, whose ``p`` is
    recomputed from ``(τ, norm)`` a chunk of rows at a time (no saved fp32 copy for fp16/bf16 input).
    """
    work = work_dtype(saved.dtype)
    delta = _split_alpha(*_alpha_arguments(alpha, scalar_alpha, kind), work)
    grad = torch.empty_like(saved, memory_format=torch.contiguous_format)
    need_alpha = alpha_grad and alpha is not None
    grad_alpha = torch.empty(saved.shape[0] if need_alpha else 0, dtype=torch.float64, device=saved.device)
    step = chunk_rows(*saved.shape)
    for start in range(0, saved.shape[0], step):
        stop = min(start + step, saved.shape[0])
        chunk_delta = _delta_rows(delta, start, stop, work)
        if kind == BISECT:
            p = probabilities(saved[start:stop].to(work), tau[start:stop], kind, chunk_delta, norm[start:stop])
        else:
            p = saved[start:stop].to(work)
        g = grad_output[start:stop].to(work)
        # (diag(s) − s sᵀ/Σs) g = s ⊙ (g − q), q = Σ s⊙g / Σ s (sums in float64)
        s = derivative_weights(p, kind, chunk_delta)
        total = s.sum(dim=1, keepdim=True, dtype=torch.float64)
        q = (g * s).sum(dim=1, keepdim=True, dtype=torch.float64) / torch.where(total == 0, 1.0, total)
        torch.mul(s, g.sub_(q.to(work)) if work != grad_output.dtype else g - q.to(work), out=grad[start:stop])
        if need_alpha:
            derivative = entmax_alpha_derivative(p.to(torch.float64), delta[start:stop].to(torch.float64))
            grad_alpha[start:stop] = (grad_output[start:stop].to(torch.float64) * derivative).sum(dim=1)
    if need_alpha:
        grad_alpha = grad_alpha.to(alpha.dtype).reshape(-1, 1)
    return grad, grad_alpha


@_entmax_backward_op.register_fake
def _entmax_backward_fake(grad_output, saved, tau, norm, alpha, kind, scalar_alpha, alpha_grad):
    grad = torch.empty_like(saved, memory_format=torch.contiguous_format)
    if alpha_grad and alpha is not None:
        return grad, alpha.new_empty((saved.shape[0], 1))
    return grad, saved.new_empty(0, dtype=torch.float64)


def _entmax_setup(ctx, inputs, output):
    x, alpha, kind, scalar_alpha, _ = inputs
    p, tau, norm = output
    ctx.mark_non_differentiable(tau, norm)
    ctx.kind, ctx.scalar_alpha = kind, scalar_alpha
    ctx.save_for_backward(x if kind == BISECT else p, tau, norm, alpha)


def _entmax_backward(ctx, grad_p, grad_tau, grad_norm):
    saved, tau, norm, alpha = ctx.saved_tensors
    alpha_grad = alpha is not None and ctx.needs_input_grad[1]
    grad, grad_alpha = _EntmaxBackward(
        grad_p, saved, tau, norm, alpha, ctx.kind, ctx.scalar_alpha, alpha_grad
    )
    return grad if ctx.needs_input_grad[0] else None, grad_alpha if alpha_grad else None, None, None, None


_EntmaxFunction = differentiable(_entmax_op, _entmax_setup, _entmax_backward)
_EntmaxBackward = once_differentiable(_entmax_backward_op)


def torch_entmax(
    x: torch.Tensor, kind: str, alpha_rows: torch.Tensor | None = None, scalar_alpha: float | None = None,
    n_iter: int = 50,
) -> torch.Tensor:
    """Sparsemax, 1.5-entmax or α-entmax (``kind``) of 2-D rows ``x`` ``(N, C)`` along the last dim, through
    ``torch.ops.softmaxkit.entmax_torch``; arguments already validated (see :func:`softmaxkit.entmax_bisect`)."""
    scalar = 1.5 if scalar_alpha is None else float(scalar_alpha)
    return _EntmaxFunction(x, alpha_rows, kind, scalar, n_iter)[0]


def _row_weights(target, weight, ignore_index, work):
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    zero = torch.zeros((), dtype=work, device=target.device)
    w_y = valid.to(work) if weight is None else torch.where(valid, weight.to(work)[safe_target], zero)
    return valid, safe_target, w_y


@torch.library.custom_op("softmaxkit::fenchel_young_torch", mutates_args=())
def _fenchel_young_op(
    x: torch.Tensor,
    alpha: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    kind: str,
    scalar_alpha: float,
    n_iter: int,
    ignore_index: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(loss, τ, norm, ∂H_α/∂α)`` of the Fenchel-Young loss of ``kind`` for 2-D logits ``(N, C)``.

    Per row ``ℓ = w_y [⟨p − e_y, x⟩ + H_α(p)]`` (0 where ignored), written without ``⟨p, x⟩`` cancellation:
    sparsemax ``(1 + ‖p‖²)/2 − (x_y − τ)``; 1.5-entmax ``(2/3)Σ p^{3/2} + 4/3 − (x_y − τ)``; α-entmax
    ``Σ_{p_i>0} p_i (x_i − x_y) + H_α(p)``. A row without a threshold (a NaN, a +inf, every entry −inf) has a
    NaN loss; a target on a −inf class an infinite one. The loss is ``()`` for ``"mean"`` / ``"sum"`` and
    ``(N,)`` for ``"none"``, in ``x``'s dtype; ``τ`` ``(N,)`` and ``norm`` (α-entmax: ``(N,)``, else empty)
    let the backward recompute ``p``; ``∂H_α(p)/∂α`` ``(N,)`` float64 is computed for a tensor ``alpha``
    (else empty).
    """
    num_rows = x.shape[0]
    work = work_dtype(x.dtype)
    delta = _split_alpha(*_alpha_arguments(alpha, scalar_alpha, kind), work)
    valid, safe_target, w_y = _row_weights(target, weight, ignore_index, work)
    zero = torch.zeros((), dtype=work, device=x.device)
    solution = solve_threshold(x, kind, delta, n_iter, keep_support=True)
    tau = solution.tau
    x_y = x.gather(1, safe_target[:, None])[:, 0].to(work)
    entropy_alpha = x.new_empty(num_rows if alpha is not None else 0, dtype=torch.float64)
    norm = x.new_empty(0, dtype=work)
    if solution.index is not None:
        row = _exact_row_loss(_support_probabilities(solution, kind), x_y - tau, kind)
    else:
        norm = _normaliser(x, tau, delta) if kind == BISECT else norm
        row = torch.empty(num_rows, dtype=tau.dtype if kind != BISECT else work, device=x.device)
        step = chunk_rows(*x.shape)
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            chunk = x[start:stop].to(work)
            chunk_delta = _delta_rows(delta, start, stop, work)
            chunk_p = probabilities(chunk, tau[start:stop], kind, chunk_delta,
                                    norm[start:stop] if kind == BISECT else None)
            if kind == BISECT:
                gap = torch.where(chunk_p > 0, chunk_p * (chunk - x_y[start:stop, None]), zero).sum(dim=1)
                # a row without a threshold (NaN p) has no loss: NaN, as softmax cross-entropy gives
                unsolved = torch.isnan(chunk_p).any(dim=1)
                row[start:stop] = torch.where(unsolved, math.nan, gap + tsallis_entropy(chunk_p, chunk_delta))
            else:
                row[start:stop] = _exact_row_loss(chunk_p, x_y[start:stop] - tau[start:stop], kind)
            if alpha is not None:
                entropy_alpha[start:stop] = tsallis_alpha_derivative(
                    chunk_p.to(torch.float64), delta[start:stop].to(torch.float64)
                )
    loss = torch.where(valid, w_y * row, zero)
    out = reduce_loss(loss, reduction, w_y.sum())
    return out.to(x.dtype), tau, norm, entropy_alpha


@_fenchel_young_op.register_fake
def _fenchel_young_fake(x, alpha, target, weight, kind, scalar_alpha, n_iter, ignore_index, reduction):
    num_rows = x.shape[0]
    loss = x.new_empty((num_rows,) if reduction == "none" else ())
    tau = x.new_empty(num_rows, dtype=threshold_dtype(kind, x.dtype))
    norm = x.new_empty(num_rows if kind == BISECT else 0, dtype=work_dtype(x.dtype))
    return loss, tau, norm, x.new_empty(num_rows if alpha is not None else 0, dtype=torch.float64)


@torch.library.custom_op("softmaxkit::fenchel_young_torch_backward", mutates_args=())
def _fenchel_young_backward_op(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    tau: torch.Tensor,
    norm: torch.Tensor,
    alpha: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    entropy_alpha: torch.Tensor,
    kind: str,
    scalar_alpha: float,
    ignore_index: int,
    reduction: str,
    alpha_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂ℓ/∂x, ∂ℓ/∂α)``: ``scale_i (p − e_y)`` with ``p`` recomputed into the gradient buffer a chunk of
    rows at a time, and ``scale_i ∂H_α/∂α`` ``(N, 1)`` when ``alpha_grad`` (else empty)."""
    num_rows = x.shape[0]
    work = work_dtype(x.dtype)
    delta = _split_alpha(*_alpha_arguments(alpha, scalar_alpha, kind), work)
    _, safe_target, w_y = _row_weights(target, weight, ignore_index, work)
    scale_i = row_scale(grad_output.to(work), reduction, num_rows, w_y.sum(), w_y)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    direct = work == x.dtype
    step = chunk_rows(*x.shape)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        p = probabilities(
            x[start:stop].to(work), tau[start:stop], kind, _delta_rows(delta, start, stop, work),
            norm[start:stop] if kind == BISECT else None, out=grad[start:stop] if direct else None,
        )
        scale = scale_i[start:stop, None]
        # p·scale is exactly 0 off the support; an ignored row (scale 0) gets exact zeros even when its p is NaN
        p.mul_(scale).masked_fill_(scale == 0, 0.0).scatter_add_(1, safe_target[start:stop, None], -scale)
        if not direct:
            grad[start:stop].copy_(p)
    if alpha_grad and alpha is not None and entropy_alpha.numel() == num_rows:
        grad_alpha = (scale_i.to(torch.float64) * entropy_alpha).to(alpha.dtype).reshape(-1, 1)
    else:
        grad_alpha = x.new_empty(0, dtype=torch.float64)
    return grad, grad_alpha


@_fenchel_young_backward_op.register_fake
def _fenchel_young_backward_fake(grad_output, x, tau, norm, alpha, target, weight, entropy_alpha, kind,
                                 scalar_alpha, ignore_index, reduction, alpha_grad):
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    if alpha_grad and alpha is not None:
        return grad, alpha.new_empty((x.shape[0], 1))
    return grad, x.new_empty(0, dtype=torch.float64)


def _fenchel_young_setup(ctx, inputs, output):
    x, alpha, target, weight, kind, scalar_alpha, _, ignore_index, reduction = inputs
    _, tau, norm, entropy_alpha = output
    ctx.mark_non_differentiable(tau, norm, entropy_alpha)
    ctx.options = (kind, scalar_alpha, ignore_index, reduction)
    ctx.save_for_backward(x, tau, norm, alpha, target, weight, entropy_alpha)


def _fenchel_young_backward(ctx, grad_loss, grad_tau, grad_norm, grad_entropy):
    x, tau, norm, alpha, target, weight, entropy_alpha = ctx.saved_tensors
    alpha_grad = alpha is not None and ctx.needs_input_grad[1]
    grad, grad_alpha = _FenchelYoungBackward(
        grad_loss, x, tau, norm, alpha, target, weight, entropy_alpha, *ctx.options, alpha_grad
    )
    return (grad if ctx.needs_input_grad[0] else None, grad_alpha if alpha_grad else None,
            None, None, None, None, None, None, None)


_FenchelYoungFunction = differentiable(_fenchel_young_op, _fenchel_young_setup, _fenchel_young_backward)
_FenchelYoungBackward = once_differentiable(_fenchel_young_backward_op)


def torch_fenchel_young(
    x: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    alpha_rows: torch.Tensor | None = None,
    scalar_alpha: float | None = None,
    n_iter: int = 50,
) -> torch.Tensor:
    """The Fenchel-Young loss of ``kind`` for 2-D logits ``(N, C)`` and class indices ``(N,)`` through
    ``torch.ops.softmaxkit.fenchel_young_torch``; arguments already validated (see
    :func:`softmaxkit.sparsemax_loss`)."""
    scalar = 1.5 if scalar_alpha is None else float(scalar_alpha)
    return _FenchelYoungFunction(
        x, alpha_rows, target, weight, kind, scalar, n_iter, ignore_index, reduction
    )[0]


def _exact_row_loss(p: torch.Tensor, margin: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row Fenchel-Young loss of sparsemax / 1.5-entmax from ``p`` (any set of columns holding the
    support) and ``margin = x_y − τ``."""
    if kind == SPARSEMAX:
        return 0.5 * (1.0 + (p * p).sum(dim=1, dtype=torch.float64)) - margin
    return (2.0 / 3.0) * (p * p.sqrt()).sum(dim=1, dtype=torch.float64) + 4.0 / 3.0 - margin
