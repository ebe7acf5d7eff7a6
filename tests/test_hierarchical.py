"""HierarchicalSoftmax: the Huffman tree (prefix-free, optimal), rows that normalise exactly, the float64
oracle, gradcheck of the custom backward, predict, ignore_index, low precision, and bad input.

Tolerances: float64 1e-10 relative (``_helpers``); row normalisation in float64 to 1e-12 absolute (a sum of
C − 1 ≤ 2000 node decisions whose branch probabilities add to 1 up to 1 ulp each).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from softmaxkit.hierarchical import _HierarchicalNLLFunction, huffman_paths, huffman_tree
from softmaxkit.nn import HierarchicalSoftmax
from softmaxkit.reference.hierarchical import hierarchical_log_prob, hierarchical_nll, huffman_cost

from ._helpers import assert_close_f64, assert_within_budget, to_numpy


def _module(num_classes=40, in_features=6, seed=0, dtype=torch.float64, **kwargs):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 1000, (num_classes,), generator=g).double() ** 1.5
    torch.manual_seed(seed)
    module = HierarchicalSoftmax(in_features, counts, dtype=dtype, **kwargs)
    with torch.no_grad():
        module.weight.normal_(generator=g)
        if module.bias is not None:
            module.bias.normal_(generator=g)
    return module


def _oracle(module):
    bias = None if module.bias is None else to_numpy(module.bias)
    return to_numpy(module.weight), bias, to_numpy(module.path_nodes), to_numpy(module.path_signs)


def _codes(module):
    """Each class's bit string along its path (sign −1 ↔ code 1)."""
    signs, lengths = module.path_signs.tolist(), module.path_lengths.tolist()
    return ["".join("1" if s < 0 else "0" for s in row[:n]) for row, n in zip(signs, lengths)]


@pytest.mark.parametrize("num_classes", [2, 3, 17, 300])
def test_huffman_tree_is_prefix_free_and_optimal(num_classes):
    counts = (torch.arange(num_classes, dtype=torch.float64) + 1.0) ** -1.1 * 1e6  # Zipf-like
    module = HierarchicalSoftmax(4, counts)
    codes = _codes(module)
    assert len(set(codes)) == num_classes
    assert not any(a != b and b.startswith(a) for a in codes for b in codes)
    assert (module.path_lengths >= 1).all()
    weighted_depth = float((counts * module.path_lengths).sum())
    assert math.isclose(weighted_depth, huffman_cost(counts.numpy()), rel_tol=1e-12)
    # Huffman's expected code length lies within one bit of the entropy.
    p = counts / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    assert entropy <= weighted_depth / float(counts.sum()) < entropy + 1


def test_equal_counts_give_a_balanced_tree_and_the_word2vec_example_paths():
    module = HierarchicalSoftmax(4, torch.ones(8))
    assert module.path_lengths.tolist() == [3] * 8
    module = HierarchicalSoftmax(4, torch.tensor([50.0, 20.0, 10.0, 5.0, 1.0]))
    assert module.path_lengths.tolist() == [1, 2, 3, 4, 4]
    parent, code = huffman_tree(np.array([50.0, 20.0, 10.0, 5.0, 1.0]))
    assert parent[-1] == -1 and (parent[:-1] >= 5).all()
    nodes, signs, lengths = huffman_paths(parent, code, 5)
    assert (nodes[:, 0] == 3).all()  # every path starts at the root, inner node 2C − 2 − C = 3
    assert lengths.tolist() == [1, 2, 3, 4, 4]
    assert ((signs != 0).sum(1) == lengths).all() and (signs[:, 0] != 0).all()  # padding only at the end


@pytest.mark.parametrize("bias", [True, False])
def test_log_prob_matches_oracle_and_rows_normalise_exactly(bias):
    module = _module(num_classes=57, bias=bias)
    hidden = torch.randn(9, 6, dtype=torch.float64) * 3
    log_p = module.log_prob(hidden)
    assert_close_f64(log_p, hierarchical_log_prob(to_numpy(hidden), *_oracle(module)))
    assert_close_f64(torch.logsumexp(log_p, dim=1), torch.zeros(9, dtype=torch.float64), atol=1e-12)
    assert log_p.shape == (9, 57)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_matches_oracle_and_log_prob(reduction):
    module = _module(num_classes=33, reduction=reduction)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 33, (2, 5))
    loss = module(hidden, target)
    nll = hierarchical_nll(to_numpy(hidden).reshape(-1, 6), to_numpy(target).reshape(-1), *_oracle(module))
    expected = {"mean": nll.mean(), "sum": nll.sum(), "none": nll.reshape(2, 5)}[reduction]
    assert_close_f64(loss, expected)
    picked = -module.log_prob(hidden).gather(-1, target[..., None])[..., 0]
    assert_close_f64(loss, {"mean": picked.mean(), "sum": picked.sum(), "none": picked}[reduction])


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64_of_the_custom_backward(bias):
    module = _module(num_classes=12, in_features=3, bias=bias)
    target = torch.tensor([0, 3, 11, 7, 7])
    nodes, signs = module.path_nodes[target], module.path_signs[target]
    inputs = (torch.randn(5, 3, dtype=torch.float64), module.weight.detach(), module.bias)
    inputs = tuple(None if t is None else t.detach().clone().requires_grad_() for t in inputs)

    def per_row_nll(hidden, weight, bias):
        return _HierarchicalNLLFunction.apply(hidden, weight, bias, nodes, signs, 2)  # chunks of 2 rows

    assert torch.autograd.gradcheck(per_row_nll, inputs)


def test_sparse_and_gathered_paths_agree_and_the_csr_matrix_is_valid(monkeypatch):
    """fp32/fp64 use SDDMM/SpMM over a CSR path matrix, fp16/bf16 gather node vectors: same numbers."""
    import softmaxkit.hierarchical as hierarchical

    module = _module(num_classes=90, in_features=5, reduction="none")
    hidden = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 90, (11,))
    target[4] = -100
    results = []
    for sparse in (True, False):
        monkeypatch.setattr(hierarchical, "_sparse_path", lambda dtype, sparse=sparse: sparse)
        loss = module(hidden, target)
        grads = torch.autograd.grad((loss * torch.arange(11.0, dtype=torch.float64)).sum(),
                                    [hidden, module.weight, module.bias])
        results.append((loss, *grads))
    for a, b in zip(*results):
        assert_close_f64(a, b, rtol=1e-12)
    nodes, signs = module.path_nodes[target.clamp(min=0)], module.path_signs[target.clamp(min=0)]
    order = torch.argsort(torch.where(signs != 0, nodes, 90), dim=1)
    nodes, mask = nodes.gather(1, order), signs.gather(1, order) != 0
    matrix = hierarchical._path_matrix(nodes, mask, torch.ones(nodes.shape, dtype=torch.float64), 89, check=True)
    assert matrix._nnz() == int(mask.sum())


def test_gradients_equal_autograd_through_log_prob():
    module = _module(num_classes=20, in_features=4)
    hidden = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 20, (7,))
    grads = torch.autograd.grad(module(hidden, target), [hidden, module.weight, module.bias])
    picked = -module.log_prob(hidden).gather(1, target[:, None]).mean()
    expected = torch.autograd.grad(picked, [hidden, module.weight, module.bias])
    for a, b in zip(grads, expected):
        assert_close_f64(a, b)


def test_only_the_targets_path_nodes_get_gradient():
    module = _module(num_classes=64, in_features=4)
    target = torch.tensor([5])
    (grad,) = torch.autograd.grad(module(torch.randn(1, 4, dtype=torch.float64), target), [module.weight])
    length = int(module.path_lengths[5])
    touched = torch.zeros(63, dtype=torch.bool)
    touched[module.path_nodes[5, :length]] = True
    assert torch.count_nonzero(grad[~touched]) == 0 and (grad[touched].abs().sum(1) > 0).all()


def test_ignore_index_equals_dropping_rows_and_all_ignored_is_zero():
    module = _module(num_classes=15)
    hidden = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 4, 14, -100, 0])
    keep = target != -100
    loss = module(hidden, target)
    dropped = module(hidden[keep], target[keep])
    assert_close_f64(loss, dropped, rtol=1e-14)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert torch.count_nonzero(grad[~keep]) == 0
    zero = module(hidden, torch.full_like(target, -100))
    assert zero.item() == 0.0


def test_predict_is_argmax_of_log_prob_for_any_leading_shape():
    module = _module(num_classes=200)
    hidden = torch.randn(3, 4, 6, dtype=torch.float64)
    predicted = module.predict(hidden)
    assert predicted.shape == (3, 4)
    assert torch.equal(predicted, module.log_prob(hidden).argmax(-1))


def test_state_dict_round_trip_and_extreme_inputs():
    module = _module(num_classes=30, dtype=torch.float32)
    clone = HierarchicalSoftmax(6, module.counts, dtype=torch.float32)
    clone.load_state_dict(module.state_dict())
    hidden = torch.randn(4, 6)
    assert torch.equal(clone.log_prob(hidden), module.log_prob(hidden))
    extreme = (hidden * 1e4).requires_grad_()
    loss = module(extreme, torch.tensor([0, 5, 17, 29]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(extreme.grad).all()
    assert torch.isfinite(module.log_prob(extreme.detach())).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_error_budget(dtype):
    """|ours − oracle| ≤ |the same sum of log-sigmoids in plain ``dtype`` torch ops − oracle| + 4 ulp·|loss|."""
    exact = _module(num_classes=50, dtype=torch.float64)
    low = _module(num_classes=50, dtype=dtype)
    low.load_state_dict({k: (t.to(dtype) if t.is_floating_point() and k in ("weight", "bias") else t)
                         for k, t in exact.state_dict().items()})
    exact.load_state_dict({k: (t.double() if k in ("weight", "bias") else t) for k, t in low.state_dict().items()})
    hidden = torch.randn(16, 6, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 50, (16,))
    oracle = exact(hidden.double(), target)
    ours = low(hidden, target)
    scores = torch.einsum("nld,nd->nl", low.weight[low.path_nodes[target]], hidden) + low.bias[low.path_nodes[target]]
    signs = low.path_signs[target].to(dtype)
    peer = -(torch.nn.functional.logsigmoid(signs * scores) * (signs != 0)).sum(1).mean()
    assert ours.dtype == dtype
    assert_within_budget(ours, peer, oracle, tol=4 * torch.finfo(dtype).eps * abs(oracle.item()))


@given(num_classes=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_property_rows_normalise_and_match_oracle(num_classes, seed):
    module = _module(num_classes=num_classes, in_features=3, seed=seed)
    hidden = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    log_p = module.log_prob(hidden)
    assert_close_f64(torch.logsumexp(log_p, 1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert_close_f64(log_p, hierarchical_log_prob(to_numpy(hidden), *_oracle(module)))
    assert int(module.path_lengths.max()) <= num_classes - 1


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: HierarchicalSoftmax(4, torch.tensor([3.0, 0.0, 2.0])), ValueError, "holds 0.0 at class 1"),
        (lambda: HierarchicalSoftmax(4, torch.tensor([3.0, -1.0])), ValueError, "must be finite and > 0"),
        (lambda: HierarchicalSoftmax(4, torch.tensor([3.0, float("nan")])), ValueError, "must be finite and > 0"),
        (lambda: HierarchicalSoftmax(4, torch.tensor([3.0])), ValueError, "at least 2 classes"),
        (lambda: HierarchicalSoftmax(4, torch.ones(2, 2)), ValueError, "must be a 1-d tensor"),
        (lambda: HierarchicalSoftmax(4, torch.ones(5))(torch.randn(2, 3), torch.tensor([0, 1])), ValueError,
         "`hidden` must have shape (..., 4)"),
        (lambda: HierarchicalSoftmax(4, torch.ones(5))(torch.randn(2, 4), torch.tensor([0, 5])), ValueError,
         "holds 5 at position 1"),
        (lambda: HierarchicalSoftmax(4, torch.ones(5))(torch.randn(2, 4), torch.tensor([0])), ValueError,
         "`target` must have shape (2,)"),
    ],
)
def test_bad_input_raises_clear_errors(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_docstring_examples_run():
    import doctest

    import softmaxkit.hierarchical as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
