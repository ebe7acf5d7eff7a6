"""Adaptive softmax ``predict`` (argmax class per row) at C = 100k: PyTorch's vs softmaxkit's pruned one.

* ``torch``: ``AdaptiveLogSoftmaxWithLoss.predict``: the head, then every tail cluster for each row whose
  head argmax is a cluster;
* ``softmaxkit``: ``AdaptiveSoftmax.predict``: tail cluster ``i`` only for the rows where ``log p(cluster i)``
  beats the best class found so far;
* ``full_log_prob``: ``AdaptiveSoftmax.log_prob(h).argmax(1)``, the whole ``(N, C)`` distribution.

Hidden states come from a briefly trained model (``train_steps`` Adam steps on Zipf-distributed targets)
so the head is as confident as in practice; random weights would make every cluster a candidate.
"""

from __future__ import annotations

import torch

from .._harness import Case
from .adaptive_softmax import QUICK_SHAPES, SHAPES, _module_pair, zipf_targets


def _runner(impl, n, d, c, dtype, device, train_steps=30):
    g = torch.Generator().manual_seed(0)
    ours, theirs = _module_pair(d, c, torch.float32, device)
    hidden = torch.randn(n, d, generator=g).to(device)
    target = zipf_targets(n, c, g).to(device)
    hidden.requires_grad_(True)
    optimizer = torch.optim.Adam([hidden, *theirs.parameters()], lr=0.05)
    for _ in range(train_steps):  # make the head's cluster probabilities realistic
        optimizer.zero_grad()
        theirs(hidden, target).loss.backward()
        optimizer.step()
    ours.load_state_dict(theirs.state_dict())
    hidden = hidden.detach().to(dtype)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    if impl == "torch":
        return lambda: theirs.predict(hidden)
    if impl == "softmaxkit":
        return lambda: ours.predict(hidden)
    return lambda: ours.log_prob(hidden).argmax(1)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    dtype_name = str(dtype).replace("torch.", "")
    out = []
    for n, d, c in QUICK_SHAPES if quick else SHAPES:
        for impl in ("torch", "softmaxkit", "full_log_prob"):
            def setup(mode, impl=impl, n=n, d=d, c=c):
                fn = _runner(impl, n, d, c, dtype, device)

                def forward():
                    with torch.no_grad():
                        return fn()
                return forward

            out.append(Case("adaptive_softmax_predict", impl, f"{n}x{d}x{c}", dtype_name, setup, modes=("forward",)))
    return out
