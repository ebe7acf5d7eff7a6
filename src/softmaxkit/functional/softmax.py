"""The softmax family: ``softmax``, ``log_softmax``, ``logsumexp``."""

from __future__ import annotations

import torch

from .._core import compute_dtype  # the one compute-dtype rule (re-exported for the functional modules)
from .._validation import check_dim, check_float_dtype, check_floating, check_positive

__all__ = ["compute_dtype", "log_softmax", "logsumexp", "softmax"]


def _scaled(x: torch.Tensor, temperature: float, dtype: torch.dtype | None) -> torch.Tensor:
    """``x / T`` computed in at least fp32 (so a low-precision input is not rounded twice)."""
    work = dtype if dtype is not None else compute_dtype(x.dtype)
    return x.to(work) / temperature


def softmax(
    x: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    r"""Stable softmax of ``x / T`` along ``dim``.

    .. math:: \operatorname{softmax}(x)_i = \frac{e^{x_i/T - m}}{\sum_j e^{x_j/T - m}},\qquad m = \max_j x_j/T

    Args:
        x: input of any shape; ``-inf`` entries get probability 0.
        dim: the class dimension.
        temperature: ``T > 0``; ``T > 1`` flattens the distribution, ``T < 1`` sharpens it.
        dtype: cast the input to this dtype first (as in :func:`torch.softmax`); the result has this dtype,
            or ``x``'s dtype when None. fp16/bf16 inputs are reduced in fp32 internally.

    Returns:
        Tensor of ``x``'s shape whose slices along ``dim`` sum to 1. Equals ``torch.softmax(x / T, dim)``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.softmax(torch.tensor([2.0, 1.0, 0.1]))
        tensor([0.6590, 0.2424, 0.0986])
    """
    x = check_floating("x", x)
    dim = check_dim(dim, x.dim())
    temperature = check_positive("temperature", temperature)
    dtype = check_float_dtype("dtype", dtype)
    if temperature == 1.0:
        return torch.softmax(x, dim, dtype=dtype)
    return torch.softmax(_scaled(x, temperature, dtype), dim).to(dtype or x.dtype)


def log_softmax(
    x: torch.Tensor, dim: int = -1, *, temperature: float = 1.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    r"""Stable log-softmax of ``x / T`` along ``dim``.

    .. math:: \log \operatorname{softmax}(x)_i = x_i/T - \operatorname{LSE}(x/T)

    Arguments and shapes as :func:`softmax`. Equals ``torch.log_softmax(x / T, dim)``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.log_softmax(torch.tensor([0.0, 0.0]))
        tensor([-0.6931, -0.6931])
    """
    x = check_floating("x", x)
    dim = check_dim(dim, x.dim())
    temperature = check_positive("temperature", temperature)
    dtype = check_float_dtype("dtype", dtype)
    if temperature == 1.0:
        return torch.log_softmax(x, dim, dtype=dtype)
    return torch.log_softmax(_scaled(x, temperature, dtype), dim).to(dtype or x.dtype)


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    r"""Stable log-sum-exp along ``dim``.

    .. math:: \operatorname{LSE}(x) = m + \log\sum_j e^{x_j - m},\qquad m = \max_j x_j

    Returns ``x``'s shape without ``dim`` (kept with size 1 when ``keepdim``). Rows of all ``-inf`` give
    ``-inf``; ``+inf`` entries give ``+inf``. Equals :func:`torch.logsumexp`.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.logsumexp(torch.tensor([1e4, 1e4]))
        tensor(10000.6934)
    """
    x = check_floating("x", x)
    dim = check_dim(dim, x.dim())
    return torch.logsumexp(x, dim, keepdim=keepdim)
