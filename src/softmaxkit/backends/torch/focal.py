r"""Softmax focal loss with a closed-form backward, for 2-D logits and class-index or class-probability targets.

For one row with ``z = x/T``, ``p = softmax(z)`` and coefficients ``a_c = α_c w_c q_c`` (``q`` the smoothed
one-hot target, 0 on ignored rows):

.. math:: ℓ = −\sum_c a_c (1 − p_c)^γ \log p_c,\qquad
          \frac{∂ℓ}{∂z_j} = g_j − p_j \sum_c g_c,\quad g_c = a_c (1 − p_c)^γ\big(γ\,r_c − 1\big)

with ``r_c = p_c \log p_c / (1 − p_c)``. Written this way the backward never forms ``(1 − p)^{γ−1}``: that
factor is infinite at ``p = 1`` for ``γ < 1`` and autograd through ``pow`` turns it into NaN (``∞·0``).
``1 − p`` is computed as ``−expm1(log p)``, accurate when ``p`` is close to 1, and ``r → −1`` as ``p → 1``.

Forward is one fused ``log_softmax``, and nothing ``(N, C)`` is saved: the backward recomputes it into the
buffer that becomes the gradient (one allocation). Without label smoothing only ``g_y`` is non-zero, so the
gradient is ``g_y (e_y − p)``: exponentiated, scaled and scattered in place. fp16/bf16 logits are computed in
fp32.

Class-probability targets ``t`` (:class:`_FocalProbabilityFunction`) use the same formulas with
``a_c = α_c w_c ((1 − ε) t_c + ε/C)`` for every class; the loss is also differentiable in ``t``:
``∂ℓ/∂t_c = (1 − ε) α_c w_c · (−(1 − p_c)^γ \log p_c)``, also where ``t_c = 0`` (as
:func:`torch.nn.functional.cross_entropy`'s target gradient). The loss counts a term with ``a_c = 0`` as 0
even at ``\log p_c = −∞`` (a masked class); there the derivative in ``t_c`` is taken as 0, not ``+∞``, so a
masked class with no target mass leaves every gradient finite.
"""

from __future__ import annotations

import torch

from ..._core import CrossEntropyOptions
from ..._core import compute_dtype as _work_dtype
from ..._core.autograd import strict_once_differentiable
from ..._reduction import reduce_loss, row_scale


def focal_terms(log_p: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``(−(1 − p)^γ log p, (1 − p)^γ (γ r − 1))``: the loss term and the gradient coefficient.

    Safe everywhere: ``p = 1`` gives ``(0, −1·[γ = 0])``-style limits, ``log p = −inf`` (a masked class)
    gives ``(+inf, −1)``.
    """
    one_minus = -torch.expm1(log_p)
    if gamma == 0.0:
        modulation = torch.ones_like(log_p)
    else:
        modulation = one_minus.pow(gamma)
    term = -modulation * log_p
    if gamma == 0.0:
        return term, -modulation
    p = torch.exp(log_p)
    safe = torch.where(one_minus == 0, torch.ones_like(one_minus), one_minus)
    ratio = torch.where(one_minus == 0, -torch.ones_like(p), p * log_p / safe)
    ratio = torch.where(p == 0, torch.zeros_like(ratio), ratio)
    return term, modulation * (gamma * ratio - 1.0)


class _FocalFunction(torch.autograd.Function):
    """Private autograd Function behind :func:`softmaxkit.focal_loss`."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        gamma: float,
        class_scale: torch.Tensor | None,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        temperature: float,
    ) -> torch.Tensor:
        num_classes = logits.shape[1]
        work = _work_dtype(logits.dtype)
        z = logits.to(work)
        if temperature != 1.0:
            z = z / temperature
        # One fused pass (log_softmax); backward recomputes it into the gradient buffer (one allocation).
        log_p = torch.log_softmax(z, dim=1)
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        zero = torch.zeros((), dtype=work, device=logits.device)

        # Row weight w_y (the mean's denominator) and the per-class coefficient scale α_c w_c.
        w_y = valid.to(work) if weight is None else torch.where(valid, weight.to(work)[safe_target], zero)
        scale = None if class_scale is None else class_scale.to(work)
        eps = label_smoothing

        log_p_y = log_p.gather(1, safe_target[:, None])[:, 0]
        term_y, _ = focal_terms(log_p_y, gamma)
        s_y = torch.ones((), dtype=work, device=logits.device) if scale is None else scale[safe_target]
        # ℓ = (1 − ε) a'_y f_y + (ε/C) Σ_c a'_c f_c, with a'_c = α_c w_c; 0 on ignored rows.
        # A zero coefficient contributes 0 even where the term is infinite (a masked target class).
        loss = torch.where(s_y == 0, zero, (1.0 - eps) * s_y * term_y) if eps < 1 else torch.zeros_like(term_y)
        if eps > 0:
            terms, _ = focal_terms(log_p, gamma)
            if scale is not None:
                terms = torch.where(scale == 0, zero, terms * scale)
            loss = loss + (eps / num_classes) * terms.sum(dim=1)
        loss = torch.where(valid, loss, zero)

        denominator = w_y.sum()
        out = reduce_loss(loss, reduction, denominator)
        ctx.save_for_backward(logits, safe_target, valid, scale, denominator)
        ctx.options = (gamma, reduction, eps, temperature)
        return out.to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, target, valid, scale, denominator = ctx.saved_tensors
        gamma, reduction, eps, temperature = ctx.options
        num_rows, num_classes = logits.shape
        work = _work_dtype(logits.dtype)
        z = logits.to(work)
        if temperature != 1.0:
            z = z / temperature
        log_p = torch.log_softmax(z, dim=1)  # a fresh buffer: it becomes the gradient
        zero = torch.zeros((), dtype=work, device=logits.device)

        scale_i = row_scale(grad_output.to(work), reduction, num_rows, denominator, valid)
        if temperature != 1.0:
            scale_i = scale_i / temperature

        s_y = torch.ones((), dtype=work, device=logits.device) if scale is None else scale[target]
        log_p_y = log_p.gather(1, target[:, None])[:, 0]
        _, coefficient_y = focal_terms(log_p_y, gamma)
        # g_y = (1 − ε) α_y w_y (1 − p_y)^γ (γ r_y − 1), times the row's upstream scale.
        g_y = torch.where(s_y == 0, zero, (1.0 - eps) * s_y * coefficient_y) * scale_i

        if eps > 0:
            _, coefficients = focal_terms(log_p, gamma)
            g = coefficients * (eps / num_classes)
            if scale is not None:
                g = torch.where(scale == 0, zero, g * scale)
            g = g * scale_i[:, None]
            g.scatter_add_(1, target[:, None], g_y[:, None])
            grad = g.sub_(log_p.exp_().mul_(g.sum(dim=1, keepdim=True)))
        else:
            # g_y (e_y − p): exp and scale in place, then a scatter.
            grad = log_p.exp_().mul_(-g_y[:, None])
            grad.scatter_add_(1, target[:, None], g_y[:, None])
        # ignored rows: exactly 0, whatever their logits hold (a NaN/±inf padding row would give 0·NaN)
        grad.masked_fill_(~valid[:, None], 0.0)
        return grad.to(logits.dtype), None, None, None, None, None, None, None, None


def probability_coefficients(
    target: torch.Tensor, class_scale: torch.Tensor | None, label_smoothing: float, work: torch.dtype
) -> torch.Tensor:
    """``a = α ⊙ w ⊙ ((1 − ε) t + ε/C)`` for ``(M, C)`` probability targets ``t``: always a new tensor."""
    num_classes = target.shape[1]
    eps = label_smoothing
    if eps > 0:
        coefficients = target.to(work) * (1.0 - eps) + eps / num_classes
    else:
        coefficients = target.to(work, copy=True)
    if class_scale is not None:
        coefficients.mul_(class_scale.to(work))
    return coefficients


class _FocalProbabilityFunction(torch.autograd.Function):
    """Focal loss for ``(M, C)`` logits and ``(M, C)`` class-probability targets (closed-form backward).

    ``ℓ_i = Σ_c a_ic f(log p_ic)`` with ``f = −(1 − p)^γ log p`` and ``a`` from
    :func:`probability_coefficients`; ``"mean"`` divides by ``M`` (PyTorch's rule for probability targets).
    Saves the logits and the target (no copies); backward recomputes ``log_softmax``.
    """

    @staticmethod
    def forward(ctx, logits, target, gamma, class_scale, reduction, label_smoothing, temperature):
        work = _work_dtype(logits.dtype)
        z = logits.to(work)
        if temperature != 1.0:
            z = z / temperature
        log_p = torch.log_softmax(z, dim=1)
        coefficients = probability_coefficients(target, class_scale, label_smoothing, work)
        terms, _ = focal_terms(log_p, gamma)
        zero = torch.zeros((), dtype=work, device=logits.device)
        # a zero coefficient contributes 0 even where the term is infinite (a masked class, log p = −inf)
        loss = torch.where(coefficients == 0, zero, coefficients * terms).sum(dim=1)
        out = reduce_loss(loss, reduction)  # "mean": over the rows (PyTorch's rule for probabilities)
        ctx.save_for_backward(logits, target, class_scale)
        ctx.options = (gamma, reduction, label_smoothing, temperature)
        return out.to(logits.dtype)

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, target, class_scale = ctx.saved_tensors
        gamma, reduction, eps, temperature = ctx.options
        num_rows = logits.shape[0]
        work = _work_dtype(logits.dtype)
        z = logits.to(work)
        if temperature != 1.0:
            z = z / temperature
        log_p = torch.log_softmax(z, dim=1)
        coefficients = probability_coefficients(target, class_scale, eps, work)
        zero = torch.zeros((), dtype=work, device=logits.device)

        count = torch.tensor(float(num_rows), dtype=work, device=logits.device)  # "mean" is over rows here
        scale_i = row_scale(grad_output.to(work), reduction, num_rows, count)

        terms, factors = focal_terms(log_p, gamma)
        inactive = coefficients == 0
        grad_target = None
        if ctx.needs_input_grad[1]:
            # ∂ℓ/∂t_c = (1 − ε) α_c w_c f_c, also where t_c = 0; 0 where a_c = 0 and p_c = 0 (f_c = +inf)
            scale = (1.0 - eps) if class_scale is None else (1.0 - eps) * class_scale.to(work)
            grad_target = torch.where(inactive & torch.isinf(terms), zero, terms * scale) * scale_i[:, None]
            grad_target = grad_target.to(target.dtype)
        # g_c = a_c (1 − p_c)^γ (γ r_c − 1); ∂ℓ/∂z = g − p Σ_c g_c, times the row's upstream scale and 1/T
        g = torch.where(inactive, zero, coefficients * factors)
        g.mul_((scale_i / temperature)[:, None] if temperature != 1.0 else scale_i[:, None])
        grad = g.sub_(log_p.exp_().mul_(g.sum(dim=1, keepdim=True)))
        return grad.to(logits.dtype), grad_target, None, None, None, None, None


def focal_loss_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    class_scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    options: CrossEntropyOptions,
    probabilities: bool,
) -> torch.Tensor:
    """Focal loss of ``(M, C)`` logits and ``(M,)`` class indices or ``(M, C)`` probabilities (validated
    arguments; ``class_scale = α ⊙ w``): the dispatch table's ``focal_loss`` implementation."""
    if probabilities:
        return _FocalProbabilityFunction.apply(logits, target, gamma, class_scale, options.reduction,
                                               options.label_smoothing, options.temperature)
    return _FocalFunction.apply(logits, target, gamma, class_scale, weight, options.ignore_index,
                                options.reduction, options.label_smoothing, options.temperature)
