"""DTensor weights in linear_cross_entropy and FSDP2-sharded output layers: 2 and 4 gloo processes.

Against single-process float64 computations on the same data:
* tensor parallel (``weight`` Shard(0), ``hidden`` a Replicate DTensor): the vocab-parallel loss equals the
  loss on the full weight; ``∂W`` comes back Shard(0), ``∂hidden`` Replicate and not summed twice;
* data parallel (``weight`` Shard(0) or Replicate, ``hidden`` each rank's own rows): each rank gets its own
  rows' loss and ``∂W`` is the average over ranks of each rank's full-weight gradient (what FSDP gives the
  unsharded model);
* FSDP2 (``fully_shard`` on the head and on the whole model, tied embeddings, the ``LinearCrossEntropyHead``
  module, a patched Hugging Face model): each rank's loss and every parameter's gradient equal an unsharded
  copy's for the mean over ranks of the per-rank losses, also after an optimizer step;
* unsupported placements raise the same ValueError on every rank.

One spawn per world size runs every case (a spawn costs seconds). Tolerance: float64, 1e-12 relative, as
tests/test_distributed.py: the same maths, only sums over classes or ranks are split into partial sums.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.distributed.fsdp
import torch.distributed.tensor
import torch.multiprocessing as mp

import softmaxkit
from softmaxkit.nn import LinearCrossEntropyHead

from ._helpers import expect_error

pytestmark = pytest.mark.distributed
# torch._dynamo, DTensor and FSDP are imported above, once, not in every forked worker (seconds per process)

RTOL, ATOL = 1e-12, 1e-14

OPTIONS = [
    dict(),
    dict(reduction="sum", bias=True),
    dict(reduction="none", bias=True),
    dict(label_smoothing=0.2, z_loss=1e-2, class_weight="plain"),
    dict(label_smoothing=0.1, reduction="none", temperature=0.8, softcap=3.0, class_weight="dtensor"),
    dict(z_loss=1e-3, bias=True, class_weight="dtensor", reduction="sum", chunk_size=2),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, case: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for run in CASES[case]:
            run(rank, world, mesh)
    except BaseException:
        traceback.print_exc()  # mp re-raises in the parent; show the failing rank's traceback too
        raise
    finally:
        dist.destroy_process_group()


def _spawn(case: str, world: int) -> None:
    # fork: the workers inherit the imported modules; one intra-op thread each
    mp.start_processes(_entry, args=(world, _free_port(), case), nprocs=world, join=True, start_method="fork")


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _problem(num_classes: int, world: int, rows: int = 7, hidden_size: int = 4):
    """The same data on every rank; ``hidden``/``target``/``upstream`` have one batch per rank."""
    g = torch.Generator().manual_seed(123)
    hidden = torch.randn(world, rows, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(num_classes, hidden_size, generator=g, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)
    class_weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5
    target = torch.randint(0, num_classes, (world, rows), generator=g)
    target[:, 1] = -100
    upstream = torch.randn(world, rows, generator=g, dtype=torch.float64)
    return hidden, weight, bias, class_weight, target, upstream


def _unpack(spec: dict):
    options = dict(spec)
    return options, options.pop("bias", False), options.pop("class_weight", None)


def _backward(loss, upstream, options) -> None:
    if options.get("reduction") != "none":
        loss.backward()  # a scalar DTensor (Replicate) too
        return
    local = loss.to_local() if isinstance(loss, torch.distributed.tensor.DTensor) else loss
    (local * upstream).sum().backward()


def _reference(hidden, weight, bias, class_weight, target, upstream, options):
    """Loss and gradients of the composite path on full tensors (``bias``/``class_weight`` may be None)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    loss = softmaxkit.linear_cross_entropy(h, w, target, bias=b, class_weight=class_weight, impl="composite",
                                           **options)
    _backward(loss, upstream, options)
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def _case_tensor_parallel(rank: int, world: int, mesh) -> None:
    """Shard(0) weight, Replicate hidden: the vocab-parallel loss; uneven shards, an empty shard on 4 ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    for num_classes in (13, 5):  # 4 ranks: 4,4,4,1 and 2,2,1,0 rows
        hidden, weight, bias, class_weight, target, upstream = _problem(num_classes, world)
        hidden, target, upstream = hidden[0], target[0], upstream[0]  # tensor parallel: one batch for all
        for spec in OPTIONS:
            options, use_bias, weights = _unpack(spec)
            expected, h_grad, w_grad, b_grad = _reference(
                hidden, weight, bias if use_bias else None, class_weight if weights else None, target, upstream,
                options)
            h = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
            w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
            b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_() if use_bias else None
            cw = (distribute_tensor(class_weight, mesh, [Shard(0)]) if weights == "dtensor"
                  else class_weight if weights else None)
            loss = softmaxkit.linear_cross_entropy(h, w, target, bias=b, class_weight=cw, **options)
            what = f"rank {rank}/{world} tensor parallel C={num_classes} {spec}"
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), what
            _backward(loss, upstream, options)
            _close(loss.to_local(), expected, f"{what}: loss")
            assert w.grad.placements == (Shard(0),) and h.grad.placements == (Replicate(),), what
            _close(w.grad.full_tensor(), w_grad, f"{what}: weight grad")
            _close(h.grad.to_local(), h_grad, f"{what}: hidden grad (summed once over the ranks)")
            if use_bias:
                assert b.grad.placements == (Shard(0),), what
                _close(b.grad.full_tensor(), b_grad, f"{what}: bias grad")


def _case_data_parallel(rank: int, world: int, mesh) -> None:
    """Plain hidden (each rank its own rows), Shard(0) or Replicate weight: each rank's loss, ∂W averaged."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    num_classes = 13
    hidden, weight, bias, class_weight, target, upstream = _problem(num_classes, world)
    for placement in (Shard(0), Replicate()):
        for spec in OPTIONS:
            options, use_bias, weights = _unpack(spec)
            per_rank = [_reference(hidden[r], weight, bias if use_bias else None, class_weight if weights else None,
                                   target[r], upstream[r], options) for r in range(world)]
            expected, h_grad = per_rank[rank][0], per_rank[rank][1]
            w_grad = sum(result[2] for result in per_rank) / world
            h = hidden[rank].clone().requires_grad_()
            w = distribute_tensor(weight, mesh, [placement]).requires_grad_()
            b = distribute_tensor(bias, mesh, [placement]).requires_grad_() if use_bias else None
            cw = (distribute_tensor(class_weight, mesh, [Shard(0)]) if weights == "dtensor"
                  else class_weight if weights else None)
            loss = softmaxkit.linear_cross_entropy(h, w, target[rank], bias=b, class_weight=cw, **options)
            what = f"rank {rank}/{world} data parallel {placement} {spec}"
            assert type(loss) is torch.Tensor, what
            _backward(loss, upstream[rank], options)
            _close(loss, expected, f"{what}: loss")
            _close(h.grad, h_grad, f"{what}: hidden grad")
            assert w.grad.placements == (placement,), what
            _close(w.grad.full_tensor(), w_grad, f"{what}: weight grad (average over ranks)")
            if use_bias:
                _close(b.grad.full_tensor(), sum(result[3] for result in per_rank) / world, f"{what}: bias grad")


def _case_replicated(rank: int, world: int, mesh) -> None:
    """Replicate weight and Replicate hidden: local, the loss a Replicate DTensor, gradients Replicate."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    hidden, weight, bias, class_weight, target, upstream = _problem(6, world)
    options = dict(label_smoothing=0.1, reduction="none")
    expected, h_grad, w_grad, b_grad = _reference(hidden[0], weight, bias, class_weight, target[0], upstream[0],
                                                  options)
    h, w, b = (distribute_tensor(t, mesh, [Replicate()]).requires_grad_() for t in (hidden[0], weight, bias))
    loss = softmaxkit.linear_cross_entropy(h, w, distribute_tensor(target[0], mesh, [Replicate()]), bias=b,
                                           class_weight=class_weight, **options)
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
    _backward(loss, upstream[0], options)
    _close(loss.to_local(), expected, "replicated loss")
    for name, leaf, grad in (("hidden", h, h_grad), ("weight", w, w_grad), ("bias", b, b_grad)):
        assert leaf.grad.placements == (Replicate(),), name
        _close(leaf.grad.to_local(), grad, f"replicated {name} grad")


def _case_errors(rank: int, world: int, mesh) -> None:
    """Placements that cannot be served raise a ValueError naming them, the same on every rank."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, bias, _, target, _ = _problem(8, world)
    hidden, target = hidden[0], target[0]
    lce = softmaxkit.linear_cross_entropy
    replicated = distribute_tensor(hidden, mesh, [Replicate()])
    by_column = distribute_tensor(weight, mesh, [Shard(1)])
    by_row = distribute_tensor(weight, mesh, [Shard(0)])
    expect_error("`weight` is a DTensor with placements (Shard(dim=1),)", lambda: lce(replicated, by_column, target))
    expect_error("`weight` is a DTensor with placements (Shard(dim=1),)", lambda: lce(hidden, by_column, target))
    expect_error("`hidden` is a DTensor with placements (Shard(dim=0),)",
                  lambda: lce(distribute_tensor(hidden, mesh, [Shard(0)]), by_row, target))
    expect_error("but `weight` is a plain tensor", lambda: lce(replicated, weight, target))
    expect_error("`bias` is a plain tensor", lambda: lce(replicated, by_row, target, bias=bias))
    expect_error("`bias` is a DTensor with placements (Replicate(),)",
                  lambda: lce(hidden, by_row, target, bias=distribute_tensor(bias, mesh, [Replicate()])))
    expect_error("class-probability targets", lambda: lce(replicated, by_row, torch.softmax(hidden @ weight.T, -1)))
    expect_error("`impl='composite'`", lambda: lce(replicated, by_row, target, impl="composite"))
    expect_error("`target` is a DTensor", lambda: lce(hidden, by_row, distribute_tensor(target, mesh, [Replicate()])))
    reversed_mesh = DeviceMesh("cpu", list(range(world))[::-1])
    expect_error("on mesh", lambda: lce(distribute_tensor(hidden, reversed_mesh, [Replicate()]), by_row, target))
    expect_error("ranks in increasing order", lambda: lce(distribute_tensor(hidden, reversed_mesh, [Replicate()]),
                                                           distribute_tensor(weight, reversed_mesh, [Shard(0)]),
                                                           target))
    if world == 4:
        grid = init_device_mesh("cpu", (2, 2))
        expect_error("on a 2-d mesh", lambda: lce(hidden, distribute_tensor(weight, grid, [Shard(0), Replicate()]),
                                                   target))
    # the shape checks read the global shapes, as without DTensors
    expect_error("`hidden` has 3 features", lambda: lce(hidden[:, :3], by_row, target))


# ------------------------------------------------------------------------------------------------ FSDP2
VOCAB, WIDTH = 13, 6  # 2 ranks: 7 + 6 rows of the head; 4 ranks: 4 + 4 + 4 + 1


class _Model(torch.nn.Module):
    """Embedding, one hidden layer, an output layer: an ``nn.Linear`` head (tied or not) or the loss head."""

    def __init__(self, head: str, bias: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.body = torch.nn.Linear(WIDTH, WIDTH)
        self.head = head
        if head == "module":
            self.lm_head = LinearCrossEntropyHead(WIDTH, VOCAB, bias=bias, label_smoothing=0.1, chunk_size=3)
        else:
            self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=bias)
            if head == "tied":
                self.lm_head.weight = self.embed.weight

    def forward(self, ids, target=None):
        hidden = torch.tanh(self.body(self.embed(ids)))
        return hidden if target is None else self.lm_head(hidden, target)

    def loss(self, ids, target):
        """The fused loss called outside the head's forward (the head module: inside its own forward)."""
        if self.head == "module":
            return self(ids, target)
        return softmaxkit.linear_cross_entropy(self(ids), self.lm_head.weight, target, bias=self.lm_head.bias,
                                               label_smoothing=0.1, chunk_size=3)


def _fsdp_batches(world: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (world, 2, 5), generator=g)
    target = torch.randint(0, VOCAB, (world, 2, 5), generator=g)
    target[:, 0, :2] = -100
    return ids, target


def _check_fsdp_training(rank, world, sharded, reference, loss_of, what: str) -> None:
    """Two SGD steps: each rank's loss and every gradient equal the unsharded model's on the mean loss."""
    names = [name for name, _ in reference.named_parameters()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (sharded, reference)]
    for step in range(2):
        losses = [loss_of(reference, r) for r in range(world)]
        (sum(losses) / world).backward()
        loss = loss_of(sharded, rank)
        assert type(loss) is torch.Tensor, what
        loss.backward()
        _close(loss.detach(), losses[rank].detach(), f"{what} step {step}: rank {rank} loss")
        for name, param in sharded.named_parameters():
            assert name in names, f"{what}: {name} not in {names}"
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            _close(grad, reference.get_parameter(name).grad, f"{what} step {step}: rank {rank} grad of {name}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _case_fsdp(rank: int, world: int, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    ids, target = _fsdp_batches(world)
    # (head, bias, fully_shard the head on its own, head.set_unshard_in_backward(False)); with the whole model
    # sharded only, the root keeps its parameters gathered from forward to backward, so the weight used outside
    # forward is the plain unsharded parameter there (and FSDP reduce-scatters its gradient)
    for head, bias, shard_head, lean in (("linear", False, True, False), ("linear", True, False, False),
                                         ("tied", False, False, False), ("module", True, True, False),
                                         ("module", False, True, True)):
        torch.manual_seed(0)  # the same initial parameters on every rank
        model = _Model(head, bias).double()
        reference = copy.deepcopy(model)
        if shard_head:
            fully_shard(model.lm_head, mesh=mesh)
            if lean:  # the fused loss computes its gradients in forward: no gather in backward needed
                model.lm_head.set_unshard_in_backward(False)
        fully_shard(model, mesh=mesh)
        _check_fsdp_training(rank, world, model, reference, lambda m, r: m.loss(ids[r], target[r]),
                             f"FSDP2 head={head} bias={bias} head sharded on its own={shard_head} lean={lean}")


def _hf_loss(model, rank: int) -> torch.Tensor:
    from tests.test_integrations_transformers import batch

    input_ids, attention_mask, labels = batch(rows=3, length=8, seed=rank)  # each rank its own batch
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def _case_transformers(rank: int, world: int, mesh) -> None:
    """A patched Hugging Face causal LM with fully_shard-ed decoder layers, head and model trains as unsharded."""
    from torch.distributed.fsdp import fully_shard

    from softmaxkit.integrations.transformers import patch
    from tests.test_integrations_transformers import build

    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM"):  # Qwen2 here: tied embeddings
        # the unsharded reference is patched too: the model's own loss upcasts the logits to fp32, and the
        # patched loss equals it (tests/test_integrations_transformers.py); here both stay fp64
        model, reference = (patch(build(name, dtype=torch.float64)) for _ in range(2))
        reference.load_state_dict(model.state_dict())
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if not model.config.tie_word_embeddings:
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _check_fsdp_training(rank, world, model, reference, _hf_loss, f"transformers {name}")


CASES = {
    "all": (_case_tensor_parallel, _case_data_parallel, _case_replicated, _case_errors, _case_fsdp),
    "transformers": (_case_transformers,),
}


def test_two_ranks_dtensor_weights_and_fsdp2_heads_equal_the_unsharded_computation():
    _spawn("all", 2)


def test_four_ranks_with_uneven_and_empty_shards():
    _spawn("all", 4)


def test_a_patched_transformers_model_with_an_fsdp2_head_trains_as_unsharded():
    transformers = pytest.importorskip("transformers")
    import tests.test_integrations_transformers  # noqa: F401  (imported once here, not in every worker)

    transformers.LlamaForCausalLM, transformers.Qwen2ForCausalLM  # the lazily imported model modules too
    _spawn("transformers", 2)
