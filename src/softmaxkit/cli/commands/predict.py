"""``softmaxkit predict``: a saved model's predictions for a table of raw features."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

import os
from pathlib import Path

import typer

from .._app import command, console, note
from .._io import UserError
from ._shared import delimiter_option, no_header_option, overwrite_option


def _check_out_file(out: Path | None, overwrite: bool) -> None:
    if out is None:
        return
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as predictions.csv")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or choose another file")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UserError(f"cannot write --out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out {out}: {parent} is not a writable folder")


@command()
def predict(
    model: Path = typer.Argument(..., help="A model folder written by `softmaxkit train` (OUT/model)."),
    data: str = typer.Argument(..., help="A table with the model's feature columns (any extra column, such "
                                         "as the label, is ignored), or a scikit-learn dataset name."),
    out: Path | None = typer.Option(None, "--out", help="Write the predictions to this CSV file (default: stdout)."),
    delimiter: str | None = delimiter_option(),
    no_header: bool = no_header_option(),
    label_column: str = typer.Option("label", "--label-column",
                                     help="When DATA has this column, also report the accuracy against it."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Predict with a saved model: the class and the calibrated probabilities of every row of DATA.

    Applies what the model was trained with, in order: the preprocessing (imputation, one-hot encoding),
    the standardisation and the fitted temperature. Writes CSV: `prediction` and one `p_<class>`
    column per class, in the row order of DATA.
    """
    import numpy as np

    from ...datasets import NAMED, DatasetError, read_table
    from .._io import write_csv_atomic
    from .._model import load_saved_model

    _check_out_file(out, overwrite)
    saved = load_saved_model(model)
    notes: list[str] = []
    labels = None
    if data in NAMED:
        from ...datasets import load_dataset

        dataset = load_dataset(data)
        import pandas as pd

        frame = pd.DataFrame(dataset.X, columns=dataset.feature_names)
        labels = np.asarray(dataset.target_names, dtype=object)[np.unique(dataset.y, return_inverse=True)[1]] \
            if len(dataset.target_names) == dataset.n_classes else dataset.y
    else:
        frame = read_table(data, delimiter=delimiter, header=not no_header, notes=notes)
    for text in notes:
        note(text)
    missing = [name for name in saved.input_features if name not in frame.columns]
    if missing:
        raise DatasetError(
            f"{data} lacks the model's feature column(s) {', '.join(map(repr, missing[:5]))}"
            f"{' ...' if len(missing) > 5 else ''}; the model needs {', '.join(map(repr, saved.input_features[:8]))}"
            f"{' ...' if len(saved.input_features) > 8 else ''}"
        )
    if labels is None and label_column in frame.columns and label_column not in saved.input_features:
        labels = frame[label_column].astype(str).str.strip().to_numpy()
    try:
        proba = saved.predict_proba(frame)
    except ValueError as error:
        raise UserError(f"{data}: {error}") from None
    names = saved.class_names
    predicted = np.asarray(names, dtype=object)[proba.argmax(axis=1)]
    header = ["prediction", *(f"p_{name}" for name in names)]
    rows = [[predicted[i], *(f"{p:.6g}" for p in proba[i])] for i in range(len(proba))]
    if out is None:
        import csv
        import sys

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    else:
        write_csv_atomic(out, header, rows)
        console.print(f"predictions for {len(rows)} rows: [bold]{out}[/bold]")
    if labels is not None:
        truth = np.asarray([str(v) for v in labels])
        accuracy = float(np.mean(truth == np.asarray([str(p) for p in predicted])))
        target = console if out is not None else None
        line = f"accuracy against column {label_column!r}: {accuracy:.4f} ({len(truth)} rows)"
        if target is not None:
            console.print(line, markup=False)
        else:
            from .._app import errors

            errors.print(line, markup=False, highlight=False)
