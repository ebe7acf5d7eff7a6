"""The 1.5-entmax Fenchel-Young loss (``softmaxkit``: on CPU its compiled kernel; ``softmaxkit_torch``: its
PyTorch path, CPU only) vs softmax + cross-entropy (``F.cross_entropy``, baseline) and the ``entmax`` package's
``entmax15_loss``; shapes and conventions of :mod:`benchmarks.ops.sparsemax`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case
from .sparsemax import _softmaxkit, loss_cases, peer_loss, softmaxkit_torch


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    return loss_cases("entmax15_loss", {
        "torch": lambda: (lambda x, y: F.cross_entropy(x, y)),
        "softmaxkit": lambda: _softmaxkit("entmax15_loss"),
        "softmaxkit_torch": lambda: softmaxkit_torch("entmax15_loss", device),
        "entmax": lambda: peer_loss("entmax15_loss"),
    }, device, dtype, quick)
