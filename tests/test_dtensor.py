"""DTensor inputs to the losses and tensor parallelism: 2 and 4 gloo processes on 127.0.0.1.

Every loss and sparse map on a DTensor is compared with the single-process function on the gathered (full)
tensor, values and gradients in float64 (the gradients come back as DTensors with the input's placements, gathered with
``full_tensor()``), and with PyTorch's ``F.cross_entropy`` on DTensors (``loss_parallel()`` for class-sharded
logits) wherever PyTorch serves the call. Placements that cannot be served raise a ``ValueError`` on every
rank. Each world size is one spawn running every case (a spawn costs seconds of imports).

Tolerance: float64 1e-12 relative, as in tests/test_distributed.py: the same maths as the single-process
path, only the sums over classes (class-sharded) or over rows (row-sharded) are split into per-rank partial
sums before being added.
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
import torch.nn.functional as F

import softmaxkit

from ._helpers import expect_error

pytestmark = pytest.mark.distributed

RTOL, ATOL = 1e-12, 1e-14

CE_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.2, z_loss=1e-2),
    dict(label_smoothing=0.1, reduction="none", temperature=0.8, softcap=3.0),
    dict(z_loss=1e-3, softcap=2.0, weight="full"),
    dict(label_smoothing=0.3, weight="sharded", reduction="sum", chunk_size=2),
    dict(weight="full", reduction="none", ignore_index=3),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for case in CASES:
            case(rank, world, mesh)
    except BaseException:
        traceback.print_exc()  # mp re-raises in the parent; print the failing rank's full traceback too
        raise
    finally:
        dist.destroy_process_group()


def _spawn(world: int) -> None:
    # fork: the workers inherit the imported modules (see tests/test_distributed.py). Seconds of imports are
    # paid here once instead of in every rank: the DTensor packages, and what the first call of each C kernel
    # loads (torch._dynamo among them).
    import torch.distributed.tensor.parallel

    x, t = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True), torch.zeros(2, dtype=torch.long)
    for function in (softmaxkit.cross_entropy, softmaxkit.focal_loss, softmaxkit.sparsemax_loss,
                     softmaxkit.entmax15_loss, softmaxkit.entmax_bisect_loss):
        function(x, t).backward()
    mp.start_processes(_entry, args=(world, _free_port()), nprocs=world, join=True, start_method="fork")


def _close(actual, expected, what: str) -> None:
    from torch.distributed.tensor import DTensor

    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    if isinstance(expected, DTensor):
        expected = expected.full_tensor()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _data(shape, num_classes, seed=123, ignore=True):
    g = torch.Generator().manual_seed(seed)  # the same data on every rank
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    target_shape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    target = torch.randint(0, num_classes, target_shape, generator=g)
    if ignore and target.dim() > 0:
        target.view(-1)[1] = -100
    class_weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5
    upstream = torch.randn(target_shape, generator=g, dtype=torch.float64)
    return logits, target, class_weight, upstream


def _with_ignore(target, options):
    """The target with its -100 entries turned into the option's ignore_index (when one is given)."""
    ignore = options.get("ignore_index", -100)
    return target.masked_fill(target == -100, ignore)


def _backward(loss, upstream, reduction):
    from torch.distributed.tensor import DTensor

    if isinstance(loss, DTensor):
        loss = loss.full_tensor()  # differentiable; a Replicate DTensor's is a no-op
    (loss * upstream if reduction == "none" else loss).sum().backward()


def _reference(function, full, target, upstream, reduction, **options):
    x = full.clone().requires_grad_()
    loss = function(x, target, reduction=reduction, **options)
    _backward(loss, upstream, reduction)
    return loss.detach(), x.grad


def _on_mesh(tensor, mesh, placement, requires_grad=False):
    from torch.distributed.tensor import distribute_tensor

    out = distribute_tensor(tensor, mesh, [placement])
    return out.requires_grad_() if requires_grad else out


def _case_cross_entropy_class_sharded(rank, world, mesh):
    """Shard(class): the vocab-parallel algorithm equals the single-process loss and loss_parallel()."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    # uneven torch.chunk slices: 4+3 on 2 ranks; 2+2+1+0 (an empty slice) and 3+3+3+1 on 4 ranks
    sizes = (7,) if world == 2 else (5, 10)
    for num_classes, shape in [(c, shape) for c in sizes for shape in ((6, c), (3, c, 2))]:
        # loss_parallel() fails on a rank holding no class ("index 0 is out of bounds for dimension 1 with
        # size 0"), so it is compared where every rank holds classes
        every_rank_has_classes = -(-num_classes // world) * (world - 1) < num_classes
        full, plain_target, class_weight, upstream = _data(shape, num_classes)
        for spec in CE_OPTIONS:
            options = dict(spec)
            kind = options.pop("weight", None)
            reduction = options.pop("reduction", "mean")
            target = _with_ignore(plain_target, options)
            expected, expected_grad = _reference(softmaxkit.cross_entropy, full, target, upstream, reduction,
                                                 weight=None if kind is None else class_weight, **options)
            logits = _on_mesh(full, mesh, Shard(1), requires_grad=True)
            weight = {None: None, "full": class_weight, "sharded": _on_mesh(class_weight, mesh, Shard(0))}[kind]
            replicated_target = _on_mesh(target, mesh, Replicate()) if kind == "sharded" else target
            loss = softmaxkit.cross_entropy(logits, replicated_target, weight=weight, reduction=reduction, **options)
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
            _backward(loss, upstream, reduction)
            assert logits.grad.placements == (Shard(1),)
            _close(loss, expected, f"rank {rank} Shard(1) loss {shape} {spec}")
            _close(logits.grad, expected_grad, f"rank {rank} Shard(1) grad {shape} {spec}")
            if options or kind == "sharded" or not every_rank_has_classes:
                continue
            # PyTorch's own class-sharded cross-entropy, where it applies (no smoothing, z-loss, ...)
            theirs = _on_mesh(full, mesh, Shard(1), requires_grad=True)
            with loss_parallel():
                pt = F.cross_entropy(theirs, target, weight=None if kind is None else class_weight,
                                     reduction=reduction, ignore_index=spec.get("ignore_index", -100))
                _backward(pt, upstream, reduction)
            _close(loss, pt, f"rank {rank} Shard(1) vs loss_parallel {shape} {spec}")
            _close(logits.grad, theirs.grad, f"rank {rank} Shard(1) grad vs loss_parallel {shape} {spec}")

    # every target ignored: 0 with zero gradient, no NaN
    num_classes = sizes[0]
    full, target, _, _ = _data((4, num_classes), num_classes)
    logits = _on_mesh(full, mesh, Shard(1), requires_grad=True)
    zero = softmaxkit.cross_entropy(logits, torch.full_like(target, -100))
    zero.full_tensor().backward()
    assert zero.full_tensor().item() == 0.0 and torch.count_nonzero(logits.grad.full_tensor()) == 0

    # float32 logits: the loss and gradient keep the dtype; the tolerance is torch.testing's fp32 default (the
    # sums over classes are split into per-rank partial sums, a different rounding order)
    full, target, _, _ = _data((6, num_classes), num_classes)
    for function in (softmaxkit.cross_entropy, softmaxkit.sparsemax_loss, softmaxkit.entmax15_loss):
        expected, expected_grad = _reference(function, full.float(), target, None, "mean")
        logits = _on_mesh(full.float(), mesh, Shard(1), requires_grad=True)
        loss = function(logits, target)
        _backward(loss, None, "mean")
        assert loss.dtype == torch.float32 and logits.grad.dtype == torch.float32
        torch.testing.assert_close(loss.full_tensor(), expected)
        torch.testing.assert_close(logits.grad.full_tensor(), expected_grad)

    # 1-D logits (C,): the class dim is dim 0
    full, target, _, _ = _data((num_classes,), num_classes)
    expected, expected_grad = _reference(softmaxkit.cross_entropy, full, target, None, "mean")
    logits = _on_mesh(full, mesh, Shard(0), requires_grad=True)
    loss = softmaxkit.cross_entropy(logits, target)
    _backward(loss, None, "mean")
    _close(loss, expected, "1-D Shard(0) loss")
    _close(logits.grad, expected_grad, "1-D Shard(0) grad")


def _case_cross_entropy_rows(rank, world, mesh):
    """Shard(row dim) and Replicate: local loss, PyTorch's weighted mean over all ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    num_classes = 5
    cases = [((7, num_classes), Shard(0)), ((3, num_classes), Shard(0)), ((3, num_classes, 5), Shard(2))]
    if world == 2:  # the same code on 4 ranks: these run once
        cases += [((5, num_classes, 2), Shard(0)), ((6, num_classes), Replicate())]
    for shape, placement in cases:
        full, plain_target, class_weight, upstream = _data(shape, num_classes)
        target_dim = None if placement.is_replicate() else (0 if placement.dim == 0 else placement.dim - 1)
        for spec in CE_OPTIONS:
            options = dict(spec)
            kind = options.pop("weight", None)
            reduction = options.pop("reduction", "mean")
            target = _with_ignore(plain_target, options)
            weight = None if kind is None else class_weight
            expected, expected_grad = _reference(softmaxkit.cross_entropy, full, target, upstream, reduction,
                                                 weight=weight, **options)
            logits = _on_mesh(full, mesh, placement, requires_grad=True)
            if kind == "sharded":
                weight = _on_mesh(class_weight, mesh, Shard(0))  # gathered: a (C,) vector
            dtarget = target if target_dim is None or kind == "full" else _on_mesh(target, mesh, Shard(target_dim))
            loss = softmaxkit.cross_entropy(logits, dtarget, weight=weight, reduction=reduction, **options)
            want = (Shard(target_dim),) if reduction == "none" and target_dim is not None else (Replicate(),)
            assert isinstance(loss, DTensor) and loss.placements == want, (loss.placements, want)
            _backward(loss, upstream, reduction)
            assert logits.grad.placements == (placement,)
            _close(loss, expected, f"rank {rank} {placement} loss {shape} {spec}")
            _close(logits.grad, expected_grad, f"rank {rank} {placement} grad {shape} {spec}")

    # class-probability targets, batch-sharded (mean divides by the number of rows over all ranks)
    full, _, _, _ = _data((7, num_classes), num_classes)
    probabilities = torch.softmax(_data((7, num_classes), num_classes, seed=5)[0], dim=1)
    expected, expected_grad = _reference(softmaxkit.cross_entropy, full, probabilities, None, "mean",
                                         label_smoothing=0.1)
    logits = _on_mesh(full, mesh, Shard(0), requires_grad=True)
    loss = softmaxkit.cross_entropy(logits, _on_mesh(probabilities, mesh, Shard(0)), label_smoothing=0.1)
    _backward(loss, None, "mean")
    _close(loss, expected, "probability targets Shard(0) loss")
    _close(logits.grad, expected_grad, "probability targets Shard(0) grad")

    # F.cross_entropy on a Shard(0) DTensor (its local mean marked Partial(avg)): equal where that is exact,
    # i.e. even shards, nothing ignored, no class weights
    full, target, _, _ = _data((4 * world, num_classes), num_classes, ignore=False)
    ours, theirs = (_on_mesh(full, mesh, Shard(0), requires_grad=True) for _ in range(2))
    dtarget = _on_mesh(target, mesh, Shard(0))
    loss = softmaxkit.cross_entropy(ours, dtarget, label_smoothing=0.1)
    pt = F.cross_entropy(theirs, dtarget, label_smoothing=0.1)
    loss.full_tensor().backward()
    pt.full_tensor().backward()
    _close(loss, pt, "Shard(0) vs F.cross_entropy")
    _close(ours.grad, theirs.grad, "Shard(0) grad vs F.cross_entropy")

    # every target ignored: softmaxkit's documented 0 with zero gradient
    logits = _on_mesh(full, mesh, Shard(0), requires_grad=True)
    zero = softmaxkit.cross_entropy(logits, torch.full_like(target, -100))
    zero.full_tensor().backward()
    assert zero.full_tensor().item() == 0.0 and torch.count_nonzero(logits.grad.full_tensor()) == 0


def _case_other_losses(rank, world, mesh):
    """focal, the sparse losses and sampled softmax on Shard(0) and Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    num_classes = 6
    full, target, class_weight, upstream = _data((7, num_classes), num_classes)
    alpha_rows = 1.2 + torch.rand(7, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    losses = [
        (softmaxkit.focal_loss, dict(gamma=1.5, alpha=class_weight.flip(0), weight=class_weight, label_smoothing=0.1)),
        (softmaxkit.focal_loss, dict(gamma=2.0)),
        (softmaxkit.sparsemax_loss, dict(weight=class_weight, temperature=0.7)),
        (softmaxkit.entmax15_loss, dict()),
        (softmaxkit.entmax_bisect_loss, dict(alpha=1.3, weight=class_weight)),
    ]
    for placement in (Shard(0), Replicate()):
        for function, options in losses:
            for reduction in ("mean", "sum", "none"):
                expected, expected_grad = _reference(function, full, target, upstream, reduction, **options)
                logits = _on_mesh(full, mesh, placement, requires_grad=True)
                dtarget = _on_mesh(target, mesh, placement)
                loss = function(logits, dtarget, reduction=reduction, **options)
                _backward(loss, upstream, reduction)
                what = f"rank {rank} {function.__name__} {placement} {reduction}"
                _close(loss, expected, what)
                _close(logits.grad, expected_grad, what + " grad")
        # a replicated per-row alpha tensor that takes a gradient: summed over the ranks' rows
        a = alpha_rows.clone().requires_grad_()
        x = full.clone().requires_grad_()
        expected = softmaxkit.entmax_bisect_loss(x, target, alpha=a)
        expected.backward()
        a2 = alpha_rows.clone().requires_grad_()
        logits = _on_mesh(full, mesh, placement, requires_grad=True)
        loss = softmaxkit.entmax_bisect_loss(logits, target, alpha=a2)
        loss.full_tensor().backward()
        _close(loss, expected, f"entmax_bisect tensor alpha {placement}")
        _close(logits.grad, x.grad, f"entmax_bisect tensor alpha {placement} logits grad")
        _close(a2.grad, a.grad, f"entmax_bisect tensor alpha {placement} alpha grad")

        # sampled softmax: the same generator seed on every rank draws the same classes
        g = torch.Generator().manual_seed(3)
        hidden = torch.randn(9, 4, generator=g, dtype=torch.float64)
        out_weight = torch.randn(50, 4, generator=g, dtype=torch.float64)
        bias = torch.randn(50, generator=g, dtype=torch.float64)
        sampled_target = torch.randint(0, 50, (9,), generator=g)
        sampled_target[2] = -100
        for reduction in ("mean", "none"):
            h, w, b = (t.clone().requires_grad_() for t in (hidden, out_weight, bias))
            expected = softmaxkit.sampled_softmax_loss(h, w, sampled_target, bias=b, num_sampled=8, reduction=reduction,
                                                       generator=torch.Generator().manual_seed(11))
            _backward(expected, upstream[:1].expand(9), reduction)
            dh = _on_mesh(hidden, mesh, placement, requires_grad=True)
            w2, b2 = out_weight.clone().requires_grad_(), _on_mesh(bias, mesh, Replicate(), requires_grad=True)
            loss = softmaxkit.sampled_softmax_loss(dh, w2, sampled_target, bias=b2, num_sampled=8,
                                                   reduction=reduction, generator=torch.Generator().manual_seed(11))
            _backward(loss, upstream[:1].expand(9), reduction)
            what = f"sampled_softmax_loss {placement} {reduction}"
            _close(loss, expected, what)
            _close(dh.grad, h.grad, what + " hidden grad")
            _close(w2.grad, w.grad, what + " weight grad")
            _close(b2.grad, b.grad, what + " bias grad")


def _case_sparse_class_sharded(rank, world, mesh):
    """sparsemax_loss and entmax15_loss of class-sharded logits: the global threshold search over the mesh
    equals the single-process loss (values and gradients), for wide and narrow supports, masked classes,
    class weights (whole or Shard(0)), temperature, ignored rows, K-dimensional logits and empty slices."""
    from torch.distributed.tensor import Replicate, Shard

    for num_classes in (7,) if world == 2 else (5,):  # 4+3; 2+2+1+0 (an empty slice)
        for shape, spread in (((6, num_classes), 0.3), ((6, num_classes), 4.0), ((3, num_classes, 2), 1.0)):
            full, target, class_weight, upstream = _data(shape, num_classes)
            full = full * spread  # 0.3: most classes in the support; 4.0: one or two
            if len(shape) == 2:
                full[2, 1:3] = -torch.inf  # masked classes
                target[2] = 0
            for function in (softmaxkit.sparsemax_loss, softmaxkit.entmax15_loss):
                for options in (dict(), dict(reduction="sum", weight="full", temperature=0.7),
                                dict(reduction="none", weight="sharded")):
                    options = dict(options)
                    kind = options.pop("weight", None)
                    reduction = options.pop("reduction", "mean")
                    expected, expected_grad = _reference(function, full, target, upstream, reduction,
                                                         weight=None if kind is None else class_weight, **options)
                    logits = _on_mesh(full, mesh, Shard(1), requires_grad=True)
                    weight = {None: None, "full": class_weight, "sharded": _on_mesh(class_weight, mesh, Shard(0))}[kind]
                    dtarget = _on_mesh(target, mesh, Replicate()) if kind == "sharded" else target
                    loss = function(logits, dtarget, weight=weight, reduction=reduction, **options)
                    assert loss.placements == (Replicate(),)
                    _backward(loss, upstream, reduction)
                    assert logits.grad.placements == (Shard(1),)
                    what = f"rank {rank} {function.__name__} Shard(1) {shape} x{spread} {kind} {reduction}"
                    _close(loss, expected, what)
                    _close(logits.grad, expected_grad, what + " grad")


def _case_row_statistics(rank, world, mesh):
    """focal_loss, poly1_cross_entropy and distillation_loss of class-sharded logits (all-reduced row
    statistics: LSE, the target's logit, sums over classes), and of Shard(0) / Replicate logits, equal the
    single-process losses in values and gradients (the teacher's too); uneven and empty class slices."""
    from torch.distributed.tensor import Replicate, Shard

    num_classes = 7 if world == 2 else 5  # 4+3; 2+2+1+0 (an empty slice)
    for shape in ((6, num_classes), (3, num_classes, 2)):
        full, target, class_weight, upstream = _data(shape, num_classes)
        if len(shape) == 2:
            full[0, target[0]] += 40.0  # p_y = 1 in float64: the focal gradient stays finite for gamma < 1
        cases = [
            (softmaxkit.focal_loss, dict(gamma=2.0)),
            (softmaxkit.focal_loss, dict(gamma=0.5, alpha="full", weight="sharded", label_smoothing=0.1,
                                         temperature=0.8)),
            (softmaxkit.focal_loss, dict(gamma=1.5, alpha="sharded", weight="full")),
            (softmaxkit.poly1_cross_entropy, dict(epsilon=1.0)),
            (softmaxkit.poly1_cross_entropy, dict(epsilon=-0.5, weight="sharded", label_smoothing=0.2,
                                                  temperature=1.3)),
        ]
        for function, spec in cases:
            for reduction in ("mean", "sum", "none"):
                options = dict(spec)
                kinds = {name: options.pop(name) for name in ("alpha", "weight") if name in options}
                reference = {name: class_weight.flip(0) if name == "alpha" else class_weight for name in kinds}
                expected, expected_grad = _reference(function, full, target, upstream, reduction, **reference,
                                                     **options)
                assert torch.isfinite(expected_grad).all()
                for placement in (Shard(1), Shard(0), Replicate()):
                    if placement != Shard(1) and (reduction != "mean" or len(shape) > 2):
                        continue  # the row-sharded grids run in _case_other_losses; here one call each
                    given = {name: (_on_mesh(reference[name], mesh, Shard(0)) if kind == "sharded" and
                                    placement == Shard(1) else reference[name]) for name, kind in kinds.items()}
                    logits = _on_mesh(full, mesh, placement, requires_grad=True)
                    dtarget = _on_mesh(target, mesh, Replicate() if placement == Shard(1) else placement)
                    loss = function(logits, dtarget, reduction=reduction, **given, **options)
                    _backward(loss, upstream, reduction)
                    assert logits.grad.placements == (placement,)
                    what = f"rank {rank} {function.__name__} {placement} {shape} {spec} {reduction}"
                    _close(loss, expected, what)
                    _close(logits.grad, expected_grad, what + " grad")

    # Poly-1 with class-probability targets on Shard(0)
    full, target, class_weight, upstream = _data((4 * world - 1, num_classes), num_classes)
    soft = torch.softmax(torch.randn(full.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 1)
    expected, expected_grad = _reference(softmaxkit.poly1_cross_entropy, full, soft, upstream, "mean", weight=class_weight)
    logits = _on_mesh(full, mesh, Shard(0), requires_grad=True)
    loss = softmaxkit.poly1_cross_entropy(logits, _on_mesh(soft, mesh, Shard(0)), weight=class_weight)
    _backward(loss, upstream, "mean")
    _close(loss, expected, "poly1 probabilities Shard(0)")
    _close(logits.grad, expected_grad, "poly1 probabilities Shard(0) grad")

    # distillation: student and teacher class-sharded, batch-sharded or replicated; teacher placed like the
    # student or whole (a plain tensor); with and without the hard-label term
    for shape in ((4 * world - 1, num_classes), (3, num_classes, 2)):
        student, target, class_weight, upstream = _data(shape, num_classes, seed=7)
        teacher = _data(shape, num_classes, seed=8)[0]
        if len(shape) == 2:
            teacher[1, 2] = -torch.inf  # a class the teacher masks (pi = 0)
        for reduction in ("batchmean", "mean", "sum", "none"):
            for hard in (None, dict(target=target, alpha=0.3, weight=class_weight, label_smoothing=0.1)):
                options = dict(temperature=2.5, reduction=reduction, **(hard or {}))
                s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
                expected = softmaxkit.distillation_loss(s, t, **options)
                _backward(expected, upstream, reduction)
                for placement in (Shard(1), Shard(0), Replicate()):
                    if len(shape) > 2 and placement == Shard(0) and world == 4:
                        continue  # 3 rows on 4 ranks: covered by the 2-D shape
                    for teacher_kind in ("dtensor", "plain"):
                        if teacher_kind == "plain" and (reduction != "mean" or hard is not None):
                            continue
                        ds = _on_mesh(student, mesh, placement, requires_grad=True)
                        dt = (_on_mesh(teacher, mesh, placement) if teacher_kind == "dtensor"
                              else teacher.clone()).requires_grad_()
                        given = dict(options)
                        if hard is not None and placement == Shard(0):
                            given["target"] = _on_mesh(target, mesh, Shard(0))
                        loss = softmaxkit.distillation_loss(ds, dt, **given)
                        _backward(loss, upstream, reduction)
                        what = f"rank {rank} distillation {placement} {shape} {reduction} {hard is not None} {teacher_kind}"
                        _close(loss, expected, what)
                        _close(ds.grad, s.grad, what + " student grad")
                        _close(dt.grad, t.grad, what + " teacher grad")

    # class-sharded edge cases: every target ignored (0, zero gradient); a masked class; float32 (dtype kept,
    # torch.testing's fp32 tolerance: per-rank partial sums round differently); 1-D (C,) distillation
    full, target, class_weight, upstream = _data((6, num_classes), num_classes)
    for function in (softmaxkit.focal_loss, softmaxkit.poly1_cross_entropy):
        logits = _on_mesh(full, mesh, Shard(1), requires_grad=True)
        zero = function(logits, torch.full_like(target, -100))
        zero.full_tensor().backward()
        assert zero.full_tensor().item() == 0.0 and torch.count_nonzero(logits.grad.full_tensor()) == 0
        masked = full.clone()
        masked[2, (target[2] + 1) % num_classes] = -torch.inf
        expected, expected_grad = _reference(function, masked, target, upstream, "mean")
        logits = _on_mesh(masked, mesh, Shard(1), requires_grad=True)
        loss = function(logits, target)
        _backward(loss, upstream, "mean")
        _close(loss, expected, f"{function.__name__} masked class")
        _close(logits.grad, expected_grad, f"{function.__name__} masked class grad")
        expected, expected_grad = _reference(function, full.float(), target, None, "mean")
        logits = _on_mesh(full.float(), mesh, Shard(1), requires_grad=True)
        loss = function(logits, target)
        _backward(loss, None, "mean")
        assert loss.dtype == torch.float32 and logits.grad.dtype == torch.float32
        torch.testing.assert_close(loss.full_tensor(), expected)
        torch.testing.assert_close(logits.grad.full_tensor(), expected_grad)
    student, teacher = full[0].clone(), full[1].clone()
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    expected = softmaxkit.distillation_loss(s, t, temperature=2.0)
    expected.backward()
    ds, dt = (_on_mesh(x, mesh, Shard(0), requires_grad=True) for x in (student, teacher))
    loss = softmaxkit.distillation_loss(ds, dt, temperature=2.0)
    loss.full_tensor().backward()
    _close(loss, expected, "1-D distillation Shard(0)")
    _close(ds.grad, s.grad, "1-D distillation student grad")
    _close(dt.grad, t.grad, "1-D distillation teacher grad")


def _case_sparse_maps(rank, world, mesh):
    """sparsemax, entmax15 and entmax_bisect of DTensors: outputs placed like the input and gradients equal
    the single-process ones; Shard(dim) searches the exact threshold across the ranks (uneven, empty slices)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    num_classes = 7 if world == 2 else 5
    g = torch.Generator().manual_seed(21)
    for spread in (0.3, 3.0):  # wide and narrow supports
        full = torch.randn(2 * world + 1, num_classes, generator=g, dtype=torch.float64) * spread
        full[1, 1:3] = -torch.inf
        upstream = torch.randn(full.shape, generator=g, dtype=torch.float64)
        alpha = 1.1 + torch.rand(full.shape[0], 1, generator=g, dtype=torch.float64)
        calls = [
            (softmaxkit.sparsemax, {}), (softmaxkit.entmax15, {}),
            (softmaxkit.entmax_bisect, dict(alpha=1.7)), (softmaxkit.entmax_bisect, dict(alpha="tensor")),
        ]
        for function, options in calls:
            for dim, placement in ((1, Shard(1)), (-1, Shard(0)), (1, Replicate()), (0, Shard(0))):
                x_full = full if dim != 0 else full.t().contiguous()
                up = upstream if dim != 0 else upstream.t().contiguous()
                bisect = function is softmaxkit.entmax_bisect
                if bisect and placement.is_shard() and placement.dim % 2 == dim % 2:
                    logits = _on_mesh(x_full, mesh, placement)
                    expect_error(f"placement {placement}", lambda logits=logits, dim=dim, function=function: function(
                        logits, dim=dim, alpha=1.5))
                    continue
                given = dict(options)
                if options.get("alpha") == "tensor":
                    if dim == 0:
                        continue
                    a = alpha.clone().requires_grad_()
                    given["alpha"] = alpha.clone().requires_grad_()
                    reference = dict(alpha=a)
                else:
                    reference = options
                x = x_full.clone().requires_grad_()
                expected = function(x, dim=dim, **reference)
                (expected * up).sum().backward()
                dx = _on_mesh(x_full, mesh, placement, requires_grad=True)
                out = function(dx, dim=dim, **given)
                assert isinstance(out, DTensor) and out.placements == (placement,), out
                (out.full_tensor() * up).sum().backward()
                assert dx.grad.placements == (placement,)
                what = f"rank {rank} {function.__name__} {options} dim={dim} {placement} x{spread}"
                _close(out, expected, what)
                _close(dx.grad, x.grad, what + " grad")
                if options.get("alpha") == "tensor":
                    _close(given["alpha"].grad, a.grad, what + " alpha grad")


def _case_errors(rank, world, mesh):
    """Placements that cannot be served, and one rank's bad data, raise a ValueError on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    num_classes = 6
    full, target, _, _ = _data((4, num_classes), num_classes)
    class_sharded = _on_mesh(full, mesh, Shard(1))
    expect_error("placement S(1)", lambda: softmaxkit.entmax_bisect_loss(class_sharded, target))
    expect_error("placement S(1)", lambda: softmaxkit.entmax_bisect(class_sharded, dim=1))
    expect_error("impl='cpu'", lambda: softmaxkit.sparsemax(class_sharded, dim=1, impl="cpu"))
    for function in (softmaxkit.focal_loss, softmaxkit.poly1_cross_entropy):
        expect_error("class-probability targets", lambda function=function: function(
            class_sharded, torch.softmax(full, dim=1)))
    partial = DTensor.from_local(full, mesh, [Partial()], run_check=False)
    expect_error("placement P(sum)", lambda: softmaxkit.cross_entropy(partial, target))
    mesh_2d = init_device_mesh("cpu", (1, world))
    on_2d = DTensor.from_local(full, mesh_2d, [Shard(0), Shard(1)], run_check=False)
    expect_error("2-D device mesh", lambda: softmaxkit.cross_entropy(on_2d, target))
    expect_error("feature dimension", lambda: softmaxkit.sampled_softmax_loss(
        _on_mesh(torch.randn(4, 4, dtype=torch.float64), mesh, Shard(1)), torch.randn(9, 4, dtype=torch.float64),
        target.clamp(min=0), num_sampled=3))
    expect_error("class-probability targets", lambda: softmaxkit.cross_entropy(
        class_sharded, torch.softmax(full, dim=1)))
    # one rank's target out of range: that rank says so, the others raise instead of waiting
    bad = target.clone()
    if rank == world - 1:
        bad[0] = num_classes
    message = f"class indices in [0, {num_classes})" if rank == world - 1 else f"rank(s) [{world - 1}]"
    expect_error(message, lambda: softmaxkit.cross_entropy(class_sharded, bad))
    expect_error(message, lambda: softmaxkit.sparsemax_loss(class_sharded, bad))
    rows = _on_mesh(torch.randn(2 * world, num_classes, dtype=torch.float64), mesh, Shard(0))
    local_bad = torch.zeros(2, dtype=torch.long)
    if rank == 0:
        local_bad[1] = 99
    bad_rows = DTensor.from_local(local_bad, mesh, [Shard(0)], run_check=False)
    message = f"class indices in [0, {num_classes})" if rank == 0 else "rank(s) [0]"
    expect_error(message, lambda: softmaxkit.cross_entropy(rows, bad_rows))
    # a plain target of the wrong shape on one rank only (batch-sharded logits)
    wrong = torch.zeros(2 * world + (1 if rank == 0 else 0), dtype=torch.long)
    for function in (softmaxkit.cross_entropy, softmaxkit.focal_loss, softmaxkit.sparsemax_loss):
        expect_error("must have shape" if rank == 0 else "rank(s) [0]", lambda function=function: function(rows, wrong))
    # a plain teacher of the wrong shape on one rank only (class-sharded student)
    teacher = full if rank != 0 else full[:-1]
    expect_error("must have the same shape" if rank == 0 else "rank(s) [0]",
                  lambda: softmaxkit.distillation_loss(class_sharded, teacher))
    # a plain (replicated) target that differs between the ranks of class-sharded logits
    other = target.clone()
    if rank == 1:
        other[0] = (other[0] + 1) % num_classes
    expect_error("`target` differs", lambda: softmaxkit.cross_entropy(class_sharded, other))
    # the mesh still works after the errors (no rank is left behind in a collective)
    _close(softmaxkit.cross_entropy(class_sharded, target), softmaxkit.cross_entropy(full, target), "after errors")


def _case_tensor_parallel(rank, world, mesh):
    """ColwiseParallel(use_local_output=False) output layer: softmaxkit on its class-sharded DTensor logits
    equals loss_parallel() + F.cross_entropy (loss and every parameter's gradient), and adds label smoothing
    (which loss_parallel refuses), equal to the single-process model."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    num_classes = 11  # uneven over 2 and 4 ranks
    torch.manual_seed(0)  # the same initial parameters on every rank
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, num_classes)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)  # (batch, sequence, features)
    target = torch.randint(0, num_classes, (2, 5), generator=g)
    target[0, 3] = -100
    target = target.flatten()

    def parallel_copy():
        import copy

        model = copy.deepcopy(reference)
        return parallelize_module(model, mesh, {"2": ColwiseParallel(use_local_output=False)})

    def grads(model):
        return [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]

    ours, theirs = parallel_copy(), parallel_copy()
    logits = ours(x)
    assert logits.placements in ((Shard(-1),), (Shard(2),)), logits.placements
    logits = logits.flatten(0, -2)  # (N, C), still class-sharded
    assert logits.placements in ((Shard(-1),), (Shard(1),)), logits.placements
    loss = softmaxkit.cross_entropy(logits, target)
    loss.backward()
    with loss_parallel():
        pt = F.cross_entropy(theirs(x).flatten(0, -2), target)
        pt.backward()
    _close(loss, pt, "tensor parallel loss vs loss_parallel")
    for mine, other in zip(grads(ours), grads(theirs)):
        _close(mine, other, "tensor parallel parameter grad vs loss_parallel")

    smoothed_model, single = parallel_copy(), reference
    criterion = softmaxkit.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)  # the module: the same path
    loss = criterion(smoothed_model(x).flatten(0, -2), target)
    loss.backward()
    expected = softmaxkit.cross_entropy(single(x).flatten(0, -2), target, label_smoothing=0.1, z_loss=1e-3)
    expected.backward()
    _close(loss, expected, "tensor parallel label smoothing vs single process")
    for mine, other in zip(grads(smoothed_model), grads(single)):
        _close(mine, other, "tensor parallel label-smoothing parameter grad vs single process")


CASES = [_case_cross_entropy_class_sharded, _case_cross_entropy_rows, _case_other_losses,
         _case_sparse_class_sharded, _case_row_statistics, _case_sparse_maps, _case_errors, _case_tensor_parallel]


def test_two_processes():
    _spawn(2)


def test_four_processes_with_uneven_and_empty_shards():
    _spawn(4)


def test_the_dtensor_check_imports_nothing():
    # `import softmaxkit` and the check every loss makes first leave torch.distributed.tensor unimported
    import subprocess
    import sys

    code = ("import sys, torch, softmaxkit; from softmaxkit.functional._dtensor import holds_dtensor; "
            "x = torch.randn(3, 4); assert not holds_dtensor(x, None, 1.5); "
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out
