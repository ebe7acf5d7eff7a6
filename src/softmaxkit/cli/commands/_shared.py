"""Options and steps that several sub-commands share: reading a table, the experiment, its table and report."""


from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from .._app import Progress, command_line, console, note, parse_columns, status
from .._io import UserError


class Profile(str, Enum):
    exponential = "exponential"
    step = "step"


# ---------------------------------------------------------------- table-reading options
def label_column_option():
    return typer.Option("label", "--label-column",
                        help="Name of the label column (with --no-header: a column number or 'last').")


def delimiter_option():
    return typer.Option(None, "--delimiter", help="Field separator of a text table, e.g. ';' or tab "
                                                  "(default: sniffed from the first lines).")


def no_header_option():
    return typer.Option(False, "--no-header", help="The table's first row is data, not column names "
                                                   "(columns are then column_1, column_2, ...).")


def features_option():
    return typer.Option(None, "--features", help="Comma-separated feature columns to use (default: all "
                                                 "but the label).")


def drop_columns_option():
    return typer.Option(None, "--drop-columns", help="Comma-separated columns to leave out.")


def no_preprocess_option():
    return typer.Option(False, "--no-preprocess",
                        help="Refuse categorical and missing values instead of one-hot encoding / imputing them.")


def overwrite_option():
    return typer.Option(False, "--overwrite", help="Replace an earlier run's output folder (whole).")


def load(data: str, *, label_column: str = "label", delimiter: str | None = None, no_header: bool = False,
         features: str | None = None, drop_columns: str | None = None, no_preprocess: bool = False):
    """Read ``data`` (:func:`softmaxkit.datasets.load_dataset`) and print the reader's notes."""
    from ...datasets import load_dataset

    dataset = load_dataset(data, label_column=label_column, delimiter=delimiter, header=not no_header,
                           features=parse_columns("--features", features),
                           drop_columns=parse_columns("--drop-columns", drop_columns),
                           preprocess=not no_preprocess)
    for text in dataset.notes:
        note(text)
    if dataset.needs_preprocessing:
        categorical = dataset.categorical
        missing = [c for c in dataset.feature_names if dataset.table[c].isna().any()]
        parts = []
        if categorical:
            parts.append(f"{len(categorical)} categorical column(s) one-hot encoded ({', '.join(categorical[:5])}"
                         f"{', ...' if len(categorical) > 5 else ''})")
        if missing:
            parts.append(f"missing values imputed in {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                         "(median; most frequent category)")
        note("; ".join(parts) + " — fitted on the training rows, saved with the model; --no-preprocess refuses them")
    return dataset


# ---------------------------------------------------------------- experiment → table + report
def run_experiment(data, losses, *, long_tail, profile, alpha, test_size, seed, max_iter, overrides=None):
    from .. import _experiment

    _experiment.check_models(losses, alpha=1.0 if alpha is None else alpha, max_iter=max_iter, seed=seed,
                             overrides=overrides)
    with Progress(len(losses)) as progress:
        def done(label, result):
            progress.done(f"{result.model.n_iter_} iterations, "
                          + ("converged" if result.converged else "NOT converged"))

        experiment = _experiment.run(
            data, losses, long_tail=long_tail, profile=profile, alpha=alpha, test_size=test_size, seed=seed,
            max_iter=max_iter, overrides=overrides, on_model_start=progress.start, on_model_done=done,
            on_iteration=progress.iteration,
        )
    report_convergence(experiment)
    return experiment


def report_convergence(experiment) -> None:
    """One warning line per model that stopped short, and one per temperature at its bound."""
    from .._app import _state, errors

    for result in experiment.results:
        if not result.converged:
            errors.print(f"{_state['command']}: warning: {result.label}: L-BFGS {result.stop_reason}; the "
                         "model may be far from its optimum (try a larger --max-iter or another --alpha)",
                         markup=False, highlight=False, soft_wrap=True)
        if result.temperature_at_bound:
            errors.print(f"{_state['command']}: warning: {result.label}: the fitted temperature "
                         f"T = {result.temperature:g} is at its bound (the validation likelihood has no optimum "
                         "inside [0.01, 100]); it is reported and saved as a bound, not an estimate",
                         markup=False, highlight=False, soft_wrap=True)


def print_table(experiment, title: str) -> None:
    from rich import box
    from rich.table import Table

    from ..report import metrics_rows

    rows = metrics_rows(experiment)
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAVY, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    table.add_column("model", no_wrap=True)
    for column in ("acc.", "F1", "bal.acc", "NLL", "ECE", "ECE(T)", "T"):
        table.add_column(column, justify="right", min_width=max(5, len(column)), no_wrap=True)
    best_f1 = max(r["macro_f1"] for r in rows)
    for r in rows:
        f1 = f"{r['macro_f1']:.3f}"
        t = f"{r['temperature']:.2f}" + ("*" if r.get("temperature_at_bound") else "")
        table.add_row(r["model"], f"{r['accuracy']:.3f}", f"[bold green]{f1}[/]" if r["macro_f1"] == best_f1 else f1,
                      f"{r['balanced_accuracy']:.3f}", f"{r['nll']:.3f}", f"{r['ece']:.3f}",
                      f"{r['ece_after']:.3f}", t)
    console.print(table)
    if any(r.get("temperature_at_bound") for r in rows):
        console.print("* the temperature is at a bound of its search range, not an estimate", markup=False)


def write_report(experiment, out: Path, title: str) -> Path:
    from .. import report
    from .._io import write_bytes_atomic, write_csv_atomic, write_text_atomic

    with status("drawing the report's figures"):
        page, pngs = report.render(experiment, title=title, command=command_line())
    for name, data in pngs.items():
        write_bytes_atomic(out / "figures" / name, data)
    rows = report.metrics_rows(experiment)
    columns = list(rows[0])
    write_csv_atomic(out / "metrics.csv", columns, [[r[c] for c in columns] for r in rows])
    summary = {
        "dataset": experiment.dataset, "classes": experiment.class_names,
        "train_counts": experiment.train_counts.tolist(), "test_counts": experiment.test_counts.tolist(),
        "long_tail": experiment.long_tail, "settings": experiment.settings, "models": rows,
    }
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return write_text_atomic(out / "report.html", page)


def check_common(*, test_size, long_tail, max_iter, seed):
    from .._app import check_fraction, check_long_tail, check_positive_int, check_seed

    check_fraction("--test-size", test_size)
    check_long_tail(long_tail)
    check_positive_int("--max-iter", max_iter)
    check_seed(seed)


__all__ = ["Profile", "UserError", "check_common", "load", "print_table", "run_experiment", "write_report"]
