"""The PyTorch entry of the ``vocab_parallel_cross_entropy`` row: chunked torch ops, any device.

The maths and the chunk loop are :class:`softmaxkit._core.linear.VocabParallelCrossEntropy` (shared with the
vocab-parallel linear cross-entropy's row helpers); the C-kernel sibling is
:mod:`softmaxkit.backends.cpu.vocab_parallel`.
"""

from __future__ import annotations

from ..._core import CrossEntropyOptions
from ..._core.linear import VocabParallelCrossEntropy


def torch_vocab_parallel_cross_entropy(logits, target, class_weight, options: CrossEntropyOptions, reduce):
    return VocabParallelCrossEntropy.apply(logits, target, class_weight, options, reduce)
