"""Atomic output files and the safe (pickle-free) model format of the command line.

Every file is first written to a temporary file in the destination directory and then moved over the
destination with :func:`os.replace`, so a reader never sees a half-written file and an interrupted run
leaves the previous version intact.

A saved model is a directory holding ``model.json`` (format version, class labels, feature names, the
estimator's parameters, the standardisation) and ``model.npz`` (the weight arrays, loaded with
``allow_pickle=False``): nothing in it can execute code when loaded.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

MODEL_FORMAT = "softmaxkit.SoftmaxRegression/1"
#: the saved preprocessing (scikit-learn ColumnTransformer), written with skops (no pickle).
PREPROCESSOR_FILE = "preprocess.skops"


class UserError(Exception):
    """A problem with the user's input: the command prints its message on one line and exits with 2."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 less the umask).
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def write_csv_atomic(path: str | os.PathLike, header: list[str], rows) -> Path:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


#: written last into every output folder: marks it as a complete softmaxkit run (so --overwrite may replace it).
RUN_MARKER = ".softmaxkit-run.json"


class OutputDir:
    """An output folder written whole or not at all.

    Checked when constructed, before any work: ``out`` must not be a file, and an existing folder must be
    empty or hold an earlier softmaxkit run, which is refused unless ``overwrite``. Used as a context
    manager it yields a staging folder next to ``out``; on success the staging folder becomes ``out``
    (replacing an earlier run whole: nothing of it is left beside the new files), on any error it is
    removed together with the parent folders this run created, so a failed run leaves nothing behind.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out"):
        self.out = Path(out)
        self.flag = flag
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"{flag} {out} exists and is not a directory")
        self.replaces = False
        if out.is_dir() and any(out.iterdir()):
            earlier = (out / RUN_MARKER).exists() or (
                (out / "report.html").exists() and any((out / n).exists() for n in ("metrics.json", "calibration.json"))
            )
            if not earlier:
                raise UserError(
                    f"{flag} {out} is a folder that holds other files (not an earlier softmaxkit run); choose a "
                    "new or empty folder"
                )
            if not overwrite:
                raise UserError(
                    f"{flag} {out} holds the output of an earlier run; pass --overwrite to replace it whole, or "
                    "choose another folder"
                )
            self.replaces = True
        ancestor = out.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"cannot write {flag} {out}: {ancestor} is not a writable folder")
        self.staging: Path | None = None
        self._created: list[Path] = []

    def __enter__(self) -> Path:
        missing = []
        parent = self.out.absolute().parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial",
                                                 dir=self.out.absolute().parent))
            os.chmod(self.staging, 0o777 & ~_umask())
        except OSError as error:
            self._remove_created()
            raise UserError(f"cannot write {self.flag} {self.out}: {error.strerror or error}") from None
        return self.staging

    def __exit__(self, kind, error, trace) -> None:
        import shutil

        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._remove_created()
            return
        write_text_atomic(self.staging / RUN_MARKER, json.dumps({"command": " ".join(sys.argv)}) + "\n")
        out = self.out
        backup = None
        if out.is_dir() and any(out.iterdir()):
            backup = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, backup)
        elif out.is_dir():
            out.rmdir()
        os.replace(self.staging, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create the output directory (and parents); a user error when ``out`` is an existing file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output directory {out}: {error.strerror or error}") from None
    return out


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def save_model(model, directory: str | os.PathLike, *, feature_names, mean=None, scale=None, extra=None,
               input_features=None, categorical=None, preprocessing: bool = False) -> Path:
    """Save a fitted :class:`~softmaxkit.SoftmaxRegression` (and its standardisation) without pickle.

    ``feature_names`` name the columns the estimator sees; ``input_features`` the raw table's columns
    when a preprocessing step (saved beside, see :mod:`softmaxkit.cli._model`) maps one to the other.
    """
    directory = prepare_out_dir(directory)
    params = {k: _jsonable(v) for k, v in model.get_params().items() if k != "random_state"
              or v is None or isinstance(v, int)}
    classes = model.classes_
    meta = {
        "format": MODEL_FORMAT,
        "params": params,
        "classes": [c.item() if isinstance(c, np.generic) else c for c in classes.tolist()],
        "classes_dtype": classes.dtype.kind,
        "feature_names": list(feature_names),
        "n_iter": int(model.n_iter_),
        "standardize": mean is not None,
        "input_features": list(input_features if input_features is not None else feature_names),
        "categorical": list(categorical or []),
        "preprocessing": bool(preprocessing),
        "extra": _jsonable(extra or {}),
    }
    arrays = {"coef": model.coef_, "intercept": model.intercept_}
    for index, (weight, bias) in enumerate(zip(model.hidden_coefs_, model.hidden_intercepts_)):
        arrays[f"hidden_coef_{index}"] = weight
        arrays[f"hidden_intercept_{index}"] = bias
    if mean is not None:
        arrays["mean"] = np.asarray(mean, dtype=np.float64)
        arrays["scale"] = np.asarray(scale, dtype=np.float64)
    write_npz_atomic(directory / "model.npz", **arrays)
    write_text_atomic(directory / "model.json", json.dumps(meta, indent=2) + "\n")
    return directory


def load_model(directory: str | os.PathLike):
    """Load a model saved by :func:`save_model`: ``(model, meta, mean, scale)``.

    The parts, unassembled; :func:`softmaxkit.load_model` returns one object that predicts from raw
    features (preprocessing, standardisation and temperature applied).

    Raises:
        UserError: missing files, a different format, or inconsistent arrays.
    """
    from ..estimator import SoftmaxRegression

    directory = Path(directory)
    try:
        meta = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        with np.load(directory / "model.npz", allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError as error:
        raise UserError(f"{directory} is not a saved softmaxkit model: {Path(error.filename).name} is missing") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{directory}/model.json is not valid JSON: {error}") from None
    except (ValueError, OSError) as error:
        raise UserError(f"{directory} holds an unreadable model: {error}") from None
    if meta.get("format") != MODEL_FORMAT:
        raise UserError(f"{directory}/model.json has format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    params = dict(meta["params"])
    if "hidden_layer_sizes" in params:
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    model = SoftmaxRegression(**params)
    kind = meta.get("classes_dtype", "i")
    model.classes_ = np.asarray(meta["classes"], dtype=np.int64 if kind in "iu" else None)
    model.coef_ = arrays["coef"]
    model.intercept_ = arrays["intercept"]
    hidden = sorted(k for k in arrays if k.startswith("hidden_coef_"))
    model.hidden_coefs_ = [arrays[f"hidden_coef_{i}"] for i in range(len(hidden))]
    model.hidden_intercepts_ = [arrays[f"hidden_intercept_{i}"] for i in range(len(hidden))]
    n_features = model.hidden_coefs_[0].shape[1] if hidden else model.coef_.shape[1]
    model.n_features_in_ = n_features
    model.n_iter_ = meta.get("n_iter", 1)
    if model.coef_.shape[0] != len(model.classes_):
        raise UserError(f"{directory}: model.npz has {model.coef_.shape[0]} class rows but {len(model.classes_)} classes")
    return model, meta, arrays.get("mean"), arrays.get("scale")
