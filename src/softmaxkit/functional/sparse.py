"""Sparse alternatives to softmax: sparsemax, 1.5-entmax, α-entmax, and their Fenchel-Young losses.

All run along any ``dim``, in float64 down to bf16 (fp16/bf16 are solved in fp32, the sparsemax / 1.5-entmax
thresholds in float64), with exact closed-form backward passes and without a full sort per row (see
:mod:`softmaxkit.backends.torch.sparse`). Each function reads validate → select → call: the dispatch table
(:mod:`softmaxkit.backends`, rows ``sparsemax``, ``entmax15``, ``entmax_bisect`` and their ``*_loss``) picks
the C kernel on CPU (:mod:`softmaxkit.backends.cpu.sparse`), Triton on CUDA (maps), else the PyTorch path;
every one is a ``torch.ops.softmaxkit`` custom op, so the functions trace under ``torch.compile(fullgraph=True)``,
``torch.export``, FakeTensorMode and meta tensors, and differentiate under ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _validation as v
from .. import backends
from .._core import BISECT, ENTMAX15, SPARSEMAX, constant_result, fp32_under_autocast
from .._core import compute_dtype as work_dtype
from ._dtensor import holds_dtensor
from ._rows import class_rows, from_last_dim_rows, last_dim_rows, restore_rows


def _alpha_rows(alpha: float | torch.Tensor, x: torch.Tensor, dim: int) -> tuple[torch.Tensor | None, float | None]:
    """A tensor α as ``(M, 1)`` rows matching ``last_dim_rows(x, dim)`` (differentiably), or the float."""
    if not isinstance(alpha, torch.Tensor):
        return None, alpha
    shape = list(x.shape)
    shape[dim] = 1
    return alpha.expand(shape).movedim(dim, -1).reshape(-1, 1), None


def _check_plain(name: str, tensor: torch.Tensor | None, function: str) -> None:
    """Refuse tensor subclasses (DTensor, ...): no implementation here shards or unwraps them.

    Plain tensors on any device (meta included), parameters, and the FakeTensor / FunctionalTensor wrappers of
    ``torch.compile`` / ``torch.export`` tracing are served (the custom ops' fake kernels take the last two).
    """
    if tensor is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(tensor, (FakeTensor, FunctionalTensor)):
        return
    raise TypeError(
        f"`{name}` of {function} must be a plain torch.Tensor (CPU, CUDA or meta), but got a "
        f"{type(tensor).__name__}; convert it first (a DTensor: `.full_tensor()` or `.to_local()`)"
    )


#: the implementations :func:`_choose` resolved, by (op, name): read by traced code after the choice
_RESOLVED: dict[tuple[str, str], Callable] = {}


@constant_result
def _choose(op: str, impl: str, device: str, dtype: torch.dtype) -> str:
    """The name of the implementation of ``op`` serving 2-D rows of ``dtype`` on ``device`` (see
    :func:`softmaxkit.backends.select`); the C kernel is loaded here, and when it cannot be (a build that
    fails) ``impl="auto"`` falls back to the PyTorch path. Under ``torch.compile`` this runs once while tracing
    and its answer is a constant of the graph (no graph break)."""
    request = backends.Request(device=device, dtype=dtype, ndim=2)
    chosen = backends.select(op, impl, request)
    if chosen.name == "cpu":
        from ..backends.cpu import _build
        from ..backends.cpu import sparse as cpu_sparse

        if not cpu_sparse.available(dtype):
            if impl != "auto":
                raise ValueError(f"`impl={impl!r}` cannot serve this call: {_build.failure_reason}")
            chosen = backends.select(op, "torch", request)
    _RESOLVED[op, chosen.name] = chosen.resolve()
    return chosen.name


def _implementation(op: str, impl: str, rows: torch.Tensor) -> Callable:
    name = _choose(op, impl, rows.device.type, rows.dtype)
    return _RESOLVED[op, name]


def _entmax_map(
    x: torch.Tensor, dim: int, kind: str, op: str, impl: str, alpha=None, n_iter: int = 50
) -> torch.Tensor:
    if x.dim() == 0:
        alpha = alpha.reshape(1) if isinstance(alpha, torch.Tensor) else alpha
        return _entmax_map(x.unsqueeze(0), 0, kind, op, impl, alpha, n_iter).squeeze(0)
    alpha_rows, scalar_alpha = _alpha_rows(alpha, x, dim) if kind == BISECT else (None, None)
    rows, moved_shape = last_dim_rows(x, dim)
    function = _implementation(op, impl, rows)
    if x.numel() == 0:
        return x * 0 + (0 * alpha_rows.sum() if alpha_rows is not None else 0)
    return from_last_dim_rows(function(rows, kind, alpha_rows, scalar_alpha, n_iter), moved_shape, dim)


def sparsemax(x: torch.Tensor, dim: int = -1, *, impl: str = "auto") -> torch.Tensor:
    r"""Sparsemax: the Euclidean projection onto the probability simplex (Martins & Astudillo 2016).

    .. math:: \mathrm{sparsemax}(x) = \arg\min_{p ∈ Δ}\|p − x\|^2 = [x − τ]_+,\qquad \sum_i [x_i − τ]_+ = 1

    Unlike softmax it gives exact zeros. Its Jacobian is ``diag(s) − s sᵀ/|S|`` with ``s = 1[p > 0]``
    (``|S|`` the support size): the gradient is the upstream gradient centred on the support.

    ``x`` may be a DTensor on a 1-D device mesh; the result is one with the same placement: ``Replicate`` or
    ``Shard`` of a dimension other than ``dim`` map each rank's piece, ``Shard(dim)`` finds the exact threshold
    across the ranks (``docs/distributed.md``). The same holds for :func:`entmax15`; :func:`entmax_bisect`
    serves ``Replicate`` and ``Shard`` of another dimension (``Shard(dim)`` raises a ``ValueError``).

    Args:
        x: input of any shape and floating dtype; ``-inf`` entries get probability 0.
        dim: the dimension to normalise (negative counts from the end).
        impl: ``"auto"`` (the C kernel on CPU, Triton on CUDA, else PyTorch), or ``"cpu"``, ``"triton"``,
            ``"torch"`` to ask for one (a ``ValueError`` says why when it cannot serve the input).

    Returns:
        Tensor of ``x``'s shape and dtype whose slices along ``dim`` sum to 1. Equals
        ``entmax.sparsemax`` (the ``entmax`` package) where it is defined.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.sparsemax(torch.tensor([2.0, 1.0, 0.1]))
        tensor([1., 0., 0.])
        >>> softmaxkit.sparsemax(torch.tensor([0.5, 0.3, -1.0]))
        tensor([0.6000, 0.4000, 0.0000])

    References:
        Martins & Astudillo, "From Softmax to Sparsemax", ICML 2016.
    """
    if holds_dtensor(x):
        from . import _dtensor

        return _dtensor.sparse_map("sparsemax", sparsemax, x, dim, impl=impl)
    x = v.check_floating("x", x)
    _check_plain("x", x, "sparsemax")
    dim = v.check_dim(dim, x.dim())
    return _entmax_map(x, dim, SPARSEMAX, "sparsemax", impl)


def entmax15(x: torch.Tensor, dim: int = -1, *, impl: str = "auto") -> torch.Tensor:
    r"""Exact 1.5-entmax (Peters et al. 2019): between softmax and sparsemax, sparse but smoother.

    .. math:: \mathrm{entmax}_{1.5}(x) = \arg\max_{p ∈ Δ} ⟨p, x⟩ + H_{1.5}(p) = \big[(x − τ)/2\big]_+^2,
              \qquad H_{1.5}(p) = \tfrac{4}{3}\big(1 − \textstyle\sum_i p_i^{3/2}\big)

    Jacobian ``diag(s) − s sᵀ/Σs`` with ``s = √p``.

    Args:
        x: input of any shape and floating dtype.
        dim: the dimension to normalise.
        impl: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``, as for :func:`sparsemax`.

    Returns:
        Tensor of ``x``'s shape and dtype; slices along ``dim`` sum to 1. Equals ``entmax.entmax15``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.entmax15(torch.tensor([2.0, 1.0, 0.1]))
        tensor([0.8307, 0.1693, 0.0000])

    References:
        Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models", ACL 2019.
    """
    if holds_dtensor(x):
        from . import _dtensor

        return _dtensor.sparse_map("entmax15", entmax15, x, dim, impl=impl)
    x = v.check_floating("x", x)
    _check_plain("x", x, "entmax15")
    dim = v.check_dim(dim, x.dim())
    return _entmax_map(x, dim, ENTMAX15, "entmax15", impl)


def entmax_bisect(
    x: torch.Tensor, alpha: float | torch.Tensor = 1.5, dim: int = -1, n_iter: int = 50, *, impl: str = "auto"
) -> torch.Tensor:
    r"""α-entmax for any ``α >= 1``, by bisection on the threshold (Peters et al. 2019; Blondel et al. 2020).

    .. math:: \mathrm{entmax}_α(x) = \arg\max_{p ∈ Δ} ⟨p, x⟩ + H_α(p) = \big[(α − 1)x − τ\big]_+^{1/(α−1)},
              \qquad H_α(p) = \frac{1 − \sum_i p_i^α}{α(α − 1)}

    ``α = 1`` is softmax (Shannon entropy), ``α = 1.5`` :func:`entmax15`, ``α = 2`` :func:`sparsemax`; larger
    ``α`` is sparser. The threshold is bracketed exactly and halved ``n_iter`` times, then the result is
    renormalised to sum to 1; only the entries that can be in the support take part (top-k with an exactness
    check). The gradient for ``x`` is ``diag(s) − s sᵀ/Σs``, ``s = p^{2−α}``; for a tensor ``alpha`` it is the
    closed form of Correia et al. (2019), evaluated stably near ``α = 1``.

    Args:
        x: input of any shape and floating dtype (fp16/bf16 solved in fp32).
        alpha: ``α >= 1``: a number, or a floating tensor (which receives a gradient), a single value or one
            per slice: broadcastable to ``x``'s shape with size 1 at ``dim`` (e.g. ``(N, 1)`` for ``(N, C)``).
        dim: the dimension to normalise.
        n_iter: bisection steps (each halves a bracket of width ``≤ log C``): 50 reach float64 precision.
        impl: ``"auto"`` or ``"torch"`` (the one implementation: a custom op with a PyTorch kernel).

    Returns:
        Tensor of ``x``'s shape and dtype; slices along ``dim`` sum to 1. Equals ``entmax.entmax_bisect``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.entmax_bisect(torch.tensor([2.0, 1.0, 0.1]), alpha=2.0)
        tensor([1., 0., 0.])

    References:
        Peters, Niculae & Martins, ACL 2019; Correia, Niculae & Martins, "Adaptively Sparse Transformers",
        EMNLP 2019 (the α-gradient); Blondel, Martins & Niculae, "Learning with Fenchel-Young Losses", JMLR 2020.
    """
    if holds_dtensor(x, alpha):
        from . import _dtensor

        return _dtensor.sparse_map("entmax_bisect", entmax_bisect, x, dim, alpha=alpha, n_iter=n_iter, impl=impl)
    x = v.check_floating("x", x)
    _check_plain("x", x, "entmax_bisect")
    dim = v.check_dim(dim, x.dim())
    alpha = v.check_entmax_alpha(alpha, x, dim)
    _check_plain("alpha", alpha if isinstance(alpha, torch.Tensor) else None, "entmax_bisect")
    n_iter = v.check_positive_int("n_iter", n_iter)
    return _entmax_map(x, dim, BISECT, "entmax_bisect", impl, alpha, n_iter)


def _fenchel_young(
    logits, target, kind, alpha, weight, ignore_index, reduction, temperature, n_iter, function, impl
) -> torch.Tensor:
    if holds_dtensor(logits, target, weight, alpha):
        from . import _dtensor

        options = dict(alpha=alpha, n_iter=n_iter) if kind == BISECT else {}
        return _dtensor.fenchel_young_loss(function, globals()[function], logits, target, weight=weight,
                                           ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                                           impl=impl, **options)
    logits, weight, alpha = fp32_under_autocast(logits, weight, alpha)
    logits = v.check_floating("logits", logits)
    _check_plain("logits", logits, function)
    num_classes = v.check_class_index_target(logits, target, function)
    _check_plain("target", target, function)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    temperature = v.check_positive("temperature", temperature)
    weight = v.check_class_weight(weight, num_classes, logits)
    _check_plain("weight", weight, function)
    class_dim = 0 if logits.dim() == 1 else 1
    if kind == BISECT:
        alpha = v.check_entmax_alpha(alpha, logits, class_dim)
        _check_plain("alpha", alpha if isinstance(alpha, torch.Tensor) else None, function)
        n_iter = v.check_positive_int("n_iter", n_iter)
    v.check_class_target(target, num_classes, ignore_index)

    # z = x/T in the compute dtype (fp16 700/0.01 overflows; bf16 would round z once more)
    z = logits.to(work_dtype(logits.dtype)) / temperature if temperature != 1.0 else logits
    rows, row_target = class_rows(z, target)
    loss_function = _implementation(function, impl, rows)
    alpha_rows, scalar_alpha = (None, None)
    if kind == BISECT:
        alpha_rows, scalar_alpha = _alpha_rows(alpha, logits, class_dim)
    loss = loss_function(rows, row_target, kind, weight, ignore_index, reduction, alpha_rows, scalar_alpha, n_iter)
    return restore_rows(loss.to(logits.dtype), reduction, target)


def sparsemax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    r"""Sparsemax loss: the Fenchel-Young loss of sparsemax (Martins & Astudillo 2016; Blondel et al. 2020).

    With ``z = x/T`` and ``p = sparsemax(z)``:

    .. math:: ℓ = w_y\Big(⟨p − e_y, z⟩ + \tfrac12\big(1 − \|p\|^2\big)\Big)
              = w_y\Big(\tfrac12\big(1 + \|p\|^2\big) − (z_y − τ)\Big),\qquad \frac{∂ℓ}{∂z} = w_y (p − e_y)

    ``ℓ >= 0`` with equality exactly when ``p`` is the one-hot ``e_y`` (a margin: ``z_y`` exceeds every other
    logit by at least 1).

    ``logits`` may be a DTensor on a 1-D device mesh: sharded on a row dimension (``Shard(0)``; the mean is
    taken over all ranks), ``Replicate``, or (sparsemax and 1.5-entmax losses, not α-entmax's) sharded on the
    class dimension, where the exact threshold is searched across the ranks without gathering the logits
    (``docs/distributed.md``, "DTensor and tensor parallelism").

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (int64).
        weight: ``(C,)`` class weights; a row's loss is multiplied by ``w_y`` and ``"mean"`` divides by ``Σ w_y``.
        ignore_index: targets equal to it (any value, negative too) contribute nothing.
        reduction: ``"mean"`` (0 when every target is ignored), ``"sum"`` or ``"none"``.
        temperature: ``T > 0`` dividing the logits (in fp32 for fp16/bf16 logits).
        impl: ``"auto"`` (the C kernel on CPU, else PyTorch), ``"cpu"`` or ``"torch"``; a ``ValueError`` says
            why when the one asked for cannot serve the input.

    Returns:
        A scalar for ``"mean"``/``"sum"``, the target's shape for ``"none"``; dtype of ``logits``. Equals the
        ``entmax`` package's ``sparsemax_loss`` (whose ``"elementwise_mean"`` is this ``"mean"``).

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.sparsemax_loss(torch.tensor([[0.5, 0.3, -1.0]]), torch.tensor([1]))
        tensor(0.3600)

    References:
        Martins & Astudillo, ICML 2016; Blondel, Martins & Niculae, "Learning with Fenchel-Young Losses", JMLR 2020.
    """
    return _fenchel_young(
        logits, target, SPARSEMAX, None, weight, ignore_index, reduction, temperature, 0, "sparsemax_loss", impl
    )


def entmax15_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    r"""1.5-entmax loss: the Fenchel-Young loss of :func:`entmax15` (Peters et al. 2019).

    .. math:: ℓ = w_y\Big(⟨p − e_y, z⟩ + \tfrac43\big(1 − \textstyle\sum_i p_i^{3/2}\big)\Big),
              \qquad p = \mathrm{entmax}_{1.5}(z),\ z = x/T,\qquad \frac{∂ℓ}{∂z} = w_y (p − e_y)

    Arguments, shapes, reductions and DTensor placements as :func:`sparsemax_loss` (``impl`` too). Equals
    ``entmax.entmax15_loss``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.entmax15_loss(torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0]))
        tensor(0.0617)
    """
    return _fenchel_young(
        logits, target, ENTMAX15, None, weight, ignore_index, reduction, temperature, 0, "entmax15_loss", impl
    )


def entmax_bisect_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor = 1.5,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature: float = 1.0,
    n_iter: int = 50,
    impl: str = "auto",
) -> torch.Tensor:
    r"""α-entmax loss: the Fenchel-Young loss of :func:`entmax_bisect`, for any ``α >= 1``.

    .. math:: ℓ = w_y\big(⟨p − e_y, z⟩ + H_α(p)\big),\quad p = \mathrm{entmax}_α(z),\qquad
              \frac{∂ℓ}{∂z} = w_y (p − e_y),\quad \frac{∂ℓ}{∂α} = w_y \frac{∂H_α}{∂α}(p)

    ``α = 1`` is cross-entropy, ``α = 2`` the sparsemax loss. A tensor ``alpha`` (one per row: broadcastable to
    the logits' shape with size 1 at the class dim, e.g. ``(N, 1)``) receives a gradient.

    Arguments, shapes, reductions and DTensor placements as :func:`sparsemax_loss`, plus ``n_iter`` (bisection steps); ``impl``
    is ``"auto"`` or ``"torch"`` (the one implementation). A row without a threshold (a NaN, a +inf, every
    logit −inf) has a NaN loss and gradient, as softmax cross-entropy.
    Equals ``entmax.entmax_bisect_loss``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.entmax_bisect_loss(torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0]), alpha=1.0)
        tensor(0.4170)
    """
    return _fenchel_young(
        logits, target, BISECT, alpha, weight, ignore_index, reduction, temperature, n_iter, "entmax_bisect_loss",
        impl,
    )
