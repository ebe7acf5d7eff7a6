r"""DTensor inputs to the losses: each placement of a 1-D device mesh mapped to the algorithm that serves it.

``cross_entropy``, ``focal_loss``, ``poly1_cross_entropy``, ``distillation_loss``, ``sparsemax_loss``,
``entmax15_loss``, ``entmax_bisect_loss``, ``sampled_softmax_loss``, ``linear_cross_entropy`` (its own adapter,
:mod:`._dtensor_linear`) and the maps ``sparsemax``, ``entmax15``, ``entmax_bisect`` call :func:`holds_dtensor` first (a dictionary look-up while
``torch.distributed.tensor`` was never imported, so plain-tensor calls pay nothing) and hand DTensor calls to
this module, which unwraps them, runs the plain-tensor code on each rank's local piece and wraps the result:

* **class dimension sharded** (``Shard(1)`` of ``(N, C)`` / ``(N, C, d1, ...)``, ``Shard(0)`` of ``(C,)``):
  for cross-entropy the vocab-parallel algorithm (the dispatch row ``vocab_parallel_cross_entropy``),
  for ``focal_loss``, ``poly1_cross_entropy`` and ``distillation_loss`` the same row statistics (global
  LSE, target logit, sums over classes) through :func:`~softmaxkit._core.collectives.sum_over` and
  :func:`~softmaxkit._core.collectives.replicated_grad`, for ``sparsemax_loss`` / ``entmax15_loss`` and the
  maps ``sparsemax`` / ``entmax15`` (``Shard(dim)``) the exact threshold searched across ranks
  (:mod:`softmaxkit._core.sparse_parallel`), over ``mesh.get_group()``; only per-row statistics cross ranks,
  the logits are never gathered (``entmax_bisect_loss`` and ``entmax_bisect`` refuse this placement). Each rank's
  class offset comes from the DTensor's own layout (``torch.chunk`` sizes, uneven and empty slices included).
  The target must be replicated (a plain tensor or a ``Replicate`` DTensor); a ``(C,)`` class weight may be
  whole (each rank reads its slice) or a ``Shard(0)`` DTensor (its local slice is used).
* **a row dimension sharded** (``Shard(0)``, or a spatial ``Shard(d ≥ 2)`` of K-dimensional logits): each rank
  computes the summed loss of its rows; ``"mean"`` divides the sum over ranks by the summed weight of the
  non-ignored targets over ranks (PyTorch's weighted mean, 0 when every target is ignored): one all-reduce
  of two numbers. ``"none"`` returns the per-element loss sharded like the rows. The target is a DTensor
  sharded the same way, or replicated (then each rank reads its rows).
* ``Replicate``: computed on the local (whole) tensor.

Scalars come back as ``Replicate`` DTensors (already reduced, the same number on every rank); gradients come
back as DTensors with the input's placements. Replicated tensors that take a gradient (``entmax_bisect``'s
``alpha``, ``sampled_softmax_loss``'s ``weight`` and ``bias``) get the gradient summed over the ranks when the
rows are sharded. Anything else (a 2-D mesh, ``Partial`` inputs, a sharding with no algorithm here) raises a
``ValueError`` naming the placement, on every rank alike (placements are the same everywhere). Checks of the
local data (target values, shapes of plain tensors) run before the first collective and one all-gather of
a flag lets every rank raise when one of them fails, instead of waiting for it.

The custom ops themselves are not given DTensor sharding rules (``register_sharding``): the functions unwrap
DTensors before any op runs, and the rules such a registration can state (each output placement a function
of the input placements, computed by running the op on local shards) cannot express either algorithm above:
the vocab-parallel loss needs collectives between the ops of one call, and a batch-sharded ``"mean"`` needs
the global denominator (a local mean marked ``Partial("avg")``, PyTorch's own choice for
``F.cross_entropy``, is off as soon as targets are ignored, weighted or unevenly sharded).
"""

from __future__ import annotations

import math
import sys

import torch

from .. import _validation as v


def holds_dtensor(*tensors: object) -> bool:
    """Whether any argument is a ``torch.distributed.tensor.DTensor`` (without importing that package: no
    DTensor can exist before it is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    dtensor = module.DTensor
    return any(isinstance(t, dtensor) for t in tensors)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


class _Layout:
    """The mesh and placement of the main input (``logits`` / ``hidden``) and this rank's piece of it."""

    def __init__(self, name: str, tensor: object, function: str, class_dim: int | None):
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        dtensor = _dtensor_type()
        if not isinstance(tensor, dtensor):
            raise TypeError(
                f"`{name}` of {function} must be a DTensor when another tensor argument is one (plain tensors are "
                f"read as replicated), but is a {type(tensor).__name__}; make it a DTensor on the same device "
                "mesh (DTensor.from_local or distribute_tensor)"
            )
        self.name, self.function, self.tensor = name, function, tensor
        self.mesh, self.placements = tensor.device_mesh, tuple(tensor.placements)
        if self.mesh.ndim != 1:
            raise ValueError(
                f"`{name}` of {function} is a DTensor on a {self.mesh.ndim}-D device mesh with placements "
                f"{self.placements}; DTensor inputs are served on 1-D meshes (placements Shard(d) or Replicate())"
            )
        placement = self.placements[0]
        self.placement = placement
        if placement.is_replicate():
            self.dim = None
        elif placement.is_shard() and type(placement) is Shard:
            self.dim = placement.dim + tensor.dim() if placement.dim < 0 else placement.dim
        else:
            raise ValueError(
                f"`{name}` of {function} is a DTensor with placement {placement}, which cannot be served: pass "
                "Shard(d) or Replicate() (reduce a Partial tensor first: .redistribute(placements=[Replicate()]))"
            )
        self.class_dim = class_dim
        self.group = self.mesh.get_group()
        self.local = tensor.to_local()
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, self.mesh, self.placements)
        self.local_shape, self.offset = tuple(shape), tuple(offset)

    @property
    def replicated(self) -> bool:
        return self.dim is None

    @property
    def class_sharded(self) -> bool:
        return self.dim is not None and self.dim == self.class_dim

    def refuse(self, supported: str) -> ValueError:
        return ValueError(
            f"`{self.name}` of {self.function} is a DTensor with placement {self.placement} (sharded along its "
            f"class dimension, dim {self.dim}), which {self.function} does not serve; supported: {supported}"
        )

    def rows(self, tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
        """This rank's rows of a replicated ``tensor`` whose dim ``dim`` runs along the sharded row dim."""
        if self.dim is None or dim is None:
            return tensor
        return tensor.narrow(dim, self.offset[self.dim], self.local_shape[self.dim])

    def replicated_input(self, name: str, tensor, dim: int | None = None, whole: bool = False):
        """The local tensor of an argument that is replicated, or sharded like the main input along ``dim``.

        Plain tensors and ``Replicate`` DTensors are whole on every rank: with sharded rows their gradient is
        summed over the ranks, and ``dim`` (when given and of the rows' extent) is narrowed to this rank's rows.
        A DTensor sharded like the main input (``Shard(dim)``) gives its local piece. ``whole``: a ``Shard``
        DTensor is gathered (for small per-class vectors).
        """
        if tensor is None or not isinstance(tensor, torch.Tensor):
            return tensor
        dtensor = _dtensor_type()
        if isinstance(tensor, dtensor):
            self.same_mesh(name, tensor)
            placement = tensor.placements[0]
            if placement.is_shard():
                tensor_dim = placement.dim + tensor.dim() if placement.dim < 0 else placement.dim
                if (dim is not None and tensor_dim == dim and self.dim is not None and not self.class_sharded
                        and tensor.shape[dim] == self.tensor.shape[self.dim]):
                    return tensor.to_local()
                if whole:
                    return tensor.full_tensor()
                expected = "Replicate()" if self.dim is None or dim is None else f"Replicate() or Shard({dim})"
                raise ValueError(
                    f"`{name}` of {self.function} is a DTensor with placement {placement}; with `{self.name}` "
                    f"placed {self.placement} it must be {expected} (or a plain tensor, read as replicated)"
                )
            if not placement.is_replicate():
                raise ValueError(
                    f"`{name}` of {self.function} is a DTensor with placement {placement}, which cannot be served: "
                    "pass Replicate() or a plain tensor"
                )
            tensor = tensor.to_local()
        if self.dim is None or self.class_sharded:
            return tensor
        from .._core.collectives import replicated_grad

        tensor = replicated_grad(tensor, self.group)
        if dim is not None and tensor.dim() > dim and tensor.shape[dim] == self.tensor.shape[self.dim]:
            return self.rows(tensor, dim)
        return tensor

    def same_mesh(self, name: str, tensor) -> None:
        if tensor.device_mesh != self.mesh:
            raise ValueError(
                f"`{name}` of {self.function} is a DTensor on another device mesh ({tensor.device_mesh}) than "
                f"`{self.name}` ({self.mesh}); put both on the same 1-D mesh"
            )
        if tensor.device_mesh.ndim != 1:
            raise ValueError(
                f"`{name}` of {self.function} is a DTensor on a {tensor.device_mesh.ndim}-D device mesh with "
                f"placements {tuple(tensor.placements)}; DTensor inputs are served on 1-D meshes"
            )

    def wrap(self, loss: torch.Tensor, reduction: str, out_shape: tuple[int, ...], out_dim: int | None):
        """A local result as a DTensor: ``Replicate`` for scalars and replicated rows, ``Shard(out_dim)``
        for a ``"none"`` loss of sharded rows."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if reduction == "none" and self.dim is not None and not self.class_sharded:
            return DTensor.from_local(loss, self.mesh, [Shard(out_dim)], run_check=False, shape=torch.Size(out_shape),
                                      stride=_contiguous_strides(out_shape))
        return DTensor.from_local(loss, self.mesh, [Replicate()], run_check=False)

    def over_rows(self, reduction: str, local_loss, out_shape: tuple[int, ...], out_dim: int | None):
        """Run ``local_loss(reduction) -> (loss, denominator)`` on this rank's rows and reduce over the mesh."""
        from .._core.collectives import global_reduce, raise_together

        if self.dim is None:
            return self.wrap(local_loss(reduction)[0], reduction, out_shape, out_dim)
        error = None
        try:
            loss, denominator = local_loss("none" if reduction == "none" else "sum")
        except Exception as caught:  # re-raised on this rank once every rank has been told
            error = caught
        raise_together(error, self.group, self.local.device)
        if reduction != "none":
            loss = global_reduce(loss, denominator, self.group, reduction)
        return self.wrap(loss, reduction, out_shape, out_dim)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _class_dim(logits) -> int:
    return 0 if logits.dim() == 1 else 1


def _target_dim(layout: _Layout, probabilities: bool) -> int | None:
    """The target's dimension that runs along the logits' sharded row dimension."""
    if layout.dim is None or layout.class_sharded:
        return None
    if probabilities or layout.dim == 0:
        return layout.dim
    return layout.dim - 1


def _out_shape(logits) -> tuple[int, ...]:
    return () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])


def _index_denominator(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, dtype) -> torch.Tensor:
    from .._reduction import target_weight

    return target_weight(target, weight, ignore_index, dtype)[0].sum()


def _rows_denominator(logits: torch.Tensor) -> torch.Tensor:
    rows = logits.numel() // max(logits.shape[_class_dim(logits)], 1) if logits.dim() > 1 else 1
    return torch.tensor(float(rows), dtype=torch.float64, device=logits.device)


def _work(dtype):
    from .._core import compute_dtype

    return compute_dtype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# cross_entropy


def cross_entropy(logits, target, *, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap,
                  impl, inplace_backward, chunk_size):
    """:func:`softmaxkit.cross_entropy` of DTensor inputs (module docstring)."""
    from .cross_entropy import _check_target_shape
    from .cross_entropy import cross_entropy as local_cross_entropy

    layout, reduction = _loss_layout(logits, "cross_entropy", reduction)
    if layout.class_sharded:
        return _vocab_parallel(layout, logits, target, weight, ignore_index, reduction, label_smoothing,
                               temperature, z_loss, softcap, impl, inplace_backward, chunk_size)
    weight_local = layout.replicated_input("weight", weight, whole=True)  # may gather: outside the local checks
    local_logits = layout.local

    def local_loss(local_reduction):
        # per-rank checks (a plain target is each rank's own): inside the part every rank reports on
        v.check_tensor("target", target)
        probabilities = _check_target_shape(logits, target)  # global shapes (a DTensor's shape is the global one)
        target_local = layout.replicated_input("target", target, _target_dim(layout, probabilities))
        loss = local_cross_entropy(
            local_logits, target_local, weight=weight_local, ignore_index=ignore_index, reduction=local_reduction,
            label_smoothing=label_smoothing, temperature=temperature, z_loss=z_loss, softcap=softcap, impl=impl,
            inplace_backward=inplace_backward, chunk_size=chunk_size,
        )
        if probabilities:
            return loss, _rows_denominator(local_logits)
        return loss, _index_denominator(target_local, weight_local, ignore_index, _work(local_logits.dtype))

    return layout.over_rows(reduction, local_loss, _out_shape(logits), _target_dim(layout, False))


def _vocab_parallel_rows(rows, target, weight, options, group):
    """The vocab-parallel cross-entropy of this rank's class slice ``rows`` ``(M, C_r)``, through the dispatch
    table's ``vocab_parallel_cross_entropy`` row (the C kernel on plain CPU tensors, else chunked torch ops)."""
    from .. import backends
    from .._core.collectives import GroupReduce

    implementation = backends.select("vocab_parallel_cross_entropy", "auto", backends.Request.of(rows, target, weight))
    return implementation.resolve()(rows, target, weight, options, GroupReduce(group))


def _class_rows(layout: _Layout) -> torch.Tensor:
    """The local logits as ``(M, C_local)`` rows (class dim last), also when this rank holds no class."""
    local, class_dim = layout.local, layout.class_dim
    rows_count = math.prod(s for d, s in enumerate(local.shape) if d != class_dim)
    return local.movedim(class_dim, -1).reshape(rows_count, local.shape[class_dim])


def _vocab_parallel(layout, logits, target, weight, ignore_index, reduction, label_smoothing, temperature, z_loss,
                    softcap, impl, inplace_backward, chunk_size):
    from .._core import CrossEntropyOptions
    from .._core.collectives import raise_together
    from .cross_entropy import _check_target_shape, check_bool

    num_classes = logits.shape[layout.class_dim]
    if impl not in ("auto", "torch"):
        raise ValueError(
            f"`impl={impl!r}` cannot serve logits sharded along the class dimension (placement "
            f"{layout.placement}): they take the vocab-parallel chunked PyTorch path; pass impl='auto' or 'torch'"
        )
    if check_bool("inplace_backward", inplace_backward):
        raise ValueError(
            f"`inplace_backward=True` is not available for logits sharded along the class dimension (placement "
            f"{layout.placement}); pass inplace_backward=False"
        )
    weight_kind = _class_vector_kind(layout, "weight", weight, "cross_entropy")
    error, digest, weight_local, target_local, options = None, 0, None, None, None
    try:
        v.check_tensor("target", target)
        if _check_target_shape(logits, target):
            raise ValueError(
                f"class-probability targets are not served with logits sharded along the class dimension "
                f"(placement {layout.placement}); pass class indices, or shard the rows (Shard(0)) instead"
            )
        options = CrossEntropyOptions(
            ignore_index=v.check_int("ignore_index", ignore_index), reduction=reduction,
            label_smoothing=v.check_label_smoothing(label_smoothing),
            temperature=v.check_positive("temperature", temperature), z_loss=v.check_non_negative("z_loss", z_loss),
            softcap=v.check_softcap(softcap), chunk_size=v.check_optional_positive_int("chunk_size", chunk_size),
            num_classes=num_classes, class_offset=layout.offset[layout.class_dim],
        )
        target_local, digest = _class_sharded_target(layout, logits, target, options.ignore_index, "cross_entropy",
                                                     check_shape=False)  # _check_target_shape above
        weight_local = _class_vector_slice(layout, "weight", weight, weight_kind, num_classes,
                                           _weight_check(layout.local))
    except Exception as caught:  # re-raised on this rank once every rank has been told
        error = caught
    raise_together(error, layout.group, layout.local.device, digest)
    loss = _vocab_parallel_rows(_class_rows(layout), target_local.reshape(-1), weight_local, options,
                                layout.group)
    if reduction == "none":
        loss = loss.reshape(target_local.shape)
    return layout.wrap(loss, reduction, tuple(target_local.shape), None)


def _sharded_fenchel_young(layout, logits, target, kind, weight, ignore_index, reduction, temperature, impl,
                           function):
    """Sparsemax / 1.5-entmax loss of class-sharded logits (:mod:`softmaxkit._core.sparse_parallel`)."""
    from .._core.collectives import raise_together
    from .._core.sparse_parallel import ShardedFenchelYoung

    if impl not in ("auto", "torch"):
        raise ValueError(
            f"`impl={impl!r}` cannot serve logits sharded along the class dimension (placement "
            f"{layout.placement}): they take the class-sharded PyTorch path; pass impl='auto' or 'torch'"
        )
    weight_kind = _class_vector_kind(layout, "weight", weight, function)
    error, digest, weight_local, target_local = None, 0, None, None
    try:
        ignore_index = v.check_int("ignore_index", ignore_index)
        temperature = v.check_positive("temperature", temperature)
        target_local, digest = _class_sharded_target(layout, logits, target, ignore_index, function)
        weight_local = _class_vector_slice(layout, "weight", weight, weight_kind, logits.shape[layout.class_dim],
                                           _weight_check(layout.local))
    except Exception as caught:  # re-raised on this rank once every rank has been told
        error = caught
    raise_together(error, layout.group, layout.local.device, digest)
    rows = _class_rows(layout)
    if temperature != 1.0:
        rows = rows.to(_work(rows.dtype)) / temperature
    loss = ShardedFenchelYoung.apply(rows, target_local.reshape(-1), weight_local, kind,
                                     layout.offset[layout.class_dim], ignore_index, reduction, layout.group)
    loss = loss.to(logits.dtype)
    if reduction == "none":
        loss = loss.reshape(target_local.shape)
    return layout.wrap(loss, reduction, tuple(target_local.shape), None)


# ---------------------------------------------------------------------------------------------------------------
# focal loss, the sparse losses, sampled softmax


def focal_loss(logits, target, *, gamma, alpha, weight, ignore_index, reduction, label_smoothing, temperature):
    """:func:`softmaxkit.focal_loss` of DTensor inputs: ``Shard`` of a row dimension or ``Replicate``."""
    from .cross_entropy import _check_target_shape
    from .focal import focal_loss as local_focal_loss

    layout, reduction = _loss_layout(logits, "focal_loss", reduction)
    if layout.class_sharded:
        _refuse_probability_target(layout, logits, target)
        return _focal_class_sharded(layout, logits, target, gamma, alpha, weight, ignore_index, reduction,
                                    label_smoothing, temperature)
    alpha_local = layout.replicated_input("alpha", alpha, whole=True)
    weight_local = layout.replicated_input("weight", weight, whole=True)
    local_logits = layout.local

    def local_loss(local_reduction):
        v.check_tensor("target", target)
        probabilities = _check_target_shape(logits, target)
        target_local = layout.replicated_input("target", target, _target_dim(layout, probabilities))
        loss = local_focal_loss(local_logits, target_local, gamma=gamma, alpha=alpha_local, weight=weight_local,
                                ignore_index=ignore_index, reduction=local_reduction, label_smoothing=label_smoothing,
                                temperature=temperature)
        if probabilities:
            return loss, _rows_denominator(local_logits)
        return loss, _index_denominator(target_local, weight_local, ignore_index, _work(local_logits.dtype))

    return layout.over_rows(reduction, local_loss, _out_shape(logits), _target_dim(layout, False))


def _loss_layout(logits, function_name: str, reduction):
    """The logits' :class:`_Layout` (class dimension set) and the checked ``reduction``: every loss's start."""
    layout = _Layout("logits", logits, function_name, None)
    if logits.dim() == 0:
        raise ValueError("`logits` must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...), but is 0-d")
    layout.class_dim = _class_dim(logits)
    return layout, v.check_reduction(reduction)


def _refuse_probability_target(layout, logits, target) -> None:
    """Class-sharded focal and Poly-1 take class indices only (the same answer on every rank: metadata)."""
    if _probability_target(logits, target):
        raise ValueError(
            f"class-probability targets are not served with logits sharded along the class dimension "
            f"(placement {layout.placement}); pass class indices, or shard the rows (Shard(0)) instead"
        )


def _probability_target(logits, target) -> bool:
    """Whether ``target`` holds class probabilities (the logits' shape, floating): global metadata, the same
    answer on every rank."""
    return (isinstance(target, torch.Tensor) and target.is_floating_point()
            and tuple(target.shape) == tuple(logits.shape))


def poly1_cross_entropy(logits, target, *, epsilon, weight, ignore_index, reduction, label_smoothing, temperature):
    """:func:`softmaxkit.poly1_cross_entropy` of DTensor inputs: class-sharded (the vocab-parallel
    cross-entropy plus the all-reduced ``p_y``), a row dimension sharded, or ``Replicate``."""
    from .cross_entropy import _check_target_shape
    from .focal import poly1_cross_entropy as local_poly1

    layout, reduction = _loss_layout(logits, "poly1_cross_entropy", reduction)
    if layout.class_sharded:
        _refuse_probability_target(layout, logits, target)
        return _poly1_class_sharded(layout, logits, target, epsilon, weight, ignore_index, reduction,
                                    label_smoothing, temperature)
    weight_local = layout.replicated_input("weight", weight, whole=True)
    local_logits = layout.local

    def local_loss(local_reduction):
        v.check_tensor("target", target)
        probabilities = _check_target_shape(logits, target)
        target_local = layout.replicated_input("target", target, _target_dim(layout, probabilities))
        loss = local_poly1(local_logits, target_local, epsilon=epsilon, weight=weight_local,
                           ignore_index=ignore_index, reduction=local_reduction, label_smoothing=label_smoothing,
                           temperature=temperature)
        if probabilities:
            return loss, _rows_denominator(local_logits)
        return loss, _index_denominator(target_local, weight_local, ignore_index, _work(local_logits.dtype))

    return layout.over_rows(reduction, local_loss, _out_shape(logits), _target_dim(layout, False))


def fenchel_young_loss(function_name: str, local_function, logits, target, *, alpha=None, weight, ignore_index,
                       reduction, **options):
    """``sparsemax_loss`` / ``entmax15_loss`` / ``entmax_bisect_loss`` of DTensor inputs (rows or Replicate)."""
    layout, reduction = _loss_layout(logits, function_name, reduction)
    if layout.class_sharded:
        if function_name == "entmax_bisect_loss":
            raise layout.refuse(
                "Shard(0) (rows), Shard(d >= 2) of K-dimensional logits or Replicate() (sparsemax_loss and "
                "entmax15_loss also serve class-sharded logits; the α-entmax bisection does not)"
            )
        kind = "sparsemax" if function_name == "sparsemax_loss" else "entmax15"
        return _sharded_fenchel_young(layout, logits, target, kind, weight, ignore_index, reduction,
                                      options.get("temperature", 1.0), options.get("impl", "auto"), function_name)
    weight_local = layout.replicated_input("weight", weight, whole=True)
    extra = {}
    if isinstance(alpha, torch.Tensor):
        # α broadcasts against the logits from the right: its dim along the sharded rows, if it has one
        alpha_dim = None if layout.dim is None else layout.dim - (logits.dim() - alpha.dim())
        extra["alpha"] = layout.replicated_input("alpha", alpha, alpha_dim if alpha_dim is not None and alpha_dim >= 0
                                                 else None)
    elif alpha is not None:
        extra["alpha"] = alpha
    local_logits = layout.local

    def local_loss(local_reduction):
        v.check_class_index_target(logits, target, function_name)  # global shapes and dtype
        target_local = layout.replicated_input("target", target, _target_dim(layout, False))
        loss = local_function(local_logits, target_local, weight=weight_local, ignore_index=ignore_index,
                              reduction=local_reduction, **extra, **options)
        return loss, _index_denominator(target_local, weight_local, ignore_index, _work(local_logits.dtype))

    return layout.over_rows(reduction, local_loss, _out_shape(logits), _target_dim(layout, False))


def sampled_softmax_loss(hidden, weight, target, *, bias, counts, reduction, ignore_index, **options):
    """:func:`softmaxkit.sampled_softmax_loss` of DTensor inputs: ``hidden`` sharded on a row dim or Replicate;
    ``weight``, ``bias`` and ``counts`` replicated (plain tensors or ``Replicate`` DTensors)."""
    from .sampled import sampled_softmax_loss as local_sampled

    layout = _Layout("hidden", hidden, "sampled_softmax_loss", None)
    if hidden.dim() < 1:
        raise ValueError(f"`hidden` must have shape (..., D), but has shape {tuple(hidden.shape)}")
    if layout.dim is not None and layout.dim == hidden.dim() - 1:
        raise ValueError(
            f"`hidden` of sampled_softmax_loss is a DTensor with placement {layout.placement} (its feature "
            "dimension sharded), which sampled_softmax_loss does not serve; supported: Shard(d) of a row "
            "dimension (d < hidden.dim() - 1) or Replicate()"
        )
    reduction = v.check_reduction(reduction)
    for name, value in (("weight", weight), ("bias", bias), ("counts", counts)):
        if isinstance(value, _dtensor_type()) and not value.placements[0].is_replicate():
            layout.same_mesh(name, value)
            raise ValueError(
                f"`{name}` of sampled_softmax_loss is a DTensor with placement {value.placements[0]}, which "
                "sampled_softmax_loss does not serve: the sampled classes are drawn from the whole vocabulary, so "
                f"`{name}` must be Replicate() or a plain tensor"
            )
    target_dim = layout.dim
    weight_local = layout.replicated_input("weight", weight)
    bias_local = layout.replicated_input("bias", bias)
    counts_local = layout.replicated_input("counts", counts)
    local_hidden = layout.local

    def local_loss(local_reduction):
        v.check_tensor("target", target)
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"`target` must have shape {tuple(hidden.shape[:-1])} (one class index per row of `hidden`), but "
                f"has shape {tuple(target.shape)}"
            )
        target_local = layout.replicated_input("target", target, target_dim)
        loss = local_sampled(local_hidden, weight_local, target_local, bias=bias_local, counts=counts_local,
                             reduction=local_reduction, ignore_index=ignore_index, **options)
        valid = (target_local != ignore_index).sum().to(torch.float64)
        return loss, valid

    return layout.over_rows(reduction, local_loss, tuple(hidden.shape[:-1]), target_dim)


# ---------------------------------------------------------------------------------------------------------------
# class-sharded row statistics: focal, Poly-1, distillation (autograd through sum_over / replicated_grad)


class _FocalTerm(torch.autograd.Function):
    """Elementwise ``f(log p) = −(1 − p)^γ log p`` with the safe derivative ``df/dlog p = (1 − p)^γ (γ r − 1)``
    of :func:`softmaxkit.backends.torch.focal.focal_terms` (finite at ``p = 1`` for every ``γ >= 0``)."""

    @staticmethod
    def forward(ctx, log_p, gamma: float):
        from ..backends.torch.focal import focal_terms

        term, coefficient = focal_terms(log_p, gamma)
        ctx.save_for_backward(coefficient)
        return term

    @staticmethod
    def backward(ctx, grad_output):
        (coefficient,) = ctx.saved_tensors
        return grad_output * coefficient, None


def _class_vector_kind(layout: _Layout, name: str, vector, function: str) -> str | None:
    """How a ``(C,)`` per-class vector of class-sharded logits is read: None (absent), ``"whole"`` (a plain
    tensor or a Replicate DTensor: this rank narrows it to its classes) or ``"slice"`` (a Shard(0) DTensor).
    Placement errors are the same on every rank."""
    if vector is None or not isinstance(vector, _dtensor_type()):
        return None if vector is None else "whole"
    layout.same_mesh(name, vector)
    placement = vector.placements[0]
    if placement.is_shard() and vector.dim() == 1 and placement.dim in (0, -1):
        return "slice"
    if placement.is_replicate():
        return "whole"
    raise ValueError(
        f"`{name}` of {function} is a DTensor with placement {placement}; with `logits` placed {layout.placement} "
        "it must be Shard(0) (each rank its classes' entries), Replicate() or a plain (C,) tensor"
    )


def _class_vector_slice(layout: _Layout, name: str, vector, kind, num_classes: int, check):
    """This rank's classes of a per-class vector (``check(name, tensor, size)`` validates it; per-rank
    checks: call inside the part every rank reports on)."""
    if kind is None:
        return None
    local_classes, offset = layout.local.shape[layout.class_dim], layout.offset[layout.class_dim]
    if kind == "slice":
        if tuple(vector.shape) != (num_classes,):
            raise ValueError(f"`{name}` must have shape ({num_classes},), one entry per class, but has shape "
                             f"{tuple(vector.shape)}")
        return check(name, vector.to_local(), local_classes)
    whole = vector.to_local() if isinstance(vector, _dtensor_type()) else vector
    return check(name, whole, num_classes).narrow(0, offset, local_classes)


def _class_sharded_target(layout: _Layout, logits, target, ignore_index: int, function: str,
                          check_shape: bool = True):
    """The replicated class-index target of class-sharded logits, checked, and its digest (per-rank checks)."""
    from .._core.collectives import fingerprint

    if check_shape:
        v.check_class_index_target(logits, target, function)  # global shapes and dtype
    target = v.check_tensor("target", target)
    if isinstance(target, _dtensor_type()):
        layout.same_mesh("target", target)
        if not target.placements[0].is_replicate():
            raise ValueError(
                f"`target` of {function} is a DTensor with placement {target.placements[0]}; with `logits` placed "
                f"{layout.placement} (class-sharded) it must be Replicate() or a plain tensor, the same on every rank"
            )
        target = target.to_local()
    v.check_same_device("target", target, "logits", layout.local)
    v.check_class_target(target, logits.shape[layout.class_dim], ignore_index)
    return target, fingerprint(target)


class _ShardedRows:
    """Class-sharded logits as ``(M, C_local)`` rows in the compute dtype, divided by ``T``, ignored rows zeroed,
    with the global LSE and the target's logit (all-reduced, differentiable)."""

    def __init__(self, layout: _Layout, target, ignore_index: int, temperature: float):
        from .._core.collectives import sharded_logsumexp, sum_over

        rows = _class_rows(layout)
        work = _work(rows.dtype)
        self.group, self.work = layout.group, work
        self.target = target.reshape(-1)
        self.valid = self.target != ignore_index
        local_classes = rows.shape[1]
        local = self.target.long() - layout.offset[layout.class_dim]
        self.owned = self.valid & (local >= 0) & (local < local_classes)
        self.local_target = torch.where(self.owned, local, torch.zeros_like(local))
        self.zero = torch.zeros((), dtype=work, device=rows.device)
        z = rows.to(work)
        if temperature != 1.0:
            z = z / temperature
        self.z = torch.where(self.valid[:, None], z, self.zero)  # ignored rows read as 0: loss and gradient 0
        self.lse = sharded_logsumexp(self.z, self.group)
        self.z_y = sum_over(self.pick(self.z), self.group)

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's entry at the target of each row (0 where another rank owns it)."""
        if values.shape[1] == 0:
            return torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
        return torch.where(self.owned, values.gather(1, self.local_target[:, None])[:, 0], self.zero)

    def row_weight(self, class_vector: torch.Tensor | None) -> torch.Tensor:
        """``v_y`` of each valid row (1 without a vector; 0 on ignored rows), the same on every rank."""
        from .._core.collectives import sum_over

        if class_vector is None:
            return self.valid.to(self.work)
        picked = self.pick(class_vector.detach().to(self.work)[None, :].expand(self.z.shape[0], -1))
        return torch.where(self.valid, sum_over(picked, self.group), self.zero)

    def local_log_p(self) -> torch.Tensor:
        """This rank's ``log p`` slice (the replicated LSE used rank-locally: its gradient is summed)."""
        from .._core.collectives import replicated_grad

        return self.z - replicated_grad(self.lse, self.group)[:, None]


def _class_sharded_common(layout: _Layout, logits, target, ignore_index, temperature, function, vectors):
    """Checks of a class-sharded call, reported on every rank: returns ``(target, ignore_index, temperature,
    slices)`` with ``slices`` this rank's pieces of the ``{name: (vector, check)}`` per-class vectors."""
    from .._core.collectives import raise_together

    num_classes = logits.shape[layout.class_dim]
    kinds = {name: _class_vector_kind(layout, name, vector, function) for name, (vector, _) in vectors.items()}
    error, digest, slices = None, 0, {}
    try:
        ignore_index = v.check_int("ignore_index", ignore_index)
        temperature = v.check_positive("temperature", temperature)
        target, digest = _class_sharded_target(layout, logits, target, ignore_index, function)
        for name, (vector, check) in vectors.items():
            slices[name] = _class_vector_slice(layout, name, vector, kinds[name], num_classes, check)
    except Exception as caught:  # re-raised on this rank once every rank has been told
        error = caught
    raise_together(error, layout.group, layout.local.device, digest)
    return target, ignore_index, temperature, slices


def _weight_check(local):
    return lambda name, tensor, size: v.check_class_weight(tensor, size, local, name=name)


def _focal_class_sharded(layout, logits, target, gamma, alpha, weight, ignore_index, reduction, label_smoothing,
                         temperature):
    r"""Focal loss of class-sharded logits. With the global ``LSE`` (two all-reduces) and ``z_y`` (one):
    ``log p_y = z_y − LSE`` on every rank, ``ℓ = (1 − ε) a_y f(log p_y) + (ε/C) Σ_c a_c f(log p_c)``
    (``f(log p) = −(1 − p)^γ log p``, ``a_c = α_c w_c``; the sum over classes one more all-reduce). The gradient
    ``∂ℓ/∂z_j = g_j − p_j Σ_c g_c`` (``g_c = a_c q_c f'(log p_c)``) is local given the LSE and the per-row
    ``Σ_c g_c``: autograd through :func:`~softmaxkit._core.collectives.sum_over` and
    :func:`~softmaxkit._core.collectives.replicated_grad` computes exactly that (one all-reduce of ``N``
    numbers in backward, only with label smoothing)."""
    from .._core.collectives import sum_over
    from .._reduction import reduce_loss

    gamma = v.check_non_negative("gamma", gamma)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    local = layout.local
    alpha_check = lambda name, tensor, size: v.check_class_vector(name, tensor, size, local, minimum=0.0)  # noqa: E731
    target, ignore_index, temperature, slices = _class_sharded_common(
        layout, logits, target, ignore_index, temperature, "focal_loss",
        {"alpha": (alpha, alpha_check), "weight": (weight, _weight_check(local))})
    alpha_local, weight_local = slices["alpha"], slices["weight"]
    rows = _ShardedRows(layout, target, ignore_index, temperature)
    work, zero = rows.work, rows.zero
    if alpha_local is None:
        scale = None if weight_local is None else weight_local.to(work)
    else:
        scale = alpha_local.to(work) if weight_local is None else alpha_local.to(work) * weight_local.to(work)
    num_classes = logits.shape[layout.class_dim]
    s_y = rows.row_weight(scale)
    w_y = rows.row_weight(weight_local)
    loss = torch.zeros_like(s_y)
    if label_smoothing < 1:
        term_y = _FocalTerm.apply(rows.z_y - rows.lse, gamma)
        loss = torch.where(s_y == 0, zero, (1.0 - label_smoothing) * s_y * term_y)
    if label_smoothing > 0:
        terms = _FocalTerm.apply(rows.local_log_p(), gamma)
        if scale is not None:
            terms = torch.where(scale == 0, zero, terms * scale)
        loss = loss + (label_smoothing / num_classes) * sum_over(terms.sum(dim=1), rows.group)
    loss = torch.where(rows.valid, loss, zero)
    loss = reduce_loss(loss, reduction, w_y.sum()).to(logits.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return layout.wrap(loss, reduction, tuple(target.shape), None)


def _poly1_class_sharded(layout, logits, target, epsilon, weight, ignore_index, reduction, label_smoothing,
                         temperature):
    r"""Poly-1 of class-sharded logits: the vocab-parallel cross-entropy (``"none"``) plus
    ``ε w_y (1 − p_t)``, ``p_t = (1 − ε_s) p_y + ε_s/C`` with ``p_y = exp(z_y − LSE)`` from the all-reduced
    row statistics; the polynomial term's gradient ``ε w_y p_y (p − e_y)(1 − ε_s)`` is local given them."""
    from .._core import CrossEntropyOptions
    from .._reduction import reduce_loss

    epsilon = v.check_in_range("epsilon", epsilon, -1.0, math.inf, high_open=True)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    target, ignore_index, temperature, slices = _class_sharded_common(
        layout, logits, target, ignore_index, temperature, "poly1_cross_entropy",
        {"weight": (weight, _weight_check(layout.local))})
    weight_local = slices["weight"]
    num_classes = logits.shape[layout.class_dim]
    options = CrossEntropyOptions(ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing,
                                  temperature=temperature, num_classes=num_classes,
                                  class_offset=layout.offset[layout.class_dim])
    flat_target = target.reshape(-1)
    ce = _vocab_parallel_rows(_class_rows(layout), flat_target, weight_local, options, layout.group)
    rows = _ShardedRows(layout, target, ignore_index, temperature)
    w_y = rows.row_weight(weight_local)
    p_y = torch.exp(rows.z_y - rows.lse)
    p_t = (1.0 - label_smoothing) * p_y + label_smoothing / num_classes
    loss = torch.where(rows.valid, ce.to(rows.work) + epsilon * w_y * (1.0 - p_t), rows.zero)
    loss = reduce_loss(loss, reduction, w_y.sum()).to(logits.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return layout.wrap(loss, reduction, tuple(target.shape), None)


def _piece(layout: _Layout, name: str, tensor):
    """This rank's piece of a tensor shaped like the main input: its local tensor when it is a DTensor placed
    like it; a plain tensor or a ``Replicate`` DTensor is whole on every rank and narrowed to this rank's piece
    (its gradient summed over the ranks, each of which used only its piece)."""
    from .._core.collectives import replicated_grad

    if isinstance(tensor, _dtensor_type()):
        layout.same_mesh(name, tensor)
        if tuple(tensor.placements) == layout.placements:
            return tensor.to_local()
        if not tensor.placements[0].is_replicate():
            raise ValueError(
                f"`{name}` of {layout.function} is a DTensor with placement {tensor.placements[0]}; with "
                f"`{layout.name}` placed {layout.placement} it must be placed the same, Replicate() or a plain tensor"
            )
        tensor = tensor.to_local()
    if layout.dim is None:
        return tensor
    tensor = replicated_grad(tensor, layout.group)
    return tensor.narrow(layout.dim, layout.offset[layout.dim], layout.local_shape[layout.dim])


def _as_rows(local: torch.Tensor, class_dim: int) -> torch.Tensor:
    rows_count = math.prod(s for d, s in enumerate(local.shape) if d != class_dim)
    return local.movedim(class_dim, -1).reshape(rows_count, local.shape[class_dim])


def distillation_loss(student_logits, teacher_logits, *, temperature, reduction, target, alpha, weight, ignore_index,
                      label_smoothing):
    r""":func:`softmaxkit.distillation_loss` of DTensor inputs. ``teacher_logits`` is placed like
    ``student_logits``, or whole (a plain tensor or a ``Replicate`` DTensor: each rank reads its piece).

    * class-sharded: ``T² KL(π‖σ) = T² Σ_c π_c (log π_c − log σ_c)`` with ``log π = t/T − LSE_t`` and
      ``log σ = s/T − LSE_s``: both LSEs and the sum over classes are all-reduced row statistics, the
      gradients (``T(σ − π)`` for the student, ``T π (log π − log σ − KL)`` for the teacher) local given them.
      The cross-entropy term (with ``target``) is the vocab-parallel one.
    * a row dimension sharded: each rank's distributions, summed over the ranks; ``"batchmean"`` divides by
      the global batch size, ``"mean"`` by the global number of distributions, the cross-entropy term by the
      summed weight of its non-ignored targets over the ranks.
    * ``Replicate``: computed locally.
    """
    from .._core.collectives import global_reduce, sharded_logsumexp, sum_over
    from .._reduction import reduce_loss
    from .distillation import DISTILLATION_REDUCTIONS
    from .distillation import distillation_loss as local_distillation

    layout = _Layout("student_logits", student_logits, "distillation_loss", None)
    if student_logits.dim() == 0:
        raise ValueError("`student_logits` must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...), but is 0-d")
    layout.class_dim = _class_dim(student_logits)
    if isinstance(teacher_logits, _dtensor_type()):
        v.check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)  # global shapes
    elif layout.dim is not None:  # a plain teacher is each rank's own: every rank reports on its check
        from .._core.collectives import raise_together

        error = None
        try:
            v.check_tensor("teacher_logits", teacher_logits)
            v.check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
        except Exception as caught:  # re-raised on this rank once every rank has been told
            error = caught
        raise_together(error, layout.group, layout.local.device)
    else:
        v.check_tensor("teacher_logits", teacher_logits)
        v.check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    temperature = v.check_positive("temperature", temperature)
    reduction = v.check_reduction(reduction, DISTILLATION_REDUCTIONS)
    if target is None and alpha is not None:
        raise ValueError(
            f"`alpha` mixes the distillation term with cross-entropy on `target`, but no `target` was given "
            f"(got alpha={alpha}); pass target=... or leave alpha=None"
        )
    if target is not None:
        if alpha is None:
            raise ValueError("`alpha` (the weight of the distillation term, in [0, 1]) is required with `target`")
        alpha = v.check_in_range("alpha", alpha, 0.0, 1.0)
    student = layout.local
    teacher = _piece(layout, "teacher_logits", teacher_logits)
    work = _work(torch.promote_types(student.dtype, teacher.dtype))
    batch = 1 if student_logits.dim() == 1 else max(student_logits.shape[0], 1)
    distributions = max(math.prod(_out_shape(student_logits)), 1)  # an empty batch: its sum, 0
    ce = None
    if target is not None:
        ce_reduction = "mean" if reduction in ("mean", "batchmean") else reduction
        ce = cross_entropy(student_logits, target, weight=weight, ignore_index=ignore_index, reduction=ce_reduction,
                           label_smoothing=label_smoothing, temperature=1.0, z_loss=0.0, softcap=None, impl="auto",
                           inplace_backward=False, chunk_size=None).to_local().to(work)

    if layout.class_sharded:
        s = _as_rows(student, layout.class_dim).to(work) / temperature
        t = _as_rows(teacher, layout.class_dim).to(work) / temperature
        from .._core.collectives import replicated_grad

        log_sigma = s - replicated_grad(sharded_logsumexp(s, layout.group), layout.group)[:, None]
        log_pi = t - replicated_grad(sharded_logsumexp(t, layout.group), layout.group)[:, None]
        pi = torch.exp(log_pi)
        gap = torch.where(pi == 0, torch.zeros_like(log_pi), log_pi - log_sigma)
        kd = sum_over((pi * gap).sum(dim=1), layout.group) * (temperature * temperature)
        kd = kd.reshape(_out_shape(student_logits))
        if reduction == "batchmean":
            kd = kd.sum() / batch
        else:
            kd = reduce_loss(kd, reduction)
    elif layout.dim is None:
        kd = local_distillation(student, teacher, temperature=temperature, reduction=reduction).to(work)
    else:
        kd = local_distillation(student, teacher, temperature=temperature,
                                reduction="none" if reduction == "none" else "sum").to(work)
        if reduction != "none":
            kd = global_reduce(kd, torch.zeros((), dtype=work, device=kd.device), layout.group, "sum")
            kd = kd / {"batchmean": batch, "mean": distributions, "sum": 1}[reduction]
    loss = kd if ce is None else alpha * kd + (1.0 - alpha) * ce
    return layout.wrap(loss.to(student_logits.dtype), "none" if reduction == "none" else "sum",
                       _out_shape(student_logits), _target_dim(layout, False))


# ---------------------------------------------------------------------------------------------------------------
# the sparse maps


def sparse_map(function_name: str, local_function, x, dim, *, alpha=None, **options):
    """``sparsemax`` / ``entmax15`` / ``entmax_bisect`` of a DTensor ``x``: ``Replicate`` or ``Shard`` of a
    dimension other than ``dim`` map each rank's local piece (the slices along ``dim`` are whole there);
    ``Shard(dim)`` (sparsemax, entmax15) runs :class:`~softmaxkit._core.sparse_parallel.ShardedSparseMap`, the
    exact threshold searched across the ranks. The result is a DTensor placed like ``x``; gradients flow back
    to ``x`` (and to a tensor ``alpha``, summed over the ranks when it is replicated and the slices sharded)."""
    from torch.distributed.tensor import DTensor

    from .._core import ENTMAX15, SPARSEMAX

    layout = _Layout("x", x, function_name, None)
    if not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point tensor, but has dtype {x.dtype}")
    layout.class_dim = v.check_dim(dim, x.dim())
    dim = layout.class_dim
    if layout.class_sharded and x.dim() > 0:
        if function_name == "entmax_bisect":
            raise layout.refuse(
                "Replicate() or Shard(d) of a dimension d other than `dim` (sparsemax and entmax15 also serve "
                "Shard(dim), the threshold searched across the ranks; the α-entmax bisection does not)"
            )
        from .._core.sparse_parallel import ShardedSparseMap

        impl = options.get("impl", "auto")
        if impl not in ("auto", "torch"):
            raise ValueError(
                f"`impl={impl!r}` cannot serve `x` sharded along `dim` (placement {layout.placement}): it takes the "
                "class-sharded PyTorch path; pass impl='auto' or 'torch'"
            )
        moved = layout.local.movedim(dim, -1)
        rows = moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])
        kind = SPARSEMAX if function_name == "sparsemax" else ENTMAX15
        out = ShardedSparseMap.apply(rows, kind, layout.group).reshape(moved.shape).movedim(-1, dim)
    elif function_name == "entmax_bisect":
        if isinstance(alpha, torch.Tensor):
            alpha_dim = None if layout.dim is None else layout.dim - (x.dim() - alpha.dim())
            alpha = layout.replicated_input("alpha", alpha, alpha_dim if alpha_dim is not None and alpha_dim >= 0
                                            else None)
        out = local_function(layout.local, alpha, dim, **options)
    else:
        out = local_function(layout.local, dim, **options)
    return DTensor.from_local(out.contiguous(), layout.mesh, layout.placements, run_check=False, shape=x.shape,
                              stride=_contiguous_strides(tuple(x.shape)))
