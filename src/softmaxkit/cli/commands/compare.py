"""``softmaxkit compare``: the demo's table and report for any dataset and set of losses."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

from pathlib import Path

import typer

from .._app import DATA_HELP, command, console, parse_alpha
from ._shared import (
    Profile,
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


@command()
def compare(
    data: str = typer.Argument(..., help=DATA_HELP),
    losses: str = typer.Option("ce,ls,cb,focal,poly1", "--losses",
                               help="Comma-separated losses: ce, ls (label smoothing), cb (class-balanced), "
                                    "focal, poly1, sparsemax, and the comparisons hinge (Weston-Watkins), "
                                    "crammer_singer, mse (on softmax probabilities), mse_scores (on raw "
                                    "scores), sigmoid (one-vs-rest)."),
    long_tail: float | None = typer.Option(None, "--long-tail", help="Make the training set long-tailed with this imbalance ratio (>= 1)."),
    profile: Profile = typer.Option(Profile.exponential, help="Long-tail profile: exponential, or step (two levels, e.g. 98:2)."),
    alpha: str = typer.Option("auto", help="L2 strength on the weights (>= 0), or auto: min(1e-3, 1/training rows)."),
    label_column: str = label_column_option(),
    delimiter: str | None = delimiter_option(),
    no_header: bool = no_header_option(),
    features: str | None = features_option(),
    drop_columns: str | None = drop_columns_option(),
    no_preprocess: bool = no_preprocess_option(),
    test_size: float = typer.Option(0.25, "--test-size", help="Fraction of rows held out for testing."),
    max_iter: int = typer.Option(300, "--max-iter", help="L-BFGS iterations per model."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(Path("softmaxkit-compare"), "--out", help="Output directory."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Compare losses on any dataset: the demo's table and report for DATA."""
    from .. import _experiment
    from .._io import OutputDir

    names = _experiment.parse_losses(losses)
    check_common(test_size=test_size, long_tail=long_tail, max_iter=max_iter, seed=seed)
    alpha_value = parse_alpha(alpha)
    output = OutputDir(out, overwrite=overwrite)
    dataset = load(data, label_column=label_column, delimiter=delimiter, no_header=no_header, features=features,
                   drop_columns=drop_columns, no_preprocess=no_preprocess)
    with output as staging:
        experiment = run_experiment(dataset, names, long_tail=long_tail, profile=profile.value, alpha=alpha_value,
                                    test_size=test_size, seed=seed, max_iter=max_iter)
        print_table(experiment, f"{dataset.name}: test-set metrics")
        write_report(experiment, staging, f"softmaxkit compare: {dataset.name}")
    console.print(f"report: [bold]{output.out / 'report.html'}[/bold]")
