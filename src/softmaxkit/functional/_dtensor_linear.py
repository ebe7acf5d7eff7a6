r"""DTensor inputs of :func:`~softmaxkit.linear_cross_entropy`: a sharded output projection, 1-d device mesh.

Three layouts are served, told apart by the placements (global metadata, the same on every rank, so an
unsupported one raises the same ``ValueError`` everywhere):

* ``weight`` ``Shard(0)`` (classes split over the mesh) and ``hidden`` a ``Replicate`` DTensor on the same
  mesh — tensor parallelism, the explicit signal: the vocab-parallel algorithm of
  :func:`softmaxkit.distributed.vocab_parallel_linear_cross_entropy` (its layer-1 pieces called directly:
  :func:`~softmaxkit._core.collectives.shard_layout`, :class:`~softmaxkit._core.linear.ChunkedLinearCrossEntropy`,
  :class:`~softmaxkit._core.collectives.GroupReduce`) over ``mesh.get_group()``, the weight never gathered. Each rank's slice is its ``to_local()`` rows in mesh order (uneven and empty shards
  included). The loss is a ``Replicate`` DTensor; ``∂/∂weight`` comes back ``Shard(0)``, ``∂/∂hidden``
  ``Replicate``: the vocab-parallel function already sums ``∂/∂hidden`` over the group, and a
  ``Replicate`` DTensor's ``to_local()`` passes its gradient through without communication, so it is
  summed once.
* ``weight`` ``Shard(0)`` or ``Replicate`` and ``hidden`` a plain tensor — data parallelism (FSDP2: each
  rank its own rows) or tensor parallelism with local outputs: the weight is all-gathered
  (``redistribute`` to ``Replicate``) and each rank computes the loss of its own rows with the plain path.
  The gathered weight's gradient is marked ``Partial("avg")``, so backward reduce-scatters (``Shard(0)``)
  or all-reduces (``Replicate``) the average over ranks of each rank's full gradient — what FSDP gives the
  unsharded model, and exact when every rank holds the same rows. The loss is a plain tensor.
* ``weight`` ``Replicate`` and ``hidden`` a ``Replicate`` DTensor: every rank holds everything; computed
  locally, the loss a ``Replicate`` DTensor, gradients ``Replicate`` without communication.

``bias`` (if given) must be a DTensor with the weight's placement; ``class_weight`` a plain ``(C,)`` tensor
or a DTensor on the mesh; ``target`` a plain tensor or a ``Replicate`` DTensor.
"""

from __future__ import annotations

import torch

from .. import _validation as v
from ._dtensor import _dtensor_type

_SUPPORTED = (
    "supported: a 1-d mesh with `weight` Shard(0) and `hidden` a Replicate DTensor on the same mesh (tensor "
    "parallel: vocab-parallel loss), `weight` Shard(0) or Replicate and `hidden` a plain tensor (data parallel / "
    "FSDP2: each rank's own rows, weight gathered, its gradient averaged over the ranks), or both Replicate"
)


def _describe(tensor) -> str:
    return f"a DTensor with placements {tuple(tensor.placements)} on a {tensor.device_mesh.ndim}-d mesh"


def _placements(hidden, weight, target, bias, class_weight) -> str:
    """Check the placements; return ``"tensor_parallel"``, ``"data_parallel"`` or ``"replicated"``."""
    from torch.distributed.tensor import Replicate, Shard

    dtensor = _dtensor_type()
    if not isinstance(weight, dtensor):
        name, other = next((name, t) for name, t in (("hidden", hidden), ("target", target), ("bias", bias),
                                                     ("class_weight", class_weight)) if isinstance(t, dtensor))
        raise ValueError(
            f"`{name}` is {_describe(other)} but `weight` is a plain tensor; linear_cross_entropy takes DTensors "
            f"only with a DTensor `weight` ({_SUPPORTED})"
        )
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"`weight` is {_describe(weight)}; {_SUPPORTED}")
    (placement,) = weight.placements
    sharded = placement.is_shard() and placement.dim in (0, -2)
    if not sharded and not placement.is_replicate():
        raise ValueError(f"`weight` is {_describe(weight)}; {_SUPPORTED}")
    replicate = (Replicate(),)
    if isinstance(hidden, dtensor):
        if hidden.device_mesh != mesh:
            raise ValueError(
                f"`hidden` is a DTensor on mesh {hidden.device_mesh} but `weight` is on mesh {mesh}; they must share "
                f"one mesh ({_SUPPORTED})"
            )
        if tuple(hidden.placements) != replicate:
            raise ValueError(f"`hidden` is {_describe(hidden)} with `weight` {tuple(weight.placements)}; {_SUPPORTED}")
        layout = "tensor_parallel" if sharded else "replicated"
    else:
        layout = "data_parallel"
    if bias is not None:
        if not isinstance(bias, dtensor) or bias.device_mesh != mesh or tuple(bias.placements) != (
                (Shard(0),) if sharded else replicate):
            shown = _describe(bias) if isinstance(bias, dtensor) else "a plain tensor"
            raise ValueError(
                f"`bias` is {shown}, but must be a DTensor on the weight's mesh with the weight's placement "
                f"({'Shard(0)' if sharded else 'Replicate'})"
            )
    if isinstance(class_weight, dtensor) and (
            class_weight.device_mesh != mesh
            or not (tuple(class_weight.placements) == replicate or class_weight.placements[0].is_shard(0))):
        raise ValueError(
            f"`class_weight` is {_describe(class_weight)}; it must be a plain (C,) tensor or a DTensor on the "
            f"weight's mesh, Replicate or Shard(0)"
        )
    if isinstance(target, dtensor) and (layout == "data_parallel" or target.device_mesh != mesh
                                        or tuple(target.placements) != replicate):
        raise ValueError(
            f"`target` is {_describe(target)}; it must be a plain tensor, or a Replicate DTensor on the weight's "
            f"mesh when `hidden` is one"
        )
    if layout == "tensor_parallel":
        ranks = mesh.mesh.reshape(-1).tolist()
        if ranks != sorted(ranks):
            raise ValueError(
                f"the vocab-parallel loss needs the mesh's ranks in increasing order (its slices follow the "
                f"process group's rank order), but the mesh is {ranks}"
            )
    return layout


def _gathered(tensor):
    """The full tensor of a DTensor on every rank; backward turns its gradient into the average over ranks."""
    from torch.distributed.tensor import Partial, Replicate

    return tensor.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial("avg")])


def linear_cross_entropy_dtensor(hidden, weight, target, *, bias, class_weight, impl, inplace_backward,
                                 **options) -> torch.Tensor:
    """:func:`~softmaxkit.linear_cross_entropy` with DTensor inputs (see the module docstring)."""
    from torch.distributed.tensor import DTensor, Replicate

    from .linear_cross_entropy import linear_cross_entropy

    layout = _placements(hidden, weight, target, bias, class_weight)
    mesh = weight.device_mesh
    if layout == "data_parallel":
        if isinstance(class_weight, DTensor):
            class_weight = class_weight.full_tensor()
        return linear_cross_entropy(
            hidden, _gathered(weight), target, bias=None if bias is None else _gathered(bias),
            class_weight=class_weight, impl=impl, inplace_backward=inplace_backward, **options,
        )
    local_target = target.to_local() if isinstance(target, DTensor) else target
    if layout == "replicated":
        if isinstance(class_weight, DTensor):
            class_weight = class_weight.full_tensor()
        loss = linear_cross_entropy(
            hidden.to_local(), weight.to_local(), local_target, bias=None if bias is None else bias.to_local(),
            class_weight=class_weight, impl=impl, inplace_backward=inplace_backward, **options,
        )
        return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
    # tensor parallel: the vocab-parallel algorithm over the mesh's group, the weight never gathered
    if impl not in ("auto", "torch"):
        raise ValueError(
            f"`impl={impl!r}` cannot serve a Shard(0) DTensor `weight` with a Replicate `hidden`: the "
            f"vocab-parallel loss is the chunked PyTorch path; pass impl='auto' or 'torch'"
        )
    if local_target.is_floating_point() and local_target.dim() == hidden.dim():
        raise ValueError(
            "class-probability targets are not supported with a Shard(0) DTensor `weight` and a Replicate "
            "`hidden` (the vocab-parallel loss takes class indices); pass class indices, or a plain `hidden`"
        )
    local_weight = weight.to_local()
    if class_weight is not None:
        if isinstance(class_weight, DTensor) and not tuple(class_weight.placements) == (Replicate(),):
            class_weight = class_weight.to_local()
        else:
            full = class_weight.to_local() if isinstance(class_weight, DTensor) else class_weight
            if full.dim() != 1 or full.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"`class_weight` must be a 1-d tensor with one entry per class ({weight.shape[0]}), but has "
                    f"shape {tuple(full.shape)}"
                )
            # this rank's rows: chunk of the global class dimension, in mesh order (DTensor's Shard layout)
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            _, (offset, *_) = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
            class_weight = full[offset: offset + local_weight.shape[0]]
    loss = vocab_parallel_linear(hidden.to_local(), local_weight, local_target, mesh.get_group(),
                           None if bias is None else bias.to_local(), class_weight, weight.shape[0], **options)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def vocab_parallel_linear(hidden, weight_shard, target, group, bias_shard, class_weight, num_classes, *,
                          weight_name="weight", ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                          temperature=1.0, softcap=None, chunk_size=None, accumulation_dtype=None) -> torch.Tensor:
    """The vocab-parallel linear cross-entropy of this rank's weight rows ``weight_shard`` over ``group``,
    validated (the one body of :func:`softmaxkit.distributed.vocab_parallel_linear_cross_entropy` and of the
    tensor-parallel DTensor path). ``num_classes``: the expected total (None: whatever the slices add up to);
    ``weight_name`` names the weight in errors."""
    from .._core import CrossEntropyOptions, autocast_linear_inputs
    from .._core.collectives import GroupReduce, shard_layout
    from .._core.linear import ChunkedLinearCrossEntropy

    hidden, weight_shard, bias_shard = v.check_linear_inputs(hidden, weight_shard, bias_shard, weight_name=weight_name)
    target = v.check_tensor("target", target)
    v.check_target_dtype(target)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    v.check_same_device("target", target, "hidden", hidden)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"`target` must have shape {tuple(hidden.shape[:-1])} (one class index per row of `hidden`), but has "
            f"shape {tuple(target.shape)}"
        )
    chunk_size = v.check_optional_positive_int("chunk_size", chunk_size)
    accumulation_dtype = v.check_accumulation_dtype(accumulation_dtype, weight_shard.dtype)
    class_weight = v.check_class_weight(class_weight, weight_shard.shape[0], hidden, name="class_weight")
    grad_on = torch.is_grad_enabled()
    num_classes = v.check_optional_positive_int("num_classes", num_classes)
    offset, total = shard_layout(weight_shard.shape[0], target, hidden.shape[-1], chunk_size, num_classes, group,
                                 weight_name, (class_weight is not None, grad_on and hidden.requires_grad,
                                            grad_on and (weight_shard.requires_grad or (
                                                bias_shard is not None and bias_shard.requires_grad))))
    v.check_class_target(target, total, ignore_index)
    options = CrossEntropyOptions(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=v.check_label_smoothing(label_smoothing),
        temperature=v.check_positive("temperature", temperature), z_loss=v.check_non_negative("z_loss", z_loss),
        softcap=v.check_softcap(softcap), chunk_size=chunk_size, accumulation_dtype=accumulation_dtype,
        num_classes=total, class_offset=offset,
    )
    # linear_cross_entropy's autocast rule: the matmuls in the autocast dtype, the loss computed in fp32
    hidden, weight_shard, bias_shard, autocast = autocast_linear_inputs(hidden, weight_shard, bias_shard)
    with torch.autocast(hidden.device.type, enabled=False):
        loss = ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, target.reshape(-1), class_weight,
            options, GroupReduce(group), grad_on,
        )
    loss = loss.float() if autocast else loss.to(hidden.dtype)
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss
