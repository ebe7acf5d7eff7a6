"""Focal loss (γ = 2), forward and forward+backward: softmaxkit's closed-form backward vs the hand-written
PyTorch focal loss most code bases carry (``torch``, the baseline: log_softmax, gather, pow, autograd),
the same under ``torch.compile``, and plain ``F.cross_entropy`` (``cross_entropy``: what γ = 0 costs).

Logits are ``2·N(0, 1)``; one target in 17 is ignored (-100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._harness import Case, Skip, timed_call

SHAPES = [(4096, 1000), (1024, 32000), (8192, 32000)]
QUICK_SHAPES = [(1024, 1000)]
GAMMA = 2.0


def hand_written_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """``mean over non-ignored rows of −(1 − p_y)^γ log p_y``, autograd through every op."""
    valid = target != -100
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p_y = F.log_softmax(logits.float(), dim=-1).gather(1, safe[:, None])[:, 0]
    loss = -((1 - log_p_y.exp()) ** gamma) * log_p_y
    return (loss * valid).sum() / valid.sum()


def _inputs(n, c, dtype, device, requires_grad):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, c, generator=generator) * 2).to(device=device, dtype=dtype)
    logits.requires_grad_(requires_grad)
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    target[::17] = -100
    return logits, target


def _runner(function, n, c, dtype, device, mode):
    x, target = _inputs(n, c, dtype, device, requires_grad=mode != "forward")
    return timed_call(lambda: function(x, target), [x], mode)


def _compiled():
    try:
        compiled = torch.compile(hand_written_focal, dynamic=False)
    except Exception as error:  # pragma: no cover - depends on the environment
        raise Skip(f"torch.compile unavailable ({error})") from error
    return compiled


def _softmaxkit():
    import softmaxkit

    return lambda x, y: softmaxkit.focal_loss(x, y, gamma=GAMMA)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    out = []
    dtype_name = str(dtype).replace("torch.", "")
    impls = {
        "torch": lambda: hand_written_focal,
        "torch_compile": _compiled,
        "softmaxkit": _softmaxkit,
        "cross_entropy": lambda: (lambda x, y: F.cross_entropy(x, y)),
    }
    for n, c in QUICK_SHAPES if quick else SHAPES:
        size = n * c * dtype.itemsize
        if device == "cpu" and size > (3 << 30):
            continue
        for impl, factory in impls.items():
            def setup(mode, factory=factory, n=n, c=c):
                return _runner(factory(), n, c, dtype, device, mode)

            out.append(Case("focal", impl, f"{n}x{c}", dtype_name, setup, bytes_moved=2 * size,
                            extra={"bytes_by_mode": {"forward": size, "full": 2 * size}}))
    return out
