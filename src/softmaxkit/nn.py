"""``nn.Module`` wrappers: ``__init__`` stores the functional arguments, ``forward`` calls the function.

Each module takes the same arguments, in the same order, as its function (minus the tensors it is called
with), so ``Module(**options)(x, y) == function(x, y, **options)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as v
from . import functional as F
from .functional.linear_cross_entropy import linear_cross_entropy


class Softmax(nn.Module):
    """Module form of :func:`softmaxkit.softmax`: ``Softmax(dim, temperature=T)(x)``."""

    def __init__(self, dim: int = -1, *, temperature: float = 1.0, dtype: torch.dtype | None = None):
        super().__init__()
        self.dim = v.check_int("dim", dim)
        self.temperature = v.check_positive("temperature", temperature)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, self.dim, temperature=self.temperature, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}"


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`softmaxkit.cross_entropy`; drop-in for :class:`torch.nn.CrossEntropyLoss`.

    ``weight`` is registered as a buffer (it moves with ``.to()`` and is saved in the state dict, as in
    PyTorch).
    """

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        inplace_backward: bool = False,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.register_buffer("weight", None if weight is None else v.check_floating("weight", weight))
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.temperature = v.check_positive("temperature", temperature)
        self.z_loss = v.check_non_negative("z_loss", z_loss)
        self.softcap = v.check_softcap(softcap)
        self.impl = impl
        self.inplace_backward = inplace_backward
        self.chunk_size = chunk_size

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            z_loss=self.z_loss,
            softcap=self.softcap,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, impl={self.impl!r}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`softmaxkit.linear_cross_entropy`: ``loss(hidden, weight, target, bias=None)``.

    Holds the options, not the projection: pass the output layer's ``weight`` (and ``bias``) at call time,
    so a tied embedding or an ``nn.Linear`` head keeps its own parameters. ``class_weight`` is a buffer.
    """

    def __init__(
        self,
        *,
        class_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        impl: str = "auto",
        accumulation_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.register_buffer(
            "class_weight", None if class_weight is None else v.check_floating("class_weight", class_weight)
        )
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.temperature = v.check_positive("temperature", temperature)
        self.z_loss = v.check_non_negative("z_loss", z_loss)
        self.softcap = v.check_softcap(softcap)
        self.chunk_size = v.check_optional_positive_int("chunk_size", chunk_size)
        self.impl = impl
        self.accumulation_dtype = accumulation_dtype

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            class_weight=self.class_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            impl=self.impl,
            accumulation_dtype=self.accumulation_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, chunk_size={self.chunk_size}, impl={self.impl!r}"
        )
