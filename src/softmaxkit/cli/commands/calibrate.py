"""``softmaxkit calibrate``: fit a calibrator to a model's scores and measure it on held-out rows."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path

import typer

from .._app import (
    check_fraction,
    check_positive_int,
    check_seed,
    command,
    command_line,
    console,
    note,
    status,
)
from .._io import UserError
from ._shared import delimiter_option, label_column_option, load, no_header_option, overwrite_option

#: --method choices: name -> calibrator class in softmaxkit.calibration (a new method is one entry).
METHODS = {
    "temperature": "TemperatureScaling",
    "vector": "VectorScaling",
    "isotonic": "IsotonicCalibration",
    "histogram": "HistogramBinning",
    "platt": "PlattScaling",
    "dirichlet": "DirichletCalibration",
}
#: what --help says of a method beyond its name.
METHOD_NOTES = {"platt": "one-vs-rest sigmoid", "dirichlet": "matrix scaling, Kull et al. 2019"}
Method = Enum("Method", {name: name for name in METHODS}, type=str)


class InputKind(str, Enum):
    auto = "auto"
    logits = "logits"
    probabilities = "probabilities"


#: a row of probabilities sums to 1 within this (float32 probabilities written with 6+ digits do).
SUM_TOLERANCE = 1e-4


def _looks_like_probabilities(scores) -> bool:
    import numpy as np

    return bool(np.all(scores >= 0) and np.all(scores <= 1)
                and np.all(np.abs(scores.sum(axis=1) - 1) <= SUM_TOLERANCE))


def check_scores(name: str, scores, labels, kind: str, label_column: str, columns: list[str]):
    """The logits to calibrate: probabilities converted (or refused), feature tables refused."""
    import numpy as np

    n_rows, n_classes = scores.shape
    if n_classes < 2:
        raise UserError(f"{name} must have one score column per class (at least 2), but has {n_classes}")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= n_classes:
        raise UserError(
            f"{name}: column {label_column!r} must hold class indices in [0, {n_classes}) matching the "
            f"{n_classes} logit columns ({', '.join(columns[:8])}{', ...' if n_classes > 8 else ''})"
        )
    probabilities = _looks_like_probabilities(scores)
    if kind == "probabilities" and not probabilities:
        raise UserError(f"--input probabilities: the rows of {name} are not probabilities (non-negative, "
                        "summing to 1)")
    if probabilities and kind == "logits":
        raise UserError(f"{name} holds probabilities (every row is non-negative and sums to 1), not logits; "
                        "pass --input probabilities (or auto) to use their logarithms")
    if probabilities:
        note(f"{name} holds probabilities (every row is non-negative and sums to 1): calibrating their "
             "logarithms, log p, as logits (--input logits refuses this)")
        scores = np.log(np.clip(scores, np.finfo(np.float64).tiny, None))
    used = len(np.unique(labels))
    if n_classes >= 4 and used <= n_classes // 2 and n_rows >= 5 * n_classes:
        raise UserError(
            f"{name}: column {label_column!r} uses only {used} of the {n_classes} classes the score columns "
            f"stand for, in {n_rows} rows: these look like features, not one logit column per class "
            "(calibrate a model's scores; train one with `softmaxkit train`)"
        )
    accuracy = float(np.mean(scores.argmax(axis=1) == labels))
    majority = float(np.bincount(labels).max() / n_rows)
    if n_rows >= 5 * n_classes and accuracy <= majority and n_classes >= 3:
        raise UserError(
            f"{name}: the arg-max column matches {label_column!r} in {accuracy:.1%} of the rows, no better "
            f"than always predicting the most frequent class ({majority:.1%}): these are not a classifier's "
            "logits for these labels (columns in class order, labels as class indices)"
        )
    return scores


@command()
def calibrate(
    scores: str = typer.Argument(..., help="CSV / NPZ / Parquet with one logit column per class (in class "
                                           "order) and a label column of class indices."),
    method: Method = typer.Option("temperature", help=", ".join(
        f"{name} ({METHOD_NOTES[name]})" if name in METHOD_NOTES else name for name in METHODS) + "."),
    input_kind: InputKind = typer.Option(InputKind.auto, "--input",
                                         help="What the score columns hold: auto (probabilities are detected and "
                                              "converted with log), logits, or probabilities."),
    label_column: str = label_column_option(),
    delimiter: str | None = delimiter_option(),
    no_header: bool = no_header_option(),
    test_size: float = typer.Option(0.5, "--test-size",
                                     help="Fraction of rows held out to measure ECE/NLL before and after (the rest fits the calibrator)."),
    bins: int = typer.Option(15, help="Confidence bins of the ECE and the reliability diagram."),
    seed: int = typer.Option(0, help="Random seed of the split."),
    out: Path = typer.Option(Path("softmaxkit-calibrate"), "--out", help="Output directory."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Fit a calibrator to a model's scores; print its parameters and ECE/NLL before and after.

    Writes OUT/calibrated.csv (calibrated probabilities of every row), OUT/reliability.png,
    OUT/calibration.json (parameters and metrics), OUT/calibrator.json (the fitted calibrator, reloadable
    with softmaxkit.calibration.load) and OUT/report.html.
    """
    from ...datasets import NAMED
    from .._io import OutputDir

    check_fraction("--test-size", test_size)
    check_positive_int("--bins", bins)
    check_seed(seed)
    if scores in NAMED:
        raise UserError(
            f"{scores!r} is a dataset of features, not a model's scores: calibrate takes a file with one logit "
            "column per class and a label column (train a model with `softmaxkit train`)"
        )
    output = OutputDir(out, overwrite=overwrite)
    data = load(scores, label_column=label_column, delimiter=delimiter, no_header=no_header, no_preprocess=True)
    logits = check_scores(scores, data.X, data.y, input_kind.value, label_column, data.feature_names)
    with output as staging:
        _calibrate(data, logits, method.value, label_column, test_size, bins, seed, staging, scores)
    console.print(f"calibrated probabilities: [bold]{output.out / 'calibrated.csv'}[/bold]; "
                  f"reliability diagram: [bold]{output.out / 'reliability.png'}[/bold]")


def _calibrate(data, logits, method: str, label_column: str, test_size: float, bins: int, seed: int, out: Path,
               scores: str) -> None:
    import numpy as np
    from rich.table import Table
    from sklearn.model_selection import train_test_split

    from ... import calibration, metrics, reference
    from .._app import errors
    from .._io import write_bytes_atomic, write_csv_atomic, write_text_atomic
    from ..report import figures, render_simple

    labels = data.y
    n_classes = logits.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    index = np.arange(len(labels))
    fit_index, eval_index = train_test_split(index, test_size=test_size, stratify=stratify, random_state=seed)
    calibrator = getattr(calibration, METHODS[method])()
    with status(f"fitting {method} calibration on {len(fit_index)} rows"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrator.fit(logits[fit_index], labels[fit_index])
    at_bound = bool(getattr(calibrator, "at_bound_", False))
    for warning in caught:
        if not (at_bound and "no optimum inside bounds" in str(warning.message)):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if at_bound:
        errors.print(f"softmaxkit calibrate: warning: the fitted temperature T = {calibrator.temperature_:g} is at a "
                     f"bound of its search range {tuple(calibrator.bounds)}: the likelihood has no optimum inside "
                     "it, so T is a bound, not an estimate (flagged as at_bound in calibrator.json)",
                     markup=False, highlight=False, soft_wrap=True)
    before = reference.softmax(logits[eval_index], axis=-1)
    after = np.asarray(calibrator.predict_proba(logits[eval_index]), dtype=np.float64)
    y_eval = labels[eval_index]
    result = {
        "ece_before": float(metrics.expected_calibration_error(before, y_eval, n_bins=bins)),
        "ece_after": float(metrics.expected_calibration_error(after, y_eval, n_bins=bins)),
        "nll_before": float(metrics.log_loss(before, y_eval)),
        "nll_after": float(metrics.log_loss(after, y_eval)),
        "accuracy_before": float(np.mean(before.argmax(1) == y_eval)),
        "accuracy_after": float(np.mean(after.argmax(1) == y_eval)),
    }
    parameters, shown = calibrator_parameters(calibrator)

    console.print(f"[bold]{method} calibration[/bold] fitted on {len(fit_index)} rows, "
                  f"measured on {len(eval_index)} held-out rows")
    for key, text in shown.items():
        console.print(f"  {key} = {text}" + ("  (at its bound)" if at_bound and key == "temperature_" else ""))
    table = Table(header_style="bold")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right")
    table.add_row("ECE", f"{result['ece_before']:.4f}", f"{result['ece_after']:.4f}")
    table.add_row("NLL", f"{result['nll_before']:.4f}", f"{result['nll_after']:.4f}")
    table.add_row("accuracy", f"{result['accuracy_before']:.4f}", f"{result['accuracy_after']:.4f}")
    console.print(table)

    all_after = np.asarray(calibrator.predict_proba(logits), dtype=np.float64)
    header = [f"p_{name}" for name in data.feature_names] + [label_column, "split"]
    split = np.where(np.isin(index, fit_index), "fit", "eval")
    rows = [[f"{p:.10g}" for p in all_after[i]] + [int(labels[i]), split[i]] for i in range(len(labels))]
    write_csv_atomic(out / "calibrated.csv", header, rows)
    png = figures.single_reliability(before, after, y_eval, title_after=f"after {method} calibration", n_bins=bins)
    write_bytes_atomic(out / "reliability.png", png)
    summary = {"scores": str(scores), "method": method, "parameters": parameters, "at_bound": at_bound, **result,
               "n_fit": len(fit_index), "n_eval": len(eval_index)}
    write_text_atomic(out / "calibration.json", json.dumps(summary, indent=2) + "\n")
    # the fitted calibrator itself, reloadable with softmaxkit.calibration.load(path)
    write_text_atomic(out / "calibrator.json", json.dumps(calibrator.to_dict(), indent=2) + "\n")
    warning = (" <b>The fitted temperature is at a bound of its search range: a bound, not an estimate.</b>"
               if at_bound else "")
    page = render_simple(
        f"softmaxkit calibrate: {method} on {data.name}",
        [f"<code>{command_line()}</code>",
         f"ECE {result['ece_before']:.4f} → {result['ece_after']:.4f}, NLL {result['nll_before']:.4f} → "
         f"{result['nll_after']:.4f} on {len(eval_index)} held-out rows.{warning}"],
        {"reliability.png": png},
    )
    write_text_atomic(out / "report.html", page)


def calibrator_parameters(calibrator) -> tuple[dict, dict]:
    """The fitted attributes (``name_``): JSON-able values and short texts for the terminal."""
    import numpy as np

    values, texts = {}, {}
    for name in sorted(vars(calibrator)):
        if not name.endswith("_") or name.startswith("_") or name == "at_bound_":
            continue
        value = getattr(calibrator, name)
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            values[name] = float(value) if isinstance(value, (float, np.floating)) else int(value)
            texts[name] = f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            if value.size <= 32:
                values[name] = value.tolist()
                texts[name] = np.array2string(value, precision=4, suppress_small=True)
            else:
                texts[name] = f"array of shape {value.shape}"
        elif isinstance(value, (list, tuple)):
            sizes = [len(v) if hasattr(v, "__len__") else 1 for v in value]
            texts[name] = f"{len(value)} per-class entries of sizes {sizes}"
    return values, texts
