"""torch.library.opcheck on every softmaxkit custom op: schema, fake kernel, autograd registration and
AOT dispatch agree with the real kernel."""

from __future__ import annotations

import pytest
import torch

import softmaxkit  # noqa: F401  (registers the ops)

N, C, D = 5, 7, 3
SCALARS = (-100, "mean", 0.1, 1.5, 1e-3, 4.0, None)  # ignore_index ... chunk_size (CrossEntropyOptions.OP_FIELDS)


def _ce_inputs(dtype=torch.float64):
    torch.manual_seed(0)
    logits = torch.randn(N, C, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 3, -100, 6, 2])
    weight = torch.rand(C, dtype=dtype) + 0.5
    return logits, target, weight


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fuse", [False, True])
def test_cross_entropy_cpu(reduction, fuse):
    logits, target, weight = _ce_inputs()
    scalars = (SCALARS[0], reduction, *SCALARS[2:])
    op = torch.ops.softmaxkit.cross_entropy_cpu
    args = (logits, target, weight, *scalars, False, fuse)
    if not (fuse and reduction != "none"):
        torch.library.opcheck(op.default, args)
        return
    _opcheck_fused(op, args)


def _opcheck_fused(op, args):
    """opcheck of an op whose forward also returns the gradients for a unit upstream gradient.

    Its compiled backward scales those saved outputs in place (they are donated to the backward:
    ``_core.autograd.saved_gradient_times``). That is only sound because no caller returns them, so opcheck's
    AOT test, which returns every output, does not apply; the AOT check here returns the loss only, as the
    callers do, with dynamic shapes and a non-unit upstream gradient, and compares every gradient exactly.
    """
    from functorch.compile import aot_function, nop

    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_autograd_registration",
                                                        "test_faketensor"))
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    tensors = [args[i] for i in positions]
    leaves = [t for t in tensors if t.requires_grad]

    def loss_only(*given):
        full = list(args)
        for i, tensor in zip(positions, given):
            full[i] = tensor
        return op(*full)[0] * 2.5

    expected = torch.autograd.grad(loss_only(*tensors), leaves)
    actual = torch.autograd.grad(aot_function(loss_only, nop, dynamic=True)(*tensors), leaves)
    for got, wanted in zip(actual, expected):
        torch.testing.assert_close(got, wanted, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_cross_entropy_chunked(reduction):
    logits, target, weight = _ce_inputs()
    scalars = (SCALARS[0], reduction, *SCALARS[2:6], 2)
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_chunked.default,
                          (logits, target, weight, *scalars, False))


def test_backward_ops():
    logits, target, weight = _ce_inputs()
    with torch.no_grad():
        _, row_max, log_sum = torch.ops.softmaxkit.cross_entropy_chunked(logits, target, weight, *SCALARS, False)
        _, lse, stats, _ = torch.ops.softmaxkit.cross_entropy_cpu(logits, target, weight, *SCALARS, False, False)
    grad_output = torch.tensor(1.5, dtype=torch.float64)
    plain = logits.detach().clone()
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_chunked_backward.default,
                          (grad_output, plain, target, weight, row_max, log_sum, *SCALARS))
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_chunked_backward_.default,
                          (grad_output, plain.clone(), target, weight, row_max, log_sum, *SCALARS))
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_cpu_backward.default,
                          (grad_output, plain, target, weight, lse, stats, *SCALARS))
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_cpu_backward_.default,
                          (grad_output, plain.clone(), target, weight, lse, stats, *SCALARS))
    for upstream in (grad_output, torch.tensor(1.0, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.softmaxkit.scale_saved_gradient_.default, (plain.clone(), upstream))


@pytest.mark.parametrize("name", ["linear_cross_entropy", "linear_cross_entropy_cpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_linear_cross_entropy(reduction, probabilities, name):
    """Both chunk loops' op pairs: torch passes, and the CPU kernel per chunk (torch passes for probabilities)."""
    forward, backward = getattr(torch.ops.softmaxkit, name), getattr(torch.ops.softmaxkit, f"{name}_backward")
    torch.manual_seed(0)
    hidden = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1) if probabilities else torch.tensor(
        [0, 3, -100, 6, 2])
    needs = (True, True, True, probabilities)
    args = (hidden, weight, bias, target, None, -100, reduction, 0.1, 1.5, 1e-3, 4.0, 2, None, *needs)
    if reduction == "none":
        torch.library.opcheck(forward.default, args)
    else:  # the forward builds the gradients (see _opcheck_fused)
        _opcheck_fused(forward, args)
    with torch.no_grad():
        _, row_max, log_sum, *_ = forward(*args)
    torch.library.opcheck(backward.default,
                          (torch.ones(N if reduction == "none" else (), dtype=torch.float64), hidden.detach(),
                           weight.detach(), bias.detach(), target, None, row_max, log_sum, *args[5:13], *needs))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_triton(reduction):
    """The Triton op (interpreted on CPU tensors under TRITON_INTERPRET=1, as CI runs it)."""
    pytest.importorskip("triton")
    import softmaxkit.backends.triton.cross_entropy  # noqa: F401  (registers the op)

    logits, target, weight = _ce_inputs()
    scalars = (SCALARS[0], reduction, *SCALARS[2:])
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_triton.default,
                          (logits, target, weight, *scalars, False))
    with torch.no_grad():
        _, lse = torch.ops.softmaxkit.cross_entropy_triton(logits, target, weight, *scalars, False)
    plain = logits.detach().clone()
    grad_output = torch.ones(N if reduction == "none" else (), dtype=torch.float64)
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_triton_backward.default,
                          (grad_output, plain, target, weight, lse, *scalars))
    torch.library.opcheck(torch.ops.softmaxkit.cross_entropy_triton_backward_.default,
                          (grad_output, plain.clone(), target, weight, lse, *scalars))


def test_linear_cross_entropy_triton():
    pytest.importorskip("triton")
    import softmaxkit.backends.triton.linear_cross_entropy  # noqa: F401  (registers the op)

    torch.manual_seed(0)
    hidden = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 6, 2])
    torch.library.opcheck(torch.ops.softmaxkit.linear_cross_entropy_triton.default,
                          (hidden, weight, bias, target, None, -100, "mean", 0.1, 1.5, 1e-3, 4.0, 2, None,
                           True, True, True))
