"""cross_entropy forward / forward+backward: softmaxkit vs torch eager, torch.compile, Liger-Kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, Skip

SHAPES = [(4096, 32000), (8192, 50257), (2048, 128256), (16384, 256000)]
QUICK_SHAPES = [(1024, 32000)]
#: CPU cases larger than this many bytes of logits are left out (24 GiB machines, 3-4 logits-sized buffers).
CPU_MAX_LOGIT_BYTES = 3 << 30


def _inputs(n: int, c: int, dtype: torch.dtype, device: str, requires_grad: bool):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, c, generator=generator) * 2).to(device=device, dtype=dtype)
    logits.requires_grad_(requires_grad)
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    target[::17] = -100
    return logits, target


def _runner(loss_fn, n, c, dtype, device, mode):
    logits, target = _inputs(n, c, dtype, device, requires_grad=mode == "full")
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return loss_fn(logits, target)
        return forward

    def full():
        # autograd.grad returns the gradient without accumulating it into .grad (no extra copy for any impl)
        loss = loss_fn(logits, target)
        (grad,) = torch.autograd.grad(loss, [logits])
        return grad
    return full


def _softmaxkit(**options):
    import softmaxkit

    return lambda x, y: softmaxkit.cross_entropy(x, y, **options)


def _torch_compile():
    compiled = torch.compile(lambda x, y: F.cross_entropy(x, y), dynamic=False)
    return compiled


def _liger(device: str):
    if device != "cuda":
        raise Skip("liger-kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Skip(f"liger-kernel not installed ({error})") from error
    return lambda x, y: liger_cross_entropy(x, y)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    shapes = QUICK_SHAPES if quick else SHAPES
    dtype_name = str(dtype).replace("torch.", "")
    out = []
    for n, c in shapes:
        if device == "cpu" and n * c * dtype.itemsize > CPU_MAX_LOGIT_BYTES:
            continue
        bytes_moved = 3 * n * c * dtype.itemsize  # forward reads logits; backward reads them, writes grad
        impls = {
            "torch": lambda: (lambda x, y: F.cross_entropy(x, y)),
            "torch_compile": _torch_compile,
            "softmaxkit": lambda: _softmaxkit(),
            "softmaxkit_inplace": lambda: _softmaxkit(inplace_backward=True),
            "liger": lambda: _liger(device),
        }
        for impl, factory in impls.items():
            def setup(mode, factory=factory, n=n, c=c):
                return _runner(factory(), n, c, dtype, device, mode)

            modes = ("full",) if impl == "softmaxkit_inplace" else ("forward", "full")
            out.append(Case("cross_entropy", impl, f"{n}x{c}", dtype_name, setup, bytes_moved=bytes_moved,
                            modes=modes))
    return out
