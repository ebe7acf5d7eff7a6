"""sparsemax and its Fenchel-Young loss, forward and forward+backward: softmaxkit vs the ``entmax`` package.

Ops (each its own table, ratios to its own ``torch`` baseline):

* ``sparsemax``: ``torch`` = ``torch.softmax`` (the dense map it replaces: the baseline), ``softmaxkit`` =
  :func:`softmaxkit.sparsemax` (on CPU its compiled kernel), ``softmaxkit_torch`` = the same on its PyTorch
  path (what runs on CPU where no C compiler is found; CPU only), ``softmaxkit_triton`` = its Triton kernels called directly (what
  :func:`softmaxkit.sparsemax` uses on CUDA; CUDA only), ``entmax`` = ``entmax.sparsemax`` (full sort per
  row), ``entmax_bisect`` = ``entmax.sparsemax_bisect``. "full" back-propagates a fixed random upstream
  gradient.
* ``sparsemax_loss``: ``torch`` = ``F.cross_entropy`` (softmax + cross-entropy: the baseline),
  ``softmaxkit`` = :func:`softmaxkit.sparsemax_loss`, ``softmaxkit_torch`` its PyTorch path (CPU only),
  ``entmax`` = ``entmax.sparsemax_loss(...).mean()``.

The speed target for softmaxkit is 3× the baseline's time at (4096, 1000) and (1024, 32000) fp32 with a peak
extra memory of at most 2× the input. Logits are ``2·N(0, 1)``; targets uniform.

:mod:`benchmarks.ops.entmax15` and ``entmax15_loss`` reuse :func:`map_cases` / :func:`loss_cases`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, Skip, timed_call

SHAPES = [(4096, 1000), (1024, 32000)]
QUICK_SHAPES = [(1024, 1000)]


def _peer(name: str):
    try:
        import entmax
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise Skip(f"the entmax package is not installed ({error})") from error
    return getattr(entmax, name)


def peer_map(name: str, **options):
    """``x -> entmax.<name>(x, dim=-1, **options)`` (Skip when the package is missing)."""
    function = _peer(name)
    return lambda x: function(x, dim=-1, **options)


def peer_loss(name: str):
    """``(x, y) -> entmax.<name>(x, y).mean()`` (the package returns per-row losses)."""
    function = _peer(name)
    return lambda x, y: function(x, y).mean()


def _inputs(n, c, dtype, device, requires_grad):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, c, generator=generator) * 2).to(device=device, dtype=dtype)
    logits.requires_grad_(requires_grad)
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    upstream = torch.randn(n, c, generator=generator).to(device=device, dtype=dtype)
    return logits, target, upstream


def _map_runner(function, n, c, dtype, device, mode):
    x, _, upstream = _inputs(n, c, dtype, device, requires_grad=mode != "forward")
    return timed_call(lambda: function(x), [x], mode, grad_outputs=upstream)


def _loss_runner(function, n, c, dtype, device, mode):
    x, target, _ = _inputs(n, c, dtype, device, requires_grad=mode != "forward")
    return timed_call(lambda: function(x, target), [x], mode)


def map_cases(op: str, impls: dict, device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Cases of a probability map ``op``: ``impls`` maps impl name → factory returning ``x -> p``."""
    out = []
    dtype_name = str(dtype).replace("torch.", "")
    for n, c in QUICK_SHAPES if quick else SHAPES:
        size = n * c * dtype.itemsize
        for impl, factory in impls.items():
            def setup(mode, factory=factory, n=n, c=c):
                return _map_runner(factory(), n, c, dtype, device, mode)

            # forward reads x and writes p; full also reads the upstream gradient and writes the gradient
            out.append(Case(op, impl, f"{n}x{c}", dtype_name, setup, bytes_moved=4 * size,
                            extra={"bytes_by_mode": {"forward": 2 * size, "full": 4 * size}}))
    return out


def loss_cases(op: str, impls: dict, device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Cases of a loss ``op``: ``impls`` maps impl name → factory returning ``(x, target) -> scalar``."""
    out = []
    dtype_name = str(dtype).replace("torch.", "")
    for n, c in QUICK_SHAPES if quick else SHAPES:
        size = n * c * dtype.itemsize
        for impl, factory in impls.items():
            def setup(mode, factory=factory, n=n, c=c):
                return _loss_runner(factory(), n, c, dtype, device, mode)

            out.append(Case(op, impl, f"{n}x{c}", dtype_name, setup, bytes_moved=2 * size,
                            extra={"bytes_by_mode": {"forward": size, "full": 2 * size}}))
    return out


def _softmaxkit(name: str):
    import softmaxkit

    return getattr(softmaxkit, name)


def softmaxkit_torch(name: str, device: str):
    """``softmaxkit.<name>`` on its PyTorch path: the CPU kernel is reported unavailable during each call
    (backward runs the Function that forward chose); CPU only."""
    if device != "cpu":
        raise Skip("the PyTorch path is softmaxkit's CPU fallback (on CUDA see softmaxkit_triton)")
    from softmaxkit.backends.cpu import sparse as cpu_sparse

    function = _softmaxkit(name)

    def call(*args):
        available = cpu_sparse.available
        cpu_sparse.available = lambda dtype=None: False
        try:
            return function(*args)
        finally:
            cpu_sparse.available = available

    return call


def softmaxkit_triton(kind: str, device: str):
    """``x -> triton_entmax(x, kind)`` for 2-D ``x`` (the Triton sparsemax / 1.5-entmax kernels); CUDA only."""
    if device != "cuda":
        raise Skip("Triton kernels need a CUDA device")
    from softmaxkit.backends.triton.sparse import triton_entmax

    return lambda x: triton_entmax(x, kind)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    return map_cases("sparsemax", {
        "torch": lambda: (lambda x: torch.softmax(x, dim=-1)),
        "softmaxkit": lambda: _softmaxkit("sparsemax"),
        "softmaxkit_torch": lambda: softmaxkit_torch("sparsemax", device),
        "softmaxkit_triton": lambda: softmaxkit_triton("sparsemax", device),
        "entmax": lambda: peer_map("sparsemax"),
        "entmax_bisect": lambda: peer_map("sparsemax_bisect"),
    }, device, dtype, quick)


def sparsemax_loss_cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    return loss_cases("sparsemax_loss", {
        "torch": lambda: (lambda x, y: F.cross_entropy(x, y)),
        "softmaxkit": lambda: _softmaxkit("sparsemax_loss"),
        "softmaxkit_torch": lambda: softmaxkit_torch("sparsemax_loss", device),
        "entmax": lambda: peer_loss("sparsemax_loss"),
    }, device, dtype, quick)
