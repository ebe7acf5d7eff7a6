"""``SoftmaxRegression``: a scikit-learn classifier trained with any softmaxkit loss.

Multinomial logistic regression (optionally with a small MLP in front of the softmax layer) whose
training loss is one of softmaxkit's: cross-entropy (with label smoothing and class weights), focal,
Poly-1 or the sparsemax Fenchel-Young loss. All computation is float64 PyTorch on the CPU; the L-BFGS
solver runs SciPy's L-BFGS-B on a closure that returns the objective and its autograd gradient, the
same optimiser scikit-learn's ``LogisticRegression`` uses, so with the same penalty both reach the same
optimum.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings

import numpy as np
import torch

try:  # scikit-learn (and SciPy) come with the `cli` extra
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as _error:
    from . import missing_extra_message

    raise ImportError(missing_extra_message(_error, "softmaxkit.SoftmaxRegression")) from None

from . import _validation as v
from ._reduction import safe_divide

LOSSES = ("cross_entropy", "focal", "poly1", "sparsemax")
#: the losses softmax + cross-entropy is compared with (softmaxkit.functional.comparison)
COMPARISON_LOSSES = ("hinge", "crammer_singer", "mse", "mse_scores", "sigmoid")
LOSSES = LOSSES + COMPARISON_LOSSES
SOLVERS = ("lbfgs", "adamw")
CLASS_WEIGHT_METHODS = ("balanced", "effective_number")
ACTIVATIONS = ("relu", "tanh")


def _loss_function(name: str):
    """The softmaxkit function behind ``loss=name`` (imported lazily: some arrive with later releases)."""
    import softmaxkit

    attribute = {
        "cross_entropy": "cross_entropy",
        "focal": "focal_loss",
        "poly1": "poly1_cross_entropy",
        "sparsemax": "sparsemax_loss",
        "hinge": "multi_margin_loss",
        "crammer_singer": "crammer_singer_loss",
        "mse": "softmax_mse_loss",
        "mse_scores": "score_mse_loss",
        "sigmoid": "multilabel_soft_margin_loss",
    }[name]
    function = getattr(softmaxkit, attribute, None)
    if function is None:
        raise ValueError(
            f"`loss={name!r}` needs softmaxkit.{attribute}, which this installation of softmaxkit lacks"
        )
    return function


@contextlib.contextmanager
def _small_problem_threads(numel: int):
    """One intra-op thread for small problems: OpenMP's thread hand-off costs far more than the work.

    (A 150×4 matmul takes microseconds on one thread and can take tens of milliseconds with two threads
    on a busy machine.) Large problems keep PyTorch's thread count.
    """
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    small = numel < 2_000_000
    if small and previous > 1:
        torch.set_num_threads(1)
    try:
        if small:  # SciPy's L-BFGS-B calls BLAS too
            with threadpool_limits(limits=1):
                yield
        else:
            yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _accepts(function, argument: str) -> bool:
    try:
        return argument in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    r"""Multinomial logistic regression trained with a softmaxkit loss.

    The model computes logits ``z = W h(x) + b`` (``h`` the identity, or a small MLP when
    ``hidden_layer_sizes`` is set) and minimises

    .. math:: J(θ) = \frac{\sum_i s_i\, ℓ(z_i, y_i)}{\sum_i s_i\, w_{y_i}} + \frac{α}{2}\sum_l \lVert W_l \rVert_F^2

    where ``ℓ`` is the chosen loss with class weights ``w`` folded in (PyTorch's weighted mean; ``s`` are
    sample weights, 1 by default) and the penalty covers the weight matrices, never the intercepts.
    With ``loss="cross_entropy"`` and ``α = 1/(C·n)`` this is exactly the objective of
    ``sklearn.linear_model.LogisticRegression(C=C)`` divided by ``C·n``, so both reach the same optimum
    (for three or more classes; scikit-learn fits binary problems with one weight vector).

    Args:
        loss: ``"cross_entropy"``, ``"focal"`` (Lin et al. 2017, focusing ``gamma``), ``"poly1"`` (Leng
            et al. 2022, coefficient ``epsilon``) or ``"sparsemax"`` (the sparsemax Fenchel-Young loss,
            Martins & Astudillo 2016; ``predict_proba`` is then ``sparsemax(z)`` and may hold exact 0s), or one
            of the losses softmax + cross-entropy is compared with: ``"hinge"`` (Weston–Watkins,
            :func:`softmaxkit.multi_margin_loss`), ``"crammer_singer"``, ``"mse"`` (squared error of the
            softmax probabilities, :func:`softmaxkit.softmax_mse_loss`), ``"mse_scores"`` (squared error of the
            raw scores against the one-hot target, :func:`softmaxkit.score_mse_loss`) or ``"sigmoid"``
            (one-vs-rest sigmoid BCE, :func:`softmaxkit.multilabel_soft_margin_loss`; ``predict_proba`` is
            then ``σ(z)`` renormalised). The hinge and raw-score MSE models are not trained as probability
            models: their ``predict_proba`` is ``softmax(z)`` of the scores, to be calibrated before its
            values are read as probabilities.
        alpha: L2 strength ``α >= 0`` on the weights (not the intercepts).
        label_smoothing: ``ε ∈ [0, 1]``, mixes each one-hot target with the uniform distribution.
        class_weight: None, ``"balanced"`` (``n / (C·n_c)``, as scikit-learn), ``"effective_number"``
            (``(1 − β)/(1 − β^{n_c})``, Cui et al. 2019, via :func:`softmaxkit.class_weights`) or a dict
            ``{label: weight}`` (missing labels weigh 1).
        fit_intercept: learn the bias ``b``.
        solver: ``"lbfgs"`` (full batch, SciPy L-BFGS-B; default) or ``"adamw"`` (mini-batch AdamW on
            the same objective: the L2 term is part of the loss, so AdamW's decoupled decay is 0).
        max_iter: L-BFGS iterations, or AdamW epochs.
        tol: L-BFGS stops when the largest gradient entry is below ``tol``; AdamW stops when the epoch
            objective (or the validation loss with ``early_stopping``) has not improved by ``tol`` for
            ``n_iter_no_change`` epochs.
        batch_size: AdamW mini-batch size (capped at the number of samples).
        learning_rate: AdamW step size.
        early_stopping: AdamW only: hold out ``validation_fraction`` of the training data (stratified),
            stop when its loss stalls, and keep the best parameters seen.
        validation_fraction: fraction held out for ``early_stopping``.
        n_iter_no_change: patience in epochs for AdamW.
        gamma: focal-loss focusing parameter ``γ >= 0``.
        epsilon: Poly-1 coefficient ``ε_1``.
        hidden_layer_sizes: widths of an optional MLP before the softmax layer; ``()`` is plain
            multinomial logistic regression.
        activation: the MLP's non-linearity, ``"relu"`` or ``"tanh"``.
        random_state: seed for the MLP initialisation, the AdamW shuffling and the validation split.
        warm_start: start from the previous fit's parameters when the shapes agree.

    Attributes:
        classes_: ``(C,)`` class labels.
        coef_: ``(C, D')`` weights of the softmax layer (``D'`` = features, or the last hidden width).
            Always one row per class, binary problems included.
        intercept_: ``(C,)`` biases (zeros when ``fit_intercept=False``).
        hidden_coefs_, hidden_intercepts_: lists of the MLP's weights ``(out, in)`` and biases.
        n_iter_: iterations (L-BFGS) or epochs (AdamW) run.
        converged_: whether the solver stopped at its tolerance (L-BFGS: max |gradient| <= ``tol`` or no
            further decrease at machine precision; AdamW: the loss stalled). When False a
            ``ConvergenceWarning`` says why.
        stop_reason_: ``"converged"``, or how the solver stopped short.
        loss_curve_: the objective after each iteration / epoch.
        validation_scores_: AdamW with ``early_stopping``: the validation loss after each epoch.
        n_features_in_, feature_names_in_: as every scikit-learn estimator.

    Example:
        >>> from sklearn.datasets import load_iris
        >>> from softmaxkit import SoftmaxRegression
        >>> X, y = load_iris(return_X_y=True)
        >>> model = SoftmaxRegression(alpha=1e-3).fit(X, y)
        >>> model.predict_proba(X[:1]).round(2)
        array([[1., 0., 0.]])
        >>> model.score(X, y) > 0.97
        True

    References:
        Lin et al., "Focal Loss for Dense Object Detection", 2017; Leng et al., "PolyLoss", 2022;
        Martins & Astudillo, "From Softmax to Sparsemax", 2016; Cui et al., "Class-Balanced Loss Based on
        Effective Number of Samples", 2019.
    """

    def __init__(
        self,
        loss: str = "cross_entropy",
        *,
        alpha: float = 1e-4,
        label_smoothing: float = 0.0,
        class_weight=None,
        fit_intercept: bool = True,
        solver: str = "lbfgs",
        max_iter: int = 500,
        tol: float = 1e-6,
        batch_size: int = 256,
        learning_rate: float = 1e-2,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        gamma: float = 2.0,
        epsilon: float = 1.0,
        hidden_layer_sizes: tuple = (),
        activation: str = "relu",
        random_state=None,
        warm_start: bool = False,
    ):
        self.loss = loss
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.gamma = gamma
        self.epsilon = epsilon
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.random_state = random_state
        self.warm_start = warm_start

    # ------------------------------------------------------------------ validation
    def _validate_params_values(self) -> None:
        v.check_choice("loss", self.loss, LOSSES)
        v.check_choice("solver", self.solver, SOLVERS)
        v.check_choice("activation", self.activation, ACTIVATIONS)
        v.check_non_negative("alpha", self.alpha)
        v.check_label_smoothing(self.label_smoothing)
        v.check_positive_int("max_iter", self.max_iter)
        v.check_positive("tol", self.tol)
        v.check_positive_int("batch_size", self.batch_size)
        v.check_positive("learning_rate", self.learning_rate)
        v.check_in_range("validation_fraction", self.validation_fraction, 0.0, 1.0, low_open=True, high_open=True)
        v.check_positive_int("n_iter_no_change", self.n_iter_no_change)
        v.check_non_negative("gamma", self.gamma)
        v.check_number("epsilon", self.epsilon)
        sizes = self.hidden_layer_sizes
        if sizes is None:
            sizes = ()
        if isinstance(sizes, numbers.Integral):
            sizes = (sizes,)
        try:
            sizes = tuple(sizes)
        except TypeError:
            raise TypeError(
                f"`hidden_layer_sizes` must be a tuple of ints >= 1, but got {type(self.hidden_layer_sizes).__name__}"
            ) from None
        for size in sizes:
            v.check_positive_int("hidden_layer_sizes", size)
        cw = self.class_weight
        if not (cw is None or isinstance(cw, dict)):
            if not isinstance(cw, str):
                raise TypeError(
                    f"`class_weight` must be None, 'balanced', 'effective_number' or a dict, "
                    f"but got {type(cw).__name__}"
                )
            v.check_choice("class_weight", cw, CLASS_WEIGHT_METHODS)
        function = _loss_function(self.loss)
        if self.label_smoothing > 0 and not _accepts(function, "label_smoothing"):
            raise ValueError(f"`label_smoothing` is not supported with loss={self.loss!r}, but got {self.label_smoothing}")

    def _hidden_sizes(self) -> tuple[int, ...]:
        sizes = self.hidden_layer_sizes
        if sizes is None:
            return ()
        if isinstance(sizes, numbers.Integral):
            return (int(sizes),)
        return tuple(int(s) for s in sizes)

    def _class_weight_vector(self, y_encoded: np.ndarray) -> np.ndarray | None:
        """``(C,)`` class weights in the order of ``classes_`` (None when unweighted)."""
        cw = self.class_weight
        if cw is None:
            return None
        n_classes = len(self.classes_)
        counts = np.bincount(y_encoded, minlength=n_classes).astype(np.float64)
        if isinstance(cw, dict):
            weights = np.ones(n_classes)
            known = {label: i for i, label in enumerate(self.classes_.tolist())}
            for label, weight in cw.items():
                if label not in known:
                    raise ValueError(
                        f"`class_weight` has a weight for label {label!r}, which is not among the classes "
                        f"{self.classes_.tolist()}"
                    )
                weights[known[label]] = v.check_non_negative(f"class_weight[{label!r}]", weight)
            return weights
        if cw == "balanced":
            return counts.sum() / (n_classes * counts)
        import softmaxkit

        class_weights = getattr(softmaxkit, "class_weights", None)
        if class_weights is None:
            raise ValueError(
                "`class_weight='effective_number'` needs softmaxkit.class_weights, which this installation lacks"
            )
        weights = class_weights(torch.as_tensor(counts), method="effective_number")
        return np.asarray(torch.as_tensor(weights, dtype=torch.float64).numpy(), dtype=np.float64)

    # ------------------------------------------------------------------ model
    def _layer_shapes(self, n_features: int, n_classes: int) -> list[tuple[int, int]]:
        widths = [n_features, *self._hidden_sizes(), n_classes]
        return [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]

    def _unflatten(self, theta: torch.Tensor, shapes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights, biases, offset = [], [], 0
        last = len(shapes) - 1
        for index, (out_features, in_features) in enumerate(shapes):
            size = out_features * in_features
            weights.append(theta[offset : offset + size].view(out_features, in_features))
            offset += size
            if index < last or self.fit_intercept:
                biases.append(theta[offset : offset + out_features])
                offset += out_features
            else:
                biases.append(None)
        return weights, biases

    def _forward(self, X: torch.Tensor, weights, biases) -> torch.Tensor:
        hidden = X
        act = torch.relu if self.activation == "relu" else torch.tanh
        for index, (weight, bias) in enumerate(zip(weights, biases)):
            hidden = hidden @ weight.T
            if bias is not None:
                hidden = hidden + bias
            if index < len(weights) - 1:
                hidden = act(hidden)
        return hidden

    def _data_term(self, logits, target, sample_weight, class_weight) -> torch.Tensor:
        """``Σ s_i ℓ_i / Σ s_i w_{y_i}``: the loss's own weighted mean, with sample weights."""
        function = _loss_function(self.loss)
        kwargs = {"reduction": "none"}
        if self.label_smoothing > 0:
            kwargs["label_smoothing"] = self.label_smoothing
        if self.loss == "focal":
            kwargs["gamma"] = self.gamma
        elif self.loss == "poly1":
            kwargs["epsilon"] = self.epsilon
        # class_weight reweights the rows of each class (scikit-learn's meaning); the sigmoid loss's own
        # `weight` weights each class's binary term inside every row instead, so it gets w_y outside
        weight_inside = class_weight is not None and _accepts(function, "weight") and self.loss != "sigmoid"
        if weight_inside:
            kwargs["weight"] = class_weight
        rows = function(logits, target, **kwargs)
        w_y = class_weight[target] if class_weight is not None else torch.ones_like(sample_weight)
        if class_weight is not None and not weight_inside:
            rows = rows * w_y
        return safe_divide((sample_weight * rows).sum(), (sample_weight * w_y).sum())

    def _objective(self, theta, shapes, X, target, sample_weight, class_weight) -> torch.Tensor:
        weights, biases = self._unflatten(theta, shapes)
        logits = self._forward(X, weights, biases)
        objective = self._data_term(logits, target, sample_weight, class_weight)
        if self.alpha > 0:
            objective = objective + 0.5 * self.alpha * sum((w * w).sum() for w in weights)
        return objective

    def _initial_theta(self, shapes, rng: np.random.RandomState) -> np.ndarray:
        parts = []
        last = len(shapes) - 1
        for index, (out_features, in_features) in enumerate(shapes):
            if last == 0:
                parts.append(np.zeros(out_features * in_features))  # convex: start at 0, as scikit-learn
            else:  # Glorot-uniform, as scikit-learn's MLP
                bound = np.sqrt(6.0 / (in_features + out_features))
                parts.append(rng.uniform(-bound, bound, out_features * in_features))
            if index < last or self.fit_intercept:
                parts.append(np.zeros(out_features))
        return np.concatenate(parts)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, sample_weight=None):
        """Fit the model to ``X`` ``(n_samples, n_features)`` and labels ``y`` ``(n_samples,)``.

        Args:
            X: array-like of real features.
            y: class labels (any hashable type scikit-learn accepts).
            sample_weight: ``(n_samples,)`` non-negative weights, or None.

        Returns:
            self
        """
        self._validate_params_values()
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=False)
        check_classification_targets(y)
        encoder = LabelEncoder()
        y_encoded = encoder.fit_transform(y)
        classes = encoder.classes_
        if len(classes) < 2:
            raise ValueError(
                f"SoftmaxRegression needs samples of at least 2 classes in `y`, but the data contains only "
                f"one class: {classes[0]!r}"
            )
        sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
        if np.any(sample_weight < 0):
            raise ValueError("`sample_weight` must be non-negative, but holds negative entries")
        previous = (
            (self.classes_, self._theta) if self.warm_start and hasattr(self, "_theta") else None
        )
        self.classes_ = classes
        class_weight = self._class_weight_vector(y_encoded)
        shapes = self._layer_shapes(X.shape[1], len(classes))
        rng = np.random.RandomState(self.random_state) if not isinstance(
            self.random_state, np.random.RandomState
        ) else self.random_state
        theta0 = self._initial_theta(shapes, rng)
        if previous is not None and np.array_equal(previous[0], classes) and previous[1].shape == theta0.shape:
            theta0 = previous[1].copy()

        Xt = torch.from_numpy(np.array(X, dtype=np.float64, order="C"))  # a private, writable copy
        yt = torch.from_numpy(y_encoded.astype(np.int64))
        st = torch.from_numpy(sample_weight)
        cwt = None if class_weight is None else torch.from_numpy(class_weight)
        with _small_problem_threads(X.size * max(1, len(theta0) // max(1, X.shape[1]))):
            if self.solver == "lbfgs":
                theta = self._fit_lbfgs(theta0, shapes, Xt, yt, st, cwt)
            else:
                theta = self._fit_adamw(theta0, shapes, Xt, yt, st, cwt, y_encoded, rng)
        self._set_parameters(theta, shapes)
        return self

    def _fit_lbfgs(self, theta0, shapes, X, target, sample_weight, class_weight) -> np.ndarray:
        from scipy.optimize import minimize

        def value_and_grad(flat: np.ndarray):
            theta = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
            objective = self._objective(theta, shapes, X, target, sample_weight, class_weight)
            (grad,) = torch.autograd.grad(objective, theta)
            return float(objective.detach()), grad.numpy()

        curve: list[float] = []
        on_iteration = getattr(self, "_on_iteration", None)  # progress hook of the command line

        def record(intermediate_result):
            curve.append(float(intermediate_result.fun))
            if on_iteration is not None:
                on_iteration(len(curve), self.max_iter)

        result = minimize(
            value_and_grad,
            theta0,
            method="L-BFGS-B",
            jac=True,
            callback=record,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol, "ftol": 64 * np.finfo(float).eps},
        )
        gradient = float(np.max(np.abs(result.jac))) if np.size(result.jac) else 0.0
        # status 0: the gradient is below `tol`, or the objective stopped falling at machine precision.
        self.converged_ = result.status == 0 or gradient <= self.tol
        self.stop_reason_ = (
            "converged" if self.converged_
            else f"stopped after {int(result.nit)} iterations with max |gradient| {gradient:.2g} > tol={self.tol:g} "
                 f"({' '.join(str(result.message).split()).lower()})"
        )
        if result.status == 1 and not self.converged_:
            warnings.warn(
                f"L-BFGS did not converge in max_iter={self.max_iter} iterations (max |gradient| {gradient:.2g}); "
                "increase `max_iter` or scale the features",
                ConvergenceWarning,
                stacklevel=3,
            )
        elif not self.converged_:
            warnings.warn(
                f"L-BFGS {self.stop_reason_}: the line search found no lower objective, so the result may be "
                "far from the optimum; scale the features, or change `alpha`",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.n_iter_ = max(int(result.nit), 1)
        self.loss_curve_ = curve if curve else [float(result.fun)]
        return np.asarray(result.x, dtype=np.float64)

    def _fit_adamw(self, theta0, shapes, X, target, sample_weight, class_weight, y_encoded, rng) -> np.ndarray:
        n_samples = X.shape[0]
        train_index = np.arange(n_samples)
        validation_index = None
        if self.early_stopping:
            from sklearn.model_selection import train_test_split

            counts = np.bincount(y_encoded)
            stratify = y_encoded if counts[counts > 0].min() >= 2 else None
            n_validation = max(1, round(self.validation_fraction * n_samples))
            if n_samples - n_validation < 1:
                raise ValueError(
                    f"`early_stopping` holds out validation_fraction={self.validation_fraction} of "
                    f"{n_samples} samples, leaving none to train on"
                )
            try:
                train_index, validation_index = train_test_split(
                    train_index, test_size=n_validation, stratify=stratify, random_state=rng
                )
            except ValueError:  # too few samples per class to stratify
                train_index, validation_index = train_test_split(
                    train_index, test_size=n_validation, random_state=rng
                )
        generator = torch.Generator().manual_seed(int(rng.randint(0, 2**31 - 1)))
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.AdamW([theta], lr=self.learning_rate, weight_decay=0.0)
        train = torch.from_numpy(train_index)
        batch_size = min(self.batch_size, len(train_index))
        best_score, best_theta, stall = np.inf, theta.detach().clone(), 0
        self.loss_curve_, self.validation_scores_ = [], []
        converged = False
        epoch = 0
        for epoch in range(1, self.max_iter + 1):
            order = train[torch.randperm(len(train), generator=generator)]
            total, weight_total = 0.0, 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                objective = self._objective(
                    theta, shapes, X[batch], target[batch], sample_weight[batch], class_weight
                )
                objective.backward()
                optimizer.step()
                total += float(objective.detach()) * len(batch)
                weight_total += len(batch)
            self.loss_curve_.append(total / weight_total)
            if getattr(self, "_on_iteration", None) is not None:  # progress hook of the command line
                self._on_iteration(epoch, self.max_iter)
            if validation_index is not None:
                with torch.no_grad():
                    index = torch.from_numpy(validation_index)
                    weights, biases = self._unflatten(theta, shapes)
                    logits = self._forward(X[index], weights, biases)
                    score = float(self._data_term(logits, target[index], sample_weight[index], class_weight))
                self.validation_scores_.append(score)
            else:
                score = self.loss_curve_[-1]
            if score < best_score - self.tol:
                best_score, best_theta, stall = score, theta.detach().clone(), 0
            else:
                stall += 1
            if stall >= self.n_iter_no_change:
                converged = True
                break
        self.converged_ = converged
        self.stop_reason_ = "converged" if converged else f"ran max_iter={self.max_iter} epochs without stalling"
        if not converged:
            warnings.warn(
                f"AdamW ran max_iter={self.max_iter} epochs without its loss stalling; increase `max_iter`",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.n_iter_ = epoch
        final = best_theta if self.early_stopping else theta.detach()
        return final.numpy().copy()

    def _set_parameters(self, theta: np.ndarray, shapes) -> None:
        self._theta = theta
        weights, biases = self._unflatten(torch.from_numpy(theta), shapes)
        self.coef_ = weights[-1].numpy().copy()
        self.intercept_ = (
            biases[-1].numpy().copy() if biases[-1] is not None else np.zeros(shapes[-1][0])
        )
        self.hidden_coefs_ = [w.numpy().copy() for w in weights[:-1]]
        self.hidden_intercepts_ = [b.numpy().copy() for b in biases[:-1]]

    # ------------------------------------------------------------------ predict
    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        with torch.no_grad(), _small_problem_threads(X.size * self.coef_.shape[0]):
            weights = [torch.from_numpy(w) for w in (*self.hidden_coefs_, self.coef_)]
            biases = [torch.from_numpy(b) for b in (*self.hidden_intercepts_, self.intercept_)]
            return self._forward(torch.from_numpy(np.array(X, dtype=np.float64, order="C")), weights, biases).numpy()

    def decision_function(self, X) -> np.ndarray:
        """Logits ``(n_samples, C)``; for two classes the margin ``z_1 − z_0`` ``(n_samples,)``, as scikit-learn."""
        logits = self._logits(X)
        if len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, C)``: ``softmax(z)``, or ``sparsemax(z)`` for ``loss="sparsemax"``."""
        logits = torch.from_numpy(self._logits(X))
        if self.loss == "sparsemax":
            import softmaxkit

            probs = softmaxkit.sparsemax(logits, dim=-1)
        elif self.loss == "sigmoid":  # one-vs-rest: each σ(z_c) on its own, renormalised (as sklearn's OvR)
            probs = torch.sigmoid(logits)
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        else:
            probs = torch.softmax(logits, dim=-1)
        return probs.numpy()

    def predict_log_proba(self, X) -> np.ndarray:
        """``log predict_proba(X)``; ``-inf`` where sparsemax gives probability 0."""
        if self.loss in ("sparsemax", "sigmoid"):
            with np.errstate(divide="ignore"):
                return np.log(self.predict_proba(X))
        logits = torch.from_numpy(self._logits(X))
        return torch.log_softmax(logits, dim=-1).numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable class label for each row ``(n_samples,)``."""
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags
