r"""The collectives the cross-process losses share (layer 1: used by :mod:`softmaxkit.distributed` and the
DTensor adapter :mod:`softmaxkit.functional._dtensor`).

* :class:`GroupReduce`: the ``reduce`` object of the vocab-parallel losses (:mod:`._core.linear`, the cpu and
  torch ``vocab_parallel_cross_entropy`` backends), combining per-row statistics over a process group with
  all-reduce or one all-gather; a failed collective (a process died or stalled past the group's timeout) is
  re-raised by :func:`collective_failed` naming the loss, the collective and the rank.
* :func:`global_reduce`: a loss computed on each rank's own rows, summed over the group (``"sum"``) or divided
  by the group's summed denominator (``"mean"``, PyTorch's weighted mean over all ranks), with the gradient of
  a replicated result: each rank's rows get ``g`` (``"sum"``) or ``g / D`` (``"mean"``).
* :func:`replicated_grad`: the identity whose backward all-reduces the gradient, for a tensor every rank holds
  whole (a replicated weight) but each rank only uses with its own rows.
* :func:`shard_layout`: the vocab-parallel losses' agreement check (shapes, options, target) and each rank's
  class offset, one all-gather before the first collective that could otherwise deadlock.
* :func:`sum_over`: the all-reduce sum whose backward is the identity, the conjugate of :func:`replicated_grad`.
  Together they differentiate any loss built from per-row sums over class-sharded rows (the row statistics
  of focal, Poly-1 and distillation losses): a per-rank partial sum goes through :func:`sum_over`; a
  replicated statistic (the global LSE) used again in a rank-local term goes through :func:`replicated_grad`.
  The gradient of the replicated result is then exact on every rank.
* :func:`raise_together`: a rank whose local checks failed would otherwise leave the others waiting in the
  next collective; one tiny all-gather lets every rank raise instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._reduction import safe_divide
from .linear import LocalReduce


def collective_failed(error: Exception, what: str, group) -> Exception:
    """``error`` of a collective, re-raised as the same type with what failed and what to check.

    A process that died makes the others' next collective fail within about a second (its sockets close); a
    process that stalls makes them fail after the process group's timeout (``init_process_group(timeout=...)``,
    30 minutes by default): docs/distributed.md, "Failures and timeouts".
    """
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        where = f"rank {rank} of {world}"
    except RuntimeError:  # the group itself is broken
        where = "this process"
    message = (
        f"softmaxkit vocab-parallel loss: the {what} across the process group failed on {where}: another process "
        "died, stalled past the process group's timeout (init_process_group(timeout=...)), or called a different "
        f"collective. The backend said: {error}"
    )
    try:
        return type(error)(message)
    except TypeError:  # an exception type that does not take one message
        return RuntimeError(message)


class GroupReduce(LocalReduce):
    """Combine per-row statistics over the processes of ``group`` (in place, or gathered in rank order)."""

    def __init__(self, group=None):
        self.group = group

    def _all_reduce(self, tensor: torch.Tensor, op, what: str) -> torch.Tensor:
        try:
            dist.all_reduce(tensor, op=op, group=self.group)
        except RuntimeError as error:
            raise collective_failed(error, what, self.group) from error
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX, "all-reduce (max) of the row statistics")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM, "all-reduce (sum) of the row statistics")

    def sum_hidden_grad_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM, "all-reduce of the hidden states' gradient")

    def gather_async(self, tensor: torch.Tensor):
        world = dist.get_world_size(self.group)
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        what = "all-gather of the row statistics"
        # torch >= 2.10 names it all_gather_single (all_gather_into_tensor is its deprecated alias)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            work = gather(out, tensor.contiguous(), group=self.group, async_op=True)
        except RuntimeError as error:
            raise collective_failed(error, what, self.group) from error

        def wait() -> torch.Tensor:
            try:
                work.wait()
            except RuntimeError as error:
                raise collective_failed(error, what, self.group) from error
            return out.view(world, *tensor.shape)
        return wait


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


class _SumOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def sum_over(tensor: torch.Tensor, group) -> torch.Tensor:
    """``Σ_r tensor_r`` over ``group`` (a new tensor, the same on every rank). Backward is the identity: the
    result is replicated, and each rank's gradient of a replicated loss with respect to it is already the whole
    gradient, which is also each addend's (``∂(Σ_r x_r)/∂x_r = 1``). Exact as long as every use of the result
    that differs between ranks goes through :func:`replicated_grad`."""
    return _SumOver.apply(tensor, group)


def max_over(tensor: torch.Tensor, group) -> torch.Tensor:
    """``max_r tensor_r`` over ``group``, detached (a shift, not differentiated)."""
    out = tensor.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def sharded_logsumexp(z: torch.Tensor, group) -> torch.Tensor:
    """The differentiable ``(M,)`` log-sum-exp of rows ``z`` ``(M, C_local)`` whose classes are split over
    ``group`` (a slice may be empty): two all-reduces (the row maximum, then the shifted sums). A row whose
    maximum is not finite is shifted by 0 (its LSE is then ``-inf``, ``inf`` or NaN, as ``torch.logsumexp``)."""
    if z.shape[1]:
        top = z.detach().amax(dim=1)
    else:
        top = torch.full((z.shape[0],), -torch.inf, dtype=z.dtype, device=z.device)
    top = max_over(top, group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.log(sum_over(torch.exp(z - top[:, None]).sum(dim=1), group))


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


def shard_layout(
    local_classes: int,
    target: torch.Tensor,
    hidden_size: int,
    chunk_size: int | None,
    num_classes: int | None,
    group,
    shard_name: str,
    options: tuple[bool, ...] = (),
) -> tuple[int, int]:
    """All-gather each process's shapes; check they agree; return ``(class_offset, total_classes)``.

    ``local_classes``: this process's slice of the classes; ``hidden_size`` (0 for logits) and ``chunk_size``
    must agree, and so must ``options`` (flags whose collectives must match: class weights given, gradients
    needed) and the ``target`` (an order-sensitive digest). Raises the same ``ValueError`` on every process
    when they disagree (everyone sees the same table), so a mistake fails loudly instead of deadlocking.
    Used by :mod:`softmaxkit.distributed` and the DTensor adapter of ``linear_cross_entropy``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vocab-parallel losses need an initialised process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment for it)"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    flat = target.reshape(-1)
    flags = sum(int(bool(flag)) << i for i, flag in enumerate(options))
    info = torch.tensor(
        [local_classes, flat.numel(), hidden_size, -1 if chunk_size is None else chunk_size, fingerprint(flat),
         flags],
        dtype=torch.int64,
        device=target.device,
    )
    table = [torch.empty_like(info) for _ in range(world)]
    try:
        dist.all_gather(table, info, group=group)
    except RuntimeError as error:
        raise collective_failed(error, "all-gather of every process's shapes and options (the call's first "
                                "collective)", group) from error
    rows = torch.stack(table).tolist()
    sizes = [row[0] for row in rows]
    for column, what in ((1, "rows (targets)"), (2, "hidden features"), (3, "chunk_size")):
        values = [row[column] for row in rows]
        if len(set(values)) > 1:
            shown = [None if x < 0 else x for x in values] if column == 3 else values
            raise ValueError(
                f"every process of the group must pass the same number of {what}, but got {shown} on ranks "
                f"0..{world - 1}"
            )
    if len({row[5] for row in rows}) > 1:
        raise ValueError(
            "every process of the group must pass the same options: class weights given on some ranks only, or "
            "gradients needed on some ranks only (their collectives would not match)"
        )
    if len({row[4] for row in rows}) > 1:
        raise ValueError(
            "`target` differs between the processes of the group; every process must pass the same (replicated) "
            "target for the vocab-parallel loss"
        )
    total = sum(sizes)
    if num_classes is not None and num_classes != total:
        raise ValueError(
            f"the `{shard_name}` slices add up to {total} classes over the group's ranks ({sizes}), but "
            f"num_classes={num_classes}"
        )
    if total == 0:
        raise ValueError(f"the `{shard_name}` slices hold no classes at all on any rank ({sizes})")
    return sum(sizes[:rank]), total
