"""1.5-entmax, forward and forward+backward: softmaxkit (on CPU its compiled kernel; ``softmaxkit_torch``: its
PyTorch path, CPU only; ``softmaxkit_triton``: its Triton kernels, CUDA only) vs ``torch.softmax`` (baseline) and the ``entmax`` package's exact (sort-based) ``entmax15`` and
bisection ``entmax_bisect(alpha=1.5)``; the same shapes and conventions as :mod:`benchmarks.ops.sparsemax`."""

from __future__ import annotations

import torch

from .._harness import Case
from .sparsemax import _softmaxkit, map_cases, peer_map, softmaxkit_torch, softmaxkit_triton


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    return map_cases("entmax15", {
        "torch": lambda: (lambda x: torch.softmax(x, dim=-1)),
        "softmaxkit": lambda: _softmaxkit("entmax15"),
        "softmaxkit_torch": lambda: softmaxkit_torch("entmax15", device),
        "softmaxkit_triton": lambda: softmaxkit_triton("entmax15", device),
        "entmax": lambda: peer_map("entmax15"),
        "entmax_bisect": lambda: peer_map("entmax_bisect", alpha=1.5),
    }, device, dtype, quick)
