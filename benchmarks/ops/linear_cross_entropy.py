"""linear_cross_entropy (hidden @ W.T → cross-entropy) forward and forward+backward.

Impls:

* ``torch``: the naive path, ``F.cross_entropy(F.linear(h, W), y)``: holds the ``(N, C)`` logits, their
  log-softmax and their gradient (the baseline of every ratio);
* ``torch_chunked``: PyTorch's own ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (its chunked path with default options);
* ``softmaxkit``: ``softmaxkit.linear_cross_entropy`` (chunked; gradients built in forward);
* ``softmaxkit_triton``: ``impl="triton"`` (chunked GEMM + fused Triton CE kernel, fp32 ``∂W`` accumulation;
  CUDA only);
* ``softmaxkit_triton_fused``: ``impl="triton_fused"`` (fused matmul–log-sum-exp kernel, logits only in
  registers, backward recomputes them: cut-cross-entropy's scheme; CUDA only);
* ``liger``: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only);
* ``cut_cross_entropy``: Apple's Cut Cross-Entropy: its default Triton kernels on CUDA, elsewhere its
  ``impl="torch_compile"`` (the full logits, then one Inductor-compiled cross-entropy; ignored rows dropped first),
  its only CPU path.

The compiled impls (``softmaxkit_compile``, ``cut_cross_entropy`` off CUDA) are compiled in setup, by one
untimed call, so the measured first call (the peak memory) is a call, not a compilation. ``SHAPES`` starts with
hf_causal_lm's head (4 × 256 tokens, hidden 256, vocabulary 32000), ignoring every 13th row here.

``full`` computes the gradients of ``hidden`` and ``weight`` with ``torch.autograd.grad`` (nothing
accumulates into ``.grad``). Work: three ``N·C·D`` matmuls for ``full``, one for ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, Skip, timed_call

#: (N, D, C): hf_causal_lm's head, the issue's memory target (8192, 512, 50k), then LLM-like heads.
SHAPES = [(1024, 256, 32000), (8192, 512, 50000), (8192, 1024, 50257), (4096, 1024, 128256),
          # the fast-path issue's hidden sizes of today's LMs (each full case is 2.5 TFLOP: ~10 s per call on CPU)
          (4096, 2048, 50257), (2048, 4096, 50257)]
#: the fast-path issue's GPU comparison with cut-cross-entropy (16384 tokens, D=2048, Qwen-size vocabulary);
#: too large for the CPU machines (its naive logits alone are 16 GB in fp32).
CUDA_SHAPES = [(16384, 2048, 248320)]
QUICK_SHAPES = [(1024, 256, 8192)]


def _inputs(n, d, c, dtype, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    weight = (torch.randn(c, d, generator=g) * d**-0.5).to(device=device, dtype=dtype)
    weight.requires_grad_(requires_grad)
    target = torch.randint(0, c, (n,), generator=g).to(device)
    target[::13] = -100
    return hidden, weight, target


def _runner(loss_fn, n, d, c, dtype, device, mode, warm=False):
    hidden, weight, target = _inputs(n, d, c, dtype, device, requires_grad=mode != "forward")
    step = timed_call(lambda: loss_fn(hidden, weight, target), [hidden, weight], mode)
    if warm:
        step()  # compile here, not in the measured first call
    return step


def _naive(h, w, y):
    return F.cross_entropy(F.linear(h, w), y)


def _torch_chunked():
    try:
        from torch.nn import LinearCrossEntropyOptions
    except ImportError as error:  # pragma: no cover - older torch
        raise Skip(f"this torch has no LinearCrossEntropyOptions ({error})") from error
    options = LinearCrossEntropyOptions()
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)


def _softmaxkit():
    import softmaxkit

    return lambda h, w, y: softmaxkit.linear_cross_entropy(h, w, y)


def _softmaxkit_compile():
    return torch.compile(_softmaxkit(), dynamic=False)


def _softmaxkit_triton(device, impl):
    if device != "cuda":
        raise Skip("Triton kernels need a CUDA device")
    import softmaxkit

    return lambda h, w, y: softmaxkit.linear_cross_entropy(h, w, y, impl=impl)


def _liger(device):
    if device != "cuda":
        raise Skip("liger-kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as error:  # pragma: no cover
        raise Skip(f"liger-kernel not installed ({error})") from error
    return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)


def _cut_cross_entropy(device):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:  # pragma: no cover
        raise Skip(f"cut-cross-entropy not installed ({error})") from error
    impl = "cce" if device == "cuda" else "torch_compile"
    return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100, impl=impl)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    dtype_name = str(dtype).replace("torch.", "")
    out = []
    shapes = QUICK_SHAPES if quick else SHAPES + (CUDA_SHAPES if device == "cuda" else [])
    for n, d, c in shapes:
        impls = {
            "torch": lambda: _naive,
            "torch_chunked": _torch_chunked,
            "softmaxkit": _softmaxkit,
            "softmaxkit_compile": _softmaxkit_compile,
            "softmaxkit_triton": lambda: _softmaxkit_triton(device, "triton"),
            "softmaxkit_triton_fused": lambda: _softmaxkit_triton(device, "triton_fused"),
            "liger": lambda: _liger(device),
            "cut_cross_entropy": lambda: _cut_cross_entropy(device),
        }
        for impl, factory in impls.items():
            compiled_cce = impl == "cut_cross_entropy" and device != "cuda"  # its torch_compile impl
            if quick and compiled_cce:
                continue  # its compile takes ~a minute on CPU: not for the quick set
            def setup(mode, factory=factory, n=n, d=d, c=c, warm=compiled_cce or impl == "softmaxkit_compile"):
                return _runner(factory(), n, d, c, dtype, device, mode, warm)

            flops = 2 * n * d * c
            out.append(Case("linear_cross_entropy", impl, f"{n}x{d}x{c}", dtype_name, setup, flops=3 * flops,
                            modes=("forward", "full"),
                            extra={"flops_by_mode": {"forward": flops, "full": 3 * flops}}))
    return out
