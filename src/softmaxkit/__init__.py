"""softmaxkit: the softmax family of functions and losses, from the textbook formula to the fastest kernel.

The public functions live here (``softmaxkit.cross_entropy``, ...); modules in :mod:`softmaxkit.nn`, the
NumPy float64 oracle in :mod:`softmaxkit.reference`.
"""

from . import nn, reference  # subpackages reachable as attributes, like torch.nn
from .estimator import SoftmaxRegression
from .functional import cross_entropy, log_softmax, logsumexp, softmax
from .functional.linear_cross_entropy import linear_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "SoftmaxRegression",
    "__version__",
    "cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "nn",
    "reference",
    "softmax",
]
