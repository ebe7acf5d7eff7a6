"""The one place where ``mean`` / ``sum`` / ``none``, class weights and ignore masks meet.

Conventions (PyTorch's, with one deliberate difference):

* ``"none"`` returns the per-element loss, ``0`` at ignored positions.
* ``"sum"`` adds them.
* ``"mean"`` divides the sum by the *summed weight* of the non-ignored targets (their count without
  class weights). When that total is 0 (every target ignored, or an empty batch) the mean is ``0`` with
  zero gradient; PyTorch returns NaN there.
"""

from __future__ import annotations

import torch


def safe_divide(total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``total / denominator``, and exactly 0 (with zero gradient) where ``denominator == 0``.

    No host sync: the zero case is handled with tensor ops so it stays graph-capturable.
    """
    zero = denominator == 0
    safe = torch.where(zero, torch.ones_like(denominator), denominator)
    return torch.where(zero, torch.zeros_like(total), total / safe)


def reduce_loss(
    loss: torch.Tensor, reduction: str, denominator: torch.Tensor | float | int | None = None
) -> torch.Tensor:
    """Reduce an elementwise loss.

    Args:
        loss: per-element loss, already 0 where ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        denominator: what ``"mean"`` divides by; ``None`` means the number of elements.
    """
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # the mean's sum in float64 (N elements, cheap): a sum that overflows fp32 while the mean fits still
    # gives the mean, not inf
    wide = torch.float64 if loss.dtype in (torch.float32, torch.float16, torch.bfloat16) else loss.dtype
    total = loss.sum(dtype=wide)
    if denominator is None:
        denominator = loss.numel()
    if not isinstance(denominator, torch.Tensor):
        denominator = torch.tensor(float(denominator), dtype=wide, device=total.device)
    return safe_divide(total, denominator.to(wide)).to(loss.dtype)


def row_scale(
    grad_output: torch.Tensor,
    reduction: str,
    num_rows: int,
    denominator: torch.Tensor,
    row_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's upstream gradient for a per-row loss reduced by :func:`reduce_loss`, times ``row_factor``.

    ``g_i`` (``"none"``), ``g/denominator`` (``"mean"``, 0 when the denominator is) or ``g`` (``"sum"``) for
    each of ``num_rows`` rows, multiplied by ``row_factor`` (e.g. the ignore mask or ``w_y``) when given.
    Stays on the device (no host sync). ``grad_output`` should already be in the compute dtype.
    """
    if reduction == "none":
        scale = grad_output
    elif reduction == "mean":
        scale = safe_divide(grad_output, denominator).expand(num_rows)
    else:
        scale = grad_output.expand(num_rows)
    return scale if row_factor is None else scale * row_factor


def target_weight(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element weight ``w[y]`` (0 where ignored) and the ignore mask ``target != ignore_index``."""
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype), valid
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    w = weight.to(dtype)[safe_target]
    return torch.where(valid, w, torch.zeros_like(w)), valid
