"""Linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` without the ``(N, C)`` logits."""

from __future__ import annotations

import math

import torch

from .. import _validation as v
from .. import backends
from .._core import CrossEntropyOptions, autocast_linear_inputs, compute_dtype
from ._dtensor import holds_dtensor
from ._dtensor_linear import linear_cross_entropy_dtensor
from .cross_entropy import check_bool, cross_entropy_core

#: implementations ``linear_cross_entropy(impl=...)`` accepts (the dispatch table's row). ``"auto"`` picks the
#: fastest one that can serve the inputs.
IMPLS = backends.implementations("linear_cross_entropy")


def _check_target(hidden: torch.Tensor, target: object, num_classes: int) -> tuple[torch.Tensor, bool]:
    """Validate ``target`` against ``hidden (..., D)``; return it and whether it holds class probabilities."""
    target = v.check_tensor("target", target)
    v.check_same_device("target", target, "hidden", hidden)
    rows_shape = tuple(hidden.shape[:-1])
    if tuple(target.shape) == (*rows_shape, num_classes) and target.is_floating_point():
        return target, True
    if tuple(target.shape) != rows_shape:
        raise ValueError(
            f"`target` must have shape {rows_shape} (class indices) or {(*rows_shape, num_classes)} (class "
            f"probabilities) for hidden of shape {tuple(hidden.shape)} and {num_classes} classes, but has "
            f"shape {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise TypeError(
            f"`target` of shape {tuple(target.shape)} holds class indices and must have an integer dtype "
            f"(int64), but has dtype {target.dtype}"
        )
    v.check_target_dtype(target)
    return target, False


def validate_linear_cross_entropy_args(
    hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, temperature, z_loss,
    softcap, chunk_size, accumulation_dtype,
):
    """Shared validation of :func:`linear_cross_entropy`'s arguments; returns normalised values."""
    hidden, weight, bias = v.check_linear_inputs(hidden, weight, bias)
    num_classes = weight.shape[0]
    if num_classes == 0:
        raise ValueError(f"`weight` must have at least one class (row), but has shape {tuple(weight.shape)}")
    target, probabilities = _check_target(hidden, target, num_classes)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    label_smoothing = v.check_label_smoothing(label_smoothing)
    temperature = v.check_positive("temperature", temperature)
    z_loss = v.check_non_negative("z_loss", z_loss)
    softcap = v.check_softcap(softcap)
    chunk_size = v.check_optional_positive_int("chunk_size", chunk_size)
    accumulation_dtype = v.check_accumulation_dtype(accumulation_dtype, weight.dtype)
    class_weight = v.check_class_weight(class_weight, num_classes, hidden, name="class_weight")
    v.check_target_values(target, num_classes, ignore_index, probabilities)
    return (hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, temperature,
            z_loss, softcap, chunk_size, accumulation_dtype, probabilities)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    inplace_backward: bool = False,
    accumulation_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of a linear layer's output, computed chunk by chunk so the logits never exist whole.

    With logits ``x = h Wᵀ + b`` this is exactly :func:`softmaxkit.cross_entropy` of ``x`` (see it for the
    options): with ``z = softcap(x)/T`` and ``a = w ⊙ ((1 − ε)·onehot(y) + ε/C)`` (``t`` in place of
    ``onehot(y)`` for class-probability targets),

    .. math:: ℓ = −\sum_c a_c \log\operatorname{softmax}(z)_c + λ\,\operatorname{LSE}(z)^2,\qquad
              \frac{\partial ℓ}{\partial h} = G W,\quad \frac{\partial ℓ}{\partial W} = Gᵀ h,\quad
              \frac{\partial ℓ}{\partial b} = \textstyle\sum_{rows} G

    with ``G = ∂ℓ/∂x = [(A + 2λ LSE) p − a]·dz/dx``. Rows are processed ``chunk_size`` at a time: each
    chunk's logits, log-sum-exp and ``G`` are computed in the forward and folded into the three gradients
    at once, so backward only scales them by the upstream gradient (``"none"``, whose upstream gradient
    differs per row, recomputes each chunk's logits in backward instead). Extra memory is one chunk of
    logits plus the gradients; the naive ``F.linear`` + ``cross_entropy`` holds ``(N, C)`` logits, their
    log-softmax and their gradient.

    Args:
        hidden: ``(..., D)`` hidden states (any leading shape, or ``(D,)`` for one row).
        weight: ``(C, D)`` the output projection (same dtype as ``hidden``); may be a DTensor (below).
        target: ``(...)`` class indices (int64) matching ``hidden``'s leading shape, or ``(..., C)`` class
            probabilities (floating; ``t`` in place of ``onehot(y)`` above, with ``cross_entropy``'s rules for
            them: ``"mean"`` divides by the number of rows, ``ignore_index`` is unused). The chunked path reads
            them one row chunk at a time, so the target is the only ``(N, C)`` tensor; they are
            differentiable (``∂ℓ/∂t``, target-shaped, is built only when the target requires a gradient).
        bias: ``(C,)`` or None.
        class_weight: ``(C,)`` per-class loss weight (``weight`` of :func:`cross_entropy`; renamed because
            ``weight`` is the projection here).
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` (divided by the summed class weight of non-ignored rows; 0 with zero gradient
            when every row is ignored), ``"sum"`` or ``"none"``.
        label_smoothing: ``ε ∈ [0, 1]``.
        temperature: ``T > 0`` dividing the (soft-capped) logits.
        z_loss: ``λ ≥ 0``, adds ``λ·LSE(z)²`` per non-ignored row (PaLM).
        softcap: ``c > 0`` or None; ``c·tanh(x/c)`` before the temperature (Gemma 2).
        chunk_size: rows per chunk; None picks ``D/2`` rows within 64–1024 and 256 MiB of fp32 logits, so
            a chunk's logits take half the memory of ``∂ℓ/∂W`` (``3D/2`` rows where the CPU kernel keeps bf16
            chunks: ¾ of it) (:func:`~softmaxkit.backends.torch.linear_cross_entropy.default_chunk_rows`).
        impl: ``"auto"`` (the chunked path, with the Triton kernels on CUDA when available and, on CPU, the C
            kernel for bf16/fp16 inputs and the torch passes for fp32/fp64, which were level or faster there;
            class-probability targets: always the chunked PyTorch path), ``"cpu"`` (the chunked path
            with each chunk's cross-entropy by the CPU C kernel: one visit per row, its gradient written over
            the chunk's logits in the weights' dtype; class indices; fp16 and an explicit fp32
            ``accumulation_dtype`` for bf16 take the torch passes inside it), ``"torch"`` (the chunked PyTorch
            path, any device, class indices or probabilities), ``"triton"`` (chunked matmul +
            fused Triton CE, fp32 ``∂ℓ/∂W`` accumulation), ``"triton_fused"`` (cut-cross-entropy style: a
            fused matmul–log-sum-exp kernel whose logits tiles never leave the GPU's registers, not even one
            chunk; backward recomputes them tile by tile and atomically adds ``G W``, ``Gᵀ h`` into fp32
            accumulators: the least memory, ``O(N)`` beyond the gradients, for one extra ``N·C·D`` matmul
            and nondeterministic last bits; ``chunk_size`` does not apply, see
            :mod:`softmaxkit.backends.triton.fused_linear_cross_entropy`) or ``"composite"`` (``F.linear``
            then :func:`cross_entropy` with plain differentiable ops: holds the logits, supports double
            backward). ``"auto"`` does not pick ``"triton_fused"``: which of the two Triton paths is faster
            has not been measured (no GPU was available), so it keeps the chunked one.
        inplace_backward: accepted for symmetry with :func:`cross_entropy` (a ``bool``), where it lets the
            gradient overwrite the caller's logits. Here there is no caller-visible logits tensor: the chunked
            paths always write each chunk's gradient over that chunk's own logits buffer, so it changes
            nothing there; ``impl="composite"`` (autograd through ``F.linear``) refuses it.
        accumulation_dtype: dtype in which ``∂ℓ/∂W``, ``∂ℓ/∂b`` and ``∂ℓ/∂h`` are accumulated over chunks:
            None means fp32 for fp16/bf16 weights and the weights' dtype otherwise; pass the weights' own
            low-precision dtype to save memory at some accuracy. With None and bf16 weights on CPU each
            chunk's ``Gᵀ h`` is one bf16 matmul (rounded to bf16 once, as ``F.linear``'s output is) added into
            the fp32 ``∂W``: PyTorch has no CPU bf16 × bf16 → fp32 matmul, and fp32 products cost 2.4× as much.
            Pass ``torch.float32`` explicitly to form those products in fp32 too (one rounding, at the end).

    DTensors (``torch.distributed.tensor``, a 1-d mesh): a ``weight`` sharded by classes (``Shard(0)``, what
    ``fully_shard`` and ``ColwiseParallel`` make) with ``hidden`` a ``Replicate`` DTensor on the same mesh runs
    the vocab-parallel loss (:func:`softmaxkit.distributed.vocab_parallel_linear_cross_entropy`, the weight
    never gathered; the loss a ``Replicate`` DTensor). With ``hidden`` a plain tensor (FSDP2 / data parallel:
    each rank its own rows) the weight is gathered, each rank gets its own rows' loss and the weight's
    gradient is the average over ranks of each rank's full gradient, reduce-scattered to the shard (as FSDP
    gives the unsharded model). A ``Replicate`` weight computes locally (with a plain ``hidden``, its gradient
    averaged over ranks). ``bias`` takes the weight's placement. Other placements (``Shard(1)``, 2-d meshes,
    a batch-sharded ``hidden``) raise a ``ValueError`` naming them. See ``docs/distributed.md``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; ``hidden.shape[:-1]`` for ``"none"``. Dtype of ``hidden``.

    Example:
        >>> import torch, softmaxkit
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> weight = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> softmaxkit.linear_cross_entropy(hidden, weight, torch.tensor([0, 1]))
        tensor(0.3955)

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2025 (memory-lean linear
        cross-entropy); Hsu et al., "Liger Kernel", 2024 (fused linear cross-entropy).
    """
    if holds_dtensor(hidden, weight, target, bias, class_weight):
        # checked on the global shapes first, so a mistake reads the same as without DTensors
        validate_linear_cross_entropy_args(
            hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, temperature,
            z_loss, softcap, chunk_size, accumulation_dtype,
        )
        check_bool("inplace_backward", inplace_backward)
        return linear_cross_entropy_dtensor(
            hidden, weight, target, bias=bias, class_weight=class_weight, impl=impl,
            inplace_backward=inplace_backward, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, temperature=temperature, z_loss=z_loss, softcap=softcap,
            chunk_size=chunk_size, accumulation_dtype=accumulation_dtype,
        )
    (hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, temperature, z_loss,
     softcap, chunk_size, accumulation_dtype, probabilities) = validate_linear_cross_entropy_args(
        hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, temperature,
        z_loss, softcap, chunk_size, accumulation_dtype,
    )
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    options = CrossEntropyOptions(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, temperature=temperature,
        z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, inplace_backward=inplace_backward,
        accumulation_dtype=accumulation_dtype, num_classes=weight.shape[0],
    )
    hidden, weight, bias, autocast = autocast_linear_inputs(hidden, weight, bias)
    flags = (["probabilities"] if probabilities else []) + (["inplace_backward"] if inplace_backward else [])
    request = backends.Request.of(hidden, weight, bias, target, class_weight, flags=tuple(flags))
    chosen = backends.select("linear_cross_entropy", impl, request)
    rows_shape = hidden.shape[:-1]
    num_classes = weight.shape[0]
    # explicit row count: reshape(-1, 0) is ambiguous for a hidden size of 0
    flat_hidden = hidden.reshape(math.prod(rows_shape), hidden.shape[-1])
    flat_target = target.reshape(-1, num_classes) if probabilities else target.reshape(-1)
    if autocast:  # F.cross_entropy's rule on the autocast-dtype logits: an fp32 loss
        with torch.autocast(hidden.device.type, enabled=False):
            loss = chosen.resolve()(flat_hidden, weight, bias, flat_target, class_weight, options).float()
    else:
        loss = chosen.resolve()(flat_hidden, weight, bias, flat_target, class_weight, options).to(hidden.dtype)
    return loss.reshape(rows_shape) if reduction == "none" else loss


def composite_linear_cross_entropy(hidden, weight, bias, target, class_weight, options: CrossEntropyOptions):
    """``F.linear`` then the composite :func:`~softmaxkit.functional.cross_entropy.composite_cross_entropy`:
    holds the ``(N, C)`` logits, twice differentiable. Hidden states of ignored rows read as 0, so a NaN or
    ``±∞`` padding row leaves ``∂W`` finite (``0·NaN`` would not)."""
    if target.dim() == 1:
        valid = (target != options.ignore_index)[:, None]
        hidden = torch.where(valid, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    logits = torch.nn.functional.linear(hidden, weight, bias)
    # the cross-entropy of the fp32 (compute-dtype) logits returns its loss unrounded, as every linear-CE
    # backend does; the composite takes that copy of fp16/bf16 logits itself, so this costs nothing more
    logits = logits.to(compute_dtype(logits.dtype))
    return cross_entropy_core(logits, target, class_weight, options, target.dim() == 2, impl="composite")
