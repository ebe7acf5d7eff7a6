"""NumPy float64 reference implementations: the test oracle, and the readable version for learners.

Every function here is written straight from its formula (stated in its docstring), favouring clarity over
speed. The torch implementations in :mod:`softmaxkit` are tested against these.
"""

from .comparison import (
    crammer_singer_loss,
    crammer_singer_loss_grad,
    multi_margin_loss,
    multi_margin_loss_grad,
    multilabel_soft_margin_loss,
    multilabel_soft_margin_loss_grad,
    score_mse_loss,
    score_mse_loss_grad,
    softmax_mse_loss,
    softmax_mse_loss_grad,
    topk_mask,
    topk_softmax,
    topk_softmax_vjp,
)
from .cross_entropy import cross_entropy, cross_entropy_grad
from .explain import gradient_norm_vs_scale, jacobian_eigenvalues, temperature_gradient_factor
from .focal import (
    class_weights,
    distillation_loss,
    distillation_loss_grad,
    focal_loss,
    focal_loss_grad,
    poly1_cross_entropy,
    poly1_cross_entropy_grad,
)
from .gumbel import gumbel_noise, gumbel_softmax
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_grad
from .sampled import sampled_softmax_loss, sampled_softmax_loss_grad, sampler_probabilities
from .softmax import log_softmax, logsumexp, softmax, softmax_jacobian
from .sparse import (
    entmax15,
    entmax15_loss,
    entmax15_loss_grad,
    entmax_alpha_derivative,
    entmax_bisect,
    entmax_bisect_loss,
    entmax_bisect_loss_alpha_derivative,
    entmax_jacobian,
    sparsemax,
    sparsemax_loss,
    sparsemax_loss_grad,
    tsallis_entropy,
)

__all__ = [
    "class_weights",
    "crammer_singer_loss",
    "crammer_singer_loss_grad",
    "cross_entropy",
    "cross_entropy_grad",
    "distillation_loss",
    "distillation_loss_grad",
    "entmax15",
    "entmax15_loss",
    "entmax15_loss_grad",
    "entmax_alpha_derivative",
    "entmax_bisect",
    "entmax_bisect_loss",
    "entmax_bisect_loss_alpha_derivative",
    "entmax_jacobian",
    "focal_loss",
    "focal_loss_grad",
    "gradient_norm_vs_scale",
    "gumbel_noise",
    "gumbel_softmax",
    "jacobian_eigenvalues",
    "linear_cross_entropy",
    "linear_cross_entropy_grad",
    "log_softmax",
    "logsumexp",
    "multi_margin_loss",
    "multi_margin_loss_grad",
    "multilabel_soft_margin_loss",
    "multilabel_soft_margin_loss_grad",
    "poly1_cross_entropy",
    "poly1_cross_entropy_grad",
    "sampled_softmax_loss",
    "sampled_softmax_loss_grad",
    "sampler_probabilities",
    "score_mse_loss",
    "score_mse_loss_grad",
    "softmax",
    "softmax_jacobian",
    "softmax_mse_loss",
    "softmax_mse_loss_grad",
    "sparsemax",
    "sparsemax_loss",
    "sparsemax_loss_grad",
    "temperature_gradient_factor",
    "topk_mask",
    "topk_softmax",
    "topk_softmax_vjp",
    "tsallis_entropy",
]
