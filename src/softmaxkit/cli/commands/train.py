"""``softmaxkit train``: one model on a dataset, saved (pickle-free) with its preprocessing and a report."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

from pathlib import Path

import typer

from .._app import DATA_HELP, command, console, parse_alpha
from .._io import UserError
from ._shared import (
    check_common,
    delimiter_option,
    drop_columns_option,
    features_option,
    label_column_option,
    load,
    no_header_option,
    no_preprocess_option,
    overwrite_option,
    print_table,
    run_experiment,
    write_report,
)

#: cheap checks of the choices before PyTorch is loaded (the estimator checks them again).
SOLVERS = ("lbfgs", "adamw")
CLASS_WEIGHTS = ("balanced", "effective_number")


def parse_hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise UserError(f"--hidden must be comma-separated integers such as 64,32, but got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise UserError(f"--hidden widths must be integers >= 1, but got {text!r}")
    return sizes


@command()
def train(
    data: str = typer.Argument(..., help=DATA_HELP),
    loss: str = typer.Option("ce", help="ce, ls (label smoothing 0.1), cb (class-balanced), focal, poly1, sparsemax, "
                                        "or a comparison loss: hinge (Weston-Watkins), crammer_singer, mse (on "
                                        "softmax probabilities), mse_scores (on raw scores), sigmoid (one-vs-rest)."),
    alpha: str = typer.Option("auto", help="L2 strength on the weights (>= 0), or auto: min(1e-3, 1/training rows)."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Override the label smoothing ε."),
    class_weight: str | None = typer.Option(None, "--class-weight", help="balanced or effective_number."),
    solver: str = typer.Option("lbfgs", help="lbfgs (full batch) or adamw (mini-batch)."),
    hidden: str = typer.Option("", help="MLP hidden widths, e.g. 64,32 (default: linear model)."),
    long_tail: float | None = typer.Option(None, "--long-tail", help="Make the training set long-tailed with this imbalance ratio."),
    label_column: str = label_column_option(),
    delimiter: str | None = delimiter_option(),
    no_header: bool = no_header_option(),
    features: str | None = features_option(),
    drop_columns: str | None = drop_columns_option(),
    no_preprocess: bool = no_preprocess_option(),
    test_size: float = typer.Option(0.25, "--test-size", help="Fraction of rows held out for testing."),
    max_iter: int = typer.Option(300, "--max-iter", help="L-BFGS iterations or AdamW epochs."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(Path("softmaxkit-train"), "--out", help="Output directory (model/ and report.html)."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Train one SoftmaxRegression on DATA; save the model (JSON + NPZ + skops, no pickle) and a report.

    The saved OUT/model predicts from raw features: `softmaxkit predict OUT/model DATA`, or in Python
    `softmaxkit.load_model("OUT/model").predict_proba(table)`.
    """
    from .. import _experiment
    from .._io import OutputDir
    from .._model import save_trained

    (name,) = _experiment.parse_losses(loss, flag="--loss")[:1]
    if "," in loss:
        raise UserError(f"--loss takes one loss (compare several with `softmaxkit compare --losses`), but got {loss!r}")
    check_common(test_size=test_size, long_tail=long_tail, max_iter=max_iter, seed=seed)
    alpha_value = parse_alpha(alpha)
    overrides = {"solver": solver}
    if label_smoothing is not None:
        overrides["label_smoothing"] = label_smoothing
    if class_weight is not None:
        overrides["class_weight"] = class_weight
    if hidden.strip():
        overrides["hidden_layer_sizes"] = parse_hidden(hidden)
    for flag, value, choices in (("--solver", solver, SOLVERS), ("--class-weight", class_weight, CLASS_WEIGHTS)):
        if value is not None and value not in choices:
            raise UserError(f"{flag} must be one of {', '.join(map(repr, choices))}, but got {value!r}")
    if label_smoothing is not None and not 0 <= label_smoothing <= 1:
        raise UserError(f"--label-smoothing must lie in [0, 1], but got {label_smoothing:g}")
    # the remaining checks need the estimator (and PyTorch): run_experiment makes them before any training
    output = OutputDir(out, overwrite=overwrite)
    dataset = load(data, label_column=label_column, delimiter=delimiter, no_header=no_header, features=features,
                   drop_columns=drop_columns, no_preprocess=no_preprocess)
    with output as staging:
        experiment = run_experiment(dataset, [name], long_tail=long_tail, profile="exponential", alpha=alpha_value,
                                    test_size=test_size, seed=seed, max_iter=max_iter, overrides=overrides)
        print_table(experiment, f"{dataset.name}: test-set metrics")
        result = experiment.results[0]
        save_trained(result, experiment, staging / "model", dataset=dataset.name)
        write_report(experiment, staging, f"softmaxkit train: {result.label} on {dataset.name}")
    files = "model.json + model.npz" + (" + preprocess.skops" if experiment.preprocessor is not None else "")
    console.print(f"model: [bold]{output.out / 'model'}[/bold] ({files}); predict with "
                  f"`softmaxkit predict {output.out / 'model'} DATA`")
    console.print(f"report: [bold]{output.out / 'report.html'}[/bold]")
