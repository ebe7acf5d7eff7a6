r"""Triton sparsemax and 1.5-entmax over the last dimension of a 2-D tensor: forward and backward kernels.

Forward, one program per row: the threshold ``τ`` solves ``Σ_j f(x_j − τ) = 1`` with ``f(u) = [u]_+``
(sparsemax) or ``f(u) = [u/2]_+^2`` (1.5-entmax). ``τ`` lies in ``[max x − 1, max x]`` (sparsemax) or
``[max x − 2, max x]`` (entmax15), where the sum falls from ≥ 1 to 0; bisection narrows it to the working
precision, which fixes the support ``S = {x_j > τ}``; then ``τ`` is solved exactly on ``S``:

.. math:: τ_{sparsemax} = \frac{\sum_S x − 1}{|S|}, \qquad
          τ_{1.5} = \frac{\sum_S x − \sqrt{(\sum_S x)^2 − |S|(\sum_S x^2 − 4)}}{|S|}

(the smaller root of ``Σ_S (x − τ)^2 = 4``; computed on ``x − max x`` to limit cancellation), and
``p = f(x − τ)``. No sort, no ``(N, C)`` temporary.

Backward, one program per row, from the saved output ``p``: ``∂ = s ⊙ g − s·(Σ s g)/(Σ s)`` with
``s = 1[p > 0]`` (sparsemax) or ``s = √p`` (1.5-entmax) (Martins & Astudillo 2016; Peters et al. 2019).

fp16/bf16 are computed in fp32. Used by :func:`softmaxkit.sparsemax` / :func:`softmaxkit.entmax15` for CUDA
tensors when Triton is available; CPU CI runs the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import strict_once_differentiable
from .cross_entropy import _interpreting


@triton.jit
def _mapping(u, ENTMAX: tl.constexpr):
    if ENTMAX:
        half = tl.maximum(u * 0.5, 0.0)
        return half * half
    return tl.maximum(u, 0.0)


@triton.jit
def _entmax_fwd_kernel(
    x_ptr, stride_x, p_ptr, stride_p, n_cols,
    ENTMAX: tl.constexpr, N_ITER: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    p_row = p_ptr + row * stride_p
    top = tl.full([], float("-inf"), ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
        top = tl.maximum(top, tl.max(x, 0))
    width = 2.0 if ENTMAX else 1.0
    low = top - width  # Σ f(x − low) ≥ 1
    high = top  # Σ f(x − high) = 0
    for _ in range(N_ITER):
        middle = (low + high) * 0.5
        total = tl.zeros([], ACC)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
            total += tl.sum(_mapping(x - middle, ENTMAX), 0)
        above = total >= 1.0
        low = tl.where(above, middle, low)
        high = tl.where(above, high, middle)
    # the support {x > low}, and the exact threshold on it
    count = tl.zeros([], ACC)
    first = tl.zeros([], ACC)
    second = tl.zeros([], ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
        inside = x > low
        u = x - top  # shifted by the max: small sums, less cancellation in the root below
        count += tl.sum(inside.to(ACC), 0)
        first += tl.sum(tl.where(inside, u, 0.0), 0)
        second += tl.sum(tl.where(inside, u * u, 0.0), 0)
    if ENTMAX:
        # the discriminant is ≥ 0 for a consistent support; clamp what rounding may push below
        tau = top + (first - tl.sqrt(tl.maximum(first * first - count * (second - 4.0), 0.0))) / count
    else:
        tau = top + (first - 1.0) / count
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(ACC)
        tl.store(p_row + cols, _mapping(x - tau, ENTMAX).to(p_row.dtype.element_ty), mask=mask)


@triton.jit
def _entmax_bwd_kernel(
    p_ptr, stride_p, g_ptr, stride_g, out_ptr, stride_o, n_cols,
    ENTMAX: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * stride_p
    g_row = g_ptr + row * stride_g
    o_row = out_ptr + row * stride_o
    weighted = tl.zeros([], ACC)
    total = tl.zeros([], ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
        s = tl.sqrt(p) if ENTMAX else (p > 0).to(ACC)
        weighted += tl.sum(s * g, 0)
        total += tl.sum(s, 0)
    q = weighted / tl.where(total == 0, 1.0, total)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
        s = tl.sqrt(p) if ENTMAX else (p > 0).to(ACC)
        tl.store(o_row + cols, (s * (g - q)).to(o_row.dtype.element_ty), mask=mask)


def _config(num_classes: int, dtype: torch.dtype) -> dict:
    limit = 1024 if _interpreting() else 8192
    block = min(triton.next_power_of_2(max(num_classes, 1)), limit)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return {"BLOCK": block, "ACC": acc, "num_warps": 4 if block <= 1024 else 8 if block <= 4096 else 16}


class _TritonEntmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, entmax: bool) -> torch.Tensor:
        rows = x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()
        p = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
        num_rows, num_classes = rows.shape
        if num_rows and num_classes:
            # bisection halves [max − width, max] per step: 30 steps reach fp32 resolution, 60 fp64's
            n_iter = 60 if x.dtype == torch.float64 else 30
            _entmax_fwd_kernel[(num_rows,)](rows, rows.stride(0), p, p.stride(0), num_classes, ENTMAX=entmax,
                                            N_ITER=n_iter, **_config(num_classes, x.dtype))
        ctx.entmax = entmax
        ctx.save_for_backward(p)
        return p

    @staticmethod
    @strict_once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (p,) = ctx.saved_tensors
        grad_output = grad_output if grad_output.stride(-1) == 1 else grad_output.contiguous()
        grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        num_rows, num_classes = p.shape
        if num_rows and num_classes:
            _entmax_bwd_kernel[(num_rows,)](p, p.stride(0), grad_output, grad_output.stride(0), grad, grad.stride(0),
                                            num_classes, ENTMAX=ctx.entmax, **_config(num_classes, p.dtype))
        return grad, None


def triton_entmax(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Sparsemax (``kind="sparsemax"``) or 1.5-entmax (``"entmax15"``) of ``rows`` ``(N, C)`` over the last dim.

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if kind not in ("sparsemax", "entmax15"):
        raise ValueError(f"`kind` must be 'sparsemax' or 'entmax15', but got {kind!r}")
    if not rows.is_cuda and not _interpreting():
        raise ValueError(
            f"the Triton entmax kernels need CUDA tensors (or TRITON_INTERPRET=1), but got a tensor on {rows.device}"
        )
    return _TritonEntmaxFunction.apply(rows, kind == "entmax15")
