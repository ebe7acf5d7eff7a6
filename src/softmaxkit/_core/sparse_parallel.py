r"""Class-sharded sparsemax and 1.5-entmax losses: each process holds a contiguous slice of every row's classes.

The map is ``p_c = φ(u_c − t)`` with ``u = (z − m)/s`` (``m`` the row's global maximum; ``s = 1``, ``φ(d) =
d_+`` for sparsemax; ``s = 2``, ``φ(d) = d_+²`` for 1.5-entmax) and the threshold ``t`` solving
``F(t) = Σ_c φ(u_c − t) − 1 = 0``, a sum over all processes' classes. As in the single-process solver
(:func:`softmaxkit.backends.torch.sparse._newton_exact`), Newton's method from ``t = −1`` (where ``F >= 0``)
climbs monotonically to the root (Michelot's algorithm for sparsemax); every few steps the support
``S = {u > t}`` is read off and the threshold recomputed in closed form on it,

.. math:: t = \frac{\sum_S u − 1}{|S|}\quad\text{(sparsemax)},\qquad
          t = \bar u_S − \sqrt{\big(1 − \textstyle\sum_S (u − \bar u_S)^2\big)/|S|}\quad\text{(1.5-entmax)},

and a row is done when that closed form reproduces ``S`` (the KKT conditions): the threshold is exact, not
iterative. Every sum is a per-process partial sum all-reduced over the group (``N`` or ``2N`` numbers per
step), and whether to go on is decided from all-reduced values, so every process runs the same steps.

The Fenchel-Young loss ``ℓ = w_y(⟨p, z − m⟩ − (z_y − m) + H(p))`` with ``H = ½(1 − Σ p²)`` or
``(4/3)(1 − Σ p^{3/2})`` takes one more all-reduce (``⟨p, z − m⟩``, ``Σ p^α``, ``z_y − m`` from the process
owning ``y``, and ``w_y``); its gradient ``w_y (p − e_y)`` is local: backward needs no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._reduction import reduce_loss, row_scale
from . import SPARSEMAX, compute_dtype
from .autograd import strict_once_differentiable

#: Newton steps between two closed-form checks, and the most checks (the single-process solver's figures)
NEWTON_STEPS, NEWTON_ROUNDS = 3, 30


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def sharded_threshold(u: torch.Tensor, kind: str, group) -> torch.Tensor:
    """The exact threshold ``t`` ``(M, 1)`` of rows ``u`` ``(M, C_local)`` (float64, shifted and scaled as in
    the module docstring) whose classes are split over ``group``."""
    rows = u.shape[0]
    t = torch.full((rows, 1), -1.0, dtype=u.dtype, device=u.device)
    exact = t.clone()
    done = torch.zeros(rows, 1, dtype=torch.bool, device=u.device)
    for _ in range(NEWTON_ROUNDS):
        for _ in range(NEWTON_STEPS):
            d = (u - t).clamp_(min=0.0)
            if kind == SPARSEMAX:
                stats = _all_reduce(torch.stack([d.sum(dim=1), torch.sign(d).sum(dim=1)], dim=1), group)
                step = (stats[:, :1] - 1.0) / stats[:, 1:].clamp(min=1.0)
            else:
                stats = _all_reduce(torch.stack([(d * d).sum(dim=1), d.sum(dim=1)], dim=1), group)
                slope = 2.0 * stats[:, 1:]
                step = (stats[:, :1] - 1.0) / torch.where(slope > 0, slope, 1.0)
            t = torch.where(done, t, t + step)
        support = u > t
        stats = _all_reduce(torch.stack([support.sum(dim=1).to(u.dtype), torch.where(support, u, 0.0).sum(dim=1)],
                                        dim=1), group)
        size, total = stats[:, :1].clamp(min=1.0), stats[:, 1:]
        if kind == SPARSEMAX:
            closed = (total - 1.0) / size
        else:
            mean = total / size
            spread = _all_reduce(torch.where(support, (u - mean) ** 2, 0.0).sum(dim=1, keepdim=True), group)
            closed = mean - torch.sqrt(((1.0 - spread) / size).clamp_(min=0.0))
        inconsistent = _all_reduce(((u > closed) != support).sum(dim=1, keepdim=True).to(u.dtype), group)
        exact = torch.where(done, exact, closed)
        done = done | (inconsistent == 0)
        if bool(done.all()):  # all-reduced: the same answer on every process
            break
    return exact


class ShardedFenchelYoung(torch.autograd.Function):
    """Sparsemax / 1.5-entmax loss of rows ``z`` ``(M, C_local)`` holding classes
    ``[class_offset, class_offset + C_local)`` of ``num_classes``; the result is the same on every process."""

    @staticmethod
    def forward(ctx, z, target, class_weight, kind: str, class_offset: int, ignore_index: int, reduction: str,
                group):
        rows, local_classes = z.shape
        work = compute_dtype(z.dtype)
        valid = target != ignore_index
        local = target.long() - class_offset
        owned = valid & (local >= 0) & (local < local_classes)
        local_target = torch.where(owned, local, torch.zeros_like(local))
        wide = torch.float64
        # ignored rows read as 0: loss and gradient exactly 0 whatever they hold
        x = torch.where(valid[:, None], z.to(wide), torch.zeros((), dtype=wide, device=z.device))
        top = x.amax(dim=1) if local_classes else torch.full((rows,), -torch.inf, dtype=wide, device=z.device)
        top = _all_reduce(top, group, dist.ReduceOp.MAX)
        scale = 1.0 if kind == SPARSEMAX else 2.0
        shifted = x - top[:, None]
        u = shifted / scale
        d = (u - sharded_threshold(u, kind, group)).clamp_(min=0.0)
        p = d if kind == SPARSEMAX else d * d
        zero = torch.zeros((), dtype=wide, device=z.device)
        inner = torch.where(p > 0, p * shifted, zero).sum(dim=1)  # 0·(−∞) = 0 at a masked class
        power = (p * p).sum(dim=1) if kind == SPARSEMAX else (p * d).sum(dim=1)
        if local_classes:
            own_logit = torch.where(owned, shifted.gather(1, local_target[:, None])[:, 0], zero)
        else:
            own_logit = torch.zeros(rows, dtype=wide, device=z.device)
        if class_weight is None:
            own_weight = owned.to(wide)
        elif local_classes:
            own_weight = torch.where(owned, class_weight.to(wide)[local_target], zero)
        else:
            own_weight = torch.zeros(rows, dtype=wide, device=z.device)
        stats = _all_reduce(torch.stack([inner, power, own_logit, own_weight], dim=1), group)
        entropy = 0.5 * (1.0 - stats[:, 1]) if kind == SPARSEMAX else (4.0 / 3.0) * (1.0 - stats[:, 1])
        w_y = torch.where(valid, stats[:, 3], zero)
        loss = torch.where(valid, w_y * (stats[:, 0] - stats[:, 2] + entropy), zero)
        denominator = w_y.sum()
        ctx.reduction, ctx.dtype = reduction, z.dtype
        ctx.save_for_backward(p.to(work), owned, local_target, w_y.to(work), denominator.to(work))
        return reduce_loss(loss, reduction, denominator).to(z.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        p, owned, local_target, w_y, denominator = ctx.saved_tensors
        scale = row_scale(grad_output.to(p.dtype), ctx.reduction, p.shape[0], denominator, w_y)
        grad = p * scale[:, None]
        if p.shape[1]:
            grad.scatter_add_(1, local_target[:, None], torch.where(owned, -scale, torch.zeros_like(scale))[:, None])
        return grad.to(ctx.dtype), None, None, None, None, None, None, None


class ShardedSparseMap(torch.autograd.Function):
    """Sparsemax / 1.5-entmax of rows ``x`` ``(M, C_local)`` whose classes are split over ``group``: this rank's
    slice of ``p = φ(u − t)`` with the exact global threshold :func:`sharded_threshold` (solved in float64).

    Backward (the maps' Jacobians ``diag(s) − s sᵀ/Σ s``): ``∂/∂x = s ⊙ (g − Σ_c s_c g_c / Σ_c s_c)`` with
    ``s = 1[p > 0]`` for sparsemax and ``s = d = √p`` for 1.5-entmax (``p = d²``, ``d = (x − m)/2 − t``; the
    factor 2 of ``∂d²/∂d`` and the ``1/2`` of ``∂d/∂x`` cancel, and the threshold's own derivative gives the
    centring): one all-reduce of two numbers per row.
    """

    @staticmethod
    def forward(ctx, x, kind: str, group):
        rows, local_classes = x.shape
        wide = torch.float64
        z = x.to(wide)
        top = z.amax(dim=1) if local_classes else torch.full((rows,), -torch.inf, dtype=wide, device=x.device)
        top = _all_reduce(top, group, dist.ReduceOp.MAX)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        scale = 1.0 if kind == SPARSEMAX else 2.0
        u = (z - top[:, None]) / scale
        d = (u - sharded_threshold(u, kind, group)).clamp_(min=0.0)
        p = d if kind == SPARSEMAX else d * d
        work = compute_dtype(x.dtype)
        s = (d > 0).to(work) if kind == SPARSEMAX else d.to(work)
        ctx.save_for_backward(s)
        ctx.group, ctx.dtype = group, x.dtype
        return p.to(x.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output):
        (s,) = ctx.saved_tensors
        g = grad_output.to(s.dtype)
        sums = _all_reduce(torch.stack([(s * g).sum(dim=1), s.sum(dim=1)], dim=1), ctx.group)
        centre = sums[:, :1] / sums[:, 1:].clamp(min=torch.finfo(s.dtype).tiny)
        return (s * (g - centre)).to(ctx.dtype), None, None
