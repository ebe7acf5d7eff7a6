r"""Top-k softmax: the softmax renormalised over the ``k`` largest scores, exactly 0 elsewhere."""

from __future__ import annotations

import torch

from .. import _validation as v
from .softmax import compute_dtype

__all__ = ["topk_softmax"]


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` of the ``k`` largest entries of the last dimension, in decreasing order of value,
    ties at the ``k``-th value broken towards the lower index (deterministic, whatever order ``torch.topk``
    picks tied entries in).

    With ``τ`` the ``k``-th largest value, every entry above ``τ`` is among ``torch.topk``'s first
    ``n_> = #{v > τ}`` results (sorted). The remaining ``k − n_>`` slots all hold the value ``τ``; they get
    the lowest indices ``i`` with ``x_i = τ``, found by a second ``topk`` of ``−i`` over the tied entries.
    No sort of the row, no host sync.
    """
    values, indices = torch.topk(x, k, dim=-1, sorted=True)
    threshold = values[..., k - 1 :]
    above = (values > threshold).sum(dim=-1, keepdim=True)  # n_>, read off the k values
    size = x.shape[-1]
    key_dtype = torch.float64 if size > 2**24 else x.dtype  # -i exact in the key's dtype
    position = torch.arange(size, device=x.device, dtype=key_dtype)
    key = torch.where(x == threshold, -position, torch.full_like(position, -torch.inf))
    lowest_tied = torch.topk(key, k, dim=-1, sorted=True).indices  # tied entries by increasing index
    slot = torch.arange(k, device=x.device)
    tied_slot = (slot - above).clamp(min=0)
    return torch.where(slot < above, indices, lowest_tied.gather(-1, tied_slot))


def topk_softmax(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    r"""Softmax over the ``k`` largest entries of ``x`` along ``dim``, exactly 0 elsewhere.

    With ``S_k`` the indices of the ``k`` largest entries (ties broken towards the lower index):

    .. math:: q_i = \frac{e^{x_i}\,[i ∈ S_k]}{\sum_{j ∈ S_k} e^{x_j}},\qquad
              \frac{∂q_i}{∂x_j} = q_i(δ_{ij} − q_j)\ \text{ for } i, j ∈ S_k,\ 0 \text{ otherwise}

    ``k = C`` is :func:`softmaxkit.softmax`; ``k = 1`` is the one-hot argmax (with zero gradient). The
    mass the full softmax puts outside ``S_k`` is the total-variation distance between the two:
    ``‖q − p‖₁/2 = 1 − Σ_{i∈S_k} p_i``. The gradient is that of a softmax on the selected entries (the
    selection itself is piecewise constant). ``-inf`` entries stay 0; fp16/bf16 are computed in fp32.
    Cost: two ``torch.topk`` passes and a comparison over the input, then work on ``k`` entries per row.

    Args:
        x: scores of any shape with at least one dimension.
        k: how many entries to keep, ``1 <= k <= x.shape[dim]``.
        dim: the class dimension.

    Returns:
        A tensor of ``x``'s shape and dtype whose slices along ``dim`` sum to 1 with at most ``k`` non-zeros.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.topk_softmax(torch.tensor([2.0, 1.0, 0.1, 1.0]), k=2)
        tensor([0.7311, 0.2689, 0.0000, 0.0000])
    """
    x = v.check_floating("x", x)
    if x.dim() == 0:
        raise ValueError("`x` must have at least one dimension, but is 0-d")
    dim = v.check_dim(dim, x.dim())
    size = x.shape[dim]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"`k` must be an int in [1, {size}], but got {type(k).__name__}")
    if not 1 <= k <= size:
        raise ValueError(f"`k` must lie in [1, {size}] (the size of dimension {dim}), but got {k}")
    work = x.to(compute_dtype(x.dtype))
    if k == size:
        return torch.softmax(work, dim=dim).to(x.dtype)
    rows = work.movedim(dim, -1)
    index = topk_indices(rows.detach(), k)
    kept = torch.softmax(rows.gather(-1, index), dim=-1)
    out = torch.zeros_like(rows).scatter(-1, index, kept)
    return out.movedim(-1, dim).to(x.dtype)
