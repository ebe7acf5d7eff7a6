"""Registered benchmark ops: each module ``benchmarks.ops.<op>`` defines ``cases(device, dtype, quick)``."""

from __future__ import annotations

import importlib

#: op names, in the order ``python -m benchmarks`` runs them.
OPS = ["cross_entropy", "linear_cross_entropy", "focal", "sparsemax", "sparsemax_loss", "entmax15",
       "entmax15_loss", "adaptive_softmax", "adaptive_softmax_predict", "hierarchical_softmax", "metrics",
       "hf_causal_lm", "vocab_parallel"]


def load_cases(op: str, device: str, dtype, quick: bool):
    """The cases of ``op``: its quick set or its full set."""
    module = importlib.import_module(f"benchmarks.ops.{op}")
    return module.cases(device, dtype, quick)


def op_baseline(op: str) -> str:
    """The impl an op's ratios divide by: its module's ``BASELINE``, else ``"torch"``."""
    return getattr(importlib.import_module(f"benchmarks.ops.{op}"), "BASELINE", "torch")
