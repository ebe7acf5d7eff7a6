"""A saved model as one object that predicts from raw features: :func:`softmaxkit.load_model`.

A model folder (written by ``softmaxkit train``) holds ``model.json`` and ``model.npz`` (the estimator,
its standardisation and the fitted temperature; see :mod:`softmaxkit.cli._io`) and, when the training
table had categorical or missing values, ``preprocess.skops``: the fitted scikit-learn
``ColumnTransformer`` (median / most-frequent imputation, one-hot encoding) saved with skops, which
loads only an explicit list of types and never unpickles.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._io import PREPROCESSOR_FILE, UserError, load_model, save_model

#: the only type a saved preprocessor may hold beyond scikit-learn's own (OneHotEncoder's dtype).
_TRUSTED = ["numpy.dtype"]


def save_preprocessor(preprocessor, directory: str | os.PathLike) -> Path:
    import skops.io

    from ._io import write_bytes_atomic

    return write_bytes_atomic(Path(directory) / PREPROCESSOR_FILE, skops.io.dumps(preprocessor))


def _load_preprocessor(path: Path):
    import skops.io

    try:
        return skops.io.load(path, trusted=_TRUSTED)
    except Exception as error:  # skops refuses unknown types with UntrustedTypesFoundException
        raise UserError(f"{path} is not a loadable preprocessor: {' '.join(str(error).split())}") from None


class SavedModel:
    r"""A trained ``SoftmaxRegression`` with everything needed to predict from raw features.

    .. math:: p(x) = \operatorname{softmax}\big(z(\tfrac{\phi(x) - \mu}{\sigma}) / T\big)

    where ``φ`` is the saved preprocessing (identity for numeric data without missing values), ``μ, σ``
    the training standardisation, ``z`` the estimator's logits and ``T`` the temperature fitted on the
    validation rows (1 when none was fitted).

    Attributes:
        estimator: the fitted :class:`softmaxkit.SoftmaxRegression` (it expects standardised features).
        classes_: the class labels as in the training data (``predict`` returns these).
        input_features: the raw feature columns ``X`` must hold, in order.
        preprocessor: the fitted ``ColumnTransformer``, or None.
        mean, scale: the standardisation (None when the model was saved without one).
        temperature: the fitted temperature ``T``.
        meta: the contents of ``model.json``.
    """

    def __init__(self, estimator, meta: dict, mean, scale, preprocessor=None):
        self.estimator, self.meta, self.mean, self.scale = estimator, meta, mean, scale
        self.preprocessor = preprocessor
        extra = meta.get("extra", {})
        self.temperature = float(extra.get("temperature", 1.0))
        self.input_features = list(meta.get("input_features") or meta["feature_names"])
        self.categorical = list(meta.get("categorical", []))
        labels = extra.get("labels")
        self.classes_ = np.asarray(labels) if labels and len(labels) == len(estimator.classes_) else estimator.classes_
        self.class_names = list(extra.get("class_names") or [str(c) for c in self.classes_])

    def __repr__(self) -> str:
        steps = "preprocessing + " if self.preprocessor is not None else ""
        return (f"SavedModel({len(self.classes_)} classes, {len(self.input_features)} input features, "
                f"{steps}standardisation + T={self.temperature:.4g})")

    # ---------------------------------------------------------------- input
    def _frame(self, X):
        import pandas as pd

        if isinstance(X, pd.DataFrame):
            columns = [str(c) for c in X.columns]
            missing = [name for name in self.input_features if name not in columns]
            if missing:
                raise ValueError(
                    f"`X` lacks the model's feature column(s) {', '.join(map(repr, missing[:5]))}"
                    f"{' ...' if len(missing) > 5 else ''}; it needs {', '.join(map(repr, self.input_features))}"
                )
            frame = X.set_axis(columns, axis=1)[self.input_features]
        else:
            array = np.asarray(X, dtype=object if self.categorical else None)
            if array.ndim == 1:
                array = array[None, :]
            if array.ndim != 2 or array.shape[1] != len(self.input_features):
                raise ValueError(
                    f"`X` must have shape (n, {len(self.input_features)}) (columns "
                    f"{', '.join(self.input_features[:6])}{', ...' if len(self.input_features) > 6 else ''}), "
                    f"but has shape {array.shape}"
                )
            frame = pd.DataFrame(array, columns=self.input_features)
        return self._typed(frame)

    def _typed(self, frame):
        """Numeric columns as float64 (NaN when missing), categorical ones as text (NaN when missing)."""
        import pandas as pd

        from ..datasets import MISSING

        typed = {}
        for name in self.input_features:
            column = frame[name]
            text = column.astype(str).str.strip() if column.dtype == object else None
            if name in self.categorical:
                if text is None:
                    text = column.astype(str)
                missing = text.isin(MISSING) | column.isna().to_numpy()
                typed[name] = text.astype(object).where(~missing, np.nan)
                continue
            if text is not None:
                missing = text.isin(MISSING) | column.isna().to_numpy()
                values = pd.to_numeric(text.where(~missing), errors="coerce")
                bad = values.isna() & ~missing
                if bad.any():
                    row = int(np.flatnonzero(bad.to_numpy())[0])
                    raise ValueError(f"column {name!r} must be numeric, but row {row + 1} holds {text.iloc[row]!r}")
            else:
                values = pd.to_numeric(column, errors="coerce")
            values = values.astype(np.float64)
            if self.preprocessor is None or np.isinf(values.to_numpy()).any():
                bad = ~np.isfinite(values.to_numpy())
                if bad.any():
                    row = int(np.flatnonzero(bad)[0])
                    raise ValueError(
                        f"column {name!r} holds a missing or non-finite value at row {row + 1}"
                        + ("; this model was trained without missing values" if self.preprocessor is None else "")
                    )
            typed[name] = values
        return pd.DataFrame(typed)

    def transform(self, X) -> np.ndarray:
        """The standardised features the estimator takes: preprocessing, then ``(x − μ) / σ``."""
        frame = self._frame(X)
        features = (np.asarray(self.preprocessor.transform(frame), dtype=np.float64)
                    if self.preprocessor is not None else frame.to_numpy(np.float64))
        if self.mean is not None:
            features = (features - self.mean) / self.scale
        return features

    # ---------------------------------------------------------------- prediction
    def decision_function(self, X) -> np.ndarray:
        """The logits ``z / T`` ``(n, C)``."""
        return self.estimator._logits(self.transform(X)) / self.temperature

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated class probabilities ``softmax(z / T)`` ``(n, C)``, columns in the order of ``classes_``."""
        logits = self.decision_function(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """The most probable class label of each row."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def save_trained(result, experiment, directory: Path, *, dataset: str) -> Path:
    """Write a trained model of ``experiment`` (its preprocessing, standardisation and temperature)."""
    extra = {"dataset": dataset, "class_names": experiment.class_names, "labels": experiment.labels,
             "temperature": result.temperature,
             "temperature_at_bound": bool(getattr(result, "temperature_at_bound", False)),
             "converged": bool(getattr(result.model, "converged_", True))}
    directory = save_model(result.model, directory, feature_names=experiment.feature_names,
                           mean=experiment.mean, scale=experiment.scale, extra=extra,
                           input_features=experiment.input_features, categorical=experiment.categorical,
                           preprocessing=experiment.preprocessor is not None)
    if experiment.preprocessor is not None:
        save_preprocessor(experiment.preprocessor, directory)
    return directory


def load_saved_model(path: str | os.PathLike) -> SavedModel:
    """Load a model folder written by ``softmaxkit train`` (see :func:`softmaxkit.load_model`).

    Raises:
        ValueError: the folder is missing, holds another format or inconsistent arrays.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a saved softmaxkit model: no such folder" if not directory.exists()
                        else f"{directory} is not a saved softmaxkit model folder (model.json + model.npz)")
    estimator, meta, mean, scale = load_model(directory)
    preprocessor = None
    if meta.get("preprocessing"):
        file = directory / PREPROCESSOR_FILE
        if not file.exists():
            raise UserError(f"{directory} is not a complete softmaxkit model: {PREPROCESSOR_FILE} is missing")
        preprocessor = _load_preprocessor(file)
    return SavedModel(estimator, meta, mean, scale, preprocessor)
