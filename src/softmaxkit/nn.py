"""``nn.Module`` wrappers: ``__init__`` stores the functional arguments, ``forward`` calls the function.

Each module takes the same arguments, in the same order, as its function (minus the tensors it is called
with), so ``Module(**options)(x, y) == function(x, y, **options)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as v
from . import functional as F
from .adaptive import AdaptiveSoftmax, AdaptiveSoftmaxOutput  # noqa: F401  (re-exported)
from .functional import comparison as _comparison
from .functional.distillation import distillation_loss
from .functional.focal import focal_loss, poly1_cross_entropy
from .functional.linear_cross_entropy import linear_cross_entropy
from .functional.sparse import (
    entmax15,
    entmax15_loss,
    entmax_bisect,
    entmax_bisect_loss,
    sparsemax,
    sparsemax_loss,
)
from .functional.topk import topk_softmax
from .hierarchical import HierarchicalSoftmax  # noqa: F401  (re-exported)


class Softmax(nn.Module):
    """Module form of :func:`softmaxkit.softmax`: ``Softmax(dim, temperature=T)(x)``."""

    def __init__(self, dim: int = -1, *, temperature: float = 1.0, dtype: torch.dtype | None = None):
        super().__init__()
        self.dim = v.check_int("dim", dim)
        self.temperature = v.check_positive("temperature", temperature)
        self.dtype = v.check_float_dtype("dtype", dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, self.dim, temperature=self.temperature, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}"


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`softmaxkit.cross_entropy`; drop-in for :class:`torch.nn.CrossEntropyLoss`.

    ``weight`` is registered as a buffer (it moves with ``.to()`` and is saved in the state dict, as in
    PyTorch).
    """

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        inplace_backward: bool = False,
        chunk_size: int | None = None,
    ):
        super().__init__()
        _buffer(self, "weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.temperature = v.check_positive("temperature", temperature)
        self.z_loss = v.check_non_negative("z_loss", z_loss)
        self.softcap = v.check_softcap(softcap)
        self.impl = _check_impl(impl, "cross_entropy")
        self.inplace_backward = inplace_backward
        self.chunk_size = chunk_size

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            z_loss=self.z_loss,
            softcap=self.softcap,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, impl={self.impl!r}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`softmaxkit.linear_cross_entropy`: ``loss(hidden, weight, target, bias=None)``.

    Holds the options, not the projection: pass the output layer's ``weight`` (and ``bias``) at call time,
    so a tied embedding or an ``nn.Linear`` head keeps its own parameters. ``class_weight`` is a buffer.
    """

    def __init__(
        self,
        *,
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
    ):
        super().__init__()
        _buffer(self, "class_weight", class_weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.temperature = v.check_positive("temperature", temperature)
        self.z_loss = v.check_non_negative("z_loss", z_loss)
        self.softcap = v.check_softcap(softcap)
        self.chunk_size = v.check_optional_positive_int("chunk_size", chunk_size)
        self.impl = _check_impl(impl, "linear_cross_entropy")
        self.inplace_backward = inplace_backward
        self.accumulation_dtype = v.check_float_dtype("accumulation_dtype", accumulation_dtype)

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            class_weight=self.class_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            temperature=self.temperature,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
            accumulation_dtype=self.accumulation_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, chunk_size={self.chunk_size}, impl={self.impl!r}"
        )


class LinearCrossEntropyHead(LinearCrossEntropyLoss):
    r"""An output layer that returns its loss: ``head(hidden, target) = linear_cross_entropy(hidden, W, target)``.

    Holds the projection ``W`` (``(num_classes, in_features)``, initialised as ``nn.Linear``'s) and an optional
    bias, plus :class:`LinearCrossEntropyLoss`'s options; ``forward`` computes the fused loss, so the
    ``(N, C)`` logits never exist. Use it in place of an ``nn.Linear`` head followed by a loss when the
    parameters must be used inside the module's own ``forward``: under FSDP2 (``fully_shard(head)``) the
    weight is then gathered by FSDP's pre-forward hook, freed after forward and its gradient reduce-scattered
    by FSDP's post-backward hook (see ``docs/distributed.md``). Logits for inference:
    ``torch.nn.functional.linear(hidden, head.weight, head.bias)`` on an unsharded head.

    Args:
        in_features: ``D``, the hidden size.
        num_classes: ``C``.
        bias: whether the head has a ``(C,)`` bias (default False, as language-model heads).
        device, dtype: of the parameters.
        **loss_options: :class:`LinearCrossEntropyLoss`'s keyword arguments (``ignore_index``, ``reduction``,
            ``label_smoothing``, ``z_loss``, ``softcap``, ``chunk_size``, ``impl``, ...).
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, *, device=None, dtype=None,
                 **loss_options):
        super().__init__(**loss_options)
        in_features = v.check_int("in_features", in_features)
        num_classes = v.check_int("num_classes", num_classes)
        if in_features < 1 or num_classes < 1:
            raise ValueError(
                f"`in_features` and `num_classes` must be >= 1, but got in_features={in_features}, "
                f"num_classes={num_classes}"
            )
        if not isinstance(bias, bool):
            raise TypeError(f"`bias` must be a bool, but got {type(bias).__name__}")
        # nn.Linear's parameters and initialisation
        layer = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = layer.weight
        self.register_parameter("bias", layer.bias)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden, self.weight, target, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                + super().extra_repr())


# --- the loss family (issue 3) ---


def _buffer(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """A per-class vector option, registered as a buffer; checked here so a bad one fails at construction."""
    if value is not None and v.check_floating(name, value).dim() != 1:
        raise ValueError(f"`{name}` must be a 1-d tensor (one entry per class), but has shape {tuple(value.shape)}")
    module.register_buffer(name, value)


def _check_impl(impl: object, function_module: str) -> object:
    """``impl`` is one of the choices its function accepts (its module's ``IMPLS``), checked at construction."""
    import importlib

    choices = getattr(importlib.import_module(f".functional.{function_module}", __package__), "IMPLS", None)
    return v.check_choice("impl", impl, choices) if choices else impl


def _alpha_attribute(module: nn.Module, alpha: float | torch.Tensor) -> None:
    """A float α, an ``nn.Parameter`` (learnt: registered as a parameter) or a tensor (a buffer)."""
    if isinstance(alpha, nn.Parameter):
        module.alpha = alpha
    elif isinstance(alpha, torch.Tensor):
        module.register_buffer("alpha", v.check_floating("alpha", alpha))
    else:
        module.alpha = v.check_entmax_alpha(alpha, None, -1)  # a number: >= 1 and finite (no tensor needed)


class FocalLoss(nn.Module):
    """Module form of :func:`softmaxkit.focal_loss`; ``alpha`` and ``weight`` are buffers.

    ``forward(logits, target)`` takes class indices or class probabilities of the logits' shape.
    """

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.gamma = v.check_non_negative("gamma", gamma)
        _buffer(self, "alpha", alpha)
        _buffer(self, "weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.temperature = v.check_positive("temperature", temperature)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(
            logits, target, gamma=self.gamma, alpha=self.alpha, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}"
        )


class Poly1Loss(nn.Module):
    """Module form of :func:`softmaxkit.poly1_cross_entropy`; ``weight`` is a buffer.

    ``forward(logits, target)`` takes class indices or class probabilities of the logits' shape.
    """

    def __init__(
        self,
        *,
        epsilon: float = 1.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.epsilon = v.check_number("epsilon", epsilon)
        _buffer(self, "weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.temperature = v.check_positive("temperature", temperature)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return poly1_cross_entropy(
            logits, target, epsilon=self.epsilon, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class DistillationLoss(nn.Module):
    """Module form of :func:`softmaxkit.distillation_loss`: ``forward(student_logits, teacher_logits, target=None)``."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        alpha: float | None = None,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.temperature = v.check_positive("temperature", temperature)
        self.reduction = v.check_reduction(reduction, ("batchmean", "mean", "sum", "none"))
        self.alpha = None if alpha is None else v.check_in_range("alpha", alpha, 0.0, 1.0)
        _buffer(self, "weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.label_smoothing = v.check_label_smoothing(label_smoothing)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return distillation_loss(
            student_logits, teacher_logits, temperature=self.temperature, reduction=self.reduction, target=target,
            alpha=self.alpha, weight=self.weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, alpha={self.alpha}"


class SparsemaxLoss(nn.Module):
    """Module form of :func:`softmaxkit.sparsemax_loss`; ``weight`` is a buffer."""

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        temperature: float = 1.0,
    ):
        super().__init__()
        _buffer(self, "weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.temperature = v.check_positive("temperature", temperature)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sparsemax_loss(
            logits, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            temperature=self.temperature,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, temperature={self.temperature}"


class Entmax15Loss(SparsemaxLoss):
    """Module form of :func:`softmaxkit.entmax15_loss`; ``weight`` is a buffer."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return entmax15_loss(
            logits, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            temperature=self.temperature,
        )


class EntmaxBisectLoss(nn.Module):
    """Module form of :func:`softmaxkit.entmax_bisect_loss`.

    ``alpha`` may be an ``nn.Parameter`` (then learnt with the model: it gets a gradient), a tensor (a buffer)
    or a float.
    """

    def __init__(
        self,
        alpha: float | torch.Tensor = 1.5,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        temperature: float = 1.0,
        n_iter: int = 50,
    ):
        super().__init__()
        _alpha_attribute(self, alpha)
        _buffer(self, "weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.temperature = v.check_positive("temperature", temperature)
        self.n_iter = v.check_positive_int("n_iter", n_iter)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return entmax_bisect_loss(
            logits, target, self.alpha, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, temperature=self.temperature, n_iter=self.n_iter,
        )

    def extra_repr(self) -> str:
        alpha = self.alpha if not isinstance(self.alpha, torch.Tensor) else f"tensor{tuple(self.alpha.shape)}"
        return f"alpha={alpha}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class Sparsemax(nn.Module):
    """Module form of :func:`softmaxkit.sparsemax`: ``Sparsemax(dim)(x)``."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = v.check_int("dim", dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparsemax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Entmax15(Sparsemax):
    """Module form of :func:`softmaxkit.entmax15`: ``Entmax15(dim)(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return entmax15(x, self.dim)


class EntmaxBisect(nn.Module):
    """Module form of :func:`softmaxkit.entmax_bisect`; ``alpha`` as in :class:`EntmaxBisectLoss` (an
    ``nn.Parameter`` is learnt, as in adaptively sparse transformers)."""

    def __init__(self, alpha: float | torch.Tensor = 1.5, dim: int = -1, n_iter: int = 50):
        super().__init__()
        _alpha_attribute(self, alpha)
        self.dim = v.check_int("dim", dim)
        self.n_iter = v.check_positive_int("n_iter", n_iter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return entmax_bisect(x, self.alpha, self.dim, self.n_iter)

    def extra_repr(self) -> str:
        alpha = self.alpha if not isinstance(self.alpha, torch.Tensor) else f"tensor{tuple(self.alpha.shape)}"
        return f"alpha={alpha}, dim={self.dim}"


# ----------------------------------------------------------------------- the comparison losses, top-k softmax
class _ComparisonLoss(nn.Module):
    """Shared shell: ``__init__`` stores the functional keyword arguments, ``forward(logits, target)`` calls it."""

    _function = staticmethod(_comparison.multi_margin_loss)

    def __init__(self, *, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 **options):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        self.reduction = v.check_reduction(reduction)
        self.options = options

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return type(self)._function(logits, target, weight=self.weight, ignore_index=self.ignore_index,
                                    reduction=self.reduction, **self.options)

    def extra_repr(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.options.items())
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}{options}"


class MultiMarginLoss(_ComparisonLoss):
    """Module form of :func:`softmaxkit.multi_margin_loss` (Weston–Watkins hinge), as ``torch.nn.MultiMarginLoss``."""

    _function = staticmethod(_comparison.multi_margin_loss)

    def __init__(self, *, p: int = 1, margin: float = 1.0, weight: torch.Tensor | None = None,
                 ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction, p=p, margin=margin)


class CrammerSingerLoss(_ComparisonLoss):
    """Module form of :func:`softmaxkit.crammer_singer_loss`."""

    _function = staticmethod(_comparison.crammer_singer_loss)

    def __init__(self, *, margin: float = 1.0, weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction, margin=margin)


class SoftmaxMSELoss(_ComparisonLoss):
    """Module form of :func:`softmaxkit.softmax_mse_loss` (MSE on the softmax probabilities)."""

    _function = staticmethod(_comparison.softmax_mse_loss)

    def __init__(self, *, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction)


class ScoreMSELoss(_ComparisonLoss):
    """Module form of :func:`softmaxkit.score_mse_loss` (MSE on the raw scores)."""

    _function = staticmethod(_comparison.score_mse_loss)

    def __init__(self, *, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction)


class MultilabelSoftMarginLoss(_ComparisonLoss):
    """Module form of :func:`softmaxkit.multilabel_soft_margin_loss` (one-vs-rest sigmoid BCE)."""

    _function = staticmethod(_comparison.multilabel_soft_margin_loss)

    def __init__(self, *, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction)


class TopKSoftmax(nn.Module):
    """Module form of :func:`softmaxkit.topk_softmax`: ``TopKSoftmax(k, dim)(x)``."""

    def __init__(self, k: int, dim: int = -1):
        super().__init__()
        self.k = v.check_positive_int("k", k)
        self.dim = v.check_int("dim", dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk_softmax(x, self.k, self.dim)

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}"
