"""Knowledge distillation: match the student's tempered distribution to the teacher's."""

from __future__ import annotations

import torch

from .. import _validation as v
from .._core import compute_dtype, fp32_under_autocast
from .._reduction import reduce_loss, safe_divide
from ._dtensor import holds_dtensor
from .cross_entropy import cross_entropy_core, validate_cross_entropy_args

#: reductions :func:`distillation_loss` accepts (``"batchmean"`` is PyTorch's ``kl_div`` one).
DISTILLATION_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: torch.Tensor | None = None,
    alpha: float | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Knowledge-distillation loss (Hinton et al. 2015), optionally mixed with hard-label cross-entropy.

    With ``π = softmax(t/T)`` (teacher) and ``σ = softmax(s/T)`` (student), per distribution:

    .. math:: ℓ_{KD} = T^2\,\mathrm{KL}(π \,\|\, σ) = T^2 \sum_c π_c(\log π_c − \log σ_c),
              \qquad \frac{∂ℓ_{KD}}{∂s} = T\,(σ − π)

    The ``T²`` keeps the gradient's size independent of ``T`` (it would otherwise shrink like ``1/T²``).
    Terms with ``π_c = 0`` count 0 (a class the teacher masks with ``−inf``). With ``target`` and ``alpha``:

    .. math:: ℓ = α\,ℓ_{KD} + (1 − α)\,\mathrm{CE}(s, y)

    where ``CE`` is :func:`softmaxkit.cross_entropy` at temperature 1 (with ``weight``, ``ignore_index``,
    ``label_smoothing``); ``ignore_index`` applies to that term only.

    The logits may be DTensors on a 1-D device mesh (``teacher_logits`` placed like ``student_logits``, or
    whole): class-sharded (``Shard(1)``: both LSEs and ``Σ_c π_c(log π_c − log σ_c)`` are all-reduced row
    statistics, the gradients local given them; ``target`` replicated), on a row dimension (``Shard(0)``;
    ``"batchmean"`` / ``"mean"`` divide by the global batch / number of distributions) or ``Replicate``
    (``docs/distributed.md``, "DTensor and tensor parallelism").

    Args:
        student_logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; gradients flow here.
        teacher_logits: the same shape. Gradients flow to it too if it requires them: detach it (or compute
            it under ``torch.no_grad()``) for the usual frozen teacher.
        temperature: ``T > 0`` for both distributions.
        reduction: ``"batchmean"`` (the sum divided by the batch size ``N``, as ``torch.nn.functional.kl_div``;
            1 for unbatched input), ``"mean"`` (divided by the number of distributions ``N·d1⋯dk``, a true
            mean, unlike ``kl_div``'s ``"mean"`` which also divides by ``C``), ``"sum"`` or ``"none"``
            (per distribution, shape ``(N, d1, ..., dk)``). The cross-entropy term uses its own ``"mean"``
            for both ``"batchmean"`` and ``"mean"``.
        target: optional class indices ``(N, d1, ..., dk)`` (int64) for the hard-label term.
        alpha: weight ``α ∈ [0, 1]`` of the distillation term; required with ``target``, not allowed
            without (the loss is then ``ℓ_KD`` alone).
        weight, ignore_index, label_smoothing: options of the cross-entropy term.

    Returns:
        A scalar, or the per-distribution losses for ``"none"``; dtype of ``student_logits``.

    Example:
        >>> import torch, softmaxkit
        >>> student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> softmaxkit.distillation_loss(student, teacher, temperature=2.0)
        tensor(0.4898)

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    if holds_dtensor(student_logits, teacher_logits, target, weight):
        from . import _dtensor

        return _dtensor.distillation_loss(student_logits, teacher_logits, temperature=temperature,
                                          reduction=reduction, target=target, alpha=alpha, weight=weight,
                                          ignore_index=ignore_index, label_smoothing=label_smoothing)
    student_logits, teacher_logits, target, weight = fp32_under_autocast(student_logits, teacher_logits, target,
                                                                         weight)
    student_logits = v.check_floating("student_logits", student_logits)
    teacher_logits = v.check_floating("teacher_logits", teacher_logits)
    v.check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    v.check_same_device("teacher_logits", teacher_logits, "student_logits", student_logits)
    if student_logits.dim() == 0:
        raise ValueError("`student_logits` must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...), but is 0-d")
    temperature = v.check_positive("temperature", temperature)
    reduction = v.check_reduction(reduction, DISTILLATION_REDUCTIONS)
    if target is None:
        if alpha is not None:
            raise ValueError(
                f"`alpha` mixes the distillation term with cross-entropy on `target`, but no `target` was given "
                f"(got alpha={alpha}); pass target=... or leave alpha=None"
            )
    else:
        if alpha is None:
            raise ValueError("`alpha` (the weight of the distillation term, in [0, 1]) is required with `target`")
        alpha = v.check_in_range("alpha", alpha, 0.0, 1.0)

    class_dim = 0 if student_logits.dim() == 1 else 1
    work = compute_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))
    log_sigma = torch.log_softmax(student_logits.to(work) / temperature, dim=class_dim)
    log_pi = torch.log_softmax(teacher_logits.to(work) / temperature, dim=class_dim)
    pi = torch.exp(log_pi)
    # where() on the difference too, so a masked teacher class (π = 0, log π = −inf) gives 0 and no NaN gradient.
    gap = torch.where(pi == 0, torch.zeros_like(log_pi), log_pi - log_sigma)
    kd = (pi * gap).sum(dim=class_dim) * (temperature * temperature)
    if reduction == "batchmean":
        batch = 1 if student_logits.dim() == 1 else student_logits.shape[0]
        kd_reduced = safe_divide(kd.sum(), torch.tensor(float(batch), dtype=work, device=kd.device))
    else:
        kd_reduced = reduce_loss(kd, reduction)
    if target is None:
        return kd_reduced.to(student_logits.dtype)
    # validated once here (the target's range included), then the already-validated core
    _, target, weight, options, probabilities = validate_cross_entropy_args(
        student_logits, target, weight, ignore_index, "mean" if reduction in ("mean", "batchmean") else reduction,
        label_smoothing, 1.0, 0.0, None,
    )
    ce = cross_entropy_core(student_logits, target, weight, options, probabilities)
    return (alpha * kd_reduced + (1.0 - alpha) * ce.to(work)).to(student_logits.dtype)
