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

fp16/bf16 are compared in fp32; every sum (the bisection's ``Σ f``, the support's ``|S|``, ``Σ x``, ``Σ x²``,
the backward's ``Σ s g``, ``Σ s``) and ``τ`` are fp64 for every dtype, so wide near-uniform rows still sum
to 1 in fp32; ``τ`` is applied as two halves in the compare dtype.

Custom ops (``torch.library.triton_op``, launched through ``wrap_triton`` so ``torch.compile`` sees the
kernels): ``torch.ops.softmaxkit.sparse_map_triton`` and ``sparse_map_backward_triton``, with the autograd of
:mod:`softmaxkit.backends._custom_op`. Chosen by the dispatch table for CUDA tensors when Triton is
installed; CPU CI runs the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._custom_op import differentiable, once_differentiable


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
    # ACC: the dtype entries are compared in (fp32, or fp64 for fp64 input); every sum and τ are fp64
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
        total = tl.zeros([], tl.float64)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
            total += tl.sum(_mapping(x - middle, ENTMAX).to(tl.float64), 0)
        above = total >= 1.0
        low = tl.where(above, middle, low)
        high = tl.where(above, high, middle)
    # the support {x > low}, and the exact threshold on it
    count = tl.zeros([], tl.float64)
    first = tl.zeros([], tl.float64)
    second = tl.zeros([], tl.float64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(ACC)
        inside = x > low
        u = (x - top).to(tl.float64)  # shifted by the max: small sums, less cancellation in the root below
        count += tl.sum(inside.to(tl.float64), 0)
        first += tl.sum(tl.where(inside, u, 0.0), 0)
        second += tl.sum(tl.where(inside, u * u, 0.0), 0)
    if ENTMAX:
        # the discriminant is ≥ 0 for a consistent support; clamp what rounding may push below
        shift = (first - tl.sqrt(tl.maximum(first * first - count * (second - 4.0), 0.0))) / count
    else:
        shift = (first - 1.0) / count
    # τ = top + shift in fp64, applied as two ACC halves so its precision reaches every entry
    shift_hi = shift.to(ACC)
    shift_lo = (shift - shift_hi.to(tl.float64)).to(ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(ACC)
        tl.store(p_row + cols, _mapping(((x - top) - shift_hi) - shift_lo, ENTMAX).to(p_row.dtype.element_ty),
                 mask=mask)


@triton.jit
def _entmax_bwd_kernel(
    p_ptr, stride_p, g_ptr, stride_g, out_ptr, stride_o, n_cols,
    ENTMAX: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * stride_p
    g_row = g_ptr + row * stride_g
    o_row = out_ptr + row * stride_o
    weighted = tl.zeros([], tl.float64)
    total = tl.zeros([], tl.float64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
        s = tl.sqrt(p) if ENTMAX else (p > 0).to(ACC)
        weighted += tl.sum((s * g).to(tl.float64), 0)
        total += tl.sum(s.to(tl.float64), 0)
    q = (weighted / tl.where(total == 0, 1.0, total)).to(ACC)
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_kind(kind: str) -> bool:
    if kind not in ("sparsemax", "entmax15"):
        raise ValueError(f"`kind` must be 'sparsemax' or 'entmax15', but got {kind!r}")
    return kind == "entmax15"


@triton_op("softmaxkit::sparse_map_triton", mutates_args=())
def _map_op(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Sparsemax / 1.5-entmax (``kind``) of 2-D rows ``x`` ``(N, C)`` by :func:`_entmax_fwd_kernel`."""
    entmax = _check_kind(kind)
    rows = x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()
    p = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    num_rows, num_classes = rows.shape
    if num_rows and num_classes and x.device.type != "meta":  # meta tensors: shapes only, as the fake kernel
        # bisection halves [max − width, max] per step: it only has to fix the support (τ is then solved
        # exactly on it): 40 steps resolve far below an fp32 ulp of the entries, 60 below an fp64 one
        n_iter = 60 if x.dtype == torch.float64 else 40
        wrap_triton(_entmax_fwd_kernel)[(num_rows,)](
            rows, rows.stride(0), p, p.stride(0), num_classes, ENTMAX=entmax, N_ITER=n_iter,
            **_config(num_classes, x.dtype),
        )
    return p


@triton_op("softmaxkit::sparse_map_backward_triton", mutates_args=())
def _map_backward_op(p: torch.Tensor, grad_output: torch.Tensor, kind: str) -> torch.Tensor:
    """``s ⊙ (g − Σ s g / Σ s)`` from the saved output ``p`` by :func:`_entmax_bwd_kernel`."""
    entmax = _check_kind(kind)
    p = p if p.stride(-1) == 1 or p.shape[-1] <= 1 else p.contiguous()
    grad_output = grad_output.to(p.dtype)
    grad_output = grad_output if grad_output.stride(-1) == 1 else grad_output.contiguous()
    grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    num_rows, num_classes = p.shape
    if num_rows and num_classes and p.device.type != "meta":
        wrap_triton(_entmax_bwd_kernel)[(num_rows,)](
            p, p.stride(0), grad_output, grad_output.stride(0), grad, grad.stride(0), num_classes,
            ENTMAX=entmax, **_config(num_classes, p.dtype),
        )
    return grad


@_map_op.register_fake
def _map_fake(x, kind):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_map_backward_op.register_fake
def _map_backward_fake(p, grad_output, kind):
    return torch.empty(p.shape, dtype=p.dtype, device=p.device)


def _map_setup(ctx, inputs, output):
    ctx.kind = inputs[1]
    ctx.save_for_backward(output)


def _map_backward(ctx, grad_output):
    (p,) = ctx.saved_tensors
    return _MapBackward(p, grad_output, ctx.kind), None


_MapFunction = differentiable(_map_op, _map_setup, _map_backward)
_MapBackward = once_differentiable(_map_backward_op)


def triton_entmax(
    rows: torch.Tensor, kind: str, alpha_rows: torch.Tensor | None = None, scalar_alpha: float | None = None,
    n_iter: int = 0,
) -> torch.Tensor:
    """Sparsemax (``kind="sparsemax"``) or 1.5-entmax (``"entmax15"``) of ``rows`` ``(N, C)`` over the last dim,
    through ``torch.ops.softmaxkit.sparse_map_triton`` (the α arguments are not used: the dispatch table's
    common signature).

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check_kind(kind)
    if not rows.is_cuda and not _interpreting() and rows.device.type != "meta":
        raise ValueError(
            f"the Triton entmax kernels need CUDA tensors (or TRITON_INTERPRET=1), but got a tensor on {rows.device}"
        )
    return _MapFunction(rows, kind)
