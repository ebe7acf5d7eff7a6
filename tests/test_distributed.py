"""Vocab-parallel losses: 2 and 4 gloo processes on 127.0.0.1 against the single-process loss on gathered
logits (values and gradients, float64, every option), uneven and empty slices, and the errors raised the
same way on every rank.

Each test spawns its processes once and runs all of its cases inside them (a spawn costs a few seconds of
imports). Tolerance: float64 1e-12 relative: the same maths as the single-process path, only the sums over
classes are split into per-process partial sums before being added.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import softmaxkit
from softmaxkit import backends, distributed
from softmaxkit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

from ._helpers import expect_error

pytestmark = pytest.mark.distributed

RTOL, ATOL = 1e-12, 1e-14

#: the implementations of the vocab-parallel rows that can run here (the C kernel needs a compiler or a cache)
IMPLS = [name for name, why in backends.describe(
    "vocab_parallel_cross_entropy", backends.Request.of(torch.zeros(2, 2, dtype=torch.float64))).items()
    if why is None]

OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.2, z_loss=1e-2),
    dict(label_smoothing=0.1, reduction="none", temperature=0.8, softcap=3.0),
    dict(z_loss=1e-3, softcap=2.0, class_weight=True),
    dict(label_smoothing=0.3, class_weight=True, reduction="sum", chunk_size=2),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, case: str, sizes: list[int]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        CASES[case](rank, world, sizes)
    except BaseException:
        # mp.spawn re-raises in the parent; print the full traceback of the failing rank too
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _spawn(case: str, sizes: list[int]) -> None:
    # fork: the workers inherit the imported modules (a spawn re-imports torch and softmaxkit per process,
    # seconds each); each sets one intra-op thread first, as DataLoader workers do.
    mp.start_processes(_entry, args=(len(sizes), _free_port(), case, sizes), nprocs=len(sizes), join=True,
                       start_method="fork")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _problem(num_classes: int, rows: int = 7, hidden_size: int = 4):
    g = torch.Generator().manual_seed(123)  # the same data on every rank
    hidden = torch.randn(rows, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(num_classes, hidden_size, generator=g, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)
    class_weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5
    target = torch.randint(0, num_classes, (rows,), generator=g)
    target[1] = -100
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    return hidden, weight, bias, class_weight, target, upstream


def _split(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _case_parity(rank: int, world: int, sizes: list[int]) -> None:
    """Both vocab-parallel functions equal the single-process ones on gathered logits, for every option."""
    num_classes = sum(sizes)
    mine = _split(sizes, rank)
    hidden, weight, bias, class_weight, target, upstream = _problem(num_classes)
    for spec in OPTIONS:
        options = dict(spec)
        use_weight = options.pop("class_weight", False)
        chunk_size = options.pop("chunk_size", None)
        reduction = options.get("reduction", "mean")

        # vocab_parallel_cross_entropy vs cross_entropy on the full logits, each implementation
        logits = hidden @ weight.T + bias
        full = logits.clone().requires_grad_()
        expected = softmaxkit.cross_entropy(full, target, weight=class_weight if use_weight else None, **options)
        (expected * upstream if reduction == "none" else expected).sum().backward()
        for impl in IMPLS:
            distributed._IMPL = impl
            shard = logits[:, mine].clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(shard, target, weight=class_weight[mine] if use_weight else None,
                                                num_classes=num_classes, chunk_size=chunk_size, **options)
            (loss * upstream if reduction == "none" else loss).sum().backward()
            _close(loss, expected, f"rank {rank} {impl} loss {spec}")
            _close(shard.grad, full.grad[:, mine], f"rank {rank} {impl} logits grad {spec}")
        distributed._IMPL = "auto"

        # vocab_parallel_linear_cross_entropy vs linear_cross_entropy
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        expected = softmaxkit.linear_cross_entropy(h, w, target, bias=b,
                                                   class_weight=class_weight if use_weight else None,
                                                   impl="composite", **options)
        (expected * upstream if reduction == "none" else expected).sum().backward()
        h2 = hidden.clone().requires_grad_()
        w2, b2 = weight[mine].clone().requires_grad_(), bias[mine].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(
            h2, w2, target, bias_shard=b2, class_weight=class_weight[mine] if use_weight else None,
            chunk_size=chunk_size or 3, **options,
        )
        (loss * upstream if reduction == "none" else loss).sum().backward()
        _close(loss, expected, f"rank {rank} linear loss {spec}")
        _close(h2.grad, h.grad, f"rank {rank} hidden grad {spec}")
        _close(w2.grad, w.grad[mine], f"rank {rank} weight grad {spec}")
        _close(b2.grad, b.grad[mine], f"rank {rank} bias grad {spec}")

    for impl in IMPLS:
        distributed._IMPL = impl
        # every target ignored: 0 loss and zero gradients on every rank, no NaN (NaN logits on ignored rows too)
        ignored = torch.full_like(target, -100)
        shard = (hidden @ weight[mine].T).requires_grad_()
        zero = vocab_parallel_cross_entropy(shard, ignored)
        zero.backward()
        assert zero.item() == 0.0 and torch.count_nonzero(shard.grad) == 0, impl
        padded = (hidden @ weight[mine].T).index_fill(0, torch.tensor([1]), torch.nan).requires_grad_()
        vocab_parallel_cross_entropy(padded, target).backward()  # row 1 is ignored
        assert torch.count_nonzero(padded.grad[1]) == 0 and bool(torch.isfinite(padded.grad).all()), impl
        _case_low_precision(rank, num_classes, mine, impl)
        _case_autocast(rank, num_classes, mine, impl)
        _case_layouts_and_threads(rank, world, impl)
    distributed._IMPL = "auto"


def _case_layouts_and_threads(rank: int, world: int, impl: str) -> None:
    """A row-strided view of a wider tensor and a class-strided shard give the contiguous shard's loss and
    gradient; 2 threads (rows split between them: 96 × 800 is above the kernel's threading threshold) give
    the 1-thread result bit for bit, as rows are independent."""
    g = torch.Generator().manual_seed(7)
    num_classes = 800 * world
    logits = torch.randn(96, num_classes, generator=g, dtype=torch.float64)
    target = torch.randint(0, num_classes, (96,), generator=g)
    target[::5] = -100
    mine = slice(800 * rank, 800 * (rank + 1))
    for options in (dict(), dict(label_smoothing=0.1, reduction="sum")):
        shard = logits[:, mine].clone().requires_grad_()
        expected = vocab_parallel_cross_entropy(shard, target, **options)
        expected.backward()
        wide = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(wide[:, mine], target, **options)  # row stride C, not C_r
        loss.backward()
        assert torch.equal(loss, expected) and torch.equal(wide.grad[:, mine], shard.grad), (impl, options)
        columns = logits.t().contiguous().t()[:, mine].clone(memory_format=torch.preserve_format)
        columns.requires_grad_()
        assert columns.stride(1) != 1
        distributed._IMPL = "auto"  # the kernel needs unit class stride: auto takes the torch ops
        try:
            loss = vocab_parallel_cross_entropy(columns, target, **options)
            loss.backward()
        finally:
            distributed._IMPL = impl
        _close(loss, expected, f"rank {rank} {impl} class-strided loss {options}")
        _close(columns.grad, shard.grad, f"rank {rank} {impl} class-strided grad {options}")
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            threaded = shard.detach().clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(threaded, target, **options)
            loss.backward()
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(loss, expected) and torch.equal(threaded.grad, shard.grad), (impl, options)


def _case_autocast(rank: int, num_classes: int, mine: slice, impl: str) -> None:
    """Under autocast both vocab-parallel losses follow the one-process rules: fp32, and equal to the loss of the
    autocast-dtype logits computed in fp32 (not a bf16 loss cast up, 2^-9 off in relative terms)."""
    hidden, weight, bias, _, target, _ = _problem(num_classes)
    hidden, weight, bias = hidden.float() * 3, weight.float(), bias.float()
    for options in (dict(), dict(label_smoothing=0.1, reduction="sum"), dict(reduction="none")):
        what = f"rank {rank} {impl} autocast {options}"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = softmaxkit.linear_cross_entropy(hidden, weight, target, bias=bias, **options)
            loss = vocab_parallel_linear_cross_entropy(hidden, weight[mine], target, bias_shard=bias[mine], **options)
        assert loss.dtype == expected.dtype == torch.float32, what
        torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
        logits = (hidden.bfloat16() @ weight.bfloat16().T + bias.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = softmaxkit.cross_entropy(logits, target, **options)
            loss = vocab_parallel_cross_entropy(logits[:, mine], target, **options)
        assert loss.dtype == expected.dtype == torch.float32, what
        torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")


def _case_low_precision(rank: int, num_classes: int, mine: slice, impl: str) -> None:
    """fp32 and bf16 shards against the one-process loss of the same dtype. Both compute in fp32 and differ
    only in the order of the class sums (split per process, then rescaled): fp32 agrees to ~1e-6 relative;
    bf16 rounds the loss and the gradient once, so an fp32 difference of 1e-6 may flip one bf16 rounding
    (2^-8 relative)."""
    hidden, weight, bias, _, target, _ = _problem(num_classes)
    logits = hidden @ weight.T + bias
    for dtype, rtol, atol in ((torch.float32, 2e-6, 1e-7), (torch.bfloat16, 8e-3, 1e-4)):
        for options in (dict(), dict(label_smoothing=0.1, z_loss=1e-3), dict(softcap=2.0, reduction="sum")):
            full = logits.to(dtype).requires_grad_()
            expected = softmaxkit.cross_entropy(full, target, **options)
            expected.backward()
            shard = logits[:, mine].to(dtype).requires_grad_()
            loss = vocab_parallel_cross_entropy(shard, target, **options)
            loss.backward()
            what = f"rank {rank} {impl} {dtype} {options}"
            torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol, msg=lambda m, what=what: f"{what} loss: {m}")
            torch.testing.assert_close(shard.grad, full.grad[:, mine], rtol=rtol, atol=atol,
                                       msg=lambda m, what=what: f"{what} grad: {m}")


def _case_errors(rank: int, world: int, sizes: list[int]) -> None:
    """Mismatches between ranks raise the same ValueError on every rank instead of deadlocking."""
    num_classes = sum(sizes)
    mine = _split(sizes, rank)
    hidden, weight, _, _, target, _ = _problem(num_classes)
    logits = hidden @ weight.T
    expect_error("add up to", lambda: vocab_parallel_cross_entropy(logits[:, mine], target,
                                                                     num_classes=num_classes + 1))
    rows = 7 if rank == 0 else 6
    expect_error("same number of rows", lambda: vocab_parallel_cross_entropy(logits[:rows, mine], target[:rows]))
    other = target.clone()
    if rank == 1:
        other[0] = (other[0] + 1) % num_classes
    expect_error("`target` differs", lambda: vocab_parallel_cross_entropy(logits[:, mine], other))
    expect_error("same number of hidden features", lambda: vocab_parallel_linear_cross_entropy(
        hidden[:, : 4 - rank], weight[mine, : 4 - rank], target))
    expect_error("same number of chunk_size", lambda: vocab_parallel_linear_cross_entropy(
        hidden, weight[mine], target, chunk_size=2 + rank))
    bad = target.clone()
    bad[0] = num_classes
    expect_error(f"class indices in [0, {num_classes})", lambda: vocab_parallel_cross_entropy(logits[:, mine], bad))
    expect_error("`hidden` has 4 features", lambda: vocab_parallel_linear_cross_entropy(hidden, weight[mine, :3],
                                                                                          target))


def _case_parity_and_errors(rank: int, world: int, sizes: list[int]) -> None:
    _case_parity(rank, world, sizes)
    _case_errors(rank, world, sizes)


def _case_megatron(rank: int, world: int, sizes: list[int]) -> None:
    """Megatron-core's ``vocab_parallel_cross_entropy`` (the peer this mirrors) gives the same per-row losses and
    gradients on the same shards, for every implementation. Megatron computes in float32 whatever the input (and
    overwrites its input, so it gets a clone): both get float32 shards and agree to a few float32 ulps of the
    loss (|loss| ~ 5 here: rtol 2e-6) and of the probabilities in the gradient (atol 1e-7, upstream ~1).

    With label smoothing they differ, and Megatron is the one that is off: it averages ``log p`` over this rank's
    slice only, with the slice's size (``s = ε C_r / (C_r − 1)``, ``mean_{c ∈ r} log p_c``), so its loss is not
    the full vocabulary's smoothed loss and differs between ranks; softmaxkit's equals the single-process loss
    (``_case_parity``). The check below pins that reading of Megatron's result."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy as megatron_loss

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        num_classes = sum(sizes)
        _, _, _, _, target, upstream = _problem(num_classes)
        target, upstream = target.clamp_min(0), upstream.float()  # Megatron has no ignore_index
        full = torch.randn(target.shape[0], num_classes, generator=torch.Generator().manual_seed(7)) * 3
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        theirs_in = full[:, mine].clone().requires_grad_()
        theirs = megatron_loss(theirs_in.clone(), target)
        (theirs * upstream).sum().backward()
        for impl in IMPLS:
            distributed._IMPL = impl
            ours_in = full[:, mine].clone().requires_grad_()
            ours = vocab_parallel_cross_entropy(ours_in, target, reduction="none")
            (ours * upstream).sum().backward()
            torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7, msg=lambda m, i=impl: f"loss, {i}: {m}")
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=2e-6, atol=1e-7,
                                       msg=lambda m, i=impl: f"gradient, {i}: {m}")
        epsilon = 0.1
        smoothed = megatron_loss(full[:, mine].clone(), target, label_smoothing=epsilon)
        local = sizes[rank] / (sizes[rank] - 1) * epsilon
        log_p = torch.log_softmax(full.double(), dim=1)
        nll = -log_p.gather(1, target[:, None])[:, 0]
        slice_reading = (1 - local) * nll - local * log_p[:, mine].mean(dim=1)
        torch.testing.assert_close(smoothed.double(), slice_reading, rtol=2e-6, atol=1e-6)
        ours = vocab_parallel_cross_entropy(full[:, mine].clone(), target, reduction="none", label_smoothing=epsilon)
        full_reading = torch.nn.functional.cross_entropy(full.double(), target, reduction="none",
                                                         label_smoothing=epsilon)
        torch.testing.assert_close(ours.double(), full_reading, rtol=2e-6, atol=1e-6)
    finally:
        distributed._IMPL = "auto"
        parallel_state.destroy_model_parallel()


CASES = {"parity": _case_parity, "parity+errors": _case_parity_and_errors, "megatron": _case_megatron}


def test_two_processes_equal_the_single_process_loss_and_mismatches_raise_everywhere():
    _spawn("parity+errors", [6, 7])


def test_four_processes_with_uneven_and_empty_slices():
    _spawn("parity", [5, 0, 9, 3])


def test_megatron_core_gives_the_same_losses_and_gradients():
    pytest.importorskip("megatron.core", reason="megatron-core (a dev dependency on Linux, CPython 3.11) is absent")
    _spawn("megatron", [6, 6])  # Megatron assumes equal slices (rank r holds [r C_r, (r + 1) C_r))


def test_the_c_kernel_serves_plain_cpu_shards_and_torch_ops_everything():
    from softmaxkit.backends.cpu import cross_entropy as cpu

    request = backends.Request.of(torch.zeros(3, 4))
    expected = "cpu" if cpu.available() else "torch"
    assert backends.select("vocab_parallel_cross_entropy", "auto", request).name == expected
    assert "torch" in IMPLS
    meta = backends.Request.of(torch.zeros(3, 4, device="meta"))
    assert backends.select("vocab_parallel_cross_entropy", "auto", meta).name == "torch"


def test_without_a_process_group_the_error_says_how_to_start_one():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_a_reduce_that_combines_across_processes_must_define_its_gather():
    from softmaxkit._core.linear import LocalReduce

    class OnlySums(LocalReduce):
        def sum_(self, tensor):
            return tensor

    stats = torch.ones(3, 2)
    assert torch.equal(LocalReduce().gather_async(stats)(), stats[None])
    with pytest.raises(NotImplementedError, match="OnlySums .* gather_async"):
        OnlySums().gather_async(stats)
