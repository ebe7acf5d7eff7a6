"""The sparsemax Fenchel-Young loss vs softmax + cross-entropy and the ``entmax`` package (see
:mod:`benchmarks.ops.sparsemax`)."""

from __future__ import annotations

from .sparsemax import sparsemax_loss_cases as cases

__all__ = ["cases"]
