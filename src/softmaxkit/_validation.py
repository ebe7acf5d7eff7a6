"""Input validation: every user error softmaxkit raises is raised here.

Each helper raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) with a message that names the
argument, says what was given and what is expected. Checks that need the data (target ranges) cost one
reduction over the target, never a pass over the ``(N, C)`` logits, and are skipped while a CUDA graph is
being captured or under ``torch.compile`` tracing, where a host sync is not allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")


def _data_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether value checks that read tensor data (and so sync with the device) may run now.

    Not while tracing (compile, export), not during CUDA-graph capture, and not on tensors without data
    (meta, fake and other subclasses: there are no values to check).
    """
    if torch.compiler.is_compiling() or not has_data(tensor):
        return False
    if tensor.device.type == "meta" or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_reduction(reduction: object, allowed: Sequence[str] = REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`reduction` must be one of {choices}, but got {reduction!r}")
    return reduction


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, but got {type(value).__name__}")
    return value


def check_floating(name: str, tensor: object) -> torch.Tensor:
    tensor = check_tensor(name, tensor)
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, but has dtype {tensor.dtype}")
    return tensor


def check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"`{name}` must be a real number, but got {type(value).__name__}")
    value = float(value)
    if value != value:  # NaN; written as a comparison so a symbolic float (torch.compile(dynamic=True)) traces
        raise ValueError(f"`{name}` must be a real number, but got nan")
    return value


def check_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    value = check_number(name, value)
    if not value > 0 or (value == math.inf and not allow_inf):
        raise ValueError(f"`{name}` must be a finite number > 0, but got {value}")
    return value


def check_non_negative(name: str, value: object) -> float:
    value = check_number(name, value)
    if not (0 <= value < math.inf):
        raise ValueError(f"`{name}` must be a finite number >= 0, but got {value}")
    return value


def check_in_range(
    name: str, value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    value = check_number(name, value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must lie in {interval}, but got {value}")
    return value


def check_label_smoothing(value: object) -> float:
    return check_in_range("label_smoothing", value, 0.0, 1.0)


def check_softcap(value: object) -> float | None:
    if value is None:
        return None
    return check_positive("softcap", value)


def check_int(name: str, value: object) -> int:
    """An ``int``; NumPy integers and 0-d integer tensors are accepted (as PyTorch accepts them)."""
    if is_integer_scalar(value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, but got {type(value).__name__}")
    return value


def check_dim(dim: object, ndim: int, name: str = "dim") -> int:
    """Normalise ``dim`` into ``[0, ndim)`` (negative dims count from the end)."""
    dim = check_int(name, dim)
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise ValueError(f"`{name}` must lie in [{-size}, {size - 1}] for a {ndim}-d input, but got {dim}")
    return dim % size


def check_class_weight(
    weight: object, num_classes: int, logits: torch.Tensor, name: str = "weight"
) -> torch.Tensor | None:
    """A per-class weight vector of length ``C`` (negative entries allowed, as in PyTorch)."""
    if weight is None:
        return None
    weight = check_floating(name, weight)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"`{name}` must be a 1-d tensor with one entry per class ({num_classes}), "
            f"but has shape {tuple(weight.shape)}"
        )
    if weight.device != logits.device:
        raise ValueError(f"`{name}` is on {weight.device} but `logits` on {logits.device}")
    return weight


def check_class_target(
    target: torch.Tensor, num_classes: int, ignore_index: int | None, name: str = "target"
) -> None:
    """Every entry of an integer target is a class in ``[0, C)`` or ``ignore_index`` (None: no ignore value).

    One fused reduction over the target (``N`` integers), and one host sync; skipped while capturing.
    """
    if target.numel() == 0 or not _data_checks_enabled(target):
        return
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(target.reshape(-1)[position])
        allowed = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise ValueError(
            f"`{name}` must hold class indices in [0, {num_classes}){allowed}, "
            f"but holds {value} at position {position}"
        )


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int, probabilities: bool) -> None:
    """Class indices in ``[0, C)`` or ``ignore_index``; for probability targets ``ignore_index`` must stay < 0
    (PyTorch's rule: there is no class index to ignore)."""
    if probabilities:
        if ignore_index >= 0:
            raise ValueError(
                f"`ignore_index` is not supported with class-probability targets (it must stay negative, "
                f"the default -100), but got {ignore_index}"
            )
    else:
        check_class_target(target, num_classes, ignore_index)


def check_probability_target(target: torch.Tensor, logits: torch.Tensor, name: str = "target") -> None:
    if not target.is_floating_point():
        raise TypeError(
            f"`{name}` with the same shape as `logits` holds class probabilities and must be floating point, "
            f"but has dtype {target.dtype}"
        )


def check_target_dtype(target: torch.Tensor, name: str = "target") -> None:
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(
            f"`{name}` holding class indices must have an integer dtype (int64), but has dtype {target.dtype}"
        )


def check_same_device(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if tensor.device != other.device:
        raise ValueError(f"`{name}` is on {tensor.device} but `{other_name}` on {other.device}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` is one of the strings in ``choices``."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {allowed}, but got {value!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """An ``int`` (NumPy integers accepted) that is ``>= 1``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= 1, but got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, but got {value}")
    return int(value)


# --- large output layers: linear / sampled / adaptive / hierarchical softmax, vocab-parallel (issue 4) ---


def check_linear_inputs(
    hidden: object, weight: object, bias: object = None, *, weight_name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``hidden (..., D)``, ``weight (C, D)`` and ``bias (C,)`` of one dtype and device, for ``hidden @ weight.T``."""
    hidden = check_floating("hidden", hidden)
    weight = check_floating(weight_name, weight)
    if hidden.dim() < 1:
        raise ValueError("`hidden` must have shape (..., D) with at least 1 dimension, but is 0-d")
    if weight.dim() != 2:
        raise ValueError(f"`{weight_name}` must have shape (C, D), but has shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`hidden` has {hidden.shape[-1]} features (shape {tuple(hidden.shape)}) but `{weight_name}` "
            f"expects {weight.shape[1]} (shape {tuple(weight.shape)}); their last dimensions must match"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"`{weight_name}` has dtype {weight.dtype} but `hidden` has {hidden.dtype}; they must match")
    check_same_device(weight_name, weight, "hidden", hidden)
    if bias is not None:
        bias = check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"`bias` must have shape ({weight.shape[0]},), one entry per row of `{weight_name}`, "
                f"but has shape {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"`bias` has dtype {bias.dtype} but `{weight_name}` has {weight.dtype}; they must match")
        check_same_device("bias", bias, weight_name, weight)
    return hidden, weight, bias


def check_optional_positive_int(name: str, value: object) -> int | None:
    """None, or an int ``>= 1``."""
    if value is None:
        return None
    value = check_int(name, value)
    if value < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1, but got {value}")
    return value


def check_accumulation_dtype(value: object, weight_dtype: torch.dtype) -> torch.dtype | None:
    """None (fp32 for fp16/bf16 weights, the weight's dtype otherwise), or a float dtype no narrower than the weight's."""
    if value is None:
        return None
    allowed = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if not isinstance(value, torch.dtype) or value not in allowed:
        raise TypeError(f"`accumulation_dtype` must be None or a floating torch.dtype, but got {value!r}")
    if value != weight_dtype and torch.finfo(value).bits <= torch.finfo(weight_dtype).bits:
        raise ValueError(
            f"`accumulation_dtype` must be the weight's dtype ({weight_dtype}) or wider, but got {value}"
        )
    return value


def check_positive_counts(name: str, counts: object, num_classes: int | None = None) -> torch.Tensor:
    """Class counts that are all ``> 0``: a 1-d tensor (or array / sequence) of finite positive numbers.

    ``num_classes`` (when given) is the required length. Returns a float64 tensor on the input's device.
    """
    if isinstance(counts, torch.Tensor):
        check_meta_free(name, counts)
        tensor = counts.detach()
    else:
        try:
            tensor = torch.as_tensor(counts)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"`{name}` must be a 1-d tensor of counts, but got {type(counts).__name__}") from error
    if tensor.dtype == torch.bool or tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in (
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8
    )):
        raise TypeError(f"`{name}` must hold real numbers, but has dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-d tensor (one count per class), but has shape {tuple(tensor.shape)}")
    if num_classes is not None and tensor.shape[0] != num_classes:
        raise ValueError(f"`{name}` must have one entry per class ({num_classes}), but has {tensor.shape[0]}")
    tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor) | (tensor <= 0)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"`{name}` must be finite and > 0 for every class, but holds {float(tensor[position])} at class "
            f"{position}"
        )
    return tensor


def check_class_indices(target: torch.Tensor, num_classes: int, name: str = "target") -> None:
    """Every entry of an integer ``target`` is a class in ``[0, C)`` (no ignore value)."""
    check_target_dtype(target, name)
    check_class_target(target, num_classes, None, name)


# --- the loss family: focal, poly-1, class weights, distillation, sparsemax / entmax, Gumbel (issue 3) ---


def check_class_index_target(logits: torch.Tensor, target: object, function: str) -> int:
    """``logits`` ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` with an integer ``target`` of the matching shape.

    Returns ``C``. ``function`` names the caller in the message for floating (class-probability) targets,
    which these losses do not take.
    """
    target = check_tensor("target", target)
    check_same_device("target", target, "logits", logits)
    if logits.dim() == 0:
        raise ValueError("`logits` must have at least 1 dimension (C,), (N, C) or (N, C, d1, ...), but is 0-d")
    expected = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
    if target.is_floating_point():
        raise TypeError(
            f"`target` of {function} must hold class indices with an integer dtype (int64) and shape {expected}, "
            f"but has dtype {target.dtype} and shape {tuple(target.shape)} (class-probability targets are "
            f"taken by softmaxkit.cross_entropy)"
        )
    if tuple(target.shape) != expected:
        raise ValueError(
            f"`target` must have shape {expected} (class indices) for logits of shape {tuple(logits.shape)}, "
            f"but has shape {tuple(target.shape)}"
        )
    check_target_dtype(target)
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes == 0:
        raise ValueError(f"`logits` must have at least one class, but has shape {tuple(logits.shape)}")
    return num_classes


def check_class_vector(
    name: str, value: object, num_classes: int, logits: torch.Tensor, *, minimum: float | None = None
) -> torch.Tensor | None:
    """None, or a floating ``(C,)`` tensor on the logits' device with finite entries ``>= minimum``."""
    if value is None:
        return None
    value = check_floating(name, value)
    if value.dim() != 1 or value.shape[0] != num_classes:
        raise ValueError(
            f"`{name}` must be a 1-d tensor with one entry per class ({num_classes}), "
            f"but has shape {tuple(value.shape)}"
        )
    check_same_device(name, value, "logits", logits)
    if value.numel() and _data_checks_enabled(value):
        bad = ~torch.isfinite(value)
        if minimum is not None:
            bad = bad | (value < minimum)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            expected = "finite" + (f" and >= {minimum:g}" if minimum is not None else "")
            raise ValueError(
                f"`{name}` must hold {expected} entries, but holds {float(value[position])} at class {position}"
            )
    return value


def check_entmax_alpha(alpha: object, x: torch.Tensor, dim: int) -> float | torch.Tensor:
    """``α >= 1``: a real number, or a floating tensor (one α per slice along ``dim``).

    A tensor must be a single value or broadcastable to ``x``'s shape with size 1 at ``dim`` (e.g.
    ``(N, 1)`` for ``(N, C)`` input and ``dim=-1``), on ``x``'s device, finite and ``>= 1`` everywhere.
    """
    if not isinstance(alpha, torch.Tensor):
        value = check_number("alpha", alpha)
        if not (1.0 <= value < math.inf):
            raise ValueError(f"`alpha` must be a finite number >= 1 (1 is softmax, 2 sparsemax), but got {value}")
        return value
    if not alpha.is_floating_point():
        raise TypeError(f"`alpha` given as a tensor must have a floating-point dtype, but has dtype {alpha.dtype}")
    check_same_device("alpha", alpha, "x", x)
    row_shape = list(x.shape)
    if row_shape:
        row_shape[dim] = 1
    try:
        shape = torch.broadcast_shapes(alpha.shape, tuple(row_shape))
    except RuntimeError:
        shape = None
    if shape is None or tuple(shape) != tuple(row_shape):
        raise ValueError(
            f"`alpha` must be a single value or broadcastable to {tuple(row_shape)} (the input's shape "
            f"{tuple(x.shape)} with size 1 at dim={dim}: one α per slice), but has shape {tuple(alpha.shape)}"
        )
    if alpha.numel() and _data_checks_enabled(alpha):
        bad = ~(torch.isfinite(alpha) & (alpha >= 1))
        if bool(bad.any()):
            position = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(
                f"`alpha` must be finite and >= 1 everywhere (1 is softmax, 2 sparsemax), but holds "
                f"{float(alpha.reshape(-1)[position])} at flat position {position}"
            )
    return alpha


def check_class_counts(counts: object) -> torch.Tensor:
    """Per-class counts: a 1-d tensor / array / sequence of finite numbers >= 0, at least one of them > 0.

    Returns a float64 tensor (on the input tensor's device).
    """
    if isinstance(counts, torch.Tensor):
        check_meta_free("counts", counts)
        tensor = counts.detach()
    else:
        import numpy as np

        try:
            array = np.asarray(counts)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`counts` must be a 1-d tensor or array of numbers, but got {type(counts).__name__}") from error
        if array.dtype.kind not in "iuf":
            raise TypeError(f"`counts` must hold numbers (not booleans), but has dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"`counts` must hold real numbers, but has dtype {tensor.dtype}")
    if tensor.dim() != 1 or tensor.shape[0] == 0:
        raise ValueError(f"`counts` must be a non-empty 1-d sequence (one count per class), but has shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(f"`counts` must be finite and >= 0, but holds {float(tensor[position])} at class {position}")
    if not bool((tensor > 0).any()):
        raise ValueError("`counts` must have at least one positive entry (some class must occur), but all are 0")
    return tensor


def check_same_shape(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if tensor.shape != other.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `{other_name}` {tuple(other.shape)}, but has shape "
            f"{tuple(tensor.shape)}"
        )


def check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    """None, or a :class:`torch.Generator` on ``device``'s type (a CUDA tensor needs a CUDA generator)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, but got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"`generator` is on {generator.device} but `logits` on {device}; they must match")
    return generator


# --- metrics and calibration inputs: NumPy or torch, probabilities, class labels (issue 6) ---


def as_tensor(name: str, value: object) -> torch.Tensor:
    """A torch view of a tensor, NumPy array or array-like, without copying where possible.

    Tensors are returned detached (a view, no copy) on their own device; NumPy arrays are wrapped with
    :func:`torch.from_numpy` (shared memory); anything else goes through :func:`numpy.asarray` first.
    """
    if isinstance(value, torch.Tensor):
        check_meta_free(name, value)
        return value.detach()
    import numpy as np

    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be a torch.Tensor or a NumPy array, but got {type(value).__name__}") from error
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"`{name}` must hold numbers (a torch.Tensor or a numeric NumPy array), but has dtype {array.dtype}"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(stride < 0 for stride in array.strides):
        array = array.copy()
    return torch.from_numpy(array)


def _check_score_shape(name: str, scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        hint = (
            " (for a binary problem pass both columns, e.g. np.stack([1 - p, p], axis=1))"
            if scores.dim() == 1
            else ""
        )
        raise ValueError(f"`{name}` must have shape (N, C), but has shape {tuple(scores.shape)}{hint}")
    if not scores.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, but has dtype {scores.dtype}")
    if scores.shape[1] < 2:
        raise ValueError(
            f"`{name}` must have at least 2 classes (columns), but has shape {tuple(scores.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one row, but has shape {tuple(scores.shape)}")


def check_scores(name: str, scores: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` real scores (probabilities or logits) with ``N >= 1``, ``C >= 2`` and no NaN (``±inf`` allowed).

    The NaN check is one row-max reduction (``max`` propagates NaN), cheaper than ``isnan`` over the matrix.
    """
    _check_score_shape(name, scores)
    if _data_checks_enabled(scores):
        nan_rows = torch.isnan(scores.amax(dim=1))
        if bool(nan_rows.any()):
            row = int(nan_rows.nonzero()[0, 0])
            raise ValueError(f"`{name}` must not contain NaN, but row {row} does")
    return scores


def probability_tolerance(dtype: torch.dtype, num_classes: int) -> float:
    """How far a row of ``dtype`` probabilities may sum from 1: ``max(1e-4, eps + C·tiny·eps)``.

    Rounding each of ``C`` exact probabilities to ``dtype`` moves their sum by at most ``eps/2`` (relative
    rounding of normal numbers, whose sum is 1) plus ``C`` half-spacings of the subnormals (``tiny·eps/2``);
    the bound doubles that. It is 1e-4 for float32/float64, ~1e-3 for float16 and ~8e-3 for bfloat16.
    """
    info = torch.finfo(dtype)
    return max(1e-4, info.eps + num_classes * info.tiny * info.eps)


def check_probabilities(name: str, probs: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` probabilities: ``C >= 2``, no negative entry, every row sums to 1 within
    :func:`probability_tolerance` (1e-4 in float32/float64). Costs two reductions over ``probs``."""
    _check_score_shape(name, probs)
    if not _data_checks_enabled(probs):
        return probs
    sum_dtype = torch.float32 if probs.dtype in (torch.float16, torch.bfloat16) else probs.dtype
    sums = probs.sum(dim=1, dtype=sum_dtype)  # NaN or inf in a row makes its sum NaN or inf: caught here
    tolerance = probability_tolerance(probs.dtype, probs.shape[1])
    # The common case costs three reductions and one host sync; the slow path below finds the culprit.
    low_sum, high_sum = torch.aminmax(sums)
    low_sum, high_sum, lowest = torch.stack([low_sum.to(sum_dtype), high_sum.to(sum_dtype), probs.amin().to(sum_dtype)]).tolist()
    if 1 - tolerance <= low_sum and high_sum <= 1 + tolerance and lowest >= 0:
        return probs
    bad = ~((sums - 1).abs() <= tolerance)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        total = float(sums[row])
        if math.isnan(total) and bool(torch.isnan(probs[row]).any()):
            raise ValueError(f"`{name}` must not contain NaN, but row {row} does")
        if not math.isfinite(total):
            raise ValueError(f"`{name}` must hold finite probabilities, but row {row} holds an infinite value")
        raise ValueError(
            f"`{name}` must hold probabilities whose rows sum to 1 (within {tolerance:.0e}), but row {row} "
            f"sums to {total:.6g}; apply softmax to logits first"
        )
    if lowest < 0:
        flat = int((probs.reshape(-1) < 0).nonzero()[0, 0])
        row, column = divmod(flat, probs.shape[1])
        raise ValueError(
            f"`{name}` must hold non-negative probabilities, but holds {float(probs[row, column]):.6g} "
            f"at row {row}, class {column}"
        )
    return probs


def check_labels(name: str, labels: torch.Tensor, num_rows: int | None, num_classes: int | None) -> torch.Tensor:
    """``(N,)`` integer class indices in ``[0, C)``; returns them as int64.

    ``num_rows``/``num_classes`` of None skip the length / upper-bound checks (the lower bound 0 always holds).
    """
    if labels.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-d array of class indices (N,), but has shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"`{name}` must hold integer class indices (int64), but has dtype {labels.dtype}; "
            f"convert with .astype(int) / .long() if the values are whole numbers"
        )
    if num_rows is not None and labels.shape[0] != num_rows:
        raise ValueError(
            f"`{name}` must have one entry per row ({num_rows}), but has {labels.shape[0]} "
            f"(a length mismatch)"
        )
    if labels.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one label, but is empty")
    labels = labels.long()
    if _data_checks_enabled(labels):
        upper = num_classes if num_classes is not None else None
        bad = labels < 0 if upper is None else (labels < 0) | (labels >= upper)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            expected = f"[0, {upper})" if upper is not None else "[0, inf)"
            raise ValueError(
                f"`{name}` must hold class indices in {expected}, but holds {int(labels[position])} "
                f"at position {position}"
            )
    return labels


# --- helpers added for the extreme-input audit: scalars, dtypes, tensors without data, array-likes ---


def is_integer_scalar(value: object) -> bool:
    """A NumPy integer or a 0-d integer tensor with data (not ``bool``): what PyTorch takes for an int."""
    import numbers

    if isinstance(value, torch.Tensor):
        return (value.dim() == 0 and not value.is_floating_point() and not value.is_complex()
                and value.dtype != torch.bool and has_data(value))
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, int))


def has_data(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has real storage to read (not a meta or fake tensor)."""
    if tensor.device.type == "meta":
        return False
    fake = getattr(getattr(torch, "_subclasses", None), "FakeTensor", None)
    return fake is None or not isinstance(tensor, fake)


def check_float_dtype(name: str, dtype: object) -> torch.dtype | None:
    """None, or a floating-point ``torch.dtype`` (a result of the softmax family is a probability)."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`{name}` must be None or a floating-point torch.dtype, but got {dtype!r}")
    return dtype


def as_float_tensor(name: str, value: object) -> torch.Tensor:
    """:func:`as_tensor`, with integer and boolean arrays converted to float64 (as scikit-learn accepts them)."""
    tensor = as_tensor(name, value)
    if not tensor.is_floating_point() and not tensor.is_complex():
        tensor = tensor.to(torch.float64)
    return tensor


def check_same_length(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """Two 1-d (or row-indexed) inputs with one entry per row each."""
    if tensor.dim() >= 1 and other.dim() >= 1 and tensor.shape[0] != other.shape[0]:
        raise ValueError(
            f"`{name}` has {tensor.shape[0]} entries but `{other_name}` has {other.shape[0]}; they must have "
            f"one entry per row each"
        )


def check_meta_free(name: str, tensor: torch.Tensor) -> None:
    """A clear message for a meta tensor where an eager value check would have to read its data."""
    if tensor.device.type == "meta":
        raise TypeError(
            f"`{name}` is a meta tensor (no data), which this function cannot check or compute on; pass a CPU or "
            f"CUDA tensor"
        )
