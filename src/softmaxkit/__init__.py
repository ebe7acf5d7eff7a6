"""softmaxkit: the softmax family of functions and losses, from the textbook formula to the fastest kernel.

The public functions live here (``softmaxkit.cross_entropy``, ...); modules in :mod:`softmaxkit.nn`, the
NumPy float64 oracle in :mod:`softmaxkit.reference`.
"""

from . import calibration, metrics, nn, reference  # subpackages reachable as attributes, like torch.nn
from .distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .functional import cross_entropy, log_softmax, logsumexp, softmax
from .functional.comparison import (
    crammer_singer_loss,
    multi_margin_loss,
    multilabel_soft_margin_loss,
    score_mse_loss,
    softmax_mse_loss,
)
from .functional.distillation import distillation_loss
from .functional.focal import focal_loss, poly1_cross_entropy
from .functional.gumbel import gumbel_softmax
from .functional.linear_cross_entropy import linear_cross_entropy
from .functional.sampled import sampled_softmax_loss
from .functional.sparse import (
    entmax15,
    entmax15_loss,
    entmax_bisect,
    entmax_bisect_loss,
    sparsemax,
    sparsemax_loss,
)
from .functional.topk import topk_softmax
from .functional.weights import class_weights

__version__ = "0.1.0"

__all__ = [
    "SoftmaxRegression",
    "__version__",
    "calibration",
    "class_weights",
    "crammer_singer_loss",
    "cross_entropy",
    "distillation_loss",
    "entmax15",
    "entmax15_loss",
    "entmax_bisect",
    "entmax_bisect_loss",
    "focal_loss",
    "gumbel_softmax",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "metrics",
    "multi_margin_loss",
    "multilabel_soft_margin_loss",
    "nn",
    "poly1_cross_entropy",
    "reference",
    "sampled_softmax_loss",
    "score_mse_loss",
    "softmax",
    "softmax_mse_loss",
    "sparsemax",
    "sparsemax_loss",
    "topk_softmax",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


def __getattr__(name: str):
    # SoftmaxRegression pulls in scikit-learn (~1.5 s); load it on first use, not on `import softmaxkit`.
    if name == "SoftmaxRegression":
        from .estimator import SoftmaxRegression

        return SoftmaxRegression
    raise AttributeError(f"module 'softmaxkit' has no attribute {name!r}")
