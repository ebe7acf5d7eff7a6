r"""Hierarchical softmax's per-row loss as the custom op ``softmaxkit::hierarchical_nll``.

Row ``i`` of ``hidden`` ``(N, D)`` with its path's inner nodes ``n_{i1} … n_{iL}`` (``nodes`` ``(N, L)``) and
signs ``s_{ik} = 1 − 2 d_{ik} ∈ {±1}`` (``signs`` ``(N, L)``, 0 on padding) has

.. math:: ℓ_i = −\sum_k \log σ\big(s_{ik}\,u_{ik}\big), \quad u_{ik} = w_{n_{ik}}·h_i + b_{n_{ik}},
          \qquad \frac{∂ℓ_i}{∂u_{ik}} = −s_{ik}\,σ(−s_{ik} u_{ik}) =: c_{ik}.

With ``S`` the ``(N, C − 1)`` sparse matrix holding row ``i``'s path, the scores are the sampled product
``u = (H Wᵀ)|_S`` (an SDDMM) and, with ``G = g ⊙ c`` on the same pattern, ``∂ℓ/∂H = G W``, ``∂ℓ/∂W = Gᵀ H``
and ``∂ℓ/∂b = Σ_i G_{i·}`` (SpMMs): ``O(N·L·D)`` work, no ``(N, L, D)`` tensor. fp16/bf16 (no sparse
kernels) gather a chunk of rows' node vectors at a time, upcast to fp32 and ``bmm`` instead
(:func:`sparse_path` says which).

The forward op returns ``(ℓ, sorted nodes, mask, c)``: the three statistics are what the backward op
(``softmaxkit::hierarchical_nll_backward``) needs, saved through ``setup_context``; the op has fake kernels
(meta, ``FakeTensorMode``, ``torch.compile``, ``torch.export``) and the autograd of
:mod:`softmaxkit.backends._custom_op`. The backward is a closed form and once differentiable.
"""

from __future__ import annotations

import warnings

import torch

from ..._core import compute_dtype
from ..._core.autograd import refuse_double_backward
from .._custom_op import differentiable, once_differentiable

__all__ = ["path_matrix", "sparse_path", "torch_hierarchical_nll"]


def sparse_path(dtype: torch.dtype) -> bool:
    """Sparse kernels (SDDMM / SpMM) exist for fp32 and fp64; fp16/bf16 use the gathered path."""
    return dtype in (torch.float32, torch.float64)


def path_matrix(
    nodes: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, num_nodes: int, check: bool = False
) -> torch.Tensor:
    """The ``(N, C − 1)`` sparse CSR matrix with ``values[i, k]`` at column ``nodes[i, k]`` where ``mask``.

    ``nodes`` must be sorted within each row over its masked (leading) entries, which are distinct, so the
    matrix meets the CSR invariants (``check=True`` verifies them; the tests do, the forward skips it).
    """
    counts = mask.sum(1)
    crow = torch.zeros(nodes.shape[0] + 1, dtype=torch.int64, device=nodes.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, nodes[mask], values[mask], (nodes.shape[0], num_nodes),
                                       check_invariants=check)


@torch.library.custom_op("softmaxkit::hierarchical_nll", mutates_args=())
def _hierarchical_nll_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    nodes: torch.Tensor,
    signs: torch.Tensor,
    chunk_rows: int,
    sparse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ (N,), sorted nodes (N, L), mask (N, L), c (N, L))``: the loss in ``hidden``'s dtype, each row's
    nodes in increasing order (padding last), where they are real, and ``∂ℓ/∂u`` in the compute dtype."""
    num_rows = hidden.shape[0]
    work = compute_dtype(hidden.dtype)
    # each row's nodes in increasing order, padding last (the order of a path's factors is immaterial)
    order = torch.argsort(torch.where(signs != 0, nodes, weight.shape[0]), dim=1)
    nodes, signs = nodes.gather(1, order), signs.gather(1, order)
    mask = signs != 0
    if sparse:
        pattern = path_matrix(nodes, mask, torch.zeros(nodes.shape, dtype=work, device=hidden.device),
                              weight.shape[0])
        scores = torch.zeros(nodes.shape, dtype=work, device=hidden.device)
        scores[mask] = torch.sparse.sampled_addmm(pattern, hidden, weight.t()).values()
    else:
        scores = torch.empty(nodes.shape, dtype=work, device=hidden.device)
        for start in range(0, num_rows, chunk_rows):
            sl = slice(start, min(start + chunk_rows, num_rows))
            node_vectors = weight[nodes[sl]].to(work)  # (r, L, D)
            scores[sl] = torch.bmm(node_vectors, hidden[sl].to(work)[:, :, None])[:, :, 0]
    if bias is not None:
        scores = scores + bias.to(work)[nodes]
    signed = signs.to(work) * scores
    nll = -torch.where(mask, torch.nn.functional.logsigmoid(signed), 0.0).sum(1)
    # d(−log σ(s·u))/du = −s·σ(−s·u), 0 on padding
    coefficient = torch.where(mask, -signs.to(work) * torch.sigmoid(-signed), 0.0)
    return nll.to(hidden.dtype), nodes, mask, coefficient


@_hierarchical_nll_op.register_fake
def _hierarchical_nll_fake(hidden, weight, bias, nodes, signs, chunk_rows, sparse):
    work = compute_dtype(hidden.dtype)
    return (hidden.new_empty(hidden.shape[0]), torch.empty_like(nodes, memory_format=torch.contiguous_format),
            torch.empty(nodes.shape, dtype=torch.bool, device=nodes.device),
            hidden.new_empty(nodes.shape, dtype=work))


@torch.library.custom_op("softmaxkit::hierarchical_nll_backward", mutates_args=())
def _hierarchical_nll_backward_op(
    grad_nll: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    nodes: torch.Tensor,
    mask: torch.Tensor,
    coefficient: torch.Tensor,
    chunk_rows: int,
    sparse: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂/∂hidden, ∂/∂weight, ∂/∂bias)`` in the inputs' dtypes from ``G = g ⊙ c``; a gradient not asked
    for (``need_*`` False, or no bias) is an empty tensor."""
    work = coefficient.dtype
    num_rows, hidden_size = hidden.shape
    scaled = coefficient * grad_nll.to(work)[:, None]
    grad_hidden = grad_weight = grad_bias = None
    if sparse:
        path = path_matrix(nodes, mask, scaled, weight.shape[0])
        if need_hidden:
            grad_hidden = path @ weight
        if need_weight:
            grad_weight = path.t() @ hidden
    else:
        grad_hidden = torch.empty(hidden.shape, dtype=work, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if need_weight else None
        for start in range(0, num_rows, chunk_rows):
            sl = slice(start, min(start + chunk_rows, num_rows))
            if need_hidden:
                node_vectors = weight[nodes[sl]].to(work)
                grad_hidden[sl] = torch.bmm(scaled[sl, None, :], node_vectors)[:, 0]
            if need_weight:
                outer = scaled[sl, :, None] * hidden[sl].to(work)[:, None, :]
                grad_weight.index_add_(0, nodes[sl].reshape(-1), outer.reshape(-1, hidden_size))
    if bias is not None and need_bias:
        grad_bias = torch.zeros(bias.shape, dtype=work, device=bias.device)
        grad_bias.index_add_(0, nodes.reshape(-1), scaled.reshape(-1))
    empty = hidden.new_empty(0)
    return (
        empty if grad_hidden is None else grad_hidden.to(hidden.dtype),
        empty.clone() if grad_weight is None else grad_weight.to(weight.dtype),
        empty.clone() if grad_bias is None else grad_bias.to(bias.dtype),
    )


@_hierarchical_nll_backward_op.register_fake
def _hierarchical_nll_backward_fake(grad_nll, hidden, weight, bias, nodes, mask, coefficient, chunk_rows, sparse,
                                    need_hidden, need_weight, need_bias):
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = bias.new_empty(bias.shape) if bias is not None and need_bias else None
    return tuple(hidden.new_empty(0) if grad is None else grad for grad in (grad_hidden, grad_weight, grad_bias))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, _, _, chunk_rows, sparse = inputs
    _, nodes, mask, coefficient = output
    ctx.mark_non_differentiable(nodes, mask, coefficient)
    ctx.set_materialize_grads(False)  # no zero gradients built for the statistics outputs
    ctx.chunk_rows, ctx.sparse = chunk_rows, sparse
    ctx.save_for_backward(hidden, weight, bias, nodes, mask, coefficient)


def _backward(ctx, grad_nll, *unused):
    refuse_double_backward()
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_nll is None:  # only the statistics outputs were used
        return (None,) * 7
    hidden, weight, bias, nodes, mask, coefficient = ctx.saved_tensors
    need_bias = need_bias and bias is not None
    grad_hidden, grad_weight, grad_bias = _HierarchicalNLLBackward(
        grad_nll, hidden, weight, bias, nodes, mask, coefficient, ctx.chunk_rows, ctx.sparse,
        need_hidden, need_weight, need_bias,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None)


_HierarchicalNLL = differentiable(_hierarchical_nll_op, _setup_context, _backward)
_HierarchicalNLLBackward = once_differentiable(_hierarchical_nll_backward_op)


def torch_hierarchical_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    nodes: torch.Tensor,
    signs: torch.Tensor,
    chunk_rows: int,
    sparse: bool | None = None,
) -> torch.Tensor:
    """``−log p(y_i | h_i)`` per row ``(N,)`` through ``torch.ops.softmaxkit.hierarchical_nll``.

    Args:
        hidden: ``(N, D)`` rows (validated by the caller).
        weight: ``(C − 1, D)`` inner-node vectors, ``hidden``'s dtype.
        bias: ``(C − 1,)`` inner-node biases, or None.
        nodes: ``(N, L)`` each row's path (inner-node indices, any order; padding anywhere it is masked).
        signs: ``(N, L)`` the path's ``±1`` decisions, 0 on padding (an ignored row: all 0, loss 0).
        chunk_rows: rows per chunk of the gathered path (fp16/bf16) in forward and backward.
        sparse: SDDMM/SpMM (True) or gathered chunks (False); None: :func:`sparse_path` of ``hidden``'s dtype.
    """
    sparse = sparse_path(hidden.dtype) if sparse is None else bool(sparse)
    return _HierarchicalNLL(hidden, weight, bias, nodes, signs, int(chunk_rows), sparse)[0]
