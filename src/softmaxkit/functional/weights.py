"""Class-balancing weights from class counts."""

from __future__ import annotations

import torch

from .. import _validation as v

#: the weighting rules :func:`class_weights` accepts.
CLASS_WEIGHT_METHODS = ("inverse", "inverse_sqrt", "effective_number")


def class_weights(
    counts, *, method: str = "inverse", beta: float = 0.999, normalize: bool = True
) -> torch.Tensor:
    r"""Per-class weights from class counts ``N_c`` (``N = Σ_c N_c``), for ``weight=`` of the losses.

    .. math::
        \texttt{"inverse"}:\ w_c = \frac{N}{N_c},\qquad
        \texttt{"inverse\_sqrt"}:\ w_c = \sqrt{\frac{N}{N_c}},\qquad
        \texttt{"effective\_number"}:\ w_c = \frac{1 − β}{1 − β^{N_c}}

    ``(1 − β^{N_c})/(1 − β)`` is the *effective number* of samples of class ``c`` (Cui et al. 2019): with
    ``β = 0`` every class weighs the same, as ``β → 1`` it tends to ``"inverse"``. ``1 − β^{N_c}`` is computed
    as ``−expm1(N_c log β)``, accurate for ``β`` close to 1.

    Zero counts: a class that never occurs gets weight **0** (it can never be a target, so its weight only
    matters through label smoothing, where 0 keeps an absent class from being rewarded), and it is left out
    of the normalisation. At least one count must be positive.

    Args:
        counts: ``(C,)`` non-negative class counts: a tensor, NumPy array or sequence (may be fractional, e.g.
            summed sample weights).
        method: ``"inverse"``, ``"inverse_sqrt"`` or ``"effective_number"``.
        beta: ``β ∈ [0, 1)`` for ``"effective_number"`` (the paper tries 0.9 to 0.9999).
        normalize: rescale the weights of the classes that occur to mean 1 (Cui et al. normalise to sum
            ``C``, the same when every class occurs).

    Returns:
        ``(C,)`` weights on the counts' device; the counts' dtype when it is floating, else the default
        dtype (float32).

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.class_weights(torch.tensor([10, 30, 0]))
        tensor([1.5000, 0.5000, 0.0000])

    References:
        Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019.
    """
    values = v.check_class_counts(counts)
    method = v.check_choice("method", method, CLASS_WEIGHT_METHODS)
    beta = v.check_in_range("beta", beta, 0.0, 1.0, high_open=True)
    if not isinstance(normalize, bool):
        raise TypeError(f"`normalize` must be a bool, but got {type(normalize).__name__}")
    present = values > 0
    safe = torch.where(present, values, torch.ones_like(values))
    if method == "inverse":
        weights = values.sum() / safe
    elif method == "inverse_sqrt":
        weights = torch.sqrt(values.sum() / safe)
    else:
        # β = 0: log β = −inf, −expm1(−inf) = 1, every weight 1.
        log_beta = torch.log(torch.tensor(beta, dtype=torch.float64, device=values.device))
        weights = (1.0 - beta) / -torch.expm1(safe * log_beta)
    weights = torch.where(present, weights, torch.zeros_like(weights))
    if normalize:
        weights = weights / weights[present].mean()
    floating = isinstance(counts, torch.Tensor) and counts.is_floating_point()
    return weights.to(counts.dtype if floating else torch.get_default_dtype())
