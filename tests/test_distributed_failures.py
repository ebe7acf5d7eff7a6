"""What the other processes see when one process of a vocab-parallel loss dies or stalls (gloo, 2 and 4 processes).

Each case forks its processes from this (already imported) test process; every process writes a small JSON
report (how long its loss call took and what it raised) and the parent kills what is left (by pid). Bounds:
a dead process closes its sockets, so the others' collective fails at once (measured 0.0–0.3 s here; the
bound of 5 s leaves room for a loaded machine and is far below the 30 s timeout these groups are given);
a stalled process is only noticed when the process group's timeout (3 s here) expires, so the error comes
after at least 3 s and well before twice that plus slack.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist

from softmaxkit.distributed import vocab_parallel_cross_entropy

pytestmark = pytest.mark.distributed

DIES, STALLS = "dies", "stalls"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(directory: str, rank: int, elapsed: float, kind: str | None, message: str) -> None:
    path = os.path.join(directory, f"{rank}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump([rank, elapsed, kind, message], handle)
    os.replace(path + ".tmp", path)  # the parent never reads a half-written report


def _rank(rank: int, world: int, port: int, failure: str, timeout_s: float, results: str) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(64, 40 * world, generator=g).tensor_split(world, dim=1)[rank].clone()
        target = torch.randint(0, 40 * world, (64,), generator=g)
        shard = logits.requires_grad_()
        vocab_parallel_cross_entropy(shard, target).backward()  # every process took part once
        dist.barrier()
        if rank == 1:
            if failure == DIES:
                time.sleep(0.3)  # the others are waiting in the loss's first collective by now
                os._exit(3)
            time.sleep(600)  # stalls; the parent kills it
        start = time.monotonic()
        try:
            vocab_parallel_cross_entropy(shard, target).backward()
            _report(results, rank, time.monotonic() - start, None, "")
        except Exception as error:  # what the test inspects
            _report(results, rank, time.monotonic() - start, type(error).__name__, str(error))
    except BaseException as error:  # a setup failure: reported, so the test fails with it
        _report(results, rank, -1.0, "setup:" + type(error).__name__, str(error))
        code = 1
    # no destroy_process_group: with a peer gone it may block; the parent reaps the process
    os._exit(code)


def _run(world: int, failure: str, timeout_s: float, directory) -> list[tuple[int, float, str | None, str]]:
    context = multiprocessing.get_context("fork")
    port = _free_port()
    processes = [context.Process(target=_rank, args=(rank, world, port, failure, timeout_s, str(directory)))
                 for rank in range(world)]
    for process in processes:
        process.start()
    try:
        deadline = time.monotonic() + timeout_s + 20
        while len(list(directory.glob("*.json"))) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(5)
    return sorted(tuple(json.loads(path.read_text())) for path in directory.glob("*.json"))


@pytest.mark.parametrize("world", [2, 4])
def test_a_process_that_dies_makes_the_others_fail_at_once(world, tmp_path):
    reports = _run(world, DIES, 30.0, tmp_path)
    assert [rank for rank, *_ in reports] == [r for r in range(world) if r != 1], reports
    for rank, elapsed, kind, message in reports:
        assert kind is not None and not kind.startswith("setup"), (rank, kind, message)
        assert elapsed < 5.0, f"rank {rank} took {elapsed:.1f} s to notice a dead process"
        assert "softmaxkit vocab-parallel loss" in message and f"rank {rank} of {world}" in message, message
        assert "died" in message and "timeout" in message, message


@pytest.mark.parametrize("world", [2, 4])
def test_a_process_that_stalls_makes_the_others_fail_after_the_group_timeout(world, tmp_path):
    timeout_s = 3.0
    reports = _run(world, STALLS, timeout_s, tmp_path)
    assert [rank for rank, *_ in reports] == [r for r in range(world) if r != 1], reports
    for rank, elapsed, kind, message in reports:
        assert kind is not None and not kind.startswith("setup"), (rank, kind, message)
        assert timeout_s - 0.5 <= elapsed < 2 * timeout_s + 5, f"rank {rank}: error after {elapsed:.1f} s"
        assert "timed out" in message.lower() and "init_process_group(timeout=" in message, message
        assert "the call's first collective" in message, message
