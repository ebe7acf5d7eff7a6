"""NumPy float64 reference implementations: the test oracle, and the readable version for learners.

Every function here is written straight from its formula (stated in its docstring), favouring clarity over
speed. The torch implementations in :mod:`softmaxkit` are tested against these.
"""

from .cross_entropy import cross_entropy, cross_entropy_grad
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_grad
from .softmax import log_softmax, logsumexp, softmax, softmax_jacobian

__all__ = [
    "cross_entropy",
    "cross_entropy_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_grad",
    "log_softmax",
    "logsumexp",
    "softmax",
    "softmax_jacobian",
]
