"""Triton cross-entropy kernels against the float64 oracle and PyTorch.

Without CUDA these run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it) on CPU tensors, which is
200-900x slower than torch: shapes stay tiny, but cover several column blocks (the interpreter's block is
at most 1024 columns, so C = 1500 takes two blocks with a masked tail). Tests marked ``gpu`` need CUDA.

Tolerances: float64 to the oracle at 1e-10 (the soft-cap's series coefficients are fp32 literals in the
kernel, 1e-13 relative); float32 1e-5 relative; bf16/fp16 within the error budget of PyTorch in that dtype
plus one rounding of the result.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softmaxkit
from softmaxkit import reference

from ._helpers import assert_close_f32, assert_close_f64, assert_within_budget

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"temperature": 0.7, "z_loss": 1e-2},
    {"softcap": 2.0},
    {"softcap": 20.0, "temperature": 1.3, "label_smoothing": 0.1, "z_loss": 1e-3},
]


def _make(num_rows, num_classes, dtype=torch.float64, scale=3.0):
    logits = (torch.randn(num_rows, num_classes, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, num_classes, (num_rows,))
    if num_rows > 2:
        target[1] = -100
    return logits.to(DEVICE), target.to(DEVICE)


def _run(logits, target, impl="triton", grad_output=None, inplace_backward=False, **options):
    x = logits.detach().clone().requires_grad_()
    source = x * 1 if inplace_backward else x
    loss = softmaxkit.cross_entropy(source, target, impl=impl, inplace_backward=inplace_backward, **options)
    upstream = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad


def _oracle(logits, target, weight=None, reduction="mean", grad_output=None, **options):
    x = logits.detach().cpu().to(torch.float64).numpy()
    y = target.cpu().numpy()
    w = None if weight is None else weight.detach().cpu().to(torch.float64).numpy()
    upstream = None if grad_output is None else grad_output.detach().cpu().to(torch.float64).numpy()
    return (reference.cross_entropy(x, y, w, reduction=reduction, **options),
            reference.cross_entropy_grad(x, y, w, reduction=reduction, grad_output=upstream, **options))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize(("reduction", "weighted"), [("mean", True), ("sum", False), ("none", True)])
def test_float64_matches_oracle(options, reduction, weighted):
    logits, target = _make(3, 1500)
    weight = (torch.rand(1500, dtype=torch.float64) + 0.5).to(DEVICE) if weighted else None
    upstream = torch.rand(3, dtype=torch.float64).to(DEVICE) if reduction == "none" else None
    loss, grad = _run(logits, target, grad_output=upstream, weight=weight, reduction=reduction, **options)
    expected_loss, expected_grad = _oracle(logits, target, weight, reduction, upstream, **options)
    assert_close_f64(loss, expected_loss)
    assert_close_f64(grad, expected_grad)


def test_float32_matches_torch():
    logits, target = _make(4, 77, torch.float32)
    weight = torch.rand(77).to(DEVICE)
    loss, grad = _run(logits, target, weight=weight, label_smoothing=0.1)
    x = logits.clone().requires_grad_()
    expected = F.cross_entropy(x, target, weight=weight, label_smoothing=0.1)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close_f32(loss, expected.detach())
    np.testing.assert_allclose(grad.cpu().numpy(), expected_grad.cpu().numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_budget(dtype):
    logits, target = _make(4, 300, dtype, scale=4.0)
    options = {"reduction": "none", "softcap": 5.0, "label_smoothing": 0.1}
    loss, grad = _run(logits, target, **options)
    peer_loss, peer_grad = _run(logits, target, impl="composite", **options)
    oracle_loss, oracle_grad = _oracle(logits, target, **options)
    assert loss.dtype == grad.dtype == dtype
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # one rounding of the result to `dtype`
    assert_within_budget(loss, peer_loss, oracle_loss, tol=unit * np.abs(oracle_loss).max())
    assert_within_budget(grad, peer_grad, oracle_grad, tol=unit * np.abs(oracle_grad).max())


def test_inplace_backward_equals_out_of_place_and_bumps_version():
    logits, target = _make(3, 40)
    expected = _run(logits, target, z_loss=1e-2)[1]
    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1
    version = buffer._version
    loss = softmaxkit.cross_entropy(buffer, target, impl="triton", inplace_backward=True, z_loss=1e-2)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(grad, expected)
    assert buffer._version > version and torch.equal(buffer.detach(), expected)


def test_extremes_and_masks_are_finite_and_right():
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [0.0, -float("inf"), 2.0, -float("inf")]], dtype=torch.float64)
    target = torch.tensor([1, 2])
    logits, target = logits.to(DEVICE), target.to(DEVICE)
    loss, grad = _run(logits, target, reduction="none", z_loss=1e-4)
    expected_loss, expected_grad = _oracle(logits, target, reduction="none", z_loss=1e-4)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_f64(loss, expected_loss)
    assert_close_f64(grad, expected_grad)


def test_all_ignored_and_empty():
    logits, _ = _make(3, 10)
    target = torch.full((3,), -100, device=DEVICE)
    loss, grad = _run(logits, target, label_smoothing=0.2, z_loss=0.1)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    empty = torch.zeros(0, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert softmaxkit.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=DEVICE), impl="triton").item() == 0


def test_non_contiguous_logits_and_unbatched():
    logits, target = _make(30, 5)
    transposed = logits.t().contiguous().t()
    loss, grad = _run(transposed, target, label_smoothing=0.1)
    expected_loss, expected_grad = _oracle(logits, target, label_smoothing=0.1)
    assert_close_f64(loss, expected_loss)
    assert_close_f64(grad, expected_grad)
    single = softmaxkit.cross_entropy(logits[0], target[0], impl="triton", reduction="none")
    assert single.shape == ()
    assert_close_f64(single, _oracle(logits[:1], target[:1], reduction="none")[0][0])


def test_gradcheck():
    logits, target = _make(3, 6, scale=1.0)
    weight = (torch.rand(6, dtype=torch.float64) + 0.5).to(DEVICE)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: softmaxkit.cross_entropy(v, target, weight=weight, impl="triton", label_smoothing=0.2,
                                           temperature=0.7, z_loss=0.05, softcap=3.0),
        (x,), eps=1e-6, atol=1e-8,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_torch_at_vocabulary_size(dtype):
    logits, target = _make(64, 50257, dtype)
    loss, grad = _run(logits, target)
    x = logits.clone().requires_grad_()
    expected = F.cross_entropy(x.float(), target)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss.float(), expected.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2e-2, atol=1e-6)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N·C > 2^31: row offsets must not overflow int32."""
    num_rows, num_classes = 16512, 131072  # 2.16e9 elements, 4.3 GB in bf16
    logits = torch.zeros(num_rows, num_classes, dtype=torch.bfloat16, device="cuda")
    target = torch.full((num_rows,), 7, device="cuda")
    logits[-1, 7] = 10.0
    loss = softmaxkit.cross_entropy(logits, target, impl="triton", reduction="none")
    torch.testing.assert_close(loss[-1].float(), torch.tensor(np.log(np.exp(10.0) + num_classes - 1) - 10.0,
                                                              dtype=torch.float32, device="cuda"),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss[0].float(), torch.tensor(np.log(num_classes), dtype=torch.float32,
                                                             device="cuda"), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    logits, target = _make(8, 1000, torch.float32)
    x = logits.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        softmaxkit.cross_entropy(x, target, impl="triton").backward()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = softmaxkit.cross_entropy(x, target, impl="triton", label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x)
    graph.replay()
    torch.cuda.synchronize()
    expected_loss, expected_grad = _oracle(logits, target, label_smoothing=0.1)
    np.testing.assert_allclose(loss.item(), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad.cpu().numpy(), expected_grad, rtol=0, atol=1e-6)


_COMPILE_FOR_HOPPER = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import re, subprocess, tempfile
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from softmaxkit.backends.triton import cross_entropy as ce

for kernel in (ce._ce_fwd_kernel, ce._ce_bwd_kernel, ce._ce_fused_inplace_kernel):
    for dtype in ("bf16", "fp32"):
        block, warps = 8192, 16  # _launch_config's GPU tile for C >= 8192
        constants = dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True, BLOCK=block, PARAMS_IN_MEMORY=False)
        def kind(name):
            if name in constants:
                return "constexpr"
            if name in ("x_ptr", "grad_ptr"):
                return "*" + dtype
            if name == "target_ptr":
                return "*i64"
            if name.endswith("_ptr"):
                return "*fp32"
            return "fp32" if name in ("eps", "inv_t", "softcap", "z_loss") else "i64"
        source = ASTSource(kernel, {name: kind(name) for name in kernel.arg_names}, constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run([knobs.nvidia.ptxas_blackwell.path, "-v", "--gpu-name=sm_90a", ptx, "-o",
                                  os.path.join(tmp, "kernel.o")], capture_output=True, text=True, check=True)
        spills = re.findall(r"(\d+) bytes spill stores", log.stdout + log.stderr)
        assert spills and all(n == "0" for n in spills), (kernel, dtype, log.stdout + log.stderr)
print("compiled")
'''


@pytest.mark.skipif(ON_GPU, reason="the GPU tests run the compiled kernels themselves")
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter never compiles: Triton's code generator and ptxas must accept the three CE kernels with
    every option on (the float64 label-smoothing sum included) at the GPU tile size, with no register spills."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
