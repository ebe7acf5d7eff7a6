r"""Platt scaling and Dirichlet (matrix) calibration: the calibrators of :mod:`softmaxkit.calibration` that
fit a logistic map per class or a full linear map on the log-probabilities.

Both share the plumbing of the other calibrators (validation, JSON round-trip, NumPy in / NumPy out) and are
re-exported from :mod:`softmaxkit.calibration`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from . import _validation as v
from .calibration import (
    _Calibrator,
    _check_fit_inputs,
    _check_logits,
    _lbfgs,
    _like_input,
    _masked,
    _row_chunks,
)

__all__ = ["DirichletCalibration", "PlattScaling"]


@contextlib.contextmanager
def _one_thread_for_small(numel: int):
    """One BLAS / torch thread while fitting a small problem: each L-BFGS step is microseconds of work, and
    thread hand-offs (spinning OpenMP / OpenBLAS workers on a busy machine) cost milliseconds per step."""
    if numel >= 1 << 20:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover - without it only torch's threads are limited
        threadpool_limits = None
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1) if threadpool_limits else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------- Platt scaling
def _platt_targets(positive: np.ndarray, prior_correction: bool) -> np.ndarray:
    """Platt's regularised targets ``(N₊ + 1)/(N₊ + 2)`` and ``1/(N₋ + 2)``, or the 0/1 indicators."""
    if not prior_correction:
        return positive.astype(np.float64)
    n_positive = float(positive.sum())
    n_negative = float(positive.size - n_positive)
    return np.where(positive, (n_positive + 1.0) / (n_positive + 2.0), 1.0 / (n_negative + 2.0))


def _fit_sigmoid(score: np.ndarray, target: np.ndarray, max_iter: int, tolerance: float) -> tuple[float, float]:
    r"""``(a, b)`` minimising ``Σ_i softplus(u_i) − t_i u_i`` with ``u = a·s + b`` (a 2-parameter logistic
    regression, convex); scores are divided by ``max|s|`` when that exceeds 30 for conditioning (the map is
    the same after undoing it), as scikit-learn does."""
    scale = float(np.max(np.abs(score))) if score.size else 1.0
    scale = scale if scale >= 30.0 else 1.0
    s = score / scale
    n = float(s.size)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        u = x[0] * s + x[1]
        value = float(np.sum(np.logaddexp(0.0, u) - target * u)) / n
        residual = 0.5 * (1.0 + np.tanh(0.5 * u)) - target  # σ(u) − t, stable
        return value, np.array([np.dot(residual, s), residual.sum()]) / n

    mean_target = float(np.clip(target.mean(), 1e-12, 1 - 1e-12))
    start = np.array([0.0, math.log(mean_target / (1.0 - mean_target))])
    a, b = _lbfgs(objective, start, None, max_iter, tolerance)
    return float(a) / scale, float(b)


def _sigmoid(u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(u)


class PlattScaling(_Calibrator):
    r"""Platt scaling (Platt 1999): a logistic map of each class's score, renormalised for ``C > 2``.

    For two classes the score is the logit margin ``s = z_1 − z_0`` and

    .. math:: q_{i1} = σ(a\,s_i + b),\qquad q_{i0} = 1 − q_{i1};

    for ``C > 2`` each class is calibrated one-vs-rest on its own logit and the rows renormalised:

    .. math:: q_{ic} = \frac{σ(a_c z_{ic} + b_c)}{\sum_k σ(a_k z_{ik} + b_k)}

    Each ``(a_c, b_c)`` minimises the binary cross-entropy against Platt's regularised targets
    ``(N₊ + 1)/(N₊ + 2)`` and ``1/(N₋ + 2)`` (``prior_correction``; plain 0/1 labels otherwise), a convex
    2-parameter problem solved by L-BFGS-B. This is exactly scikit-learn's
    ``CalibratedClassifierCV(method="sigmoid")`` on a classifier whose ``decision_function`` returns these
    scores (tested). Unlike temperature scaling it can change the predicted class for ``C > 2`` (each class
    gets its own map), and a negative slope inverts a class's ranking. ``-inf`` logits (masked classes) get
    probability 0.

    Args:
        prior_correction: use Platt's regularised targets (as scikit-learn) rather than 0/1.
        max_iter: L-BFGS-B iterations per class.
        tolerance: stop when the gradient's largest entry falls below this.

    Attributes:
        slope_: ``(1,)`` for two classes, else ``(C,)`` float64 NumPy array ``a``.
        intercept_: the same shape, ``b``.
        n_classes_: ``C``.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.calibration import PlattScaling
        >>> rng = np.random.default_rng(0)
        >>> labels = rng.integers(0, 2, 400); logits = np.stack([np.zeros(400), 4 * (labels - 0.5) + rng.normal(size=400)], 1)
        >>> platt = PlattScaling().fit(logits, labels)
        >>> platt.slope_.round(2), platt.predict_proba(logits[:2]).sum(axis=1)
        (array([2.68]), array([1., 1.]))

    References:
        Platt, "Probabilistic Outputs for Support Vector Machines and Comparisons to Regularized Likelihood
        Methods", 1999; Zadrozny & Elkan, "Transforming classifier scores into accurate multiclass
        probability estimates", KDD 2002 (the one-vs-rest renormalisation).
    """

    _fitted_attribute = "slope_"

    def __init__(self, *, prior_correction: bool = True, max_iter: int = 200, tolerance: float = 1e-10):
        if not isinstance(prior_correction, bool):
            raise TypeError(f"`prior_correction` must be True or False, but got {type(prior_correction).__name__}")
        self.prior_correction = prior_correction
        self.max_iter = v.check_positive_int("max_iter", max_iter)
        self.tolerance = v.check_positive("tolerance", tolerance)
        self.slope_: np.ndarray | None = None
        self.intercept_: np.ndarray | None = None
        self.n_classes_: int | None = None

    def __repr__(self) -> str:
        fitted = f", n_classes_={self.n_classes_}" if self.slope_ is not None else ""
        return f"PlattScaling(prior_correction={self.prior_correction}{fitted})"

    @staticmethod
    def _scores(logits: torch.Tensor) -> torch.Tensor:
        """``(N, 1)`` margins ``z_1 − z_0`` for two classes, the ``(N, C)`` logits otherwise (float64)."""
        z = logits.double()
        return (z[:, 1] - z[:, 0])[:, None] if z.shape[1] == 2 else z

    def fit(self, logits: object, labels: object) -> PlattScaling:
        """Fit ``(a, b)`` per class on held-out ``logits (N, C)`` and ``labels (N,)``; returns ``self``."""
        logits, labels = _check_fit_inputs(logits, labels)
        num_classes = logits.shape[1]
        finite, mask = _masked(logits)
        scores = self._scores(finite).cpu().numpy()
        y = labels.cpu().numpy()
        slopes, intercepts = [], []
        for column in range(scores.shape[1]):
            positive = y == (1 if num_classes == 2 else column)
            keep = np.ones(y.shape, dtype=bool)
            if mask is not None and num_classes > 2:
                keep = ~mask[:, column].cpu().numpy()  # a masked class has no score to calibrate there
            elif mask is not None:
                keep = ~mask.any(dim=1).cpu().numpy()
            target = _platt_targets(positive[keep], self.prior_correction)
            if keep.sum() == 0:
                a, b = 1.0, 0.0
            else:
                with _one_thread_for_small(int(keep.sum())):
                    a, b = _fit_sigmoid(scores[keep, column], target, self.max_iter, self.tolerance)
            slopes.append(a)
            intercepts.append(b)
        self.slope_ = np.asarray(slopes, dtype=np.float64)
        self.intercept_ = np.asarray(intercepts, dtype=np.float64)
        self.n_classes_ = num_classes
        return self

    def predict_proba(self, logits: object):
        """Calibrated ``(N, C)`` probabilities, the same kind of array as ``logits``."""
        self._require_fitted()
        tensor = _check_logits(logits, self.n_classes_)
        finite, mask = _masked(tensor)
        slope = torch.from_numpy(self.slope_).to(tensor.device)
        intercept = torch.from_numpy(self.intercept_).to(tensor.device)
        calibrated = _sigmoid(self._scores(finite) * slope + intercept)
        if self.n_classes_ == 2:
            positive = calibrated[:, 0]
            if mask is not None:  # one class masked: the other is certain
                positive = torch.where(mask[:, 0], torch.ones_like(positive), positive)
                positive = torch.where(mask[:, 1], torch.zeros_like(positive), positive)
            probs = torch.stack([1.0 - positive, positive], dim=1)
        else:
            if mask is not None:
                calibrated = calibrated.masked_fill(mask, 0.0)
            total = calibrated.sum(dim=1, keepdim=True)
            empty = total <= 0  # every sigmoid underflowed: uniform over the unmasked classes (scikit-learn: uniform)
            fallback = torch.ones_like(calibrated) if mask is None else (~mask).to(calibrated.dtype)
            fallback = fallback / fallback.sum(dim=1, keepdim=True)
            probs = torch.where(empty, fallback, calibrated / torch.where(empty, torch.ones_like(total), total))
        return _like_input(probs, logits, tensor.dtype)

    def _params(self) -> dict:
        return {
            "n_classes": self.n_classes_,
            "prior_correction": self.prior_correction,
            "slope": self.slope_.tolist(),
            "intercept": self.intercept_.tolist(),
        }

    def _set_params(self, params: dict) -> None:
        self.n_classes_ = int(params["n_classes"])
        self.prior_correction = bool(params.get("prior_correction", True))
        self.slope_ = np.asarray(params["slope"], dtype=np.float64)
        self.intercept_ = np.asarray(params["intercept"], dtype=np.float64)
        columns = 1 if self.n_classes_ == 2 else self.n_classes_
        if self.slope_.shape != (columns,) or self.intercept_.shape != (columns,):
            raise ValueError(f"a saved PlattScaling with n_classes={self.n_classes_} needs `slope` and `intercept` "
                             f"of length {columns}")


# ------------------------------------------------------------------------------------ Dirichlet calibration
class DirichletCalibration(_Calibrator):
    r"""Dirichlet calibration (Kull et al. 2019): a full linear map of the log-probabilities, with ODIR.

    .. math::
        q_i = \operatorname{softmax}(W \log p_i + b),\quad p_i = \operatorname{softmax}(z_i),\qquad
        (W^\star, b^\star) = \arg\min_{W, b}\ \frac1N \sum_i −\log q_{iy_i}
            + \frac{λ}{C(C−1)} \sum_{j ≠ k} W_{jk}^2 + \frac{μ}{C} \sum_k b_k^2

    The fitted map is the one a Dirichlet model of the probability vector implies; it generalises
    temperature scaling (``W = I/T``) and vector scaling (diagonal ``W``). The off-diagonal and intercept
    regularisation (ODIR) shrinks the ``C² − C`` cross terms and the biases, never the diagonal, which keeps
    the map close to a per-class scaling unless the data insist. Convex in ``(W, b)``; fitted by L-BFGS-B
    from the identity (``W = I, b = 0``: the uncalibrated softmax), with float64 gradients over row
    chunks (closed form: ``∂/∂W = (q − e_y)ᵀ log p / N``, ``∂/∂b = mean(q − e_y)``, plus the penalties).
    Can change the predicted class. ``-inf`` logits (masked classes) stay at probability 0.

    Args:
        off_diagonal: ``λ >= 0``, the off-diagonal penalty.
        intercept: ``μ >= 0``, the intercept penalty.
        max_iter: L-BFGS-B iterations.
        tolerance: stop when the largest gradient entry falls below this.

    Attributes:
        weights_: ``(C, C)`` float64 NumPy array ``W``.
        bias_: ``(C,)`` float64 NumPy array ``b``.
        n_classes_: ``C``.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.calibration import DirichletCalibration
        >>> rng = np.random.default_rng(0)
        >>> logits = 3 * rng.normal(size=(300, 3)); labels = rng.integers(0, 3, 300)
        >>> DirichletCalibration().fit(logits, labels).predict_proba(logits).sum(axis=1)[:3]
        array([1., 1., 1.])

    References:
        Kull, Perelló-Nieto, Kängsepp, Silva Filho, Song & Flach, "Beyond temperature scaling: Obtaining
        well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019.
    """

    _fitted_attribute = "weights_"

    def __init__(self, *, off_diagonal: float = 1e-3, intercept: float = 1e-3, max_iter: int = 500,
                 tolerance: float = 1e-8):
        self.off_diagonal = v.check_non_negative("off_diagonal", off_diagonal)
        self.intercept = v.check_non_negative("intercept", intercept)
        self.max_iter = v.check_positive_int("max_iter", max_iter)
        self.tolerance = v.check_positive("tolerance", tolerance)
        self.weights_: np.ndarray | None = None
        self.bias_: np.ndarray | None = None
        self.n_classes_: int | None = None

    def __repr__(self) -> str:
        fitted = f", n_classes_={self.n_classes_}" if self.weights_ is not None else ""
        return f"DirichletCalibration(off_diagonal={self.off_diagonal:g}, intercept={self.intercept:g}{fitted})"

    @staticmethod
    def _features(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``log softmax(z)`` in float64, 0 where masked (so the products stay finite)."""
        work = logits.double()
        if mask is not None:
            work = work.masked_fill(mask, -math.inf)
        log_p = torch.log_softmax(work, dim=1)
        return log_p if mask is None else log_p.masked_fill(mask, 0.0)

    @staticmethod
    def _transform(features, mask, weights, bias):
        out = features @ weights.T + bias
        return out if mask is None else out.masked_fill(mask, -math.inf)

    def fit(self, logits: object, labels: object) -> DirichletCalibration:
        """Fit ``W`` and ``b`` on held-out ``logits (N, C)`` and ``labels (N,)``; returns ``self``."""
        logits, labels = _check_fit_inputs(logits, labels)
        num_rows, num_classes = logits.shape
        _, mask = _masked(logits)
        features = self._features(logits, mask)
        off = 1.0 - torch.eye(num_classes, dtype=torch.float64, device=logits.device)
        off_scale = self.off_diagonal / (num_classes * (num_classes - 1))
        bias_scale = self.intercept / num_classes

        onehot = torch.nn.functional.one_hot(labels, num_classes).double()

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            # closed form: with q = softmax(ℓ Wᵀ + b) and r = q − onehot(y), ∂NLL/∂W = rᵀℓ / N, ∂NLL/∂b = Σr / N
            params = torch.from_numpy(x).to(logits.device)
            weights = params[: num_classes * num_classes].view(num_classes, num_classes)
            bias = params[num_classes * num_classes :]
            nll = torch.zeros((), dtype=torch.float64, device=logits.device)
            grad_w = torch.zeros_like(weights)
            grad_b = torch.zeros_like(bias)
            for rows in _row_chunks(num_rows, num_classes):
                chunk_mask = None if mask is None else mask[rows]
                out = self._transform(features[rows], chunk_mask, weights, bias)
                log_q = torch.log_softmax(out, dim=1)
                nll -= log_q.gather(1, labels[rows, None]).sum()
                residual = log_q.exp() - onehot[rows]
                grad_w += residual.T @ features[rows]
                grad_b += residual.sum(dim=0)
            off_weights = weights * off
            value = float(nll) / num_rows + off_scale * float((off_weights**2).sum()) + bias_scale * float((bias**2).sum())
            grad_w = grad_w / num_rows + 2.0 * off_scale * off_weights
            grad_b = grad_b / num_rows + 2.0 * bias_scale * bias
            return value, torch.cat([grad_w.reshape(-1), grad_b]).cpu().numpy()

        start = np.concatenate([np.eye(num_classes).ravel(), np.zeros(num_classes)])
        with _one_thread_for_small(num_rows * num_classes):
            solution = _lbfgs(objective, start, None, self.max_iter, self.tolerance)
        self.weights_ = solution[: num_classes * num_classes].reshape(num_classes, num_classes).copy()
        self.bias_ = solution[num_classes * num_classes :].copy()
        self.n_classes_ = num_classes
        return self

    def predict_proba(self, logits: object):
        """``softmax(W log softmax(z) + b)``: ``(N, C)``, the same kind of array as ``logits``."""
        self._require_fitted()
        tensor = _check_logits(logits, self.n_classes_)
        _, mask = _masked(tensor)
        weights = torch.from_numpy(self.weights_).to(tensor.device)
        bias = torch.from_numpy(self.bias_).to(tensor.device)
        probs = torch.softmax(self._transform(self._features(tensor, mask), mask, weights, bias), dim=1)
        return _like_input(probs, logits, tensor.dtype)

    def _params(self) -> dict:
        return {
            "n_classes": self.n_classes_,
            "off_diagonal": self.off_diagonal,
            "intercept": self.intercept,
            "weights": self.weights_.tolist(),
            "bias": self.bias_.tolist(),
        }

    def _set_params(self, params: dict) -> None:
        self.n_classes_ = int(params["n_classes"])
        self.off_diagonal = float(params.get("off_diagonal", self.off_diagonal))
        self.intercept = float(params.get("intercept", self.intercept))
        self.weights_ = np.asarray(params["weights"], dtype=np.float64)
        self.bias_ = np.asarray(params["bias"], dtype=np.float64)
        if self.weights_.shape != (self.n_classes_, self.n_classes_) or self.bias_.shape != (self.n_classes_,):
            raise ValueError(f"a saved DirichletCalibration needs `weights` ({self.n_classes_}, {self.n_classes_}) "
                             f"and `bias` ({self.n_classes_},)")
