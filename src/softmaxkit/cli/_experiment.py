"""The experiment behind ``demo``, ``compare`` and ``train``: split, fit, calibrate, evaluate.

1. Split the data (stratified): a training pool, a validation set and a test set.
2. Optionally make the training pool long-tailed (:func:`softmaxkit.datasets.make_long_tailed`); the
   validation and test sets stay as they are, so rare classes are measured fairly.
3. Impute missing values and one-hot encode categorical columns
   (:func:`softmaxkit.datasets.build_preprocessor`), then standardise the features, both fitted on the
   training rows only.
4. Fit one :class:`~softmaxkit.SoftmaxRegression` per loss configuration.
5. Fit temperature scaling (:class:`softmaxkit.calibration.TemperatureScaling`) on the validation logits.
6. Measure accuracy, macro-F1, balanced accuracy, NLL and ECE on the test set, before and after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..datasets import Dataset, make_long_tailed
from ._io import UserError

#: loss presets by name; aliases map onto them.
PRESETS: dict[str, dict] = {
    "cross_entropy": {"label": "cross-entropy", "params": {"loss": "cross_entropy"}},
    "label_smoothing": {"label": "label smoothing ε=0.1", "params": {"loss": "cross_entropy", "label_smoothing": 0.1}},
    "class_balanced": {"label": "class-balanced (Cui)",
                       "params": {"loss": "cross_entropy", "class_weight": "effective_number"}},
    "focal": {"label": "focal γ=2", "params": {"loss": "focal", "gamma": 2.0}},
    "poly1": {"label": "Poly-1 ε=1", "params": {"loss": "poly1", "epsilon": 1.0}},
    "sparsemax": {"label": "sparsemax", "params": {"loss": "sparsemax"}},
}
ALIASES = {"ce": "cross_entropy", "ls": "label_smoothing", "smoothing": "label_smoothing",
           "cb": "class_balanced", "balanced": "class_balanced", "poly": "poly1", "poly-1": "poly1"}
# the losses softmax + cross-entropy is compared with (softmaxkit.functional.comparison)
PRESETS.update({
    "hinge": {"label": "hinge (Weston–Watkins)", "params": {"loss": "hinge"}},
    "crammer_singer": {"label": "hinge (Crammer–Singer)", "params": {"loss": "crammer_singer"}},
    "mse": {"label": "MSE on softmax probabilities", "params": {"loss": "mse"}},
    "mse_scores": {"label": "MSE on raw scores", "params": {"loss": "mse_scores"}},
    "sigmoid": {"label": "one-vs-rest sigmoid", "params": {"loss": "sigmoid"}},
})
ALIASES.update({"ww": "hinge", "weston_watkins": "hinge", "cs": "crammer_singer", "brier": "mse",
                "least_squares": "mse_scores", "mse_raw": "mse_scores", "ovr": "sigmoid", "bce": "sigmoid"})
DEMO_LOSSES = ("cross_entropy", "label_smoothing", "class_balanced", "focal", "poly1")
#: temperatures of the report's sweep.
SWEEP = np.geomspace(0.25, 8.0, 41)


def parse_losses(text: str, flag: str = "--losses") -> list[str]:
    """``"ce,focal"`` -> ``["cross_entropy", "focal"]``; a user error for unknown names (naming ``flag``)."""
    names = []
    for raw in text.split(","):
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        name = ALIASES.get(name, ALIASES.get(raw.strip().lower(), name))
        if name not in PRESETS:
            known = ", ".join([*PRESETS, *ALIASES])
            raise UserError(f"unknown loss {raw.strip()!r} for {flag}; choose from {known}")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"{flag} is empty; give a loss such as ce" + (", or a list such as ce,focal,poly1"
                                                                       if flag == "--losses" else ""))
    return names


@dataclass
class ModelResult:
    """One trained and evaluated model."""

    name: str
    label: str
    model: object
    metrics: dict
    calibrated_metrics: dict
    temperature: float
    test_proba: np.ndarray
    calibrated_proba: np.ndarray
    test_logits: np.ndarray
    fit_seconds: float
    sweep_nll: np.ndarray = field(default_factory=lambda: np.empty(0))
    sweep_ece: np.ndarray = field(default_factory=lambda: np.empty(0))
    converged: bool = True
    stop_reason: str = ""
    temperature_at_bound: bool = False


@dataclass
class Experiment:
    """Everything the report needs."""

    dataset: str
    class_names: list[str]
    train_counts: np.ndarray
    test_counts: np.ndarray
    n_features: int
    long_tail: float | None
    results: list[ModelResult]
    y_test: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    feature_names: list[str]
    settings: dict
    preprocessor: object = None
    input_features: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)  # the original class labels, in the order of the encoding


def _stratify_or_none(y):
    counts = np.unique(y, return_counts=True)[1]
    return y if counts.min() >= 2 else None


def split(data: Dataset, *, test_size: float, validation_size: float, seed: int):
    """Stratified train-pool / validation / test split (plain random when a class has a single row)."""
    from sklearn.model_selection import train_test_split

    X, y = data.X, data.y
    n = len(y)
    n_test = max(1, round(test_size * n))
    n_validation = max(1, round(validation_size * n))
    if n - n_test - n_validation < 2:
        raise UserError(
            f"{data.name} has {n} rows: too few to hold out {n_test} for testing and {n_validation} for "
            "calibration; use a larger dataset or smaller --test-size"
        )
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, y, test_size=n_test, stratify=_stratify_or_none(y), random_state=seed
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=n_validation, stratify=_stratify_or_none(y_rest), random_state=seed + 1
    )
    return X_train, y_train, X_val, y_val, X_test, y_test


def evaluate(proba: np.ndarray, y_encoded: np.ndarray, n_bins: int = 15) -> dict:
    """Test metrics of class probabilities ``(n, C)`` against encoded labels ``(n,)``."""
    from sklearn import metrics as skm

    from .. import metrics

    pred = proba.argmax(axis=1)
    labels = np.arange(proba.shape[1])
    return {
        "accuracy": float(np.mean(pred == y_encoded)),
        "macro_f1": float(skm.f1_score(y_encoded, pred, average="macro", labels=labels, zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_encoded, pred)),
        "nll": float(metrics.log_loss(proba, y_encoded)),
        "ece": float(metrics.expected_calibration_error(proba, y_encoded, n_bins=n_bins)),
        "per_class_f1": skm.f1_score(y_encoded, pred, average=None, labels=labels, zero_division=0),
        "confusion": skm.confusion_matrix(y_encoded, pred, labels=labels),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    from .. import reference

    return reference.softmax(logits, axis=-1)


def run(
    data: Dataset,
    losses: list[str],
    *,
    long_tail: float | None = None,
    profile: str = "exponential",
    alpha: float | None = 1e-3,
    test_size: float = 0.25,
    validation_size: float = 0.15,
    max_iter: int = 300,
    seed: int = 0,
    sweep: bool = True,
    overrides: dict | None = None,
    on_model_start: Callable[[str], None] | None = None,
    on_model_done: Callable[[str, ModelResult], None] | None = None,
    on_iteration: Callable[[int, int], None] | None = None,
) -> Experiment:
    """Run the comparison of ``losses`` on ``data``; see the module docstring for the steps.

    ``alpha=None`` chooses the L2 strength from the data: :func:`auto_alpha` of the training rows.
    """
    import torch

    from .. import calibration
    from ..estimator import SoftmaxRegression

    check_models(losses, alpha=1.0 if alpha is None else alpha, max_iter=max_iter, seed=seed, overrides=overrides)
    classes, y_all = np.unique(data.y, return_inverse=True)
    rows = np.arange(len(y_all), dtype=np.float64)[:, None]
    encoded = Dataset(X=rows, y=y_all, feature_names=["row"], name=data.name)
    i_train, y_train, i_val, y_val, i_test, y_test = split(
        encoded, test_size=test_size, validation_size=validation_size, seed=seed
    )
    i_train, i_val, i_test = (i[:, 0].astype(np.int64) for i in (i_train, i_val, i_test))
    preprocessor = None
    if data.needs_preprocessing:
        from ..datasets import build_preprocessor

        preprocessor = build_preprocessor(data.table, categorical=data.categorical)
        preprocessor.fit(data.table.iloc[i_train])
        features = np.asarray(preprocessor.transform(data.table), dtype=np.float64)
        feature_names = [str(n) for n in preprocessor.get_feature_names_out()]
    else:
        features, feature_names = data.X, list(data.feature_names)
    X_train, X_val, X_test = features[i_train], features[i_val], features[i_test]
    if alpha is None:
        alpha = auto_alpha(len(y_train))

    def params_of(name: str) -> dict:
        return model_params(name, alpha=alpha, max_iter=max_iter, seed=seed, overrides=overrides)

    if long_tail is not None:
        X_train, y_train = make_long_tailed(X_train, y_train, long_tail, random_state=seed, profile=profile)
    missing = np.setdiff1d(np.arange(len(classes)), y_train)
    if missing.size:
        raise UserError(
            f"class {_shown(classes[missing[0]])} has no training rows after the split; it needs more samples"
        )
    mean = X_train.mean(axis=0)
    scale = X_train.std(axis=0)
    scale[scale == 0] = 1.0
    standardise = lambda X: (X - mean) / scale  # noqa: E731

    names = list(classes.astype(str)) if not data.target_names or len(data.target_names) != len(classes) \
        else list(data.target_names)
    results = []
    torch_threads = torch.get_num_threads()
    for name in losses:
        preset = PRESETS[name]
        if on_model_start:
            on_model_start(preset["label"])
        model = SoftmaxRegression(**params_of(name))
        if on_iteration is not None:
            model._on_iteration = on_iteration
        start = time.perf_counter()
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():  # reported once, by the result's converged / stop_reason
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(standardise(X_train), y_train)
        model.__dict__.pop("_on_iteration", None)
        seconds = time.perf_counter() - start
        # The logits of the fitted model (for sparsemax models the report still calibrates softmax(z/T)).
        val_logits = _full_logits(model, standardise(X_val))
        test_logits = _full_logits(model, standardise(X_test))
        test_proba = model.predict_proba(standardise(X_test))
        with warnings.catch_warnings():  # reported by temperature_at_bound
            warnings.simplefilter("ignore", UserWarning)
            scaler = calibration.TemperatureScaling().fit(val_logits, y_val)
        temperature = float(scaler.temperature_)
        calibrated = np.asarray(scaler.predict_proba(test_logits), dtype=np.float64)
        result = ModelResult(
            name=name, label=preset["label"], model=model,
            metrics=evaluate(test_proba, y_test), calibrated_metrics=evaluate(calibrated, y_test),
            temperature=temperature, test_proba=test_proba, calibrated_proba=calibrated,
            test_logits=test_logits, fit_seconds=seconds,
            converged=bool(getattr(model, "converged_", True)), stop_reason=str(getattr(model, "stop_reason_", "")),
            temperature_at_bound=bool(getattr(scaler, "at_bound_", False)),
        )
        if sweep:
            from .. import metrics

            nll, ece = [], []
            for t in SWEEP:
                p = _softmax(test_logits / t)
                nll.append(metrics.log_loss(p, y_test))
                ece.append(metrics.expected_calibration_error(p, y_test, n_bins=15))
            result.sweep_nll, result.sweep_ece = np.asarray(nll, float), np.asarray(ece, float)
        results.append(result)
        if on_model_done:
            on_model_done(preset["label"], result)
    torch.set_num_threads(torch_threads)
    return Experiment(
        dataset=data.name, class_names=names,
        train_counts=np.bincount(y_train, minlength=len(classes)),
        test_counts=np.bincount(y_test, minlength=len(classes)),
        n_features=len(data.feature_names), long_tail=long_tail, results=results, y_test=y_test,
        mean=mean, scale=scale, feature_names=feature_names, preprocessor=preprocessor,
        input_features=list(data.feature_names), categorical=list(data.categorical),
        labels=[c.item() if isinstance(c, np.generic) else c for c in classes],
        settings={"alpha": alpha, "n_encoded_features": len(feature_names), "test_size": test_size, "validation_size": validation_size,
                  "max_iter": max_iter, "seed": seed, "profile": profile, "n_train": len(y_train),
                  "n_validation": len(y_val), "n_test": len(y_test)},
    )


def model_params(name: str, *, alpha: float, max_iter: int, seed: int, overrides: dict | None) -> dict:
    """The :class:`~softmaxkit.SoftmaxRegression` parameters of the preset ``name`` with the overrides."""
    return {"alpha": alpha, "max_iter": max_iter, "random_state": seed, **PRESETS[name]["params"],
            **(overrides or {})}


def check_models(losses, **settings) -> None:
    """Validate every model configuration before any work starts (a bad option fails at once).

    The estimator's messages name its parameters; the command line's name its flags (``--hidden``).
    """
    from ..estimator import SoftmaxRegression
    from ._app import cli_wording

    for name in losses:
        try:
            SoftmaxRegression(**model_params(name, **settings))._validate_params_values()
        except (TypeError, ValueError) as error:
            raise UserError(cli_wording(str(error))) from None


def auto_alpha(n_train: int) -> float:
    r"""The default L2 strength ``α = min(10⁻³, 1/n)`` for ``n`` training rows.

    ``1/n`` is scikit-learn's ``LogisticRegression(C=1)`` in this objective (the data term is a mean);
    the cap keeps small datasets at the demo's ``10⁻³``. A fixed ``α`` over-regularises large
    many-class problems: with 2000 classes and 40 000 rows, ``α = 10⁻³`` holds every weight near 0.
    """
    return min(1e-3, 1.0 / max(int(n_train), 1))


def _shown(label) -> str:
    """A class label for a message: ``'cat'`` or ``3``, never ``np.int64(3)``."""
    value = label.item() if isinstance(label, np.generic) else label
    return repr(value)


def _full_logits(model, X) -> np.ndarray:
    """``(n, C)`` logits even for two classes (``decision_function`` returns the margin there)."""
    return model._logits(X)
