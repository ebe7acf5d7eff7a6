r"""The chunked linear cross-entropy in torch ops: the custom op ``softmaxkit::linear_cross_entropy``.

The chunk loop (the maths, the oneDNN/``torch.mm`` matmuls, class-probability targets) is
:func:`softmaxkit._core.linear.linear_forward` / :func:`~softmaxkit._core.linear.linear_backward`, each chunk's
cross-entropy in torch ops, so it runs on any device; :func:`softmaxkit.backends._linear_ops.linear_cross_entropy_ops`
makes it the op pair ``softmaxkit::linear_cross_entropy`` (+ ``_backward``). The CPU backend's op
(``softmaxkit::linear_cross_entropy_cpu``) is the same loop with the C kernel for each chunk's cross-entropy.
"""

from __future__ import annotations

from ..._core.linear import default_chunk_rows
from .._linear_ops import linear_cross_entropy_ops

__all__ = ["default_chunk_rows", "torch_linear_cross_entropy"]

#: ``(hidden (N, D), weight (C, D), bias, target, class_weight, options) -> loss`` (compute dtype)
torch_linear_cross_entropy = linear_cross_entropy_ops("linear_cross_entropy")
