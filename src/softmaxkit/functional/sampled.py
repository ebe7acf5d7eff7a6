r"""Sampled softmax with the log-Q correction (Jean et al. 2015): train a huge output layer on a few classes.

Instead of normalising over all ``C`` classes, each step draws ``m`` classes ``S`` from a proposal ``Q``
(shared by the batch, with replacement) and normalises over the target and the draws, each logit
corrected by the log of its expected number of draws:

.. math:: o_y = z_y − \log(m\,Q(y)), \qquad o_s = z_s − \log(m\,Q(s)),\quad s ∈ S, \qquad
          ℓ = −\log \frac{e^{o_y}}{e^{o_y} + \sum_{s∈S} e^{o_s}}

``Σ_s e^{z_s}/(m Q(s))`` is an unbiased importance-sampling estimate of ``Σ_c e^{z_c}``, which is why the
correction makes the sampled loss's gradient approach the full softmax's as ``m`` grows. Draws equal to a
row's own target ("accidental hits") are removed from that row (their logit set to ``−∞``).
"""

from __future__ import annotations

import math

import torch

from .. import _validation as v
from .._core import fp32_under_autocast
from .._reduction import reduce_loss
from ._dtensor import holds_dtensor
from .softmax import compute_dtype

#: proposal distributions :func:`sampled_softmax_loss` can draw from.
SAMPLERS = ("uniform", "log_uniform", "unigram")


def sampler_probabilities(
    sampler: str,
    num_classes: int,
    *,
    counts: torch.Tensor | None = None,
    power: float = 0.75,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The proposal ``Q`` over ``C`` classes, a ``(C,)`` tensor summing to 1.

    * ``"uniform"``: ``Q(c) = 1/C``.
    * ``"log_uniform"`` (Zipf, the word2vec / TensorFlow ``log_uniform_candidate_sampler`` convention, for
      classes sorted by decreasing frequency): ``Q(c) = (\log(c + 2) − \log(c + 1)) / \log(C + 1)``.
    * ``"unigram"``: ``Q(c) ∝ counts_c^{power}`` (word2vec uses ``power = 0.75``).
    """
    v.check_choice("sampler", sampler, SAMPLERS)
    if sampler == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes, dtype=dtype, device=device)
    if sampler == "log_uniform":
        c = torch.arange(num_classes, dtype=torch.float64, device=device)
        return ((torch.log1p(1.0 / (c + 1.0))) / math.log(num_classes + 1.0)).to(dtype)
    weights = counts.to(device=device, dtype=torch.float64) ** power
    return (weights / weights.sum()).to(dtype)


def sample_classes(
    sampler: str,
    num_sampled: int,
    num_classes: int,
    *,
    counts: torch.Tensor | None = None,
    power: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``num_sampled`` classes from :func:`sampler_probabilities` (with replacement), ``(m,)`` int64.

    ``sampled_softmax_loss`` draws with exactly this function, so the same seeded ``generator`` reproduces
    its samples. ``"log_uniform"`` inverts its CDF (``c = ⌊(C + 1)^u⌋ − 1``, ``u ~ U[0, 1)``); ``"unigram"``
    uses :func:`torch.multinomial`.
    """
    if sampler == "uniform":
        return torch.randint(0, num_classes, (num_sampled,), generator=generator, device=device)
    if sampler == "log_uniform":
        u = torch.rand(num_sampled, generator=generator, dtype=torch.float64, device=device)
        drawn = torch.floor(torch.exp(u * math.log(num_classes + 1.0))).long() - 1
        return drawn.clamp_(0, num_classes - 1)
    q = sampler_probabilities("unigram", num_classes, counts=counts, power=power, device=device)
    return torch.multinomial(q, num_sampled, replacement=True, generator=generator)


def _check_counts(counts: object, num_classes: int, sampler: str, device: torch.device) -> torch.Tensor | None:
    if sampler != "unigram":
        if counts is not None:
            raise ValueError(f"`counts` is only used by sampler='unigram', but sampler={sampler!r}")
        return None
    if counts is None:
        raise ValueError("sampler='unigram' needs `counts`, a (C,) tensor of class frequencies")
    return v.check_positive_counts("counts", counts, num_classes).to(device)


def sampled_softmax_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    num_sampled: int,
    bias: torch.Tensor | None = None,
    sampler: str = "log_uniform",
    counts: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
    generator: torch.Generator | None = None,
    power: float = 0.75,
    subtract_log_q: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Sampled softmax loss with the log-Q correction (see the module docstring for the formula).

    Only the target rows and the ``m`` sampled rows of ``weight`` (and ``bias``) enter the computation, so
    their gradient is zero everywhere else, and the cost per row is ``O((m + 1)·D)`` instead of ``O(C·D)``.
    Use it for training only; evaluate with the full softmax (:func:`softmaxkit.linear_cross_entropy`).

    ``hidden`` may be a DTensor on a 1-D device mesh sharded on a row dimension (the mean is taken over all
    ranks; ``weight`` and ``bias``, plain or ``Replicate``, get their gradient summed over the ranks) or
    ``Replicate``; each rank draws with its own ``generator`` (``docs/distributed.md``).

    Args:
        hidden: ``(..., D)`` hidden states.
        weight: ``(C, D)`` output embeddings.
        target: ``(...)`` class indices (int64), ``ignore_index`` for rows to skip.
        num_sampled: ``m``, classes drawn per call, ``1 ≤ m < C``; shared by all rows.
        bias: ``(C,)`` or None.
        sampler: ``"log_uniform"`` (Zipf; classes must be sorted by decreasing frequency), ``"uniform"``
            or ``"unigram"`` (``Q ∝ counts^power``).
        counts: ``(C,)`` positive class frequencies, for ``"unigram"`` only.
        remove_accidental_hits: drop, per row, the draws equal to that row's target.
        generator: :class:`torch.Generator` for the draws (reproducible with :func:`sample_classes`).
        power: exponent of the unigram counts (0.75 as in word2vec).
        subtract_log_q: apply the ``− log(m Q)`` correction (turn off only to study its effect).
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: ``"mean"`` over non-ignored rows (0 when there are none), ``"sum"`` or ``"none"``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; ``target``'s shape for ``"none"``. Dtype of ``hidden``.

    Example:
        >>> import torch, softmaxkit
        >>> hidden, weight = torch.randn(4, 8), torch.randn(1000, 8)
        >>> target = torch.tensor([3, 10, 500, 999])
        >>> g = torch.Generator().manual_seed(0)
        >>> loss = softmaxkit.sampled_softmax_loss(hidden, weight, target, num_sampled=64, generator=g)
        >>> loss.shape
        torch.Size([])

    References:
        Jean et al., "On Using Very Large Target Vocabulary for Neural Machine Translation", 2015;
        Bengio & Senécal, "Adaptive Importance Sampling to Accelerate Training of a Neural Probabilistic
        Language Model", 2008; Mikolov et al., "Distributed Representations of Words and Phrases", 2013.
    """
    if holds_dtensor(hidden, weight, target, bias, counts):
        from . import _dtensor

        return _dtensor.sampled_softmax_loss(
            hidden, weight, target, num_sampled=num_sampled, bias=bias, sampler=sampler, counts=counts,
            remove_accidental_hits=remove_accidental_hits, generator=generator, power=power,
            subtract_log_q=subtract_log_q, ignore_index=ignore_index, reduction=reduction,
        )
    # under autocast: fp32 inputs (the product is still recast to the autocast dtype) and an fp32 loss
    hidden, weight, bias = fp32_under_autocast(hidden, weight, bias)
    hidden, weight, bias = v.check_linear_inputs(hidden, weight, bias)
    num_classes = weight.shape[0]
    target = v.check_tensor("target", target)
    v.check_same_device("target", target, "hidden", hidden)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"`target` must have shape {tuple(hidden.shape[:-1])} (one class index per row of `hidden`), but "
            f"has shape {tuple(target.shape)}"
        )
    v.check_target_dtype(target)
    num_sampled = v.check_int("num_sampled", num_sampled)
    if not 1 <= num_sampled < num_classes:
        raise ValueError(
            f"`num_sampled` must lie in [1, {num_classes}) (fewer than the {num_classes} classes, or the full "
            f"softmax is cheaper and exact), but got {num_sampled}"
        )
    sampler = v.check_choice("sampler", sampler, SAMPLERS)
    counts = _check_counts(counts, num_classes, sampler, hidden.device)
    power = v.check_non_negative("power", power)
    ignore_index = v.check_int("ignore_index", ignore_index)
    reduction = v.check_reduction(reduction)
    v.check_class_target(target, num_classes, ignore_index)
    generator = v.check_generator(generator, hidden.device)

    work = compute_dtype(hidden.dtype)
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index
    # ignored rows read as 0: a NaN/±inf padding row gives loss and gradient exactly 0 and stays out of ∂W
    rows = hidden.reshape(-1, hidden.shape[-1]).to(work)
    rows = torch.where(valid[:, None], rows, torch.zeros((), dtype=work, device=rows.device))
    safe_target = torch.where(valid, flat_target, torch.zeros_like(flat_target)).long()
    sampled = sample_classes(sampler, num_sampled, num_classes, counts=counts, power=power, generator=generator,
                             device=hidden.device)

    w = weight.to(work)
    true_logits = (rows * torch.nn.functional.embedding(safe_target, w)).sum(-1)
    sampled_logits = rows @ torch.nn.functional.embedding(sampled, w).t()
    if bias is not None:
        b = bias.to(work)
        true_logits = true_logits + b[safe_target]
        sampled_logits = sampled_logits + b[sampled]
    if subtract_log_q:
        log_q = sampler_probabilities(sampler, num_classes, counts=counts, power=power, dtype=work,
                                      device=hidden.device).log() + math.log(num_sampled)
        true_logits = true_logits - log_q[safe_target]
        sampled_logits = sampled_logits - log_q[sampled]
    if remove_accidental_hits:
        hits = sampled[None, :] == safe_target[:, None]
        sampled_logits = sampled_logits.masked_fill(hits, -torch.inf)
    candidates = torch.cat([true_logits[:, None], sampled_logits], dim=1)
    # the shifted form (m − z_y) + log Σ exp(c − m): LSE − z_y would lose an ulp of LSE to the shift
    shift = candidates.detach().amax(dim=1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    loss = (shift - true_logits) + torch.logsumexp(candidates - shift[:, None], dim=1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    out = reduce_loss(loss, reduction, valid.sum())
    out = out.reshape(target.shape) if reduction == "none" else out
    return out.to(hidden.dtype)
