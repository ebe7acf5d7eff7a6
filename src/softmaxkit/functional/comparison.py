r"""The losses softmax + cross-entropy is usually compared with, as first-class members of the family.

* :func:`multi_margin_loss`: the Weston–Watkins multi-class hinge, equal to
  :func:`torch.nn.functional.multi_margin_loss` (plus ``ignore_index`` and K-dimensional input);
* :func:`crammer_singer_loss`: the Crammer–Singer multi-class hinge (one violation per row);
* :func:`softmax_mse_loss`: squared error between ``softmax(z)`` and the target (the Brier score over ``C``);
* :func:`score_mse_loss`: squared error between the raw scores and the one-hot target (least-squares
  classification, "MSE on unnormalised outputs");
* :func:`multilabel_soft_margin_loss`: one-vs-rest sigmoid binary cross-entropy per class, equal to
  :func:`torch.nn.functional.multilabel_soft_margin_loss` (and to ``binary_cross_entropy_with_logits``
  averaged over the classes); it also takes multi-hot targets, for multi-label problems.

They share one convention, PyTorch's for its two of them: each row's loss is averaged over the ``C``
classes (except Crammer–Singer, a single term), class weights scale the row (by ``w_y``) or, for the
sigmoid loss, each class inside the sum, and ``"mean"`` divides by the number of non-ignored rows (class
weights do not enter the denominator, unlike :func:`softmaxkit.cross_entropy`); it is 0 when every row is
ignored. The gradients are those of the composite torch ops (autograd), which are the closed forms of
:mod:`softmaxkit.reference.comparison`; everything is traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from .. import _validation as v
from .._core import fp32_under_autocast
from .._reduction import reduce_loss
from ._rows import class_rows, restore_rows
from .softmax import compute_dtype

__all__ = [
    "crammer_singer_loss",
    "multi_margin_loss",
    "multilabel_soft_margin_loss",
    "score_mse_loss",
    "softmax_mse_loss",
]


# ------------------------------------------------------------------------------------------- plumbing
def _class_dim(logits: torch.Tensor) -> int:
    return 0 if logits.dim() == 1 else 1


def _check_target(logits: torch.Tensor, target: object, function: str, *, probabilities_allowed: bool) -> tuple[int, bool]:
    """Class indices of the logits' shape without ``C`` (integer), or, where allowed, a floating target of the
    logits' own shape (class probabilities, or a multi-hot vector). Returns ``C`` and which it is."""
    target = v.check_tensor("target", target)
    if logits.dim() == 0:
        raise ValueError("`logits` must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...), but is 0-d")
    if probabilities_allowed and target.is_floating_point():
        v.check_same_device("target", target, "logits", logits)
        if tuple(target.shape) != tuple(logits.shape):
            expected = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
            raise ValueError(
                f"`target` of {function} must be class indices of shape {expected} (integer) or a floating "
                f"target of the logits' shape {tuple(logits.shape)}, but has shape {tuple(target.shape)}"
            )
        num_classes = logits.shape[_class_dim(logits)]
        if num_classes == 0:
            raise ValueError(f"`logits` must have at least one class, but has shape {tuple(logits.shape)}")
        return num_classes, True
    return v.check_class_index_target(logits, target, function), False


def _prepare(logits, target, function, weight, ignore_index, reduction, *, probabilities_allowed,
             fp32_loss=True):
    """The checked arguments; ``fp32_loss``: PyTorch's loss rule under autocast (fp16/bf16 inputs taken in fp32),
    which its ``multilabel_soft_margin_loss`` (a composite of element-wise ops) does not follow."""
    if fp32_loss:
        logits, target, weight = fp32_under_autocast(logits, target, weight)
    logits = v.check_floating("logits", logits)
    num_classes, probabilities = _check_target(logits, target, function, probabilities_allowed=probabilities_allowed)
    reduction = v.check_reduction(reduction)
    ignore_index = v.check_int("ignore_index", ignore_index)
    weight = v.check_class_weight(weight, num_classes, logits)
    v.check_target_values(target, num_classes, ignore_index, probabilities)
    return logits, num_classes, probabilities, weight, ignore_index, reduction


def _probability_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.unsqueeze(0)
    if logits.dim() == 2:
        return logits, target
    num_classes = logits.shape[1]
    return (logits.movedim(1, -1).reshape(-1, num_classes), target.movedim(1, -1).reshape(-1, num_classes))


def _row_shape(logits: torch.Tensor) -> tuple[int, ...]:
    return () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])


class _Rows:
    """One loss call as ``(M, C)`` rows in the compute dtype: the target as indices ``y`` (0 where ignored)
    and as a dense ``t`` (one-hot, or the given floating target), the valid mask and the row weight."""

    def __init__(self, logits, target, weight, ignore_index, probabilities, *, need_dense: bool):
        work = compute_dtype(logits.dtype)
        self.logits, self.probabilities, self.target = logits, probabilities, target
        self.class_weight = None if weight is None else weight.to(work)
        if probabilities:
            rows, dense = _probability_rows(logits, target)
            self.z = rows.to(work)
            self.t = dense.to(work)
            self.valid = torch.ones(self.z.shape[0], dtype=work, device=logits.device)
            self.row_weight = (
                self.valid if self.class_weight is None else (self.t * self.class_weight).sum(dim=1)
            )
            self.y = None
            return
        rows, flat = class_rows(logits, target)
        self.z = rows.to(work)
        valid = flat != ignore_index
        self.y = torch.where(valid, flat, torch.zeros_like(flat)).long()
        self.valid = valid.to(work)
        if self.class_weight is None:
            self.row_weight = self.valid
        else:
            self.row_weight = self.class_weight[self.y] * self.valid
        self.t = (
            torch.nn.functional.one_hot(self.y, self.z.shape[1]).to(work) if need_dense else None
        )

    def finish(self, loss: torch.Tensor, reduction: str) -> torch.Tensor:
        """Reduce the per-row loss (already 0 on ignored rows) and give ``"none"`` the target's shape."""
        out = reduce_loss(loss, reduction, self.valid.sum()).to(self.logits.dtype)
        if reduction != "none":
            return out
        if self.probabilities:
            return out.reshape(_row_shape(self.logits))
        return restore_rows(out, reduction, self.target)


# ------------------------------------------------------------------------------------------- hinge losses
def multi_margin_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    p: int = 1,
    margin: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Weston–Watkins multi-class hinge loss (Weston & Watkins 1999), as ``F.multi_margin_loss``.

    .. math:: ℓ = \frac{w_y}{C} \sum_{j ≠ y} \max(0,\ m − z_y + z_j)^p

    Every class scoring within the margin ``m`` of the true class adds a penalty; the loss is piecewise
    linear (``p = 1``) in the scores, so its gradient is piecewise constant: ``−(1/C)·#violations`` on
    ``z_y`` and ``+1/C`` on each violating ``z_j``, 0 once every margin is met (however wrong the
    probabilities still are). At a kink (``m − z_y + z_j = 0``) the subgradient 0 is taken, as PyTorch.

    Args:
        logits: scores ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (PyTorch takes only the first two).
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (integer).
        p: 1 (hinge) or 2 (squared hinge).
        margin: ``m``.
        weight: ``(C,)`` class weights; ``w_y`` scales the row (not the mean's denominator, as PyTorch).
        ignore_index: targets equal to it contribute 0 and are left out of the mean.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.multi_margin_loss(torch.tensor([[0.1, 0.2, 0.4, 0.8]]), torch.tensor([3]))
        tensor(0.3250)

    References:
        Weston & Watkins, "Support Vector Machines for Multi-Class Pattern Recognition", ESANN 1999.
    """
    logits, _, _, weight, ignore_index, reduction = _prepare(
        logits, target, "multi_margin_loss", weight, ignore_index, reduction, probabilities_allowed=False
    )
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"`p` must be 1 or 2, but got {p!r}")
    margin = v.check_number("margin", margin)
    rows = _Rows(logits, target, weight, ignore_index, False, need_dense=False)
    z, num_classes = rows.z, rows.z.shape[1]
    z_y = z.gather(1, rows.y[:, None])
    own = torch.nn.functional.one_hot(rows.y, num_classes).bool()
    hinge = torch.relu(margin - z_y + z).masked_fill(own, 0.0)
    terms = hinge if p == 1 else hinge * hinge
    loss = terms.sum(dim=1) / num_classes * rows.row_weight
    return rows.finish(loss, reduction)


def crammer_singer_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    margin: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Crammer–Singer multi-class hinge loss (Crammer & Singer 2001).

    .. math:: ℓ = w_y \max\big(0,\ m + \max_{j ≠ y} z_j − z_y\big)

    Only the strongest rival class is penalised. The gradient is ``−w_y`` on ``z_y`` and ``+w_y`` on the
    rival while the margin is violated, 0 otherwise; tied rivals share ``+w_y`` equally (deterministic), and
    at the kink the subgradient 0 is taken. With one class the loss is 0.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (integer).
        margin: ``m``.
        weight: ``(C,)`` class weights; ``w_y`` scales the row (not the mean's denominator).
        ignore_index: targets equal to it contribute 0 and are left out of the mean.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the target's shape for ``"none"``. Dtype of ``logits``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.crammer_singer_loss(torch.tensor([[0.1, 0.2, 0.4, 0.8]]), torch.tensor([3]))
        tensor(0.6000)

    References:
        Crammer & Singer, "On the Algorithmic Implementation of Multiclass Kernel-based Vector Machines",
        JMLR 2001.
    """
    logits, _, _, weight, ignore_index, reduction = _prepare(
        logits, target, "crammer_singer_loss", weight, ignore_index, reduction, probabilities_allowed=False
    )
    margin = v.check_number("margin", margin)
    rows = _Rows(logits, target, weight, ignore_index, False, need_dense=False)
    z = rows.z
    own = torch.nn.functional.one_hot(rows.y, z.shape[1]).bool()
    z_y = z.gather(1, rows.y[:, None]).squeeze(1)
    if z.shape[1] == 1:
        return rows.finish(torch.zeros_like(z_y) * z_y, reduction)
    rival = z.masked_fill(own, -torch.inf).amax(dim=1)
    loss = torch.relu(margin + rival - z_y) * rows.row_weight
    return rows.finish(loss, reduction)


# -------------------------------------------------------------------------------------------- MSE losses
def softmax_mse_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Mean squared error between the softmax probabilities and the target (the Brier score over ``C``).

    .. math:: ℓ = \frac{w_y}{C} \sum_c (p_c − t_c)^2,\quad p = \operatorname{softmax}(z),\qquad
              \frac{∂ℓ}{∂z_j} = \frac{2 w_y}{C}\, p_j \big(r_j − ⟨r, p⟩\big),\ r = p − t

    The gradient passes through the softmax Jacobian, so it vanishes when the model is confidently wrong
    (``p_y → 0``): it is *not* monotone in the error, unlike cross-entropy's ``p − t``. Equals
    ``F.mse_loss(softmax(z), onehot(y), reduction="none").mean(1)`` row by row.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` (integer), or class probabilities of the
            logits' shape (floating; differentiable).
        weight: ``(C,)`` class weights: the row is scaled by ``w_y`` (``Σ_c w_c t_c`` for a probability target).
        ignore_index: class-index targets equal to it contribute 0 and are left out of the mean.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the shape of ``logits`` without ``C`` for ``"none"``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.softmax_mse_loss(torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0]))
        tensor(0.0616)
    """
    logits, _, probabilities, weight, ignore_index, reduction = _prepare(
        logits, target, "softmax_mse_loss", weight, ignore_index, reduction, probabilities_allowed=True
    )
    rows = _Rows(logits, target, weight, ignore_index, probabilities, need_dense=True)
    residual = torch.softmax(rows.z, dim=1) - rows.t
    loss = (residual * residual).mean(dim=1) * rows.row_weight
    return rows.finish(loss, reduction)


def score_mse_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Mean squared error between the raw scores and the target: least-squares classification.

    .. math:: ℓ = \frac{w_y}{C} \sum_c (z_c − t_c)^2,\qquad \frac{∂ℓ}{∂z_j} = \frac{2 w_y}{C} (z_j − t_j)

    No normalisation: the scores are regressed onto the one-hot vector, and the gradient is linear in the
    error. ``"mean"`` without weights equals ``F.mse_loss(z, onehot(y))`` (the mean over all ``N·C``
    entries); ``"none"`` is its row mean.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices (integer) or a floating target of the logits' shape.
        weight: ``(C,)`` class weights scaling the row by ``w_y`` (``Σ_c w_c t_c`` for a floating target).
        ignore_index: class-index targets equal to it contribute 0 and are left out of the mean.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the shape of ``logits`` without ``C`` for ``"none"``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.score_mse_loss(torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0]))
        tensor(0.6700)
    """
    logits, _, probabilities, weight, ignore_index, reduction = _prepare(
        logits, target, "score_mse_loss", weight, ignore_index, reduction, probabilities_allowed=True
    )
    rows = _Rows(logits, target, weight, ignore_index, probabilities, need_dense=True)
    residual = rows.z - rows.t
    loss = (residual * residual).mean(dim=1) * rows.row_weight
    return rows.finish(loss, reduction)


# -------------------------------------------------------------------------------------- one-vs-rest sigmoid
def multilabel_soft_margin_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""One-vs-rest sigmoid binary cross-entropy, averaged over the classes (``F.multilabel_soft_margin_loss``).

    .. math:: ℓ = \frac1C \sum_c w_c \big[\operatorname{softplus}(z_c) − t_c z_c\big]
              = −\frac1C \sum_c w_c \big[t_c \log σ(z_c) + (1 − t_c) \log σ(−z_c)\big],\qquad
              \frac{∂ℓ}{∂z_j} = \frac{w_j}{C}\big(σ(z_j) − t_j\big)

    Each class is its own logistic regression: the outputs ``σ(z_c)`` are independent and need not sum to
    1, which suits multi-label data (pass a multi-hot floating target); for mutually exclusive classes,
    pass class indices (a one-hot target). Computed with ``softplus`` (stable at any ``|z|``).

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices (integer), or a floating multi-hot / probability target of the logits' shape.
        weight: ``(C,)`` per-class weights ``w_c`` inside the sum (PyTorch's semantics).
        ignore_index: class-index targets equal to it contribute 0 and are left out of the mean.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.

    Returns:
        A scalar for ``"mean"``/``"sum"``; the shape of ``logits`` without ``C`` for ``"none"``.

    Example:
        >>> import torch, softmaxkit
        >>> softmaxkit.multilabel_soft_margin_loss(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]]))
        tensor(0.7201)
    """
    logits, _, probabilities, weight, ignore_index, reduction = _prepare(
        logits, target, "multilabel_soft_margin_loss", weight, ignore_index, reduction,
        probabilities_allowed=True, fp32_loss=False,
    )
    rows = _Rows(logits, target, weight, ignore_index, probabilities, need_dense=True)
    z = rows.z
    terms = torch.logaddexp(z, torch.zeros_like(z)) - rows.t * z  # softplus without F.softplus's cut-off at 20
    if rows.class_weight is not None:
        terms = terms * rows.class_weight
    loss = terms.mean(dim=1) * rows.valid
    return rows.finish(loss, reduction)
