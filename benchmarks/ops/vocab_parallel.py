"""Vocab-parallel cross-entropy over ``P`` gloo processes on this machine, against its peers and a one-process row.

Every case runs in its own harness child, which becomes rank 0 and forks ``P − 1`` more ranks before it
touches a tensor; the ranks join a gloo group on 127.0.0.1. Each rank holds its contiguous slice
``(N, C/P)`` of the same fp32 logits (``torch.tensor_split`` along the classes) and the same targets (every
target a real class: Megatron-core has no ``ignore_index``). Rank 0 times each call; the other ranks run the
same call when rank 0 broadcasts the go-ahead (one 8-byte broadcast per call, paid by every impl alike).
``forward`` runs under ``no_grad``; ``full`` is forward + ``torch.autograd.grad`` of the loss (mean over the
rows) with respect to the rank's own slice. Peak memory is rank 0's.

Threads: each rank gets ``max(1, cores // P)`` torch threads (1 per rank for 2 ranks on 2 cores), and so
does the one-process reference row, so no row has more cores than another.

Impls:

* ``softmaxkit``: :func:`softmaxkit.distributed.vocab_parallel_cross_entropy` (``reduction="mean"``);
* ``softmaxkit_torch``: the same with the dispatch row's ``torch`` entry (chunked torch ops: what runs
  without a C compiler, and on CUDA);
* ``megatron``: Megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` (``.mean()`` of its
  per-row loss), its tensor-parallel group set up by ``parallel_state.initialize_model_parallel`` on the
  gloo group (skipped, with the reason, when ``megatron-core`` does not import);
* ``loss_parallel``: PyTorch's ``torch.distributed.tensor.parallel.loss_parallel()`` around
  ``F.cross_entropy`` of a ``Shard(1)`` DTensor built from the slice (``DTensor.from_local``);
* ``single_process``: :func:`softmaxkit.cross_entropy` of ``(N, C/P)`` logits in one process (no
  collectives): the reference the vocab-parallel loss should match in time, as each rank does that much work.

The table's ``× base time`` / ``× base mem`` columns are relative to ``single_process`` (:data:`BASELINE`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile

import torch
import torch.nn.functional as F

from .._harness import Case, Skip, timed_call

WORLD = 2
#: the impl the table's ratios divide by
BASELINE = "single_process"
SHAPES = [(4096, 32000)]
QUICK_SHAPES = [(1024, 32000)]


def threads_per_rank(world: int = WORLD) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _slice(n: int, c: int, rank: int, world: int, dtype, requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(n, c, generator=generator) * 2
    target = torch.randint(0, c, (n,), generator=generator)
    shard = full.tensor_split(world, dim=1)[rank].to(dtype).contiguous()
    del full
    return shard.requires_grad_(requires_grad), target


def _megatron(world: int):
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    except ImportError as error:
        raise Skip(f"megatron-core is not importable ({error})") from error
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    return lambda shard, target: vocab_parallel_cross_entropy(shard, target).mean()


def _loss_fn(impl: str, world: int):
    """``(loss_fn(shard, target), context)``: the loss, and a context manager the whole step runs in."""
    if impl in ("softmaxkit", "softmaxkit_torch"):
        from softmaxkit import distributed

        # softmaxkit_torch: the dispatch row's torch entry (what runs without a C compiler, and on CUDA)
        distributed._IMPL = "torch" if impl == "softmaxkit_torch" else "auto"
        return (lambda shard, target: distributed.vocab_parallel_cross_entropy(shard, target)), contextlib.nullcontext
    if impl == "megatron":
        return _megatron(world), contextlib.nullcontext
    if impl == "loss_parallel":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor.parallel import loss_parallel

        mesh = init_device_mesh("cpu", (world,))

        def run(shard, target):
            logits = DTensor.from_local(shard, mesh, [Shard(1)], run_check=False)
            labels = DTensor.from_local(target, mesh, [Replicate()], run_check=False)
            return F.cross_entropy(logits, labels).to_local()
        # forward and backward both run under loss_parallel(), as its documentation asks
        return run, loss_parallel
    raise ValueError(impl)


def _step(impl: str, world: int, shard, target, mode: str):
    loss_fn, context = _loss_fn(impl, world)
    step = timed_call(lambda: loss_fn(shard, target), [shard], mode)

    def run():
        with context():
            return step()
    return run


def _worker(rank: int, world: int, store_path: str, impl: str, n: int, c: int, dtype, mode: str) -> None:
    """A rank > 0: join the group, build the same call, run it whenever rank 0 says so."""
    import torch.distributed as dist

    code = 0
    try:
        torch.set_num_threads(threads_per_rank(world))
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        shard, target = _slice(n, c, rank, world, dtype, mode != "forward")
        try:
            step = _step(impl, world, shard, target, mode)
        except Skip:  # rank 0 skips too and tells this rank to stop
            step = None
        go = torch.zeros(1, dtype=torch.int64)
        while True:
            dist.broadcast(go, 0)
            if int(go) == 0:
                break
            step()
        dist.destroy_process_group()
    except BaseException:  # a worker's failure surfaces as rank 0's collective error
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def _parallel(impl: str, n: int, c: int, dtype, mode: str, world: int = WORLD):
    """Rank 0's timed call; forks the other ranks first (before any tensor exists in this process)."""
    import torch.distributed as dist

    torch.set_num_threads(threads_per_rank(world))
    store_path = tempfile.mktemp(prefix="skvp-", dir=tempfile.gettempdir())
    children = []
    for rank in range(1, world):
        pid = os.fork()
        if pid == 0:
            _worker(rank, world, store_path, impl, n, c, dtype, mode)
        children.append(pid)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=0, world_size=world)
    go = torch.ones(1, dtype=torch.int64)

    def shutdown():
        go.zero_()
        try:
            dist.broadcast(go, 0)
            dist.destroy_process_group()
        finally:
            for pid in children:
                os.waitpid(pid, 0)
            if os.path.exists(store_path):
                os.unlink(store_path)

    shard, target = _slice(n, c, 0, world, dtype, mode != "forward")
    try:
        step = _step(impl, world, shard, target, mode)
    except Skip:
        shutdown()
        raise
    atexit.register(shutdown)

    def call():
        dist.broadcast(go, 0)
        return step()
    return call


def _single_process(n: int, c: int, dtype, mode: str, world: int = WORLD):
    import softmaxkit

    torch.set_num_threads(threads_per_rank(world))
    shard, target = _slice(n, c, 0, world, dtype, mode != "forward")
    target = target % shard.shape[1]  # classes of this share
    return timed_call(lambda: softmaxkit.cross_entropy(shard, target), [shard], mode)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    if device != "cpu":
        return []  # gloo on one CPU machine; an NCCL variant needs a GPU machine with 2 devices
    dtype_name = str(dtype).replace("torch.", "")
    out = []
    for n, c in QUICK_SHAPES if quick else SHAPES:
        size = n * (c // WORLD) * dtype.itemsize
        bytes_by_mode = {"forward": size, "full": 2 * size}
        for impl in ("single_process", "softmaxkit", "softmaxkit_torch", "megatron", "loss_parallel"):
            def setup(mode, impl=impl, n=n, c=c):
                if impl == "single_process":
                    return _single_process(n, c, dtype, mode)
                return _parallel(impl, n, c, dtype, mode)
            # the shape is the global one; single_process runs one rank's share, N × C/P
            out.append(Case("vocab_parallel", impl, f"{n}x{c}", dtype_name, setup, bytes_moved=2 * size,
                            extra={"bytes_by_mode": bytes_by_mode}))
    return out
