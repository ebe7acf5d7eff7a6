"""Hierarchical softmax loss (forward and forward+backward) at C = 100k, against the full softmax.

* ``torch``: the full softmax, ``F.cross_entropy(F.linear(h, W), y)`` over all ``C`` classes (baseline);
* ``softmaxkit``: ``softmaxkit.nn.HierarchicalSoftmax`` over a Huffman tree of Zipf counts
  (``count(r) ∝ 1/(r + 1)``), targets drawn from the same law: ``O(depth · D)`` per row;
* ``softmaxkit_linear_ce``: the full softmax via ``softmaxkit.linear_cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, timed_call
from .adaptive_softmax import zipf_targets

SHAPES = [(4096, 512, 100_000)]
QUICK_SHAPES = [(512, 128, 20_000)]


def _runner(impl, n, d, c, dtype, device, mode):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(mode != "forward")
    target = zipf_targets(n, c, g).to(device)
    if impl == "softmaxkit":
        from softmaxkit.nn import HierarchicalSoftmax

        counts = 1e7 / torch.arange(1, c + 1, dtype=torch.float64)
        module = HierarchicalSoftmax(d, counts, device=device, dtype=dtype)
        params = [hidden, *module.parameters()]

        def loss_fn():
            return module(hidden, target)
    else:
        weight = (torch.randn(c, d, generator=g) * d**-0.5).to(device=device, dtype=dtype)
        weight.requires_grad_(mode != "forward")
        params = [hidden, weight]
        if impl == "torch":
            def loss_fn():
                return F.cross_entropy(F.linear(hidden, weight), target)
        else:
            import softmaxkit

            def loss_fn():
                return softmaxkit.linear_cross_entropy(hidden, weight, target)

    return timed_call(loss_fn, params, mode)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    dtype_name = str(dtype).replace("torch.", "")
    out = []
    for n, d, c in QUICK_SHAPES if quick else SHAPES:
        for impl in ("torch", "softmaxkit", "softmaxkit_linear_ce"):
            def setup(mode, impl=impl, n=n, d=d, c=c):
                return _runner(impl, n, d, c, dtype, device, mode)

            out.append(Case("hierarchical_softmax", impl, f"{n}x{d}x{c}", dtype_name, setup,
                            modes=("forward", "full")))
    return out
