"""Datasets for the estimator and the command line: scikit-learn's bundled sets, user tables, long tails.

* :func:`load_dataset` -- ``"digits"``, ``"iris"``, ``"wine"``, ``"breast_cancer"`` (shipped with
  scikit-learn, no download) or a path to a table: CSV / TSV / any delimited text (delimiter sniffed,
  optionally gzip / bz2 / xz / zip compressed), NPZ or Parquet, with a label column.
* :func:`build_preprocessor` -- scikit-learn's ``ColumnTransformer`` that imputes missing values and
  one-hot encodes categorical columns (fitted on training rows only; saved with a model).
* :func:`make_long_tailed` -- subsample a balanced dataset into the imbalanced versions used to compare
  losses: an exponential long tail (Cui et al. 2019) or a two-level step profile (e.g. 98:2).

Every problem with a file raises :class:`DatasetError` (a ``ValueError``) with a one-line message that
names the file and says what is wrong and what is expected.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: the datasets bundled with scikit-learn that :func:`load_dataset` accepts by name.
NAMED = ("digits", "iris", "wine", "breast_cancer")
#: delimited-text suffixes (each optionally followed by a compression suffix), and the binary formats.
TEXT_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".data", ".dat")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip", ".zst": "zstd"}
SUFFIXES = (*TEXT_SUFFIXES, ".npz", ".parquet")
PROFILES = ("exponential", "step")
#: cells read as a missing value (pandas' defaults, plus "?" as in the UCI repository's files).
MISSING = frozenset({"", "NA", "N/A", "n/a", "NaN", "nan", "NAN", "null", "NULL", "None", "none", "?", "#N/A",
                     "<NA>", "-nan", "-NaN", "1.#QNAN", "1.#IND", "-1.#QNAN", "-1.#IND"})
#: a text column with more distinct values than this fraction of its rows is an identifier, not a category.
IDENTIFIER_FRACTION = 0.5


class DatasetError(ValueError):
    """A dataset name or file that cannot be used (missing, empty, malformed, no label column, ...)."""


@dataclass
class Dataset:
    """Features, labels and names of one dataset.

    Attributes:
        X: ``(n_samples, n_features)`` float64 features; ``None`` when :attr:`table` holds categorical or
            missing values that need :func:`build_preprocessor` first.
        y: ``(n_samples,)`` labels (integers, or strings as read from a file).
        feature_names: one name per feature column (of ``X``, or of :attr:`table`).
        target_names: a display name per class, in the order of ``np.unique(y)``.
        name: the dataset's name or file name.
        table: the raw feature columns as a pandas DataFrame (numeric columns as float64 with NaN for a
            missing value, categorical columns as text with NaN), when the data came from a table.
        notes: one-line notes on what the reader decided (a dropped index column, the delimiter, ...).
    """

    X: np.ndarray | None
    y: np.ndarray
    feature_names: list[str]
    target_names: list[str] = field(default_factory=list)
    name: str = ""
    table: object = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return len(np.unique(self.y))

    @property
    def categorical(self) -> list[str]:
        """The categorical (text) feature columns."""
        if self.table is None:
            return []
        return [name for name in self.feature_names if self.table[name].dtype == object]

    @property
    def needs_preprocessing(self) -> bool:
        """Whether the features hold categorical or missing values (``X`` is then ``None``)."""
        return self.X is None


def load_dataset(
    source: str | os.PathLike,
    *,
    label_column: str = "label",
    delimiter: str | None = None,
    header: bool = True,
    features: list[str] | None = None,
    drop_columns: list[str] | None = None,
    preprocess: bool = True,
) -> Dataset:
    """Load a named scikit-learn dataset or a user file.

    A table's first column is dropped (with a note) when it has no name and holds distinct values: the
    row index that pandas' ``DataFrame.to_csv`` and R's ``write.csv`` write by default.

    Args:
        source: one of :data:`NAMED`, or a path to a delimited text file (``.csv``, ``.tsv``, ``.txt``,
            ..., optionally compressed: ``.csv.gz``, ``.tsv.bz2``, ``.csv.xz``, ``.csv.zip``), an
            ``.npz`` (arrays ``X`` and ``y``, or one 1-d array per column including ``label_column``) or a
            ``.parquet`` file (needs ``pyarrow``, the ``softmaxkit[parquet]`` extra).
        label_column: name of the label column; without a header, a 1-based column number or
            ``"last"`` (the default ``"label"`` then means the last column).
        delimiter: the field separator of a text file (default: sniffed from its first lines).
        header: whether a text file's first row names the columns.
        features: keep only these feature columns (in this order).
        drop_columns: drop these columns.
        preprocess: allow categorical (text) and missing feature values; they are then left in
            :attr:`Dataset.table` for :func:`build_preprocessor`. With ``False`` they are errors.

    Returns:
        A :class:`Dataset`.

    Raises:
        DatasetError: unknown name, missing or empty file, unsupported suffix, no label column, a
            malformed row, a non-numeric or missing value (with ``preprocess=False``), fewer than 2 rows
            or fewer than 2 classes.

    Example:
        >>> data = load_dataset("iris")
        >>> data.X.shape, data.n_classes
        ((150, 4), 3)
    """
    text = os.fspath(source)
    if text in NAMED:
        data = _load_named(text)
        if features or drop_columns:
            data = _select_named(data, features, drop_columns)
        return data
    path = Path(text)
    if not path.suffix and not path.exists():
        raise DatasetError(
            f"unknown dataset {text!r}: expected one of {', '.join(NAMED)} or a path to a "
            f"{'/'.join(s[1:] for s in SUFFIXES)} file"
        )
    path = _check_file(text)
    notes: list[str] = []
    frame = _read_frame(path, delimiter, header, notes, label_column)
    if isinstance(frame, tuple):  # NPZ with X and y arrays
        X, y = frame
        y = _clean_labels(text, y)
        _check_shape(text, X, y)
        names = [f"x{i}" for i in range(X.shape[1])]
        return Dataset(X=X, y=y, feature_names=names, target_names=[str(c) for c in np.unique(y)],
                       name=path.name)
    label = _label_name(text, frame, label_column, header, notes)
    frame = _drop_index_column(text, frame, label, notes)
    y = _clean_labels(text, frame.pop(label).to_numpy())
    frame = _choose_columns(text, frame, features, drop_columns)
    if frame.shape[1] == 0:
        raise DatasetError(f"{text} has a label column but no feature columns")
    table, X = _typed_features(text, frame, y, preprocess)
    _check_shape(text, np.empty((len(table), table.shape[1])), y)
    return Dataset(X=X, y=y, feature_names=[str(c) for c in table.columns],
                   target_names=[str(c) for c in np.unique(y)], name=path.name,
                   table=table, notes=notes)


def _check_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise DatasetError(f"file not found: {text}")
    if not path.is_file():
        raise DatasetError(f"{text} is not a file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{text} is empty")
    return path


def _read_frame(path: Path, delimiter, header: bool, notes: list[str], label_column: str | None):
    """The file's columns as a DataFrame (text files: every cell a string), or ``(X, y)`` for an NPZ."""
    text = str(path)
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    kind = (suffixes[-2] if len(suffixes) == 2 else "") if compression else (suffixes[-1] if suffixes else "")
    if kind == ".npz" and not compression:
        columns = _read_npz(path, label_column)
        if "__X__" in columns:
            return columns["__X__"], columns["__y__"]
        return _frame(columns)
    if kind == ".parquet" and not compression:
        return _frame(_read_parquet(path))
    if kind in TEXT_SUFFIXES or (compression and kind == ""):
        return _read_text(path, compression, delimiter, header, notes)
    shown = "".join(path.suffixes[-2:]) if compression else path.suffix
    raise DatasetError(
        f"{text}: unsupported file type {shown!r}; expected "
        f"{', '.join(TEXT_SUFFIXES)} (optionally .gz/.bz2/.xz/.zip), .npz or .parquet"
    )


def read_table(source: str | os.PathLike, *, delimiter: str | None = None, header: bool = True,
               notes: list[str] | None = None):
    """A table of features without labels (for prediction): a pandas DataFrame.

    Read as :func:`load_dataset` reads (delimiter sniffed, compression, an unnamed index column
    dropped, ``--no-header`` columns named ``column_1, ...``); text files give string cells.
    """
    path = _check_file(os.fspath(source))
    notes = [] if notes is None else notes
    frame = _read_frame(path, delimiter, header, notes, None)
    if isinstance(frame, tuple):
        X = frame[0]
        return _frame({f"x{i}": X[:, i] for i in range(X.shape[1])})
    return _drop_index_column(os.fspath(source), frame, None, notes)


def _load_named(name: str) -> Dataset:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    target_names = [str(t) for t in getattr(bunch, "target_names", np.unique(y))]
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [f"x{i}" for i in range(X.shape[1])])]
    return Dataset(X=X, y=y, feature_names=feature_names, target_names=target_names, name=name)


def _select_named(data: Dataset, features, drop_columns) -> Dataset:
    import pandas as pd

    frame = pd.DataFrame(data.X, columns=data.feature_names)
    frame = _choose_columns(data.name, frame, features, drop_columns)
    return Dataset(X=frame.to_numpy(np.float64), y=data.y, feature_names=list(frame.columns),
                   target_names=data.target_names, name=data.name)


def _frame(columns: dict):
    import pandas as pd

    return pd.DataFrame({str(k): np.asarray(v) for k, v in columns.items()})


def _decode(path: Path, compression: str | None) -> str:
    """The text of a (possibly compressed) file, for sniffing and for pandas."""
    try:
        if compression is None:
            raw = path.read_bytes()
        elif compression == "gzip":
            import gzip

            raw = gzip.decompress(path.read_bytes())
        elif compression == "bz2":
            import bz2

            raw = bz2.decompress(path.read_bytes())
        elif compression == "xz":
            import lzma

            raw = lzma.decompress(path.read_bytes())
        elif compression == "zip":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise DatasetError(f"{path}: a zip archive must hold exactly one table, but holds {len(members)}")
                raw = archive.read(members[0])
        else:
            import pandas as pd

            with pd.io.common.get_handle(path, "rb", compression=compression, is_text=False) as handle:
                raw = handle.handle.read()
    except DatasetError:
        raise
    except Exception as error:  # gzip.BadGzipFile, lzma.LZMAError, zipfile.BadZipFile, OSError, ...
        raise DatasetError(f"{path} is not a readable {compression} file: {error}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a UTF-8 text file (CSV / TSV)") from None


def _sniff(path: Path, text: str) -> str:
    sample = "\n".join(text.splitlines()[:50])
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        if "\t" in sample:
            return "\t"
        return ","


def _describe(delimiter: str) -> str:
    return {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe", " ": "space"}.get(delimiter, repr(delimiter))


def _read_text(path: Path, compression, delimiter, header: bool, notes: list[str]):
    import pandas as pd

    text = _decode(path, compression)
    if not text.strip():
        raise DatasetError(f"{path} is empty")
    if delimiter is None:
        delimiter = "\t" if path.suffixes and path.suffixes[0].lower() in (".tsv", ".tab") else _sniff(path, text)
        if delimiter != ",":
            notes.append(f"{path.name}: columns separated by {_describe(delimiter)}s (sniffed; set --delimiter)")
    elif delimiter in ("\\t", "tab"):
        delimiter = "\t"
    if len(delimiter) != 1:
        raise DatasetError(f"--delimiter must be a single character (or 'tab'), but got {delimiter!r}")
    # The field counts, by the standard library's CSV parser: pandas pads a short row with empty cells.
    rows = [(number, len(row)) for number, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter),
                                                              start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"{path} is empty")
    width = rows[0][1]
    for number, count in rows[1:]:
        if count != width:
            raise DatasetError(
                f"{path}, line {number}: expected {width} {_describe(delimiter)}-separated values (as line "
                f"{rows[0][0]}), found {count}"
            )
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, header=None, dtype=str, keep_default_na=False,
                            skip_blank_lines=True, skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as error:
        raise DatasetError(f"{path} is not a valid delimited text file: {error}") from None
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame[~(frame == "").all(axis=1)]
    if header:
        names = [str(name) for name in frame.iloc[0]]
        if all(_is_number(name) for name in names):
            raise DatasetError(
                f"{path}: the first row holds only numbers ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}),"
                " so it looks like data, not column names; pass --no-header"
            )
        repeated = sorted({name for name in names if names.count(name) > 1 and name})
        if repeated:
            raise DatasetError(f"{path}: the header row repeats a column name: {', '.join(repeated)}")
        frame = frame.iloc[1:]
        frame.columns = names
        if frame.empty:
            raise DatasetError(f"{path} has a header row but no data rows")
    else:
        frame.columns = [f"column_{i + 1}" for i in range(frame.shape[1])]
    return frame.reset_index(drop=True)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_name(source: str, frame, label_column: str, header: bool, notes: list[str]) -> str:
    columns = [str(c) for c in frame.columns]
    if not header:
        wanted = str(label_column).strip().lower()
        if wanted in ("label", "last"):
            position = len(columns)
            if wanted == "label":
                notes.append(f"{Path(source).name} has no header: the label is the last column "
                             f"({position}); choose another with --label-column N")
        elif wanted == "first":
            position = 1
        elif wanted.isdigit() and 1 <= int(wanted) <= len(columns):
            position = int(wanted)
        else:
            raise DatasetError(
                f"{source} has no header (--no-header), so --label-column must be a column number in "
                f"[1, {len(columns)}], 'first' or 'last', but got {label_column!r}"
            )
        return columns[position - 1]
    if label_column not in columns:
        raise DatasetError(
            f"{source} has no label column {label_column!r}; its columns are "
            f"{', '.join(map(repr, columns)) or 'none'} (choose one with --label-column)"
        )
    return label_column


def _drop_index_column(source: str, frame, label: str, notes: list[str]):
    first = str(frame.columns[0])
    if first == label or not (first == "" or first.startswith("Unnamed: 0")):
        return frame
    values = frame.iloc[:, 0]
    if values.nunique(dropna=False) == len(values):
        shown = ", ".join(str(v) for v in values.iloc[:3])
        notes.append(
            f"{Path(source).name}: the first column has no name and holds distinct values ({shown}, ...): "
            "a row index as written by pandas' to_csv or R's write.csv; it is not used as a feature"
        )
        return frame.drop(columns=frame.columns[0])
    return frame


def _choose_columns(source: str, frame, features, drop_columns):
    known = [str(c) for c in frame.columns]
    for option, names in (("--features", features), ("--drop-columns", drop_columns)):
        unknown = [n for n in names or () if n not in known]
        if unknown:
            raise DatasetError(
                f"{option}: {source} has no column {', '.join(map(repr, unknown))}; its feature columns are "
                f"{', '.join(map(repr, known))}"
            )
    if drop_columns:
        frame = frame.drop(columns=list(drop_columns))
    if features:
        frame = frame[list(dict.fromkeys(features))]
    return frame


def _typed_features(source: str, frame, y, preprocess: bool):
    """Numeric columns as float64 (NaN where missing), text columns as object arrays (NaN when missing); checks both."""
    import pandas as pd

    typed = {}
    any_missing = False
    for name in frame.columns:
        column = frame[name]
        if column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
            text = column.astype(str).str.strip()
            missing = text.isin(MISSING) | column.isna().to_numpy()
            numbers = pd.to_numeric(text.where(~missing), errors="coerce")
            bad = numbers.isna() & ~missing
            if not bad.any():
                values = numbers.astype(np.float64)
            else:
                if not preprocess:
                    row = int(np.flatnonzero(bad.to_numpy())[0])
                    raise DatasetError(
                        f"{source}: column {name!r} must be numeric, but row {row + 1} holds "
                        f"{text.iloc[row]!r} (categorical columns are one-hot encoded unless --no-preprocess)"
                    )
                values = text.astype(object).where(~missing, np.nan)
                distinct = values.nunique(dropna=True)
                if len(values) > 20 and distinct > IDENTIFIER_FRACTION * len(values):
                    raise DatasetError(
                        f"{source}: column {name!r} holds {distinct} distinct text values in {len(values)} rows: "
                        f"an identifier, not a feature; leave it out with --drop-columns {name}"
                    )
        elif column.dtype == bool:
            values = column.astype(np.float64)
        elif pd.api.types.is_numeric_dtype(column.dtype):
            values = column.astype(np.float64)
        else:
            values = column.astype(str).astype(object)
        if values.dtype == np.float64:
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(values.to_numpy())
            if bad.any():
                if not preprocess or np.isinf(values.to_numpy()).any():
                    row = int(np.flatnonzero(bad)[0])
                    raise DatasetError(
                        f"{source}: column {name!r} holds a missing or non-finite value at row {row + 1}"
                        + (" (missing values are imputed unless --no-preprocess; infinities never are)"
                           if preprocess else "")
                    )
                any_missing = True
        else:
            any_missing = any_missing or bool(values.isna().any())
        typed[str(name)] = values
    table = pd.DataFrame(typed)
    categorical = any(table[c].dtype == object for c in table.columns)
    if categorical or any_missing:
        empty = [c for c in table.columns if table[c].isna().all()]
        if empty:
            raise DatasetError(f"{source}: column {empty[0]!r} has no values at all; leave it out with --drop-columns")
        return table, None
    return table, table.to_numpy(np.float64)


def build_preprocessor(table, *, categorical: list[str] | None = None):
    """A ``ColumnTransformer`` for a raw feature table: impute, then one-hot encode the text columns.

    Numeric columns: missing values replaced by the column's median (``SimpleImputer``). Categorical
    (text) columns: missing values replaced by the most frequent category, then ``OneHotEncoder`` with
    ``handle_unknown="ignore"`` (a category not seen in training encodes as all zeros). The output
    keeps the input's column order, numeric columns first; fit it on the training rows only.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    categorical = categorical if categorical is not None else [c for c in table.columns if table[c].dtype == object]
    numeric = [c for c in table.columns if c not in categorical]
    parts = []
    if numeric:
        parts.append(("numeric", SimpleImputer(strategy="median", keep_empty_features=True), numeric))
    if categorical:
        parts.append(("categorical", Pipeline([
            ("impute", SimpleImputer(strategy="most_frequent", missing_values=np.nan)),
            ("one_hot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
        ]), categorical))
    return ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=False)


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
    if label_column is not None and label_column not in arrays:
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
