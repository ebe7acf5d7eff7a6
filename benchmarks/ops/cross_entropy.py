"""cross_entropy forward / backward / forward+backward: softmaxkit's paths vs torch eager, torch.compile, Liger.

Impls:

* ``torch``: ``F.cross_entropy`` eager (the baseline of every ratio);
* ``torch_compile``: ``torch.compile(F.cross_entropy)``, one graph per shape (its compile time is excluded:
  it happens in the untimed warm-up; see ``first_call_s`` in the CSV);
* ``softmaxkit``: ``impl="auto"`` (the C kernel on CPU, Triton on CUDA), ``softmaxkit_inplace`` the same
  with ``inplace_backward=True``;
* ``softmaxkit_compile``: ``torch.compile`` of a function calling ``softmaxkit.cross_entropy`` (its custom
  op is one node of the graph; compile time in ``first_call_s``, as for ``torch_compile``);
* ``softmaxkit_torch``: ``impl="torch"``, the chunked-ATen fused path (the fallback without a compiler);
* ``softmaxkit_triton``: ``impl="triton"`` forced (what ``"auto"`` picks on CUDA; CUDA only);
* ``liger``: Liger-Kernel's Triton cross-entropy (CUDA only).

Roofline: the least traffic each mode needs (forward reads the logits; forward+backward reads them and
writes the gradient once) over the measured copy bandwidth (bytes read + written per second).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, Skip, timed_call

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


def _runner(loss_fn, n, c, dtype, device, mode, inplace=False):
    leaf, target = _inputs(n, c, dtype, device, requires_grad=mode != "forward")
    def make_loss():
        # in-place backward overwrites its input: give it a fresh non-leaf view each time, as a model would
        # (`leaf * 1` would allocate; a no-op view shares the buffer, and its version bump is harmless here)
        source = leaf.view_as(leaf) if inplace else leaf
        return loss_fn(source, target)

    if mode == "backward":
        state = {}

        def prepare():
            state["loss"] = make_loss()

        def backward():
            (grad,) = torch.autograd.grad(state.pop("loss"), [leaf])
            return grad
        return prepare, backward

    return timed_call(make_loss, [leaf], mode)


def _softmaxkit(**options):
    import softmaxkit

    return lambda x, y: softmaxkit.cross_entropy(x, y, **options)


def _softmaxkit_triton(device: str):
    if device != "cuda":
        raise Skip("Triton kernels need a CUDA device")
    return _softmaxkit(impl="triton")


def _torch_compile():
    return torch.compile(lambda x, y: F.cross_entropy(x, y), dynamic=False)


def _softmaxkit_compile():
    return torch.compile(_softmaxkit(), dynamic=False)


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
        size = n * c * dtype.itemsize
        # no backward entry: a fused impl does its gradient work in forward, so its backward's traffic is ~0
        bytes_by_mode = {"forward": size, "full": 2 * size}
        impls = {
            "torch": lambda: (lambda x, y: F.cross_entropy(x, y)),
            "torch_compile": _torch_compile,
            "softmaxkit": lambda: _softmaxkit(),
            "softmaxkit_inplace": lambda: _softmaxkit(inplace_backward=True),
            "softmaxkit_torch": lambda: _softmaxkit(impl="torch"),
            "softmaxkit_compile": _softmaxkit_compile,
            "softmaxkit_triton": lambda: _softmaxkit_triton(device),
            "liger": lambda: _liger(device),
        }
        for impl, factory in impls.items():
            inplace = impl == "softmaxkit_inplace"

            def setup(mode, factory=factory, n=n, c=c, inplace=inplace):
                return _runner(factory(), n, c, dtype, device, mode, inplace)

            modes = ("backward", "full") if inplace else ("forward", "backward", "full")
            out.append(Case("cross_entropy", impl, f"{n}x{c}", dtype_name, setup, bytes_moved=2 * size,
                            modes=modes, extra={"bytes_by_mode": bytes_by_mode}))
    return out
