"""FSDP2 output layer: peak memory and time of the two ways to take the fused loss, on gloo ranks (CPU).

* ``dtensor``: an ``nn.Linear`` head under ``fully_shard``, ``linear_cross_entropy(hidden, head.weight, target)``
  called outside the head's forward, where the weight is a ``Shard(0)`` DTensor (gathered by DTensor, its
  gradient reduce-scattered by DTensor's backward);
* ``head``: ``softmaxkit.nn.LinearCrossEntropyHead`` under ``fully_shard``, whose forward computes the loss
  (gathered and reduce-scattered by FSDP's own hooks);
* ``head_lean``: the same after ``head.set_unshard_in_backward(False)`` (the fused loss computes its gradients in
  forward for ``"mean"``/``"sum"``, so FSDP need not gather the weight again in backward);
* ``logits``: for scale, the naive ``nn.Linear`` head under ``fully_shard`` producing the logits, then
  ``softmaxkit.cross_entropy``.

Per rank, one warm step (forward + backward, after warm-up steps): peak extra resident memory (VmHWM after a
reset, minus VmRSS before; the largest over ranks) and the median time of the steps::

    PYTHONPATH=src:. python benchmarks/fsdp_head.py [--ranks 2] [--vocab 32000] [--hidden 512] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WAYS = ("dtensor", "head", "head_lean", "logits")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_fn(way: str, args, mesh):
    from torch.distributed.fsdp import fully_shard

    import softmaxkit
    from softmaxkit.nn import LinearCrossEntropyHead

    torch.manual_seed(0)
    if way.startswith("head"):
        head = LinearCrossEntropyHead(args.hidden, args.vocab)
    else:
        head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    fully_shard(head, mesh=mesh)
    if way == "head_lean":
        head.set_unshard_in_backward(False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    target = torch.randint(0, args.vocab, (args.tokens,))

    def step():
        if way.startswith("head"):
            loss = head(hidden, target)
        elif way == "dtensor":
            loss = softmaxkit.linear_cross_entropy(hidden, head.weight, target)
        else:
            loss = softmaxkit.cross_entropy(head(hidden), target)
        loss.backward()
        head.zero_grad(set_to_none=False)  # keep the gradient buffer, as a training loop with zero_grad does
        hidden.grad = None

    return step


def _entry(rank: int, world: int, port: int, args, results) -> None:
    from benchmarks._harness import _read_status, _reset_peak_rss

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    try:
        for way in WAYS:
            step = _step_fn(way, args, mesh)
            for _ in range(2):
                step()
            dist.barrier()
            base = _read_status("VmRSS")
            if not _reset_peak_rss():
                raise SystemExit("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
            step()
            peak = _read_status("VmHWM") - base
            times = []
            for _ in range(args.repeat):
                dist.barrier()
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            results[(way, rank)] = (peak, statistics.median(times))
            del step
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = mp.Manager().dict()
    mp.start_processes(_entry, args=(args.ranks, _free_port(), args, results), nprocs=args.ranks, join=True,
                       start_method="fork")
    mib = 2 ** 20
    weight = args.vocab * args.hidden * 4 / mib
    logits = args.tokens * args.vocab * 4 / mib
    print(f"{args.ranks} gloo ranks, vocab {args.vocab}, hidden {args.hidden}, {args.tokens} tokens per rank, fp32 "
          f"(full weight {weight:.1f} MiB, one rank's logits {logits:.1f} MiB), torch {torch.__version__}")
    print(f"{'way':10s} {'peak extra MiB (max over ranks)':>32s} {'median step s (max over ranks)':>32s}")
    for way in WAYS:
        peaks, times = zip(*(results[(way, r)] for r in range(args.ranks)))
        print(f"{way:10s} {max(peaks) / mib:32.1f} {max(times):32.3f}")


if __name__ == "__main__":
    main()
