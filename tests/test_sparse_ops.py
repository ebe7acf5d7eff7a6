"""The sparse family as PyTorch ops: torch.library custom ops, the dispatch table, compile / export / fake.

Every public function (sparsemax, entmax15, entmax_bisect and their Fenchel-Young losses) must trace under
``torch.compile(fullgraph=True)`` with zero graph breaks (counted by ``torch._dynamo.explain``) and equal
eager (values and gradients), export with ``torch.export.export(strict=False)``, give the right shapes under
FakeTensorMode and on the meta device (in a subprocess, so that a crash fails the test instead of killing
pytest), and differentiate under ``torch.func.grad``. Every custom op passes ``torch.library.opcheck``.
Shapes are tiny: compiles are slow on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import softmaxkit
from softmaxkit import backends
from softmaxkit.backends.cpu import sparse as cpu_sparse

HAS_KERNEL = cpu_sparse.available(torch.float32) and cpu_sparse.available(torch.float64)
SRC = str(Path(softmaxkit.__file__).resolve().parents[1])


def _x(dtype=torch.float32, shape=(3, 5)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=generator) * 2).to(dtype)


TARGET = torch.tensor([0, 3, 4])
ALPHA = torch.tensor([[1.3], [1.5], [2.2]])

#: name -> (function of (x, alpha), needs alpha); alpha is a (3, 1) tensor receiving a gradient
FUNCTIONS = {
    "sparsemax": lambda x, a: softmaxkit.sparsemax(x),
    "entmax15": lambda x, a: softmaxkit.entmax15(x, dim=0),
    "entmax_bisect": lambda x, a: softmaxkit.entmax_bisect(x, alpha=a, n_iter=30),
    "sparsemax_loss": lambda x, a: softmaxkit.sparsemax_loss(x, TARGET, temperature=0.7),
    "entmax15_loss": lambda x, a: softmaxkit.entmax15_loss(x, TARGET, reduction="none"),
    "entmax_bisect_loss": lambda x, a: softmaxkit.entmax_bisect_loss(x, TARGET, alpha=a, n_iter=30),
}
IMPLS = ["auto", "torch"]


def _scalar(output: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(0.5, 1.5, output.numel(), dtype=output.dtype).reshape(output.shape)
    return (output * weights).sum()


def _eager_and_grads(function, x, alpha):
    x = x.detach().requires_grad_()
    alpha = alpha.detach().requires_grad_()
    out = function(x, alpha)
    grads = torch.autograd.grad(_scalar(out), (x, alpha), allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_no_graph_breaks(name):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(FUNCTIONS[name])(_x().requires_grad_(), ALPHA.clone().requires_grad_())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert any("softmaxkit" in op for op in ops) or any("_function" in op for op in ops), ops


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_compiled_equals_eager(name):
    """fullgraph compile through AOTAutograd (fake kernels + the registered backward) equals eager."""
    torch._dynamo.reset()
    function = FUNCTIONS[name]
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    x = _x()
    eager_out, eager_grads = _eager_and_grads(function, x, ALPHA)
    out, grads = _eager_and_grads(compiled, x, ALPHA)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for got, expected in zip(grads, eager_grads):
        if expected is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "entmax_bisect"])
def test_compiled_without_grad(name, impl):
    """Inference (no input requires grad) traces as well: the op is called directly, no Function."""
    torch._dynamo.reset()
    function = getattr(softmaxkit, name)
    compiled = torch.compile(lambda v: function(v, impl=impl), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(_x()), function(_x(), impl=impl), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sparsemax", "sparsemax_loss"])
def test_inductor_compile_equals_eager(name):
    """The default backend (Inductor) too, on the C kernel's ops."""
    torch._dynamo.reset()
    function = FUNCTIONS[name]
    compiled = torch.compile(function, fullgraph=True)
    eager_out, eager_grads = _eager_and_grads(function, _x(), ALPHA)
    out, grads = _eager_and_grads(compiled, _x(), ALPHA)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(grads[0], eager_grads[0])


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_export_non_strict(name):
    function = FUNCTIONS[name]

    class Wrapper(torch.nn.Module):
        def forward(self, x, alpha):
            return function(x, alpha)

    exported = torch.export.export(Wrapper(), (_x(), ALPHA.clone()), strict=False)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("softmaxkit." in target for target in targets), targets
    torch.testing.assert_close(exported.module()(_x(), ALPHA.clone()), function(_x(), ALPHA.clone()))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_func_grad_equals_autograd(name):
    function = FUNCTIONS[name]
    x = _x(torch.float64)
    alpha = ALPHA.double()
    grad_x, grad_alpha = torch.func.grad(lambda v, a: _scalar(function(v, a)), argnums=(0, 1))(x, alpha)
    _, (expected_x, expected_alpha) = _eager_and_grads(function, x, alpha)
    torch.testing.assert_close(grad_x, expected_x)
    if expected_alpha is not None:
        torch.testing.assert_close(grad_alpha, expected_alpha)
        assert grad_alpha.abs().sum() > 0  # a tensor alpha keeps its gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_gradient_compiled(impl):
    torch._dynamo.reset()

    def function(x, a):
        return softmaxkit.entmax_bisect_loss(x, TARGET, alpha=a, reduction="sum", impl=impl)

    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    _, (_, expected) = _eager_and_grads(function, _x(), ALPHA)
    _, (_, got) = _eager_and_grads(compiled, _x(), ALPHA)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------- fake / meta / DTensor
_SUBPROCESS = textwrap.dedent(
    """
    import sys, torch, softmaxkit
    from torch._subclasses.fake_tensor import FakeTensorMode
    name = sys.argv[1]
    target = lambda x: torch.tensor([0, 3, 4], device=x.device)  # made in the same mode as x
    calls = {
        "sparsemax": lambda x, a: softmaxkit.sparsemax(x),
        "entmax15": lambda x, a: softmaxkit.entmax15(x),
        "entmax_bisect": lambda x, a: softmaxkit.entmax_bisect(x, alpha=a),
        "sparsemax_loss": lambda x, a: softmaxkit.sparsemax_loss(x, target(x), reduction="none"),
        "entmax15_loss": lambda x, a: softmaxkit.entmax15_loss(x, target(x)),
        "entmax_bisect_loss": lambda x, a: softmaxkit.entmax_bisect_loss(x, target(x), alpha=a),
    }
    call = calls[name]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        with FakeTensorMode():
            x = torch.empty(3, 5, dtype=dtype, requires_grad=True)
            a = torch.full((3, 1), 1.5, dtype=dtype, requires_grad=True)
            out = call(x, a)
            out.sum().backward()
            print("fake", dtype, tuple(out.shape), out.dtype, tuple(x.grad.shape))
        x = torch.empty(3, 5, dtype=dtype, device="meta", requires_grad=True)
        a = torch.full((3, 1), 1.5, dtype=dtype, device="meta", requires_grad=True)
        out = call(x, a)
        out.sum().backward()
        print("meta", dtype, tuple(out.shape), out.dtype, tuple(x.grad.shape), x.grad.device)
    import tempfile
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    distributed = DTensor.from_local(torch.randn(3, 5), mesh, [Replicate()])
    try:
        out = call(distributed, torch.full((3, 1), 1.5))
        expected = call(distributed.to_local(), torch.full((3, 1), 1.5))
        assert isinstance(out, DTensor) and torch.allclose(out.full_tensor(), expected), (out, expected)
        print("dtensor served")
    except TypeError as error:
        print("dtensor TypeError", error)
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_fake_meta_and_dtensor_in_subprocess(name):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS, name], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    lines = result.stdout.splitlines()
    loss = name.endswith("_loss")
    expected_shape = "()" if loss and name != "sparsemax_loss" else "(3,)" if loss else "(3, 5)"
    fake = [line for line in lines if line.startswith("fake")]
    meta = [line for line in lines if line.startswith("meta")]
    assert len(fake) == 3 and len(meta) == 3, lines
    for line, dtype in zip(fake, ("float32", "bfloat16", "float64")):
        assert f"{expected_shape} torch.{dtype} (3, 5)" in line, line
    assert all("device(type='meta')" in line or "meta" in line.split()[-1] for line in meta), meta
    # the maps and the losses take DTensors (functional/_dtensor.py; placements tested in tests/test_dtensor.py)
    assert "dtensor served" in lines, lines


# ---------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    x = _x(torch.float64).requires_grad_()
    p = softmaxkit.sparsemax(x.detach(), impl="torch")
    g = torch.randn(3, 5, dtype=torch.float64)
    alpha = ALPHA.double().requires_grad_()
    cases = [
        ("entmax_torch", (x, None, "sparsemax", 1.5, 50)),
        ("entmax_torch", (x, None, "entmax15", 1.5, 50)),
        ("entmax_torch", (x, alpha, "bisect", 1.5, 40)),
        ("entmax_torch", (x, None, "bisect", 1.2, 40)),
        ("entmax_torch_backward", (g, p, torch.zeros(3, dtype=torch.float64), torch.empty(0, dtype=torch.float64),
                                   None, "sparsemax", 1.5, False)),
        ("fenchel_young_torch", (x, None, TARGET, None, "sparsemax", 1.5, 50, -100, "mean")),
        ("fenchel_young_torch", (x, None, TARGET, torch.rand(5, dtype=torch.float64), "entmax15", 1.5, 50, 4,
                                 "none")),
        ("fenchel_young_torch", (x, alpha, TARGET, None, "bisect", 1.5, 40, -100, "sum")),
    ]
    if HAS_KERNEL:
        cases += [
            ("sparse_map_cpu", (x, "sparsemax")),
            ("sparse_map_cpu", (x.float().detach().requires_grad_(), "entmax15")),
            ("sparse_map_backward_cpu", (p, g, "sparsemax")),
            ("fenchel_young_cpu", (x, TARGET, None, -100, "sparsemax", "mean")),
            ("fenchel_young_cpu", (x, TARGET, torch.rand(5, dtype=torch.float64), 3, "entmax15", "none")),
        ]
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.softmaxkit, name).default, args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_opcheck_triton():
    pytest.importorskip("triton")
    import softmaxkit.backends.triton.sparse  # noqa: F401  (registers the ops)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = _x(torch.float64).to(device).requires_grad_()
    # the interpreter reads real data pointers, so AOT-dispatch tracing only runs on a GPU
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration", "test_faketensor")
    for kind in ("sparsemax", "entmax15"):
        torch.library.opcheck(torch.ops.softmaxkit.sparse_map_triton.default, (x, kind), test_utils=utils)
        p = torch.ops.softmaxkit.sparse_map_triton(x.detach(), kind)
        torch.library.opcheck(torch.ops.softmaxkit.sparse_map_backward_triton.default,
                              (p, torch.randn_like(p), kind), test_utils=utils)


# ---------------------------------------------------------------------------------- dispatch
def _request(device="cpu", dtype=torch.float32):
    return backends.Request(device=device, dtype=dtype, ndim=2)


def test_dispatch_rows():
    assert backends.implementations("sparsemax") == ("auto", "cpu", "triton", "torch")
    assert backends.implementations("entmax15_loss") == ("auto", "cpu", "torch")
    assert backends.implementations("entmax_bisect") == ("auto", "torch")
    assert backends.implementations("entmax_bisect_loss") == ("auto", "torch")
    meta = backends.describe("sparsemax", _request("meta"))
    assert meta["torch"] is None and "cpu" in meta["cpu"] and "cuda" in meta["triton"]
    assert backends.select("sparsemax", "auto", _request("meta")).name == "torch"
    assert backends.select("sparsemax", "auto", _request("cuda")).name in ("triton", "torch")


def test_explicit_impl_that_cannot_serve_raises():
    with pytest.raises(ValueError, match="impl='triton'.*needs cuda"):
        softmaxkit.sparsemax(_x(), impl="triton")
    with pytest.raises(ValueError, match="`impl` must be one of"):
        softmaxkit.entmax_bisect(_x(), impl="cpu")
    with pytest.raises(ValueError, match="`impl` must be one of"):
        softmaxkit.sparsemax_loss(_x(), TARGET, impl="fast")
    with pytest.raises(ValueError, match="impl='cpu'.*needs cpu"):
        softmaxkit.entmax15(torch.empty(2, 3, device="meta"), impl="cpu")


@pytest.mark.skipif(not HAS_KERNEL, reason="no CPU sparse kernel here")
@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
def test_impls_agree(kind):
    x = _x(torch.float64, (4, 9))
    function = FUNCTIONS[kind]
    torch.testing.assert_close(getattr(softmaxkit, kind)(x, impl="cpu"), getattr(softmaxkit, kind)(x, impl="torch"))
    loss = getattr(softmaxkit, f"{kind}_loss")
    target = torch.tensor([0, 1, 8, 2])
    torch.testing.assert_close(loss(x, target, impl="cpu"), loss(x, target, impl="torch"))
    assert function is not None


def test_double_backward_refused():
    x = _x(torch.float64).requires_grad_()
    for impl in ("torch", *(["cpu"] if HAS_KERNEL else [])):
        p = softmaxkit.sparsemax(x, impl=impl)
        (grad,) = torch.autograd.grad(_scalar(p), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once differentiable"):
            grad.sum().backward()
