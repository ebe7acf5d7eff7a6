"""CPU fast paths: C kernels built on first use (see :mod:`._build`), falling back to the PyTorch path.

``python -m softmaxkit.backends.cpu`` builds (or finds) the kernel library and prints where it is, e.g. to
prebuild it in a container image.

The kernels take a row range ``[start, stop)`` per call; :func:`row_workers` and :func:`run_row_ranges` split
the rows of one call over torch's thread count with a shared worker pool (ctypes releases the GIL, so the
ranges run in parallel).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: rows below this many elements run on the calling thread (thread hand-off costs ~50 µs)
PARALLEL_MIN_ELEMENTS = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0


def available() -> bool:
    """Whether the compiled CPU kernels can be used on this machine (builds the fp32 one on the first call)."""
    from . import _build

    return _build.load("f32") is not None


def row_workers(num_rows: int, num_classes: int) -> int:
    """How many threads a kernel call over ``num_rows × num_classes`` elements should use (1: no hand-off)."""
    import torch

    workers = min(max(1, torch.get_num_threads()), num_rows)
    if workers <= 1 or num_rows * num_classes < PARALLEL_MIN_ELEMENTS:
        return 1
    return workers


def _executor(workers: int) -> ThreadPoolExecutor:
    """The worker pool, rebuilt when the thread count changes or in a forked child (whose threads are gone)."""
    global _pool, _pool_size, _pool_pid
    if _pool is None or _pool_size != workers or _pool_pid != os.getpid():
        if _pool is not None and _pool_pid == os.getpid():
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="softmaxkit-cpu")
        _pool_size, _pool_pid = workers, os.getpid()
    return _pool


def run_row_ranges(call: Callable[[int, int, int], None], num_rows: int, workers: int) -> None:
    """Run ``call(worker, start, stop)`` over ``workers`` contiguous ranges covering ``[0, num_rows)``.

    The calling thread takes the first range, the pool the others; returns when all are done and re-raises
    the first exception of any range.
    """
    if workers <= 1:
        call(0, 0, num_rows)
        return
    bounds = [num_rows * k // workers for k in range(workers + 1)]
    futures = [_executor(workers).submit(call, k, bounds[k], bounds[k + 1]) for k in range(1, workers)]
    call(0, bounds[0], bounds[1])
    for future in futures:
        future.result()
