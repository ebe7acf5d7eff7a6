"""HierarchicalSoftmax's loss as the custom op ``softmaxkit::hierarchical_nll``: torch.library.opcheck,
torch.compile(fullgraph=True) with zero graph breaks and compiled equal to eager (loss and gradients),
torch.export (non-strict), torch.func, and meta / FakeTensorMode shapes in a subprocess (a crash fails the
test instead of killing pytest).

Tolerances: compiled vs eager run the same op bodies on the same inputs, so fp64 is compared to 1e-12 and
fp32 to a few ulps (Inductor may order the reduction's sum differently) and bf16 (gathered path, fp32
compute, one bf16 rounding of the result) to one bf16 ulp (2^-8 relative).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo as dynamo

import softmaxkit.hierarchical as hierarchical
from softmaxkit import backends
from softmaxkit.nn import HierarchicalSoftmax

COUNTS = torch.tensor([50.0, 20.0, 10.0, 5.0, 1.0, 7.0, 3.0, 2.0, 9.0, 4.0])
N, D = 7, 4


def _module(dtype=torch.float64, bias=True, reduction="mean", seed=0):
    torch.manual_seed(seed)
    module = HierarchicalSoftmax(D, COUNTS, bias=bias, reduction=reduction, dtype=dtype)
    with torch.no_grad():
        module.weight.normal_()
        if module.bias is not None:
            module.bias.normal_()
    return module


def _inputs(dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, len(COUNTS), (N,), generator=generator)
    target[2] = -100
    return hidden, target


def _op_args(module, hidden, target, sparse):
    valid = target != module.ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    signs = module.path_signs[safe] * valid[:, None].to(module.path_signs.dtype)
    return (hidden, module.weight.detach(), None if module.bias is None else module.bias.detach(),
            module.path_nodes[safe], signs, 3, sparse)


def test_the_module_keeps_no_autograd_function_and_dispatches_through_the_table():
    functions = [name for name, obj in vars(hierarchical).items()
                 if isinstance(obj, type) and issubclass(obj, torch.autograd.Function)]
    assert functions == []
    assert backends.implementations("hierarchical_nll") == ("auto", "torch")
    hidden, _ = _inputs()
    chosen = backends.select("hierarchical_nll", "auto", backends.Request.of(hidden))
    assert chosen.target == "softmaxkit.backends.torch.hierarchical:torch_hierarchical_nll"


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "gathered"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck_forward_op(sparse, bias):
    module = _module(bias=bias)
    hidden, target = _inputs()
    args = list(_op_args(module, hidden, target, sparse))
    for position in (0, 1, 2):
        if args[position] is not None:
            args[position] = args[position].clone().requires_grad_()
    torch.library.opcheck(torch.ops.softmaxkit.hierarchical_nll.default, tuple(args))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "gathered"])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "hidden", "parameters"])
def test_opcheck_backward_op(sparse, needs):
    module = _module()
    hidden, target = _inputs()
    args = _op_args(module, hidden, target, sparse)
    _, nodes, mask, coefficient = torch.ops.softmaxkit.hierarchical_nll(*args)
    grad_nll = torch.randn(N, dtype=torch.float64)
    torch.library.opcheck(torch.ops.softmaxkit.hierarchical_nll_backward.default,
                          (grad_nll, *args[:3], nodes, mask, coefficient, 3, sparse, *needs))
    grads = torch.ops.softmaxkit.hierarchical_nll_backward(grad_nll, *args[:3], nodes, mask, coefficient, 3, sparse,
                                                           *needs)
    for grad, need, like in zip(grads, needs, args[:3]):
        assert grad.shape == (like.shape if need else (0,))


def _loss_and_grads(forward, module, hidden, target):
    """The loss and the gradients of ``Σ_i i·ℓ_i`` for hidden, weight and bias (the module's grads reset)."""
    hidden = hidden.detach().clone().requires_grad_()
    loss = forward(hidden, target)
    weights = torch.arange(1.0, 1.0 + loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    grads = [hidden.grad, module.weight.grad, module.bias.grad]
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_has_no_graph_breaks_and_equals_eager(dtype, reduction):
    module = _module(dtype=dtype, reduction=reduction)
    hidden, target = _inputs(dtype)
    dynamo.reset()
    explanation = dynamo.explain(module.forward)(hidden, target)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    dynamo.reset()
    compiled = torch.compile(module.forward, fullgraph=True)
    expected_loss, expected_grads = _loss_and_grads(module.forward, module, hidden, target)
    loss, grads = _loss_and_grads(compiled, module, hidden, target)
    # fp32: Inductor may fuse the reduction's sum differently (a few ulps)
    tolerance = {torch.bfloat16: {"rtol": 2**-8, "atol": 2**-8}, torch.float32: {"rtol": 1e-6, "atol": 1e-7},
                 torch.float64: {"rtol": 1e-12, "atol": 1e-14}}[dtype]
    assert loss.dtype == dtype and loss.shape == expected_loss.shape
    torch.testing.assert_close(loss.detach(), expected_loss, **tolerance)
    for got, want in zip(grads, expected_grads):
        assert got is not None and got.dtype == dtype
        torch.testing.assert_close(got, want, **tolerance)


def test_export_non_strict_of_a_module_using_it():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, D, dtype=torch.float64)
            self.hsm = _module(reduction="none")

        def forward(self, x, target):
            return self.hsm(torch.tanh(self.proj(x)), target)

    head = Head()
    x = torch.randn(N, 3, dtype=torch.float64)
    _, target = _inputs()
    program = torch.export.export(head, (x, target), strict=False)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "softmaxkit.hierarchical_nll.default" in ops, ops
    torch.testing.assert_close(program.module()(x, target), head(x, target), rtol=1e-12, atol=0)


def test_torch_func_grad_equals_autograd():
    module = _module()
    hidden, target = _inputs()
    grad = torch.func.grad(lambda h: module(h, target))(hidden)
    hidden = hidden.clone().requires_grad_()
    (expected,) = torch.autograd.grad(module(hidden, target), hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_meta_and_fake_tensors_give_shapes_in_a_subprocess():
    code = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from softmaxkit.nn import HierarchicalSoftmax
        counts = torch.tensor([50.0, 20.0, 10.0, 5.0, 1.0, 7.0])
        for dtype in (torch.float32, torch.bfloat16):
            for reduction, shape in (("mean", ()), ("none", (2, 3))):
                module = HierarchicalSoftmax(4, counts, reduction=reduction, device="meta", dtype=dtype)
                hidden = torch.randn(2, 3, 4, device="meta", dtype=dtype, requires_grad=True)
                loss = module(hidden, torch.zeros(2, 3, dtype=torch.long, device="meta"))
                assert loss.shape == shape and loss.dtype == dtype and loss.device.type == "meta", loss
                loss.sum().backward()
                assert hidden.grad.shape == (2, 3, 4) and module.weight.grad.shape == (5, 4)
                assert module.bias.grad.shape == (5,)
        module = HierarchicalSoftmax(4, counts)
        with FakeTensorMode(allow_non_fake_inputs=True):
            hidden = torch.randn(3, 4, requires_grad=True)
            loss = module(hidden, torch.zeros(3, dtype=torch.long))
            loss.backward()
            assert loss.shape == () and hidden.grad.shape == (3, 4) and module.weight.grad.shape == (5, 4)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
