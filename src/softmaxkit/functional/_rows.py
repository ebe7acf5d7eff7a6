"""Reshaping helpers shared by the loss family: put the class dimension last and flatten the rest."""

from __future__ import annotations

import torch


def class_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits as ``(M, C)`` rows, and the target as ``(M,)``.

    2-D input is returned as is (no copy); K-dimensional input is moved (one copy).
    """
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.reshape(1)
    if logits.dim() == 2:
        return logits, target
    return logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1)


def restore_rows(loss: torch.Tensor, reduction: str, target: torch.Tensor) -> torch.Tensor:
    """Give a per-row ``"none"`` loss the target's shape (``()`` for unbatched input)."""
    return loss.reshape(target.shape) if reduction == "none" else loss


def last_dim_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """``x`` with ``dim`` moved last, as ``(M, C)`` rows, plus the moved shape to restore it with."""
    moved = x.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def from_last_dim_rows(rows: torch.Tensor, moved_shape: torch.Size, dim: int) -> torch.Tensor:
    return rows.reshape(moved_shape).movedim(-1, dim)
