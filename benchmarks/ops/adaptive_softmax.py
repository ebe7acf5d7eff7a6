"""Adaptive softmax loss (forward and forward+backward) at C = 100k, against the full softmax.

Impls (the ratio baseline ``torch`` is PyTorch's own adaptive softmax):

* ``torch``: ``torch.nn.AdaptiveLogSoftmaxWithLoss``;
* ``softmaxkit``: ``softmaxkit.nn.AdaptiveSoftmax`` with the same parameters (loaded from the same state dict);
* ``full_softmax``: ``F.cross_entropy(F.linear(h, W), y)`` over all ``C`` classes, what adaptive softmax
  approximates; ``full_softmax_linear_ce``: the same loss via ``softmaxkit.linear_cross_entropy``.

Targets follow Zipf's law over the class ranks (``p(r) ∝ 1/(r + 1)``), as words do, so about three rows in
four fall in the shortlist: cutoffs ``[4000, 20000, 60000]``, ``div_value = 4``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, timed_call

#: (N, D, C)
SHAPES = [(4096, 512, 100_000)]
QUICK_SHAPES = [(512, 128, 20_000)]
CUTOFFS = {100_000: [4000, 20000, 60000], 20_000: [1000, 5000]}


def zipf_targets(n: int, c: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` class ranks drawn with ``p(r) ∝ 1/(r + 1)``."""
    probabilities = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
    return torch.multinomial(probabilities / probabilities.sum(), n, replacement=True, generator=generator)


def _module_pair(d, c, dtype, device):
    from softmaxkit.nn import AdaptiveSoftmax

    torch.manual_seed(0)
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(d, c, CUTOFFS[c], div_value=4.0).to(device=device, dtype=dtype)
    ours = AdaptiveSoftmax(d, c, CUTOFFS[c], div_value=4.0).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _runner(impl, n, d, c, dtype, device, mode):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(mode != "forward")
    target = zipf_targets(n, c, g).to(device)
    if impl in ("torch", "softmaxkit"):
        ours, theirs = _module_pair(d, c, dtype, device)
        module = theirs if impl == "torch" else ours
        params = [hidden, *module.parameters()]

        def loss_fn():
            return module(hidden, target).loss
    else:
        weight = (torch.randn(c, d, generator=g) * d**-0.5).to(device=device, dtype=dtype)
        weight.requires_grad_(mode != "forward")
        params = [hidden, weight]
        if impl == "full_softmax":
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
        for impl in ("torch", "softmaxkit", "full_softmax", "full_softmax_linear_ce"):
            def setup(mode, impl=impl, n=n, d=d, c=c):
                return _runner(impl, n, d, c, dtype, device, mode)

            out.append(Case("adaptive_softmax", impl, f"{n}x{d}x{c}", dtype_name, setup, modes=("forward", "full")))
    return out
