r"""The neutral core every implementation of the cross-entropy family shares (layer 1, below the backends).

What lives here, and nowhere else:

* :class:`CrossEntropyOptions`: the one frozen options object of the whole family (plain, linear and
  vocab-parallel cross-entropy). It travels as one object from the functional layer down to a backend; a
  ``torch.library`` custom op, whose schema takes scalars, unpacks it in one place
  (:meth:`CrossEntropyOptions.op_args` / :meth:`CrossEntropyOptions.from_op_args`).
* :func:`compute_dtype`: the one compute-dtype rule (fp32 for fp16/bf16, the input's own dtype otherwise).
* :func:`row_weights`: the one builder of the per-row ignore mask, safe target, ``w_y`` and ``Σ_c w_c``.
* :mod:`._core.rows`: the shared cross-entropy row maths in the shifted form and the row chunking.
* :mod:`._core.linear`: the chunk loop of linear (and vocab-parallel) cross-entropy.

Numerical method (every path): with ``m = max_c z_c`` and ``s = Σ_c exp(z_c − m)``,

.. math:: ℓ = (1−ε)\,w_y\big[(m − z_y) + \log s\big]
          + \tfrac{ε}{C}\big[W \log s − \textstyle\sum_c w_c (z_c − m)\big] + λ (m + \log s)^2,
          \qquad p_c = e^{z_c − m} / s,

never ``LSE − z_y`` or ``exp(z − LSE)``: the differences ``z − m`` are exact-ish at any magnitude, so the loss
is shift invariant up to the dtype's range and a constant row gives ``log C``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


#: the kinds of sparse map every sparse backend serves (``kind`` in their entry points)
SPARSEMAX, ENTMAX15, BISECT = "sparsemax", "entmax15", "bisect"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmaxkit computes in: fp32 for fp16/bf16 inputs, the input's own dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def fp32_under_autocast(*tensors):
    """The autocast rule of PyTorch's losses (``F.cross_entropy``, ``F.kl_div``, ``F.mse_loss``,
    ``F.multi_margin_loss``, ...): under ``torch.autocast`` on the tensors' device their fp16/bf16 tensors are
    taken in fp32, so the loss is computed and returned in fp32. Other tensors, and None, pass through."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or first.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(first.device.type):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW_PRECISION else t
                 for t in tensors)


def autocast_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The autocast rule of the linear losses, ``F.linear`` then ``F.cross_entropy``: under autocast the matmul
    in the autocast dtype, the loss computed and returned in fp32. Returns the inputs cast to the autocast dtype
    and whether autocast applies (the caller then runs its backend with autocast off and keeps the fp32 loss
    every backend returns)."""
    device = hidden.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias, False
    dtype = torch.get_autocast_dtype(device)
    if not hidden.is_floating_point() or hidden.dtype == torch.float64:
        return hidden, weight, bias, False
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), True


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reduction over many rows is summed in: fp64 for fp32 and lower, else the dtype itself.

    Used for the ``N``-element sums before a mean (cheap), so an fp32 sum that would overflow while the mean
    fits still gives the mean.
    """
    return torch.float64 if dtype in (torch.float32, *_LOW_PRECISION) else dtype


@dataclass(frozen=True)
class CrossEntropyOptions:
    """The non-tensor options of one cross-entropy-family call (already validated by the public function).

    Attributes:
        ignore_index: class-index targets equal to it contribute nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ``ε ∈ [0, 1]``.
        temperature: ``T > 0``.
        z_loss: ``λ ≥ 0``.
        softcap: ``c > 0`` or None.
        chunk_size: rows per chunk (None: chosen by the path).
        inplace_backward: the backward writes the gradient over the logits.
        accumulation_dtype: linear CE's ``∂W``/``∂b``/``∂h`` accumulation dtype (None: the compute dtype).
        num_classes: total number of classes ``C`` (over all processes for vocab-parallel); 0: the input's.
        class_offset: index of this process's first class (vocab-parallel).
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    temperature: float = 1.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_size: int | None = None
    inplace_backward: bool = False
    accumulation_dtype: torch.dtype | None = None
    num_classes: int = 0
    class_offset: int = 0

    #: the fields a custom op's schema carries, in schema order (see :meth:`op_args`)
    OP_FIELDS = ("ignore_index", "reduction", "label_smoothing", "temperature", "z_loss", "softcap", "chunk_size")

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    def with_classes(self, num_classes: int) -> CrossEntropyOptions:
        """These options with ``num_classes`` filled in (when it is still 0)."""
        return self if self.num_classes else replace(self, num_classes=int(num_classes))

    def op_args(self) -> tuple:
        """The scalars a custom op's schema takes, in :data:`OP_FIELDS` order (the one unpacking point)."""
        return tuple(getattr(self, name) for name in self.OP_FIELDS)

    @classmethod
    def from_op_args(cls, *args, **extra) -> CrossEntropyOptions:
        """Inverse of :meth:`op_args` (plus any other fields by name)."""
        return cls(**dict(zip(cls.OP_FIELDS, args)), **extra)


class RowWeights(NamedTuple):
    """Per-row target data built once per call by :func:`row_weights`.

    Attributes:
        valid: ``target != ignore_index`` (bool, ``(N,)``).
        safe_target: the target with ignored entries replaced by class 0 (int64, safe to gather with).
        weight: the class weights in the compute dtype, or None.
        w_y: the target's class weight, 0 on ignored rows (1 on valid rows without weights).
        weight_total: ``W = Σ_c w_c`` (``C`` without weights), a 0-d tensor.
    """

    valid: torch.Tensor
    safe_target: torch.Tensor
    weight: torch.Tensor | None
    w_y: torch.Tensor
    weight_total: torch.Tensor


def row_weights(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    num_classes: int,
    work_dtype: torch.dtype,
) -> RowWeights:
    """The ignore mask, safe target, ``w_y`` and ``Σ_c w_c`` of class-index targets (tensor ops, no sync)."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    if weight is not None:
        weight = weight.to(work_dtype)
        zero = torch.zeros((), dtype=work_dtype, device=target.device)
        w_y = torch.where(valid, weight[safe_target], zero)
        weight_total = weight.sum()
    else:
        w_y = valid.to(work_dtype)
        weight_total = torch.full((), float(num_classes), dtype=work_dtype, device=target.device)
    return RowWeights(valid, safe_target, weight, w_y, weight_total)


def constant_result(fn):
    """Mark ``fn`` as returning a constant for ``torch.compile``: Dynamo calls it at trace time and bakes the
    result into the graph (``torch.compiler.assume_constant_result``).

    Sets the same marker as that decorator without importing ``torch._dynamo`` (about 2 s) when softmaxkit is
    imported; ``tests/test_compile.py`` checks the two mark a function identically.
    """
    fn._dynamo_marked_constant = True
    return fn


def is_unit_upstream(grad_output: torch.Tensor) -> bool:
    """Whether an upstream gradient is the plain CPU scalar 1 (the usual ``loss.backward()``), in eager mode.

    A backward that already holds the gradient for a unit upstream gradient then returns it as it is, instead
    of multiplying (a full-size read, write and allocation). The read is of CPU memory (no device sync), and only
    of a plain tensor: while compile, export or AOT autograd trace, the tensors are fake or functional wrappers
    and the answer is False (the traced backward multiplies).
    """
    return (not torch.compiler.is_compiling() and type(grad_output) is torch.Tensor
            and grad_output.device.type == "cpu" and grad_output.numel() == 1 and grad_output.tolist() == 1.0)


def has_real_storage(*tensors: torch.Tensor | None) -> bool:
    """True when every tensor given is a plain ``torch.Tensor`` with real (not meta/fake) storage.

    DTensors, fake tensors, functional wrappers and every other subclass answer False: their data pointer
    must never be handed to C.
    """
    for tensor in tensors:
        if tensor is None:
            continue
        if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
            return False
        if tensor.device.type == "meta":
            return False
    return True


from .rows import chunk_rows  # noqa: E402  (re-exported: the rows module imports the names above)

__all__ = [
    "CrossEntropyOptions",
    "RowWeights",
    "accumulate_dtype",
    "chunk_rows",
    "compute_dtype",
    "has_real_storage",
    "row_weights",
]
