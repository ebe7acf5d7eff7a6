r"""The collectives the cross-process losses share (layer 1: used by :mod:`softmaxkit.distributed` and the
DTensor adapter :mod:`softmaxkit.functional._dtensor`).

* :class:`GroupReduce`: the ``reduce`` object of the vocab-parallel chunk loops (:mod:`._core.linear`),
  combining per-row statistics over a process group with all-reduce.
* :func:`global_reduce`: a loss computed on each rank's own rows, summed over the group (``"sum"``) or divided
  by the group's summed denominator (``"mean"``, PyTorch's weighted mean over all ranks), with the gradient of
  a replicated result: each rank's rows get ``g`` (``"sum"``) or ``g / D`` (``"mean"``).
* :func:`replicated_grad`: the identity whose backward all-reduces the gradient, for a tensor every rank holds
  whole (a replicated weight) but each rank only uses with its own rows.
* :func:`raise_together`: a rank whose local checks failed would otherwise leave the others waiting in the
  next collective; one tiny all-gather lets every rank raise instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._reduction import safe_divide
from .linear import LocalReduce


class GroupReduce(LocalReduce):
    """Combine per-row statistics over the processes of ``group`` with all-reduce (in place)."""

    def __init__(self, group=None):
        self.group = group

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def sum_hidden_grad_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum_(tensor)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype


class _GlobalReduce(torch.autograd.Function):
    """``Σ_r s_r`` or ``Σ_r s_r / Σ_r D_r`` over ``group`` (one all-reduce of two numbers); the result is the
    same on every rank and its backward treats it as one replicated value (no collective)."""

    @staticmethod
    def forward(ctx, local_sum, local_denominator, group, mean: bool):
        wide = _wide(local_sum.dtype)
        both = torch.stack([local_sum.detach().to(wide).reshape(()), local_denominator.detach().to(wide).reshape(())])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        ctx.mean, ctx.dtype = mean, local_sum.dtype
        if not mean:
            return both[0].to(local_sum.dtype)
        ctx.save_for_backward(both[1])
        return safe_divide(both[0], both[1]).to(local_sum.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.mean:
            return grad_output, None, None, None
        (denominator,) = ctx.saved_tensors
        return safe_divide(grad_output.to(denominator.dtype), denominator).to(ctx.dtype), None, None, None


def global_reduce(local_sum: torch.Tensor, local_denominator: torch.Tensor, group, reduction: str) -> torch.Tensor:
    """This rank's summed loss ``s_r`` combined over ``group``: ``Σ s_r`` (``"sum"``) or ``Σ s_r / Σ D_r``
    (``"mean"``; 0 with zero gradient when ``Σ D_r = 0``, softmaxkit's convention)."""
    return _GlobalReduce.apply(local_sum, local_denominator, group, reduction == "mean")


class _ReplicatedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def replicated_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` unchanged; in backward its gradient is summed over ``group`` (a replicated parameter used by
    each rank with its own rows gets the gradient of the loss over all rows, the same on every rank)."""
    if not (torch.is_grad_enabled() and tensor.requires_grad):
        return tensor
    return _ReplicatedGrad.apply(tensor, group)


def fingerprint(target: torch.Tensor) -> int:
    """A cheap order-sensitive digest of an integer tensor (equal targets give equal digests)."""
    flat = target.reshape(-1).long()
    if flat.numel() == 0:
        return 0
    return int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum())


def raise_together(error: BaseException | None, group, device, digest: int | None = None,
                   digest_name: str = "target") -> None:
    """Every rank of ``group`` learns whether any rank's local checks failed, and all raise.

    A rank with ``error`` (any exception its local work raised) raises it; the others raise a ``ValueError``
    naming the failing ranks. With
    ``digest`` (a :func:`fingerprint` of an input that must be replicated), ranks whose digests differ raise
    a ``ValueError`` too. One all-gather of two integers per rank.
    """
    world = dist.get_world_size(group)
    info = torch.tensor([0 if error is None else 1, 0 if digest is None else digest], dtype=torch.int64,
                        device=device)
    table = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(table, info, group=group)
    rows = torch.stack(table).tolist()
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(
            f"the inputs of rank(s) {failed} of the mesh failed their checks (the error is raised there); every "
            "rank raises instead of waiting for them in the loss's collectives"
        )
    if digest is not None and len({row[1] for row in rows}) > 1:
        raise ValueError(
            f"`{digest_name}` differs between the ranks of the mesh; a replicated `{digest_name}` (a plain tensor "
            "or a Replicate DTensor) must be the same on every rank"
        )
