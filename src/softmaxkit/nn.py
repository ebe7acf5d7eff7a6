"""``nn.Module`` wrappers: ``__init__`` stores the functional arguments, ``forward`` calls the function.

Each module takes the same arguments, in the same order, as its function (minus the tensors it is called
with), so ``Module(**options)(x, y) == function(x, y, **options)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as v
from . import functional as F


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
