"""Datasets for the estimator and the command line: scikit-learn's bundled sets, user files, long tails.

* :func:`load_dataset` -- ``"digits"``, ``"iris"``, ``"wine"``, ``"breast_cancer"`` (shipped with
  scikit-learn, no download) or a path to a CSV, NPZ or Parquet file with a label column.
* :func:`make_long_tailed` -- subsample a balanced dataset into the imbalanced versions used to compare
  losses: an exponential long tail (Cui et al. 2019) or a two-level step profile (e.g. 98:2).

Every problem with a file raises :class:`DatasetError` (a ``ValueError``) with a one-line message that
names the file and says what is wrong and what is expected.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: the datasets bundled with scikit-learn that :func:`load_dataset` accepts by name.
NAMED = ("digits", "iris", "wine", "breast_cancer")
#: file suffixes :func:`load_dataset` reads.
SUFFIXES = (".csv", ".npz", ".parquet")
PROFILES = ("exponential", "step")


class DatasetError(ValueError):
    """A dataset name or file that cannot be used (missing, empty, malformed, no label column, ...)."""


@dataclass
class Dataset:
    """Features, labels and names of one dataset.

    Attributes:
        X: ``(n_samples, n_features)`` float64 features.
        y: ``(n_samples,)`` labels (integers, or strings as read from a file).
        feature_names: one name per column of ``X``.
        target_names: a display name per class, in the order of ``np.unique(y)``.
        name: the dataset's name or file name.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    target_names: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def n_classes(self) -> int:
        return len(np.unique(self.y))


def load_dataset(source: str | os.PathLike, *, label_column: str = "label") -> Dataset:
    """Load a named scikit-learn dataset or a user file.

    Args:
        source: one of :data:`NAMED`, or a path to a ``.csv`` (header row, one column named
            ``label_column``, all other columns numeric), ``.npz`` (arrays ``X`` and ``y``, or one 1-d
            array per column including ``label_column``) or ``.parquet`` file (needs ``pyarrow``, the
            ``softmaxkit[parquet]`` extra).
        label_column: name of the label column in a file.

    Returns:
        A :class:`Dataset`.

    Raises:
        DatasetError: unknown name, missing or empty file, unsupported suffix, no label column, a
            non-numeric feature value, fewer than 2 rows or fewer than 2 classes.

    Example:
        >>> data = load_dataset("iris")
        >>> data.X.shape, data.n_classes
        ((150, 4), 3)
    """
    text = os.fspath(source)
    if text in NAMED:
        return _load_named(text)
    path = Path(text)
    if not path.suffix and not path.exists():
        raise DatasetError(
            f"unknown dataset {text!r}: expected one of {', '.join(NAMED)} or a path to a "
            f"{'/'.join(s[1:] for s in SUFFIXES)} file"
        )
    if not path.exists():
        raise DatasetError(f"file not found: {text}")
    if not path.is_file():
        raise DatasetError(f"{text} is not a file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{text} is empty")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns = _read_csv(path)
    elif suffix == ".npz":
        columns = _read_npz(path, label_column)
    elif suffix == ".parquet":
        columns = _read_parquet(path)
    else:
        raise DatasetError(f"{text}: unsupported file type {path.suffix!r}; expected .csv, .npz or .parquet")
    if "__X__" in columns:  # NPZ with X and y arrays
        X, y = columns["__X__"], columns["__y__"]
        feature_names = [f"x{i}" for i in range(X.shape[1])]
    else:
        if label_column not in columns:
            raise DatasetError(
                f"{text} has no label column {label_column!r}; its columns are "
                f"{', '.join(map(repr, columns)) or 'none'} (choose one with --label-column)"
            )
        y = np.asarray(columns.pop(label_column))
        feature_names = list(columns)
        if not feature_names:
            raise DatasetError(f"{text} has a label column but no feature columns")
        X = np.column_stack([_numeric(text, name, values) for name, values in columns.items()])
    y = _clean_labels(text, y)
    _check_shape(text, X, y)
    return Dataset(X=X, y=y, feature_names=feature_names, target_names=[str(c) for c in np.unique(y)],
                   name=path.name)


def _load_named(name: str) -> Dataset:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    target_names = [str(t) for t in getattr(bunch, "target_names", np.unique(y))]
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [f"x{i}" for i in range(X.shape[1])])]
    return Dataset(X=X, y=y, feature_names=feature_names, target_names=target_names, name=name)


def _read_csv(path: Path) -> dict[str, list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a UTF-8 text CSV file") from None
    except csv.Error as error:
        raise DatasetError(f"{path} is not a valid CSV file: {error}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"{path} is empty")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        raise DatasetError(f"{path}: the header row repeats a column name: {', '.join(header)}")
    body = rows[1:]
    if not body:
        raise DatasetError(f"{path} has a header row but no data rows")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DatasetError(
                f"{path}, line {line}: expected {len(header)} comma-separated values (as the header), "
                f"found {len(row)}"
            )
    return {name: [row[i].strip() for row in body] for i, name in enumerate(header)}


def _read_npz(path: Path, label_column: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as error:
        raise DatasetError(f"{path} is not a readable NPZ archive (object arrays are refused): {error}") from None
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path} is not a readable NPZ archive: {error}") from None
    except Exception as error:  # zipfile.BadZipFile and friends
        raise DatasetError(f"{path} is not a readable NPZ archive: {error}") from None
    if not arrays:
        raise DatasetError(f"{path} holds no arrays")
    if "X" in arrays and "y" in arrays:
        X = np.asarray(arrays["X"])
        if X.ndim != 2:
            raise DatasetError(f"{path}: array 'X' must be 2-d (n_samples, n_features), but has shape {X.shape}")
        if not np.issubdtype(X.dtype, np.number):
            raise DatasetError(f"{path}: array 'X' must be numeric, but has dtype {X.dtype}")
        return {"__X__": X.astype(np.float64), "__y__": np.asarray(arrays["y"])}
    for key, value in arrays.items():
        if value.ndim != 1:
            raise DatasetError(
                f"{path}: expected arrays 'X' and 'y', or one 1-d array per column; array {key!r} has "
                f"shape {value.shape}"
            )
    if label_column not in arrays:
        raise DatasetError(
            f"{path} has neither arrays 'X' and 'y' nor a label column {label_column!r}; it holds "
            f"{', '.join(map(repr, arrays))}"
        )
    return dict(arrays)


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(
            f"{path}: reading Parquet needs pyarrow; install it with `pip install 'softmaxkit[parquet]'`"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DatasetError(f"{path} is not a readable Parquet file: {error}") from None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _numeric(source: str, name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.number) or array.dtype == bool:
        out = array.astype(np.float64)
    else:
        out = np.empty(len(array))
        for row, value in enumerate(array):
            try:
                out[row] = float(value)
            except (TypeError, ValueError):
                raise DatasetError(
                    f"{source}: column {name!r} must be numeric, but row {row + 1} holds {str(value)!r}"
                ) from None
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{source}: column {name!r} holds a missing or non-finite value at row {row + 1}")
    return out


def _clean_labels(source: str, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DatasetError(f"{source}: labels must be 1-d, but have shape {y.shape}")
    if y.dtype.kind in "US" or y.dtype == object:
        labels = np.array([str(label).strip() for label in y])
        if np.any(labels == ""):
            row = int(np.flatnonzero(labels == "")[0])
            raise DatasetError(f"{source}: the label is missing at row {row + 1}")
        try:  # integer-looking labels become integers ("3" -> 3)
            as_float = labels.astype(np.float64)
            if np.all(as_float == np.round(as_float)):
                return as_float.astype(np.int64)
        except ValueError:
            pass
        return labels
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise DatasetError(f"{source}: the labels hold a missing or non-finite value")
        if np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise DatasetError(f"{source}: labels must be class labels, but hold non-integer numbers such as {y[y != np.round(y)][0]}")
    return y


def _check_shape(source: str, X: np.ndarray, y: np.ndarray) -> None:
    if X.shape[0] != y.shape[0]:
        raise DatasetError(f"{source}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if X.shape[0] < 2:
        raise DatasetError(f"{source} has {X.shape[0]} data row(s); at least 2 are needed")
    if X.shape[1] == 0:
        raise DatasetError(f"{source} has no feature columns")
    if len(np.unique(y)) < 2:
        raise DatasetError(f"{source}: every row has the label {y[0].item()!r}; at least 2 classes are needed")


def long_tail_counts(
    class_counts, imbalance_ratio: float, profile: str = "exponential"
) -> np.ndarray:
    r"""How many samples of each class a long-tailed subset keeps.

    Classes are ranked as given (class 0 the head). With ``n_max = min_c N_c`` (so every target is
    available), ``ρ`` the imbalance ratio and ``C`` classes:

    * ``"exponential"``: ``n_c = round(n_max · ρ^{−c/(C−1)})`` (Cui et al. 2019), from ``n_max`` down to
      ``n_max / ρ``;
    * ``"step"``: the first ``⌈C/2⌉`` classes keep ``n_max``, the rest ``round(n_max / ρ)`` (Buda et al. 2018);
      for two classes with ``ρ = 49`` this is the 98:2 split.

    Every class keeps at least one sample.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    n_classes = len(counts)
    n_max = int(counts.min())
    if profile == "exponential":
        exponents = np.arange(n_classes) / max(n_classes - 1, 1)
        target = n_max * imbalance_ratio ** (-exponents)
    else:
        head = math.ceil(n_classes / 2)
        target = np.where(np.arange(n_classes) < head, n_max, n_max / imbalance_ratio)
    return np.maximum(np.round(target).astype(np.int64), 1)


def make_long_tailed(X, y, imbalance_ratio: float, random_state=None, *, profile: str = "exponential"):
    r"""Subsample ``(X, y)`` so the class sizes follow a long tail with the given imbalance ratio.

    The class sizes are :func:`long_tail_counts` of the per-class counts (classes in sorted label order,
    the first one the head); within each class the kept rows are drawn uniformly without replacement.

    Args:
        X: ``(n_samples, n_features)`` features.
        y: ``(n_samples,)`` labels, at least 2 classes.
        imbalance_ratio: ``ρ = n_head / n_tail >= 1``; 1 gives a balanced subset.
        random_state: seed or ``numpy.random.Generator`` for the subsampling.
        profile: ``"exponential"`` (long tail) or ``"step"`` (two levels, e.g. 98:2 for ``ρ = 49``).

    Returns:
        ``(X_subset, y_subset)``, rows in their original order.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> X, y = load_digits(return_X_y=True)
        >>> X_lt, y_lt = make_long_tailed(X, y, imbalance_ratio=50, random_state=0)
        >>> np.bincount(y_lt).tolist()
        [174, 113, 73, 47, 31, 20, 13, 8, 5, 3]
    """
    from ._validation import check_choice, check_number

    check_choice("profile", profile, PROFILES)
    ratio = check_number("imbalance_ratio", imbalance_ratio)
    if not (ratio >= 1 and math.isfinite(ratio)):
        raise ValueError(f"`imbalance_ratio` must be a finite number >= 1, but got {imbalance_ratio}")
    X = np.asarray(X)
    y = np.asarray(y)
    if y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"`X` and `y` must have the same number of rows and `y` must be 1-d, but got X of shape "
            f"{X.shape} and y of shape {y.shape}"
        )
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"`y` must hold at least 2 classes, but holds {len(classes)}")
    rng = np.random.default_rng(random_state)
    keep_counts = long_tail_counts(np.bincount(encoded), ratio, profile)
    keep = np.concatenate([
        rng.choice(np.flatnonzero(encoded == c), size=int(keep_counts[c]), replace=False)
        for c in range(len(classes))
    ])
    keep.sort()
    return X[keep], y[keep]
