r"""Post-hoc calibration: map a trained model's logits to probabilities that mean what they say.

A softmax classifier trained with cross-entropy is typically over-confident (Guo et al. 2017): among the
rows it predicts with 90 % confidence, fewer than 90 % are right. A calibrator is fitted on held-out
``(logits, labels)`` and applied to new logits; it changes the probabilities, and (except the two
one-vs-rest calibrators, which may reorder classes) not the predicted class.

=====================  ============================================  ===============
calibrator             map applied to the logits ``z``                parameters
=====================  ============================================  ===============
TemperatureScaling     ``softmax(z / T)``                             1
VectorScaling          ``softmax(w ⊙ z + b)``                         2C
PlattScaling           per class ``σ(a_c z_c + b_c)``, renormalised   2C (2 for C = 2)
                       (``σ(a(z_1 − z_0) + b)`` for two classes)
DirichletCalibration   ``softmax(W log softmax(z) + b)`` with ODIR    C² + C
IsotonicCalibration    per class isotonic ``g_c(softmax(z)_c)``,      ≤ 2N per class
                       renormalised
HistogramBinning       per class bin frequency of ``softmax(z)_c``,   n_bins per class
                       renormalised
=====================  ============================================  ===============

Every calibrator has ``fit(logits, labels) -> self``, ``predict_proba(logits)`` (rows sum to 1, the same
kind of array as the input: NumPy in, NumPy out; a tensor in, a tensor on its device out), ``to_dict`` /
``from_dict`` and ``save(path)`` / ``load(path)`` to a small JSON file (floats round-trip exactly).
:func:`load` reads any of them back.

Inputs are validated as in :mod:`softmaxkit.metrics`: ``logits`` ``(N, C)`` floating with ``C >= 2``,
finite or ``-inf`` (a masked class), ``labels`` ``(N,)`` class indices in ``[0, C)``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _validation as v
from ._core import CrossEntropyOptions, compute_dtype
from .functional.cross_entropy import cross_entropy_core
from .functional.softmax import softmax

__all__ = [
    "DirichletCalibration",
    "HistogramBinning",
    "IsotonicCalibration",
    "PlattScaling",
    "TemperatureScaling",
    "VectorScaling",
    "load",
]

_FORMAT = 1
#: the summed cross-entropy of a chunk of calibration rows (labels validated by the caller)
_SUM = CrossEntropyOptions(reduction="sum")
#: rows per chunk of the (N, C) passes in fitting, bounding temporaries to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------- helpers
def _check_logits(logits: object, num_classes: int | None = None) -> torch.Tensor:
    logits = v.as_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"`logits` must have shape (N, C), but has shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must have a floating-point dtype, but has dtype {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"`logits` must have at least 2 classes (columns), but has shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"`logits` must have at least one row, but has shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"`logits` must have {num_classes} classes, as the data the calibrator was fitted on, but has "
            f"shape {tuple(logits.shape)}"
        )
    bad = torch.isnan(logits) | (logits == math.inf)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"`logits` must be finite or -inf (a masked class), but row {row} holds NaN or +inf")
    if bool((logits == -math.inf).all(dim=1).any()):
        row = int((logits == -math.inf).all(dim=1).nonzero()[0, 0])
        raise ValueError(f"`logits` must have at least one finite entry per row, but row {row} is all -inf")
    return logits


def _check_fit_inputs(logits: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _check_logits(logits)
    labels = v.check_labels("labels", v.as_tensor("labels", labels), logits.shape[0], logits.shape[1])
    labels = labels.to(logits.device)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    if bool((own == -math.inf).any()):
        row = int((own == -math.inf).nonzero()[0, 0])
        raise ValueError(
            f"`logits` give the label's class -inf at row {row} (label {int(labels[row])}): no calibration "
            f"map can give it a positive probability"
        )
    return logits, labels


def _like_input(probs: torch.Tensor, like: object, dtype: torch.dtype) -> Any:
    """Return ``probs`` as the caller gave the logits: NumPy for NumPy / array-likes, a tensor otherwise."""
    probs = probs.to(dtype)
    if isinstance(like, torch.Tensor):
        return probs
    return probs.cpu().numpy()


def _row_chunks(num_rows: int, num_columns: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, num_columns))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def _not_fitted(name: str) -> Exception:
    from sklearn.exceptions import NotFittedError

    return NotFittedError(f"This {name} is not fitted yet: call fit(logits, labels) first")


class _Calibrator:
    """Shared plumbing: JSON round-trip and the fitted-state check."""

    _fitted_attribute: str = ""

    def _require_fitted(self) -> None:
        if getattr(self, self._fitted_attribute, None) is None:
            raise _not_fitted(type(self).__name__)

    def _params(self) -> dict:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _set_params(self, params: dict) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A JSON-serialisable description of the fitted calibrator."""
        self._require_fitted()
        return {"calibrator": type(self).__name__, "format": _FORMAT, **self._params()}

    @classmethod
    def from_dict(cls, data: dict):
        """Rebuild a calibrator written by :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("calibrator") != cls.__name__:
            found = data.get("calibrator") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"expected a saved {cls.__name__}, but got {found!r}")
        if data.get("format") != _FORMAT:
            raise ValueError(f"unsupported {cls.__name__} format {data.get('format')!r} (expected {_FORMAT})")
        calibrator = cls.__new__(cls)
        cls.__init__(calibrator)
        calibrator._set_params(data)
        return calibrator

    def save(self, path: str | Path) -> None:
        """Write the fitted calibrator to a JSON file."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        """Read a calibrator written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def load(path: str | Path):
    """Read back any calibrator written by ``save``, whatever its class.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from softmaxkit.calibration import TemperatureScaling, load
        >>> logits = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 0.0]]); labels = np.array([0, 1, 1, 0])
        >>> path = os.path.join(tempfile.mkdtemp(), "calibrator.json")
        >>> TemperatureScaling().fit(logits, labels).save(path)
        >>> type(load(path)).__name__
        'TemperatureScaling'
    """
    data = json.loads(Path(path).read_text())
    classes = {cls.__name__: cls for cls in (TemperatureScaling, VectorScaling, IsotonicCalibration, HistogramBinning)}
    classes.update({cls.__name__: cls for cls in (PlattScaling, DirichletCalibration)})
    name = data.get("calibrator") if isinstance(data, dict) else None
    if name not in classes:
        raise ValueError(f"{path} does not hold a saved calibrator (found {name!r}; expected one of {sorted(classes)})")
    return classes[name].from_dict(data)


def _lbfgs(objective, start: np.ndarray, bounds, max_iter: int, tolerance: float) -> np.ndarray:
    """Minimise ``objective(x) -> (value, gradient)`` by L-BFGS-B (SciPy, a scikit-learn dependency).

    SciPy rather than ``torch.optim.LBFGS``: it takes box bounds, and creating a torch optimizer imports
    ``torch._dynamo`` (seconds on first use). The parameters are a handful of float64 numbers; the data
    stay on their device.
    """
    try:
        from scipy.optimize import minimize
    except ImportError as error:
        from . import missing_extra_message

        raise ImportError(missing_extra_message(error, "softmaxkit.calibration")) from None

    result = minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": max_iter, "gtol": tolerance, "ftol": 1e-15},
    )
    return np.asarray(result.x, dtype=np.float64)


def _masked(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``-inf`` entries replaced by 0 (so products stay finite), and the mask (None when there are none)."""
    mask = logits == -math.inf
    if not bool(mask.any()):
        return logits, None
    return logits.masked_fill(mask, 0.0), mask


# ------------------------------------------------------------------------------------ temperature scaling
class TemperatureScaling(_Calibrator):
    r"""Temperature scaling (Guo et al. 2017): one scalar ``T`` divides every logit.

    .. math::
        q_i = \operatorname{softmax}(z_i / T),\qquad
        T^\star = \arg\min_{T>0}\ \frac1N\sum_i \big[\operatorname{LSE}(z_i/T) - z_{iy_i}/T\big]

    The negative log-likelihood is minimised by L-BFGS-B over ``log T`` within ``log bounds``, so ``T``
    stays positive and steps are scale-free. With ``β = 1/T`` the objective is convex in ``β`` (a log-sum-exp
    of linear functions), hence unimodal in ``log T``: the minimiser is unique when it exists. Its gradient
    is exact and closed-form, ``dNLL/dβ = mean_i(E_{softmax(βz_i)}[z_i] - z_{iy_i})``, accumulated in float64
    over row chunks: memory stays at one chunk whatever ``N`` (tested from 10 to 10⁷ rows), and no autograd
    graph is built. ``-inf`` logits (masked classes) are allowed.

    When every row is already classified correctly with a margin, the likelihood keeps rising as
    ``T → 0``; when the logits say nothing about the labels it keeps rising as ``T → ∞``. Convexity makes
    both checkable before the search (the sign of the slope at each bound): the fit then returns the
    bound and warns. ``T`` is the same for
    every class, so the predicted class (argmax) never changes.

    Args:
        bounds: ``(T_min, T_max)``, the range ``T`` is clipped to (default ``(1e-2, 1e2)``).
        max_iter: L-BFGS-B iterations (each costs about one pass over the logits).
        tolerance: stop when ``|dNLL/d log T|`` falls below this.

    Attributes:
        temperature_: the fitted ``T`` (float).
        at_bound_: True when ``T`` is a bound because the likelihood has no optimum inside ``bounds`` (the
            fit warns; :meth:`to_dict` saves the flag as ``"at_bound"``).
        n_classes_: ``C`` of the fitting data.
        nll_: the mean negative log-likelihood at ``T``; ``nll_before_`` at ``T = 1``.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.calibration import TemperatureScaling
        >>> logits = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 0.0]])
        >>> labels = np.array([0, 1, 1, 0])  # 3 of 4 right, each predicted with p = 0.98
        >>> scaler = TemperatureScaling().fit(logits, labels)
        >>> round(scaler.temperature_, 3)
        3.641
        >>> scaler.predict_proba(logits)[0].round(3)  # p = 0.75: the accuracy
        array([0.75, 0.25])

    References:
        Guo, Pleiss, Sun & Weinberger (2017), *On calibration of modern neural networks*, ICML.
    """

    _fitted_attribute = "temperature_"

    def __init__(self, *, bounds: tuple[float, float] = (1e-2, 1e2), max_iter: int = 100, tolerance: float = 1e-9):
        low, high = bounds
        low = v.check_positive("bounds[0]", low)
        high = v.check_positive("bounds[1]", high)
        if not low < high:
            raise ValueError(f"`bounds` must be (T_min, T_max) with T_min < T_max, but got {bounds}")
        self.bounds = (low, high)
        self.max_iter = v.check_positive_int("max_iter", max_iter)
        self.tolerance = v.check_positive("tolerance", tolerance)
        self.temperature_: float | None = None
        self.at_bound_: bool = False
        self.n_classes_: int | None = None
        self.nll_: float | None = None
        self.nll_before_: float | None = None

    def __repr__(self) -> str:
        fitted = f", temperature_={self.temperature_:.6g}" if self.temperature_ is not None else ""
        return f"TemperatureScaling(bounds={self.bounds}{fitted})"

    @staticmethod
    def _nll_and_slope(logits: torch.Tensor, mask: torch.Tensor | None, own: torch.Tensor, beta: float):
        """Mean NLL at ``β`` and its derivative ``dNLL/dβ``, in float64 over row chunks."""
        num_rows, num_classes = logits.shape
        nll = torch.zeros((), dtype=torch.float64, device=logits.device)
        slope = torch.zeros((), dtype=torch.float64, device=logits.device)
        ones = torch.ones(num_classes, dtype=torch.float64, device=logits.device)

        def row_sum(x: torch.Tensor) -> torch.Tensor:  # a matrix-vector product is ~8x faster for few classes
            return x @ ones if num_classes < 64 else x.sum(dim=1)

        for rows in _row_chunks(num_rows, num_classes):
            z = logits[rows].double()
            scaled = z * beta
            if mask is not None:
                scaled.masked_fill_(mask[rows], -math.inf)
            peak = scaled.amax(dim=1, keepdim=True)
            weights = scaled.sub_(peak).exp_()  # e^{βz - max}: unnormalised softmax, 0 where masked
            total = row_sum(weights)
            lse = peak.squeeze(1) + total.log()
            nll += (lse - beta * own[rows]).sum()
            slope += (row_sum(weights.mul_(z)) / total - own[rows]).sum()  # E_p[z] - z_y
        return float(nll) / num_rows, float(slope) / num_rows

    def fit(self, logits: object, labels: object) -> TemperatureScaling:
        """Fit ``T`` on held-out ``logits (N, C)`` and ``labels (N,)``; returns ``self``."""
        logits, labels = _check_fit_inputs(logits, labels)
        finite, mask = _masked(logits)
        own = finite.gather(1, labels[:, None]).squeeze(1).double()
        low, high = self.bounds
        log_low, log_high = math.log(low), math.log(high)
        evaluated: dict[float, tuple[float, float]] = {}  # each costs a pass over the logits: keep them

        def nll_and_slope(beta: float) -> tuple[float, float]:
            if beta not in evaluated:
                evaluated[beta] = self._nll_and_slope(finite, mask, own, beta)
            return evaluated[beta]

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            beta = math.exp(-float(x[0]))
            nll, slope = nll_and_slope(beta)
            return nll, np.array([-beta * slope])  # dβ/dlog T = -β

        # Convex in β = 1/T: the optimum lies inside the bounds iff the NLL still falls at the flattest
        # allowed T and already rises at the sharpest. Otherwise the bound is the answer, with a warning.
        reason = None
        if nll_and_slope(1.0 / low)[1] <= 0:
            log_temperature = log_low
            reason = (
                "the NLL still falls at T_min: the rows are all classified correctly with a margin, so sharper "
                "is always better, or the logits are under-confident beyond the bounds"
            )
        elif nll_and_slope(1.0 / high)[1] >= 0:
            log_temperature = log_high
            reason = (
                "the NLL still falls at T_max: the logits are over-confident beyond the bounds, or carry no "
                "information about the labels"
            )
        else:
            start = np.array([min(max(0.0, log_low), log_high)])  # T = 1, or the nearest bound
            log_temperature = float(_lbfgs(objective, start, [(log_low, log_high)], self.max_iter, self.tolerance)[0])
        if reason is not None:
            warnings.warn(
                f"TemperatureScaling: the likelihood has no optimum inside bounds {self.bounds} ({reason}); "
                f"using T = {math.exp(log_temperature):g}; widen `bounds` if that is not the reason",
                UserWarning,
                stacklevel=2,
            )
        temperature = math.exp(log_temperature)
        self.at_bound_ = reason is not None
        self.temperature_ = temperature
        self.n_classes_ = logits.shape[1]
        self.nll_before_ = nll_and_slope(1.0)[0]
        self.nll_ = nll_and_slope(math.exp(-log_temperature))[0]
        return self

    def predict_proba(self, logits: object):
        """``softmax(logits / T)``: ``(N, C)``, NumPy for NumPy input, a tensor (same device) for a tensor."""
        self._require_fitted()
        tensor = _check_logits(logits, self.n_classes_)
        return _like_input(softmax(tensor, dim=1, temperature=self.temperature_), logits, tensor.dtype)

    def _params(self) -> dict:
        return {"n_classes": self.n_classes_, "temperature": self.temperature_, "bounds": list(self.bounds),
                "at_bound": bool(self.at_bound_)}

    def _set_params(self, params: dict) -> None:
        self.n_classes_ = int(params["n_classes"])
        self.temperature_ = float(params["temperature"])
        self.bounds = tuple(float(b) for b in params.get("bounds", self.bounds))
        self.at_bound_ = bool(params.get("at_bound", self.temperature_ in self.bounds))


# ----------------------------------------------------------------------------------------- vector scaling
class VectorScaling(_Calibrator):
    r"""Vector scaling (Guo et al. 2017): a scale and a bias per class.

    .. math::
        q_i = \operatorname{softmax}(w \odot z_i + b),\qquad
        (w^\star, b^\star) = \arg\min_{w, b}\ \frac1N\sum_i -\log q_{iy_i} + \frac{\lambda}{2}\big(\|w - 1\|^2 + \|b\|^2\big)

    Convex in ``(w, b)`` (the logits are linear in them); fitted by L-BFGS-B from ``w = 1, b = 0`` (temperature
    1) with gradients accumulated over row chunks. ``b`` is only defined up to a constant (softmax is
    shift-invariant): it is centred to mean 0 after the fit. The small ridge ``λ`` (default ``1e-6``) keeps
    the optimum finite when a class never occurs in the labels (its bias would otherwise run to ``-∞``).
    Unlike temperature scaling, vector scaling can change the predicted class. ``-inf`` logits stay ``-inf``.

    Args:
        l2: ridge ``λ >= 0`` towards the identity map.
        max_iter: L-BFGS-B iterations.
        tolerance: stop when the largest gradient entry falls below this.

    Attributes:
        scale_: ``(C,)`` float64 NumPy array ``w``.
        bias_: ``(C,)`` float64 NumPy array ``b`` (mean 0).
        n_classes_: ``C``.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.calibration import VectorScaling
        >>> rng = np.random.default_rng(0)
        >>> logits = rng.normal(size=(200, 3)); labels = rng.integers(0, 3, 200)
        >>> VectorScaling().fit(logits, labels).predict_proba(logits).sum(axis=1)[:3]
        array([1., 1., 1.])
    """

    _fitted_attribute = "scale_"

    def __init__(self, *, l2: float = 1e-6, max_iter: int = 200, tolerance: float = 1e-9):
        self.l2 = v.check_non_negative("l2", l2)
        self.max_iter = v.check_positive_int("max_iter", max_iter)
        self.tolerance = v.check_positive("tolerance", tolerance)
        self.scale_: np.ndarray | None = None
        self.bias_: np.ndarray | None = None
        self.n_classes_: int | None = None

    def __repr__(self) -> str:
        fitted = f", n_classes_={self.n_classes_}" if self.scale_ is not None else ""
        return f"VectorScaling(l2={self.l2:g}{fitted})"

    @staticmethod
    def _transform(finite: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor):
        scaled = finite * scale + bias
        return scaled if mask is None else scaled.masked_fill(mask, -math.inf)

    def fit(self, logits: object, labels: object) -> VectorScaling:
        """Fit ``w`` and ``b`` on held-out ``logits (N, C)`` and ``labels (N,)``; returns ``self``."""
        logits, labels = _check_fit_inputs(logits, labels)
        num_rows, num_classes = logits.shape
        finite, mask = _masked(logits)

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            params = torch.from_numpy(x).to(logits.device).requires_grad_(True)
            scale, bias = params[:num_classes], params[num_classes:]
            total = 0.0
            for rows in _row_chunks(num_rows, num_classes):
                chunk_mask = None if mask is None else mask[rows]
                z = self._transform(finite[rows].double(), chunk_mask, scale, bias)
                loss = cross_entropy_core(z, labels[rows], None, _SUM, False) / num_rows
                loss.backward()
                total += float(loss.detach())
            penalty = 0.5 * self.l2 * (((scale - 1) ** 2).sum() + (bias**2).sum())
            penalty.backward()
            return total + float(penalty.detach()), params.grad.cpu().numpy()

        start = np.concatenate([np.ones(num_classes), np.zeros(num_classes)])
        solution = _lbfgs(objective, start, None, self.max_iter, self.tolerance)
        self.scale_ = solution[:num_classes].copy()
        self.bias_ = solution[num_classes:] - solution[num_classes:].mean()
        self.n_classes_ = num_classes
        return self

    def predict_proba(self, logits: object):
        """``softmax(w ⊙ logits + b)``: ``(N, C)``, the same kind of array as ``logits``."""
        self._require_fitted()
        tensor = _check_logits(logits, self.n_classes_)
        finite, mask = _masked(tensor)
        work = compute_dtype(tensor.dtype)
        scale = torch.from_numpy(self.scale_).to(tensor.device, work)
        bias = torch.from_numpy(self.bias_).to(tensor.device, work)
        probs = torch.softmax(self._transform(finite.to(work), mask, scale, bias), dim=1)
        return _like_input(probs, logits, tensor.dtype)

    def _params(self) -> dict:
        return {
            "n_classes": self.n_classes_,
            "l2": self.l2,
            "scale": self.scale_.tolist(),
            "bias": self.bias_.tolist(),
        }

    def _set_params(self, params: dict) -> None:
        self.n_classes_ = int(params["n_classes"])
        self.l2 = float(params.get("l2", self.l2))
        self.scale_ = np.asarray(params["scale"], dtype=np.float64)
        self.bias_ = np.asarray(params["bias"], dtype=np.float64)
        if self.scale_.shape != (self.n_classes_,) or self.bias_.shape != (self.n_classes_,):
            raise ValueError(f"a saved VectorScaling needs `scale` and `bias` of length n_classes={self.n_classes_}")


# ------------------------------------------------------------------------------- one-vs-rest calibrators
def _renormalise(calibrated: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sums; a row whose calibrated values are all 0 keeps the uncalibrated softmax.

    Classes the softmax gives exactly 0 (``-inf`` logits: masked) stay at 0.
    """
    calibrated = calibrated.masked_fill(fallback == 0, 0.0)
    total = calibrated.sum(dim=1, keepdim=True)
    empty = total <= 0
    safe = torch.where(empty, torch.ones_like(total), total)
    return torch.where(empty, fallback, calibrated / safe)


def _interp(x: torch.Tensor, knots_x: torch.Tensor, knots_y: torch.Tensor) -> torch.Tensor:
    """``numpy.interp(x, knots_x, knots_y)`` on the device: piecewise linear, constant outside the knots."""
    if knots_x.numel() == 1:
        return knots_y.expand_as(x).clone()
    right = torch.searchsorted(knots_x, x.contiguous(), side="right").clamp(1, knots_x.numel() - 1)
    left = right - 1
    x0, x1, y0, y1 = knots_x[left], knots_x[right], knots_y[left], knots_y[right]
    slope_t = (x - x0) / (x1 - x0)
    out = y0 + slope_t * (y1 - y0)
    out = torch.where(x <= knots_x[0], knots_y[0], out)
    return torch.where(x >= knots_x[-1], knots_y[-1], out)


class IsotonicCalibration(_Calibrator):
    r"""One-vs-rest isotonic regression (Zadrozny & Elkan 2002), renormalised.

    For each class ``c``, a non-decreasing map ``g_c`` from ``p_c = softmax(z)_c`` to ``[0, 1]`` is fitted
    to the indicators ``[y = c]`` by least squares (pool-adjacent-violators, scikit-learn's
    ``IsotonicRegression``); new probabilities are interpolated linearly between its knots (constant
    beyond them) and each row is renormalised:

    .. math:: q_{ic} = \frac{g_c(p_{ic})}{\sum_k g_k(p_{ik})}

    A row where every ``g_k`` is 0 (possible far from the fitting data) keeps its uncalibrated softmax.
    Non-parametric: it needs more held-out rows than the scaling methods (hundreds per class) and may
    change the predicted class. The fit runs on the host (scikit-learn); :meth:`predict_proba` runs on the
    logits' device.

    Attributes:
        knots_: list of ``C`` pairs ``(x, y)`` of float64 NumPy arrays, the map of each class.
        n_classes_: ``C``.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.calibration import IsotonicCalibration
        >>> rng = np.random.default_rng(0)
        >>> logits = 3 * rng.normal(size=(500, 3)); labels = rng.integers(0, 3, 500)
        >>> IsotonicCalibration().fit(logits, labels).predict_proba(logits).sum(axis=1)[:3]
        array([1., 1., 1.])
    """

    _fitted_attribute = "knots_"

    def __init__(self) -> None:
        self.knots_: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.n_classes_: int | None = None

    def __repr__(self) -> str:
        fitted = f"n_classes_={self.n_classes_}" if self.knots_ is not None else ""
        return f"IsotonicCalibration({fitted})"

    def fit(self, logits: object, labels: object) -> IsotonicCalibration:
        """Fit one isotonic map per class on held-out ``logits (N, C)`` and ``labels (N,)``."""
        from sklearn.isotonic import IsotonicRegression

        logits, labels = _check_fit_inputs(logits, labels)
        probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
        labels = labels.cpu().numpy()
        knots = []
        for c in range(probs.shape[1]):
            regression = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            regression.fit(probs[:, c], (labels == c).astype(np.float64))
            knots.append(
                (np.asarray(regression.X_thresholds_, np.float64), np.asarray(regression.y_thresholds_, np.float64))
            )
        self.knots_ = knots
        self.n_classes_ = probs.shape[1]
        return self

    def predict_proba(self, logits: object):
        """Calibrated ``(N, C)`` probabilities, the same kind of array as ``logits``."""
        self._require_fitted()
        tensor = _check_logits(logits, self.n_classes_)
        probs = torch.softmax(tensor.double(), dim=1)
        calibrated = torch.stack(
            [
                _interp(probs[:, c], torch.from_numpy(x).to(tensor.device), torch.from_numpy(y).to(tensor.device))
                for c, (x, y) in enumerate(self.knots_)
            ],
            dim=1,
        )
        return _like_input(_renormalise(calibrated, probs), logits, tensor.dtype)

    def _params(self) -> dict:
        return {
            "n_classes": self.n_classes_,
            "knots": [{"x": x.tolist(), "y": y.tolist()} for x, y in self.knots_],
        }

    def _set_params(self, params: dict) -> None:
        self.n_classes_ = int(params["n_classes"])
        self.knots_ = [
            (np.asarray(k["x"], dtype=np.float64), np.asarray(k["y"], dtype=np.float64)) for k in params["knots"]
        ]
        if len(self.knots_) != self.n_classes_:
            raise ValueError(f"a saved IsotonicCalibration needs one map per class ({self.n_classes_})")


class HistogramBinning(_Calibrator):
    r"""One-vs-rest histogram binning (Zadrozny & Elkan 2001), renormalised.

    For each class ``c``, ``p_c = softmax(z)_c`` is cut into ``n_bins`` bins (equal width on ``[0, 1]``, or
    at the quantiles of the fitting data); a bin's calibrated value is the fraction of its fitting rows
    whose label is ``c`` — an empty bin keeps the centre of its interval — and rows are renormalised:

    .. math:: q_{ic} = \frac{\theta_{c, m(p_{ic})}}{\sum_k \theta_{k, m(p_{ik})}},\qquad
              \theta_{cm} = \frac{\#\{i \in B_{cm}: y_i = c\}}{|B_{cm}|}

    Bins are right-closed as in :func:`softmaxkit.metrics.expected_calibration_error`. A row whose values are
    all 0 keeps its uncalibrated softmax.

    Args:
        n_bins: bins per class.
        strategy: ``"uniform"`` or ``"quantile"``.

    Attributes:
        edges_: ``(C, n_bins + 1)`` float64 NumPy array of bin edges.
        values_: ``(C, n_bins)`` float64 NumPy array ``θ``.
        n_classes_: ``C``.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.calibration import HistogramBinning
        >>> rng = np.random.default_rng(0)
        >>> logits = 3 * rng.normal(size=(500, 3)); labels = rng.integers(0, 3, 500)
        >>> HistogramBinning(n_bins=10).fit(logits, labels).values_.shape
        (3, 10)
    """

    _fitted_attribute = "values_"

    def __init__(self, n_bins: int = 15, strategy: str = "uniform"):
        self.n_bins = v.check_positive_int("n_bins", n_bins)
        self.strategy = v.check_choice("strategy", strategy, ("uniform", "quantile"))
        self.edges_: np.ndarray | None = None
        self.values_: np.ndarray | None = None
        self.n_classes_: int | None = None

    def __repr__(self) -> str:
        return f"HistogramBinning(n_bins={self.n_bins}, strategy={self.strategy!r})"

    def fit(self, logits: object, labels: object) -> HistogramBinning:
        """Fit per-class bin frequencies on held-out ``logits (N, C)`` and ``labels (N,)``."""
        from .metrics import _binned

        logits, labels = _check_fit_inputs(logits, labels)
        probs = torch.softmax(logits.double(), dim=1)
        edges, values = [], []
        for c in range(probs.shape[1]):
            bins = _binned(probs[:, c], labels == c, self.n_bins, self.strategy)
            centre = (bins.edges[:-1] + bins.edges[1:]) / 2
            filled = bins.count > 0
            theta = np.where(filled, bins.hit_sum / np.maximum(bins.count, 1), centre)
            edges.append(bins.edges)
            values.append(theta)
        self.edges_ = np.stack(edges)
        self.values_ = np.stack(values)
        self.n_classes_ = probs.shape[1]
        return self

    def predict_proba(self, logits: object):
        """Calibrated ``(N, C)`` probabilities, the same kind of array as ``logits``."""
        from .metrics import _bin_index

        self._require_fitted()
        tensor = _check_logits(logits, self.n_classes_)
        probs = torch.softmax(tensor.double(), dim=1)
        edges = torch.from_numpy(self.edges_).to(tensor.device)
        values = torch.from_numpy(self.values_).to(tensor.device)
        calibrated = torch.stack(
            [values[c][_bin_index(probs[:, c], edges[c])] for c in range(self.n_classes_)], dim=1
        )
        return _like_input(_renormalise(calibrated, probs), logits, tensor.dtype)

    def _params(self) -> dict:
        return {
            "n_classes": self.n_classes_,
            "n_bins": self.n_bins,
            "strategy": self.strategy,
            "edges": self.edges_.tolist(),
            "values": self.values_.tolist(),
        }

    def _set_params(self, params: dict) -> None:
        self.n_classes_ = int(params["n_classes"])
        self.n_bins = int(params["n_bins"])
        self.strategy = str(params["strategy"])
        self.edges_ = np.asarray(params["edges"], dtype=np.float64)
        self.values_ = np.asarray(params["values"], dtype=np.float64)
        if self.edges_.shape != (self.n_classes_, self.n_bins + 1) or self.values_.shape != (
            self.n_classes_,
            self.n_bins,
        ):
            raise ValueError(
                f"a saved HistogramBinning needs edges ({self.n_classes_}, {self.n_bins + 1}) and values "
                f"({self.n_classes_}, {self.n_bins})"
            )


# Platt scaling and Dirichlet calibration live in their own module (they build on the helpers above).
from ._calibration_scaling import DirichletCalibration, PlattScaling  # noqa: E402
