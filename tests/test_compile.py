"""The cross-entropy family under torch.compile, torch.export, FakeTensorMode, meta tensors, autocast and
torch.func: zero graph breaks, compiled equals eager, the right shapes and dtypes.

Shapes are tiny (compiling is slow); the crash-prone cases (fake/meta tensors, DTensor) run in a subprocess
so a segfault fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo as dynamo

import softmaxkit

N, C, D = 6, 5, 4


def _inputs(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(0, C, (N,), generator=generator)
    target[1] = -100
    return logits, target


def _break_count(function, *args) -> int:
    dynamo.reset()
    explanation = dynamo.explain(function)(*args)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


CE_OPTIONS = {
    "plain": {},
    "weight": {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5, 0.2])},
    "label_smoothing": {"label_smoothing": 0.1},
    "temperature": {"temperature": 1.7},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 3.0},
    "none": {"reduction": "none"},
    "sum": {"reduction": "sum"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CE_OPTIONS))
def test_cross_entropy_traces_without_graph_breaks(name, dtype):
    logits, target = _inputs(dtype)
    options = CE_OPTIONS[name]
    assert _break_count(lambda x, t: softmaxkit.cross_entropy(x, t, **options), logits.requires_grad_(), target) == 0


@pytest.mark.parametrize("impl", ["auto", "cpu", "torch", "composite", "triton"])
def test_every_cpu_implementation_traces_without_graph_breaks(impl):
    if impl == "triton":
        pytest.importorskip("triton")
    logits, target = _inputs()
    assert _break_count(lambda x, t: softmaxkit.cross_entropy(x, t, impl=impl), logits.requires_grad_(), target) == 0


def test_probability_targets_trace_without_graph_breaks():
    logits, _ = _inputs()
    target = torch.softmax(torch.randn(N, C), dim=1)
    assert _break_count(lambda x, t: softmaxkit.cross_entropy(x, t, label_smoothing=0.1), logits, target) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_traces_without_graph_breaks(dtype):
    hidden = torch.randn(N, D, dtype=dtype, requires_grad=True)
    weight = torch.randn(C, D, dtype=dtype, requires_grad=True)
    _, target = _inputs()
    assert _break_count(lambda h, w, t: softmaxkit.linear_cross_entropy(h, w, t, z_loss=1e-3), hidden, weight,
                        target) == 0


def test_triton_linear_cross_entropy_traces_without_graph_breaks():
    pytest.importorskip("triton")
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(C, D, requires_grad=True)
    _, target = _inputs()
    assert _break_count(lambda h, w, t: softmaxkit.linear_cross_entropy(h, w, t, impl="triton"), hidden, weight,
                        target) == 0


def test_composed_losses_trace_without_graph_breaks():
    logits, target = _inputs()
    teacher = torch.randn(N, C)
    assert _break_count(lambda x, t: softmaxkit.focal_loss(x, t, gamma=2.0), logits, target) == 0
    assert _break_count(lambda x, t: softmaxkit.poly1_cross_entropy(x, t, epsilon=1.0), logits, target) == 0
    assert _break_count(lambda x, y, t: softmaxkit.distillation_loss(x, y, target=t, alpha=0.5), logits, teacher,
                        target) == 0


def _value_and_grad(function, *tensors):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    loss = function(*leaves)
    loss.sum().backward()
    return loss.detach(), [leaf.grad for leaf in leaves if leaf.is_floating_point()]


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_cross_entropy_equals_eager(impl, reduction):
    if impl == "triton":
        pytest.importorskip("triton")
    logits, target = _inputs()

    def function(x):
        return softmaxkit.cross_entropy(x, target, impl=impl, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)

    dynamo.reset()
    eager = _value_and_grad(function, logits)
    compiled = _value_and_grad(torch.compile(function, fullgraph=True), logits)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1][0], eager[1][0])


@pytest.mark.parametrize("upstream", [1.0, 3.0, 0.0])
def test_compiled_fused_gradient_is_scaled_by_the_upstream_gradient(upstream):
    # compiled, the CPU op writes the gradient in forward and the backward scales that (donated) buffer in place
    logits, target = _inputs()

    def function(x):
        return softmaxkit.cross_entropy(x, target, label_smoothing=0.1) * upstream

    dynamo.reset()
    eager = _value_and_grad(function, logits)
    compiled = _value_and_grad(torch.compile(function, fullgraph=True), logits)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1][0], eager[1][0], rtol=0, atol=0)


@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_compiled_linear_cross_entropy_scales_its_saved_gradients_by_the_upstream_gradient(upstream):
    # the forward builds ∂h and ∂W; the compiled backward scales those donated buffers in place
    hidden, target = torch.randn(N, C), torch.randint(0, 7, (N,))

    def function(h, w):
        return softmaxkit.linear_cross_entropy(h, w, target) * upstream

    dynamo.reset()
    eager = _value_and_grad(function, hidden, _PROJECTION)
    compiled = _value_and_grad(torch.compile(function, fullgraph=True), hidden, _PROJECTION)
    torch.testing.assert_close(compiled[0], eager[0])
    for traced, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(traced, expected)


def test_compiled_backward_without_donated_buffers_keeps_a_retained_graph_right():
    # donation off: the saved gradient may be read by a second backward, so it must not be scaled in place
    result = _run("""
        import torch, softmaxkit
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
        x = torch.randn(16, 50, requires_grad=True)
        t = torch.randint(0, 50, (16,))
        loss = torch.compile(lambda x: softmaxkit.cross_entropy(x, t), fullgraph=True)(x)
        (loss * 3).backward(retain_graph=True)
        first = x.grad.clone()
        x.grad = None
        (loss * 3).backward()
        expected = 3 * torch.func.grad(lambda x: torch.nn.functional.cross_entropy(x, t))(x)
        torch.testing.assert_close(first, expected)
        torch.testing.assert_close(x.grad, expected)
        w = torch.randn(50, 8, requires_grad=True)
        h = torch.randn(16, 8)
        loss = torch.compile(lambda w: softmaxkit.linear_cross_entropy(h, w, t), fullgraph=True)(w)
        (loss * 3).backward(retain_graph=True)
        first = w.grad.clone()
        w.grad = None
        (loss * 3).backward()
        torch.testing.assert_close(w.grad, first)
        print("ok")
    """, env={"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


_PROJECTION = torch.randn(7, C, generator=torch.Generator().manual_seed(7))  # (classes, hidden = C)
_DYNAMIC_CASES = {
    "cross_entropy": lambda x, t: softmaxkit.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3) * 2,
    "linear_cross_entropy": lambda x, t: softmaxkit.linear_cross_entropy(x, _PROJECTION, t, z_loss=1e-3),
    "focal_loss": lambda x, t: softmaxkit.focal_loss(x, t),
    "sparsemax_loss": lambda x, t: softmaxkit.sparsemax_loss(x, t),
    "entmax15": lambda x, t: softmaxkit.entmax15(x).square().sum(),
}


@pytest.mark.parametrize("name", sorted(_DYNAMIC_CASES))
def test_dynamic_shape_compile_equals_eager(name):
    # dynamic=True makes float options symbolic: validation must trace them (no math.isnan on a SymFloat)
    function = _DYNAMIC_CASES[name]
    dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, dynamic=True)
    for rows in (6, 11):
        torch.manual_seed(rows)
        logits, target = torch.randn(rows, C), torch.randint(0, C, (rows,))
        eager = _value_and_grad(lambda x, t=target: function(x, t), logits)
        traced = _value_and_grad(lambda x, t=target: compiled(x, t), logits)
        torch.testing.assert_close(traced[0], eager[0])
        torch.testing.assert_close(traced[1][0], eager[1][0])


class _Head(torch.nn.Module):
    """A model whose forward computes its loss with linear_cross_entropy (the default-compile crash case)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(D, D)
        self.out = torch.nn.Linear(D, C, bias=False)

    def forward(self, x, target):
        return softmaxkit.linear_cross_entropy(torch.relu(self.body(x)), self.out.weight, target)


def test_default_compile_of_a_module_with_linear_cross_entropy():
    torch.manual_seed(0)
    model = _Head()
    x = torch.randn(N, D)
    _, target = _inputs()
    dynamo.reset()
    compiled = torch.compile(model)
    loss = compiled(x, target)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, target)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for got, expected in zip(compiled_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, expected)


def test_export_non_strict():
    logits, target = _inputs()

    class Loss(torch.nn.Module):
        def forward(self, x, t):
            return softmaxkit.cross_entropy(x, t, label_smoothing=0.1)

    class LinearLoss(torch.nn.Module):
        def forward(self, h, w, t):
            return softmaxkit.linear_cross_entropy(h, w, t)

    exported = torch.export.export(Loss(), (logits, target), strict=False)
    torch.testing.assert_close(exported.module()(logits, target), softmaxkit.cross_entropy(logits, target,
                                                                                          label_smoothing=0.1))
    hidden, weight = torch.randn(N, D), torch.randn(C, D)
    exported = torch.export.export(LinearLoss(), (hidden, weight, target), strict=False)
    torch.testing.assert_close(exported.module()(hidden, weight, target),
                               softmaxkit.linear_cross_entropy(hidden, weight, target))


def test_func_grad():
    """torch.func transforms are served by the composite path (this torch's custom ops have no functorch rule);
    a fast path named explicitly says so."""
    logits, target = _inputs(torch.float64)
    expected = torch.func.grad(lambda x: torch.nn.functional.cross_entropy(x, target))(logits)
    got = torch.func.grad(lambda x: softmaxkit.cross_entropy(x, target, label_smoothing=0.0))(logits)
    torch.testing.assert_close(got, expected)
    for impl in ("cpu", "torch"):
        with pytest.raises(ValueError, match="torch.func transforms"):
            torch.func.grad(lambda x, impl=impl: softmaxkit.cross_entropy(x, target, impl=impl))(logits)
    hidden, weight = torch.randn(N, D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64)
    got = torch.func.grad(lambda h: softmaxkit.linear_cross_entropy(h, weight, target))(hidden)
    expected = torch.func.grad(lambda h: torch.nn.functional.cross_entropy(h @ weight.T, target))(hidden)
    torch.testing.assert_close(got, expected)


def test_autocast_dtypes_follow_pytorch():
    logits, target = _inputs()
    with torch.autocast("cpu", torch.bfloat16):
        low = logits.to(torch.bfloat16)
        expected = torch.nn.functional.cross_entropy(low, target)
        for impl in ("auto", "cpu", "torch", "composite"):
            assert softmaxkit.cross_entropy(low, target, impl=impl).dtype == expected.dtype == torch.float32
        hidden, weight = torch.randn(N, D), torch.randn(C, D)
        reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight), target)
        loss = softmaxkit.linear_cross_entropy(hidden, weight, target)
    assert loss.dtype == reference.dtype == torch.float32
    # the matmul ran in bf16 (F.linear's autocast dtype): the loss equals the bf16-logits loss, not the fp32 one
    bf16_logits = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16()).float()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(bf16_logits, target), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["auto", "cpu", "torch", "composite", "triton", "triton_fused"])
def test_autocast_linear_loss_is_computed_in_fp32_by_every_impl(impl, reduction):
    """Under autocast the loss is F.cross_entropy's of the bf16 logits, in fp32 and not rounded to bf16 (that
    rounding, 2^-9 relative, is what a bf16 model's logged loss would show); without autocast, the bf16 loss."""
    if impl.startswith("triton"):
        pytest.importorskip("triton")  # interpreted on CPU-only machines (conftest)
    _, target = _inputs()
    hidden, weight = torch.randn(N, D) * 2, torch.randn(C, D)
    low_hidden, low_weight = hidden.bfloat16(), weight.bfloat16()
    if impl == "triton_fused":  # its products are accumulated in fp32, never rounded to bf16 logits
        logits = torch.nn.functional.linear(low_hidden.double(), low_weight.double())
    else:
        logits = torch.nn.functional.linear(low_hidden, low_weight).double()
    expected = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
    with torch.autocast("cpu", torch.bfloat16):
        loss = softmaxkit.linear_cross_entropy(hidden, weight, target, reduction=reduction, impl=impl)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    plain = softmaxkit.linear_cross_entropy(low_hidden, low_weight, target, reduction=reduction, impl=impl)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain, loss.bfloat16(), rtol=0, atol=0)


def _loss_cases():
    from softmaxkit.functional import comparison

    return {
        "focal_loss": lambda z, y: softmaxkit.focal_loss(z, y, alpha=torch.linspace(0.5, 1.5, z.shape[1]).bfloat16().to(z)),
        "poly1_cross_entropy": lambda z, y: softmaxkit.poly1_cross_entropy(z, y, label_smoothing=0.1),
        "distillation_loss": lambda z, y: softmaxkit.distillation_loss(z, z.flip(0), temperature=2.0),
        "sparsemax_loss": lambda z, y: softmaxkit.sparsemax_loss(z, y),
        "entmax15_loss": lambda z, y: softmaxkit.entmax15_loss(z, y),
        "entmax_bisect_loss": lambda z, y: softmaxkit.entmax_bisect_loss(z, y, alpha=1.3),
        "multi_margin_loss": lambda z, y: comparison.multi_margin_loss(z, y),
        "crammer_singer_loss": lambda z, y: comparison.crammer_singer_loss(z, y),
        "softmax_mse_loss": lambda z, y: comparison.softmax_mse_loss(z, y),
        "score_mse_loss": lambda z, y: comparison.score_mse_loss(z, y),
        "sampled_softmax_loss": lambda z, y: softmaxkit.sampled_softmax_loss(
            z, torch.linspace(-1, 1, 40 * z.shape[1]).reshape(40, z.shape[1]).bfloat16().to(z), y % 40, num_sampled=7,
            generator=torch.Generator().manual_seed(0)),
    }


@pytest.mark.parametrize("name", list(_loss_cases()))
def test_autocast_losses_are_computed_and_returned_in_fp32(name):
    """PyTorch's losses (F.cross_entropy, F.kl_div, F.mse_loss, F.multi_margin_loss) compute and return fp32
    under autocast; so do these: the loss of bf16 logits under autocast is fp32 and equals the float64 loss of the
    same bf16 values to fp32 rounding (a bf16 loss cast up would be up to 2^-9 off), and without autocast it is
    bf16. The sampled softmax's product runs in bf16 under autocast, as F.linear's does."""
    loss_of = _loss_cases()[name]
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 30, generator=g) * 3).bfloat16()
    target = torch.randint(0, 30, (16,), generator=g)
    target[3] = -100
    with torch.autocast("cpu", torch.bfloat16):
        loss = loss_of(logits, target)
    assert loss.dtype == torch.float32
    exact = loss_of(logits.double(), target)
    rtol = 2.0**-8 if name == "sampled_softmax_loss" else 1e-6
    torch.testing.assert_close(loss.double(), exact, rtol=rtol, atol=1e-7)
    assert loss_of(logits, target).dtype == torch.bfloat16


def test_autocast_comparison_losses_follow_their_pytorch_counterparts():
    from softmaxkit.functional import comparison

    logits, target = torch.randn(8, 5).bfloat16(), torch.randint(0, 5, (8,))
    multi_hot = torch.nn.functional.one_hot(target, 5).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        pairs = [(comparison.multi_margin_loss(logits, target), torch.nn.functional.multi_margin_loss(logits, target)),
                 (comparison.multilabel_soft_margin_loss(logits, multi_hot),
                  torch.nn.functional.multilabel_soft_margin_loss(logits, multi_hot))]
    for ours, theirs in pairs:
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def test_fake_and_meta_tensors_give_shapes_in_a_subprocess():
    result = _run("""
        import torch, softmaxkit
        from torch._subclasses.fake_tensor import FakeTensorMode
        for device in ("meta",):
            x = torch.randn(6, 5, device=device, requires_grad=True)
            t = torch.zeros(6, dtype=torch.long, device=device)
            for impl in ("auto", "torch", "composite"):
                assert softmaxkit.cross_entropy(x, t, impl=impl).shape == ()
                assert softmaxkit.cross_entropy(x, t, impl=impl, reduction="none").shape == (6,)
            h, w = torch.randn(6, 4, device=device), torch.randn(5, 4, device=device)
            assert softmaxkit.linear_cross_entropy(h, w, t, reduction="none").shape == (6,)
        with FakeTensorMode():
            x = torch.randn(6, 5, requires_grad=True)
            t = torch.zeros(6, dtype=torch.long)
            loss = softmaxkit.cross_entropy(x, t)
            loss.backward()
            assert loss.shape == () and x.grad.shape == (6, 5)
            h, w = torch.randn(6, 4), torch.randn(5, 4)
            assert softmaxkit.linear_cross_entropy(h, w, t).shape == ()
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_dtensor_never_reaches_the_kernel_in_a_subprocess():
    # the DTensor adapter (functional/_dtensor.py) hands the kernels the local plain tensor, for every impl
    result = _run("""
        import os, torch, torch.distributed as dist, softmaxkit
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, distribute_tensor, Replicate
        mesh = init_device_mesh("cpu", (1,))
        plain = torch.randn(6, 5)
        t = torch.zeros(6, dtype=torch.long)
        for impl in ("auto", "cpu", "torch", "composite"):
            x = distribute_tensor(plain, mesh, [Replicate()]).requires_grad_()
            loss = softmaxkit.cross_entropy(x, distribute_tensor(t, mesh, [Replicate()]), impl=impl)
            loss.backward()
            assert isinstance(loss, DTensor) and isinstance(x.grad, DTensor), (type(loss), type(x.grad))
            torch.testing.assert_close(loss.full_tensor(), softmaxkit.cross_entropy(plain, t))
        print("served")
        dist.destroy_process_group()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served" in result.stdout


def test_constant_result_marks_functions_as_torch_compiler_does():
    # softmaxkit sets Dynamo's marker itself so that `import softmaxkit` does not import torch._dynamo
    import subprocess
    import sys

    from softmaxkit._core import constant_result

    def ours():
        return 1

    def theirs():
        return 1

    constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert set(vars(ours)) == set(vars(theirs)) and all(vars(ours)[k] == vars(theirs)[k] for k in vars(theirs))
    probe = "import sys, softmaxkit; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
