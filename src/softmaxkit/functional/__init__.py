"""Public functions, one module per family: validate → dispatch → reduce."""

from .cross_entropy import cross_entropy
from .softmax import log_softmax, logsumexp, softmax

__all__ = ["cross_entropy", "log_softmax", "logsumexp", "softmax"]
