"""Gumbel-softmax: differentiable (relaxed or straight-through) samples from a categorical distribution."""

from __future__ import annotations

import torch

from .. import _validation as v
from .softmax import compute_dtype


def gumbel_noise(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Standard Gumbel noise ``g = −log(−log u)``, ``u ∼ U(0, 1)``, that is never infinite.

    ``torch.rand`` draws from ``[0, 1)``; ``u`` is clamped to ``[tiny, 1 − eps/2]`` (the smallest normal and
    the largest float below 1 of ``dtype``), so ``−log u ∈ (0, ∞)`` and ``g`` is finite: ``u = 0`` would give
    ``g = −∞`` and ``u = 1`` (impossible for ``rand``, guarded anyway) ``g = +∞``.
    """
    info = torch.finfo(dtype)
    uniform = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    uniform.clamp_(min=info.tiny, max=1.0 - info.eps / 2)
    return uniform.log_().neg_().log_().neg_()


def gumbel_softmax(
    logits: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Gumbel-softmax sample (Jang et al. 2017; Maddison et al. 2017).

    .. math:: y = \mathrm{softmax}\big((x + g)/τ\big),\qquad g_i = −\log(−\log u_i),\ u_i ∼ U(0, 1)

    ``argmax_i(x_i + g_i)`` is an exact sample from ``softmax(x)`` (the Gumbel-max trick); ``y`` is its
    differentiable relaxation, one-hot as ``τ → 0``. With ``hard=True`` the forward value is that one-hot
    vector and the gradient is the relaxed sample's (straight-through: ``y_hard − sg(y) + y``).

    Args:
        logits: unnormalised log-probabilities, any shape; ``-inf`` entries are never sampled.
        tau: temperature ``τ > 0``.
        hard: return one-hot samples with straight-through gradients.
        dim: the category dimension.
        generator: a :class:`torch.Generator` for reproducible noise (on the logits' device type).

    Returns:
        Tensor of ``logits``' shape and dtype whose slices along ``dim`` sum to 1 (exactly one 1 with
        ``hard=True``). fp16/bf16 logits are perturbed and normalised in fp32.

    Example:
        >>> import torch, softmaxkit
        >>> g = torch.Generator().manual_seed(0)
        >>> sample = softmaxkit.gumbel_softmax(torch.tensor([1.0, 2.0, 3.0]), hard=True, generator=g)
        >>> sample.sum().item(), sorted(sample.tolist())  # one-hot
        (1.0, [0.0, 0.0, 1.0])

    References:
        Jang, Gu & Poole, "Categorical Reparameterization with Gumbel-Softmax", ICLR 2017; Maddison, Mnih & Teh,
        "The Concrete Distribution", ICLR 2017.
    """
    logits = v.check_floating("logits", logits)
    tau = v.check_positive("tau", tau)
    if not isinstance(hard, bool):
        raise TypeError(f"`hard` must be a bool, but got {type(hard).__name__}")
    dim = v.check_dim(dim, logits.dim())
    generator = v.check_generator(generator, logits.device)
    work = compute_dtype(logits.dtype)
    noise = gumbel_noise(logits.shape, work, logits.device, generator)
    soft = torch.softmax((logits.to(work) + noise) / tau, dim=dim)
    if not hard:
        return soft.to(logits.dtype)
    if logits.dim() == 0:
        return (soft - soft.detach() + 1.0).to(logits.dtype)
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return (one_hot - soft.detach() + soft).to(logits.dtype)
