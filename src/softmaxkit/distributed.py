r"""Vocab-parallel cross-entropy over :mod:`torch.distributed`: each process holds a slice of the classes.

With ``P`` processes in ``group``, process ``r`` holds the contiguous classes ``[o_r, o_r + C_r)`` (uneven
slices allowed, ``Σ_r C_r = C``) of the logits, or of the output projection's rows. Nothing ``(N, C)`` is
gathered: per row, only a few numbers cross processes,

.. math:: m = \max_r \max_{c ∈ r} z_c,\qquad S = \sum_r \sum_{c ∈ r} e^{z_c − m},\qquad
          \mathrm{LSE} = m + \log S,

plus the target logit ``z_y`` (nonzero only on the process owning ``y``) and, with label smoothing, the
sum ``Σ_c z_c``; every process then has the global loss

.. math:: ℓ = (1 − ε)(\mathrm{LSE} − z_y) + \frac{ε}{C}\Big(C\,\mathrm{LSE} − \sum_c z_c\Big) + λ\,\mathrm{LSE}^2

and computes its own slice of ``∂ℓ/∂z = (1 + 2λ LSE) p − a`` locally (``p = e^{z − LSE}``, ``a`` the smoothed
one-hot restricted to its classes). :func:`vocab_parallel_cross_entropy` gathers, instead of ``m`` itself,
each process's own shift ``m_r`` with ``Σ e^{z − m_r}`` (and rescales by ``e^{m_r − m}``), so one all-gather
carries everything: once per call on CPU tensors (the C kernel), once per row chunk elsewhere; none in
backward;
:func:`vocab_parallel_linear_cross_entropy` adds one all-reduce of ``∂ℓ/∂hidden`` (``N × D``), because
``hidden`` is replicated and each process only sees its classes' share of that gradient.

Every process must call with the same batch (``target`` and, for the linear form, ``hidden`` replicated)
and the same options; a first, tiny all-gather checks the shapes and target agree and raises the same
``ValueError`` on every process otherwise, so a mistake fails loudly instead of deadlocking.

Works with any backend that has all-reduce MAX/SUM and all-gather: ``gloo`` (CPU) and ``nccl`` (CUDA).
A process that dies makes the others' next collective fail at once; one that stalls, after the process group's
timeout (``init_process_group(timeout=...)``, 30 minutes by default); either way the error names the loss and
the collective (``docs/distributed.md``, "Failures and timeouts").
See ``docs/distributed.md`` for ``torchrun`` and tensor-parallel usage.

References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
    Parallelism", 2019 (the vocab-parallel cross-entropy).
"""

from __future__ import annotations

import torch

from . import _validation as v
from . import backends
from ._core import CrossEntropyOptions, fp32_under_autocast
from ._core.collectives import GroupReduce, shard_layout

#: the ``vocab_parallel_cross_entropy`` implementation :func:`vocab_parallel_cross_entropy` asks the dispatch
#: table for (``backends/__init__.py``): ``"auto"`` (the C kernel on plain CPU tensors, else chunked torch ops);
#: tests set ``"cpu"`` or ``"torch"`` to run one of them
_IMPL = "auto"


def _check_common(target, reduction, ignore_index, label_smoothing, temperature, z_loss, softcap, num_classes):
    target = v.check_tensor("target", target)
    v.check_target_dtype(target)
    return (
        target,
        v.check_reduction(reduction),
        v.check_int("ignore_index", ignore_index),
        v.check_label_smoothing(label_smoothing),
        v.check_positive("temperature", temperature),
        v.check_non_negative("z_loss", z_loss),
        v.check_softcap(softcap),
        v.check_optional_positive_int("num_classes", num_classes),
    )


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of logits whose classes are split across the processes of ``group``.

    Equals :func:`softmaxkit.cross_entropy` of the logits gathered along the class dimension (in rank
    order), with its gradient for this process's slice, without gathering them (see the module docstring).

    Args:
        logits_shard: ``(N, C_r)`` this process's contiguous slice of the classes (process ``r`` holds
            classes ``[Σ_{q<r} C_q, Σ_{q≤r} C_q)``); slices may differ in size, even be empty.
        target: ``(N,)`` global class indices in ``[0, C)`` or ``ignore_index``, the same on every process.
        group: the process group (None: the default group).
        weight: ``(C_r,)`` this process's slice of per-class weights, or None.
        ignore_index, reduction, label_smoothing, z_loss, temperature, softcap: as
            :func:`softmaxkit.cross_entropy`; smoothing and z-loss use the global ``C`` and LSE.
        num_classes: the expected total ``C``; checked against the sum of the slices when given.
        chunk_size: rows per chunk where the work is chunked (the torch ops; the C kernel's recomputed
            gradient); None: ~32 MiB (torch) or ~8 MiB (kernel) of fp32 per chunk over the total ``C``.

    Returns:
        The same value on every process: a scalar for ``"mean"``/``"sum"``, ``(N,)`` for ``"none"``.

    Example (under ``torchrun --nproc-per-node 2``)::

        rank, world = dist.get_rank(), dist.get_world_size()
        logits = full_logits.tensor_split(world, dim=1)[rank]   # this rank's classes
        loss = vocab_parallel_cross_entropy(logits, target)     # == cross_entropy(full_logits, target)
    """
    logits_shard = v.check_floating("logits_shard", logits_shard)
    if logits_shard.dim() != 2:
        raise ValueError(f"`logits_shard` must have shape (N, C_local), but has shape {tuple(logits_shard.shape)}")
    (target, reduction, ignore_index, label_smoothing, temperature, z_loss, softcap, num_classes) = _check_common(
        target, reduction, ignore_index, label_smoothing, temperature, z_loss, softcap, num_classes
    )
    v.check_same_device("target", target, "logits_shard", logits_shard)
    if tuple(target.shape) != (logits_shard.shape[0],):
        raise ValueError(
            f"`target` must have shape ({logits_shard.shape[0]},), one class index per row of `logits_shard`, "
            f"but has shape {tuple(target.shape)}"
        )
    chunk_size = v.check_optional_positive_int("chunk_size", chunk_size)
    weight = v.check_class_weight(weight, logits_shard.shape[1], logits_shard, name="weight")
    needs_grad = torch.is_grad_enabled() and logits_shard.requires_grad
    offset, total = shard_layout(logits_shard.shape[1], target, 0, chunk_size, num_classes, group, "logits_shard",
                            (weight is not None, needs_grad))
    v.check_class_target(target, total, ignore_index)
    options = CrossEntropyOptions(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, temperature=temperature,
        z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, num_classes=total, class_offset=offset,
    )
    # F.cross_entropy's autocast rule: fp16/bf16 logits are taken in fp32, the loss is fp32
    logits_shard, target, weight = fp32_under_autocast(logits_shard, target, weight)
    implementation = backends.select("vocab_parallel_cross_entropy", _IMPL,
                                     backends.Request.of(logits_shard, target, weight))
    return implementation.resolve()(logits_shard, target, weight, options, GroupReduce(group))


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    bias_shard: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    accumulation_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r""":func:`softmaxkit.linear_cross_entropy` with the output projection's rows split across ``group``.

    Each process computes its classes' logits ``h W_rᵀ + b_r`` chunk by chunk (never the full ``(N, C)``
    logits, not even its own ``(N, C_r)`` slice at once), combines the per-row statistics with the other
    processes, and returns the global loss. Gradients: ``∂/∂W_r`` and ``∂/∂b_r`` for this process's rows,
    and the full ``∂/∂hidden`` (all-reduced over ``group``, so ``hidden`` needs no extra all-reduce in
    backward, unlike the input of a column-parallel linear layer).

    Args:
        hidden: ``(..., D)`` hidden states, the same on every process.
        weight_shard: ``(C_r, D)`` this process's contiguous rows of the ``(C, D)`` projection (rank order).
        target: ``(...)`` global class indices, the same on every process.
        group: the process group (None: the default group).
        bias_shard: ``(C_r,)`` or None. class_weight: ``(C_r,)`` this process's slice of class weights.
        ignore_index, reduction, label_smoothing, z_loss, temperature, softcap, chunk_size,
            accumulation_dtype: as :func:`softmaxkit.linear_cross_entropy` (the chunk size must be the same
            on every process; the default depends only on ``N``, ``D`` and the global ``C``).
        num_classes: the expected total ``C``; checked against the sum of the slices when given.

    Returns:
        The same value on every process: a scalar for ``"mean"``/``"sum"``, ``hidden.shape[:-1]`` for
        ``"none"``.
    """
    from .functional._dtensor_linear import vocab_parallel_linear

    return vocab_parallel_linear(
        hidden, weight_shard, target, group, bias_shard, class_weight, num_classes, weight_name="weight_shard",
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temperature, softcap=softcap, chunk_size=chunk_size, accumulation_dtype=accumulation_dtype,
    )
