r"""Sparsemax, 1.5-entmax, α-entmax and their Fenchel-Young losses for 2-D input ``(N, C)``, classes last.

**Threshold search without a full sort.** Every map here is ``p_i = φ(x_i − τ)`` with a per-row threshold
``τ`` such that ``Σ p = 1`` and ``φ = 0`` below a point, so only the largest entries can be in the support.
Precisely, ``p_max <= 1`` gives ``τ >= max(x) − 1`` (sparsemax), ``max(x) − 2`` (1.5-entmax) or
``max(x) − 1/(α−1)`` (α-entmax): entries below that bound are 0. The solvers therefore take the ``k`` largest
entries of each row (``torch.topk``, O(C) per row for small ``k``), solve exactly on them, and check the
answer: the solution is exact when the support found is smaller than ``k`` (sparsemax / 1.5-entmax: the
sorted-prefix conditions of Martins & Astudillo 2016 and Peters et al. 2019 then hold for the whole row), or
when the ``k``-th entry is already below the bound (α-entmax). Rows that fail the check are solved again with
``8k`` entries, and finally with a full sort, so the result never depends on the guess of ``k``.

**Memory.** Forward allocates the output; backward the gradient; everything else works on row chunks of
about 4 MiB (:func:`~softmaxkit.backends.torch.cross_entropy.chunk_rows`). The backward recomputes ``p``
from the input and the saved per-row threshold instead of saving an fp32 copy. The Fenchel-Young losses
never hold ``p`` at all outside a chunk.

**Precision.** fp16/bf16 input is solved and exponentiated in fp32 (the ``entmax`` package's bisection returns
NaN there); float64 stays float64.

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

import torch
from torch.autograd.function import once_differentiable

from ..._reduction import safe_divide
from .cross_entropy import chunk_rows

SPARSEMAX, ENTMAX15, BISECT = "sparsemax", "entmax15", "bisect"

#: entries per row tried first by the top-k solvers; rows whose support does not fit are retried with
#: ``GROWTH`` times more, then with a full sort once ``k`` would exceed a quarter of the row.
FIRST_K = 32
GROWTH = 8


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _ranks(k: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(1, k + 1, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- solvers on sorted prefixes
def _sparsemax_sorted(values: torch.Tensor, complete: bool, delta) -> tuple[torch.Tensor, torch.Tensor]:
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
    return tau[:, 0], solved


def _entmax15_sorted(values: torch.Tensor, complete: bool, delta) -> tuple[torch.Tensor, torch.Tensor]:
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
    return tau[:, 0], solved


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


def _bisect_sorted(values: torch.Tensor, complete: bool, delta, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    return low[:, 0], solved


def _rows_of(delta, rows: torch.Tensor | None):
    if rows is None or not isinstance(delta, torch.Tensor):
        return delta
    return delta.index_select(0, rows)


def solve_threshold(x: torch.Tensor, kind: str, delta=None, n_iter: int = 50) -> torch.Tensor:
    """Per-row threshold ``τ`` ``(N,)`` (fp32 for fp16/bf16 ``x``) of ``kind`` for 2-D ``x``.

    Top-k with an exactness check and a growing ``k`` (see the module docstring); rows still unsolved when
    ``k`` would pass ``C/4`` are fully sorted, a chunk of rows at a time.
    """
    num_rows, num_classes = x.shape
    work = work_dtype(x.dtype)
    tau = torch.empty(num_rows, dtype=work, device=x.device)
    if num_rows == 0:
        return tau

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
        return tau

    rows: torch.Tensor | None = None  # indices of the rows still to solve (None: all)
    sub, sub_delta = x, delta
    k = FIRST_K
    while True:
        if k * 4 > num_classes:
            # Full sort (bisection needs no order: it runs on the whole row), a chunk of rows at a time.
            step = chunk_rows(sub.shape[0], num_classes)
            for start in range(0, sub.shape[0], step):
                stop = min(start + step, sub.shape[0])
                chunk = sub[start:stop]
                values = chunk if kind == BISECT else torch.sort(chunk, dim=1, descending=True).values
                chunk_delta = sub_delta[start:stop] if isinstance(sub_delta, torch.Tensor) else sub_delta
                found, _ = solve(values, True, chunk_delta)
                if rows is None:
                    tau[start:stop] = found
                else:
                    tau[rows[start:stop]] = found
            return tau
        values = torch.topk(sub, k, dim=1, sorted=kind != BISECT).values
        found, solved = solve(values, False, sub_delta)
        if rows is None:
            tau.copy_(found)
        else:
            tau[rows] = found
        unsolved = ~solved
        if not bool(unsolved.any()):
            return tau
        local = unsolved.nonzero()[:, 0]
        rows = local if rows is None else rows[local]
        sub = x.index_select(0, rows)
        sub_delta = _rows_of(delta, rows)
        k *= GROWTH


# ----------------------------------------------------------------------------- maps from the threshold
def probabilities(x: torch.Tensor, tau: torch.Tensor, kind: str, delta=None, norm=None, out=None) -> torch.Tensor:
    """``p = φ(x − τ)`` for a chunk: ``x`` ``(n, C)`` in the work dtype, ``tau`` ``(n,)``; written into ``out``
    when given (same shape, the work dtype)."""
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
        return (p > 0).to(p.dtype)
    if kind == ENTMAX15:
        return p.sqrt()
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
    return torch.where(positive, torch.exp((1.0 - delta) * log_p), torch.zeros_like(p))


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


def _row_scale(grad_output: torch.Tensor, reduction: str, w_y: torch.Tensor, denominator: torch.Tensor):
    """The upstream gradient of each row's loss: ``g·w_y`` (``none``), ``g·w_y/Σw`` (``mean``), ``g·w_y``."""
    grad_output = grad_output.to(w_y.dtype)
    if reduction == "none":
        return grad_output * w_y
    if reduction == "mean":
        return safe_divide(grad_output, denominator).expand(w_y.shape[0]) * w_y
    return grad_output.expand(w_y.shape[0]) * w_y


class _EntmaxFunction(torch.autograd.Function):
    """Private autograd Function behind :func:`softmaxkit.sparsemax`, ``entmax15`` and ``entmax_bisect``.

    ``alpha_rows`` is the per-row α ``(N, 1)`` when it is a tensor (it then gets a gradient), else None and
    ``scalar_alpha`` holds the float.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, alpha_rows: torch.Tensor | None, kind: str, scalar_alpha: float | None, n_iter: int
    ) -> torch.Tensor:
        work = work_dtype(x.dtype)
        delta = _split_alpha(alpha_rows, scalar_alpha, work)
        tau = solve_threshold(x, kind, delta, n_iter)
        norm = _normaliser(x, tau, delta) if kind == BISECT else None
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        direct = work == x.dtype
        step = chunk_rows(*x.shape)
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            p = probabilities(
                x[start:stop].to(work), tau[start:stop], kind, _delta_rows(delta, start, stop, work),
                None if norm is None else norm[start:stop], out=out[start:stop] if direct else None,
            )
            if not direct:
                out[start:stop].copy_(p)
        ctx.save_for_backward(x, tau, norm, delta if isinstance(delta, torch.Tensor) else None)
        ctx.kind, ctx.scalar_delta = kind, None if isinstance(delta, torch.Tensor) else delta
        ctx.alpha_dtype = None if alpha_rows is None else alpha_rows.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, tau, norm, delta_tensor = ctx.saved_tensors
        kind = ctx.kind
        delta = delta_tensor if delta_tensor is not None else ctx.scalar_delta
        work = tau.dtype
        need_alpha = ctx.needs_input_grad[1]
        grad = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_alpha = torch.empty(x.shape[0], dtype=torch.float64, device=x.device) if need_alpha else None
        step = chunk_rows(*x.shape)
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            chunk_delta = _delta_rows(delta, start, stop, work)
            p = probabilities(
                x[start:stop].to(work), tau[start:stop], kind, chunk_delta,
                None if norm is None else norm[start:stop],
            )
            g = grad_output[start:stop].to(work)
            if grad is not None:
                # (diag(s) − s sᵀ/Σs) g = s ⊙ g − s (Σ s⊙g)/Σs
                s = derivative_weights(p, kind, chunk_delta)
                gs = g * s
                total = s.sum(dim=1, keepdim=True)
                q = gs.sum(dim=1, keepdim=True) / torch.where(total == 0, torch.ones_like(total), total)
                grad[start:stop] = gs.sub_(q * s)
            if need_alpha:
                derivative = entmax_alpha_derivative(p.to(torch.float64), delta_tensor[start:stop].to(torch.float64))
                grad_alpha[start:stop] = (g.to(torch.float64) * derivative).sum(dim=1)
        if grad_alpha is not None:
            grad_alpha = grad_alpha.to(ctx.alpha_dtype).reshape(-1, 1)
        return grad, grad_alpha, None, None, None


class _FenchelYoungFunction(torch.autograd.Function):
    r"""Private autograd Function behind the Fenchel-Young losses of sparsemax / entmax.

    Per row ``ℓ = w_y [⟨p − e_y, x⟩ + H_α(p)]`` (0 where ignored), written without ``⟨p, x⟩`` cancellation:
    sparsemax ``(1 + ‖p‖²)/2 − (x_y − τ)``; 1.5-entmax ``(2/3)Σ p^{3/2} + 4/3 − (x_y − τ)``; α-entmax
    ``Σ_{p_i>0} p_i (x_i − x_y) + H_α(p)``. ``∂ℓ/∂x = w_y (p − e_y)``, ``∂ℓ/∂α = w_y ∂H_α(p)/∂α`` (envelope
    theorem). Forward keeps ``τ`` ``(N,)`` only; backward recomputes ``p`` into the gradient buffer.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        alpha_rows: torch.Tensor | None,
        target: torch.Tensor,
        kind: str,
        scalar_alpha: float | None,
        n_iter: int,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
    ) -> torch.Tensor:
        num_rows = x.shape[0]
        work = work_dtype(x.dtype)
        delta = _split_alpha(alpha_rows, scalar_alpha, work)
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        zero = torch.zeros((), dtype=work, device=x.device)
        w_y = valid.to(work) if weight is None else torch.where(valid, weight.to(work)[safe_target], zero)

        tau = solve_threshold(x, kind, delta, n_iter)
        norm = _normaliser(x, tau, delta) if kind == BISECT else None
        x_y = x.gather(1, safe_target[:, None])[:, 0].to(work)
        row = torch.empty(num_rows, dtype=work, device=x.device)
        need_alpha = alpha_rows is not None and ctx.needs_input_grad[1]
        entropy_alpha = torch.empty(num_rows, dtype=torch.float64, device=x.device) if need_alpha else None
        step = chunk_rows(*x.shape)
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            chunk = x[start:stop].to(work)
            chunk_delta = _delta_rows(delta, start, stop, work)
            p = probabilities(chunk, tau[start:stop], kind, chunk_delta, None if norm is None else norm[start:stop])
            margin = x_y[start:stop] - tau[start:stop]
            if kind == SPARSEMAX:
                row[start:stop] = 0.5 * (1.0 + (p * p).sum(dim=1)) - margin
            elif kind == ENTMAX15:
                row[start:stop] = (2.0 / 3.0) * (p * p.sqrt()).sum(dim=1) + 4.0 / 3.0 - margin
            else:
                gap = torch.where(p > 0, p * (chunk - x_y[start:stop, None]), torch.zeros_like(p)).sum(dim=1)
                row[start:stop] = gap + tsallis_entropy(p, chunk_delta)
            if need_alpha:
                entropy_alpha[start:stop] = tsallis_alpha_derivative(
                    p.to(torch.float64), delta[start:stop].to(torch.float64)
                )
        # A target class with probability 0 and logit −inf has infinite loss; an ignored row has none.
        loss = torch.where(valid, w_y * row, zero)
        denominator = w_y.sum()
        if reduction == "mean":
            out = safe_divide(loss.sum(), denominator)
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss
        ctx.save_for_backward(
            x, tau, norm, delta if isinstance(delta, torch.Tensor) else None, safe_target, w_y, denominator,
            entropy_alpha,
        )
        ctx.options = (kind, None if isinstance(delta, torch.Tensor) else delta, reduction)
        ctx.alpha_dtype = None if alpha_rows is None else alpha_rows.dtype
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, tau, norm, delta_tensor, target, w_y, denominator, entropy_alpha = ctx.saved_tensors
        kind, scalar_delta, reduction = ctx.options
        delta = delta_tensor if delta_tensor is not None else scalar_delta
        num_rows = x.shape[0]
        work = tau.dtype
        row_scale = _row_scale(grad_output, reduction, w_y, denominator)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty_like(x, memory_format=torch.contiguous_format)
            direct = work == x.dtype
            step = chunk_rows(*x.shape)
            for start in range(0, num_rows, step):
                stop = min(start + step, num_rows)
                p = probabilities(
                    x[start:stop].to(work), tau[start:stop], kind, _delta_rows(delta, start, stop, work),
                    None if norm is None else norm[start:stop], out=grad[start:stop] if direct else None,
                )
                scale = row_scale[start:stop, None]
                p.mul_(scale).scatter_add_(1, target[start:stop, None], -scale)
                if not direct:
                    grad[start:stop].copy_(p)
        grad_alpha = None
        if ctx.needs_input_grad[1] and entropy_alpha is not None:
            grad_alpha = (row_scale.to(torch.float64) * entropy_alpha).to(ctx.alpha_dtype).reshape(-1, 1)
        return grad, grad_alpha, None, None, None, None, None, None, None
