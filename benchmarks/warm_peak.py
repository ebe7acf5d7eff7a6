"""Peak extra memory of ``cross_entropy(..., inplace_backward=True)`` forward+backward after a warm-up call.

The benchmark harness measures peak memory on the first call of a fresh process, which includes one-time
allocations (the kernel library, the thread pool, torch's first-call caches: ~4 MiB). This script measures
a warm call, the figure the "≤ 0 extra with inplace_backward" target is about:

    PYTHONPATH=. python benchmarks/warm_peak.py [N ...]   (default: 512 2048 8192 rows, 50257 classes)
"""

from __future__ import annotations

import sys

import torch

import softmaxkit
from benchmarks._harness import _read_status, _reset_peak_rss


def warm_peak_bytes(num_rows: int, num_classes: int) -> tuple[int, bool]:
    leaf = torch.randn(num_rows, num_classes).requires_grad_()
    target = torch.randint(0, num_classes, (num_rows,))

    def step() -> torch.Tensor:
        loss = softmaxkit.cross_entropy(leaf.view_as(leaf), target, inplace_backward=True)
        (grad,) = torch.autograd.grad(loss, [leaf])
        return grad

    for _ in range(2):
        step()
    base = _read_status("VmRSS")
    if not _reset_peak_rss():
        raise SystemExit("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    grad = step()
    return _read_status("VmHWM") - base, grad.data_ptr() == leaf.data_ptr()


def main(argv: list[str]) -> None:
    rows = [int(a) for a in argv] or [512, 2048, 8192]
    for num_rows in rows:
        peak, same = warm_peak_bytes(num_rows, 50257)
        print(f"{num_rows}x50257 fp32: logits {num_rows * 50257 * 4 / 2**20:,.0f} MiB, "
              f"warm peak extra {peak / 2**20:.2f} MiB, gradient is the logits buffer: {same}")


if __name__ == "__main__":
    main(sys.argv[1:])
