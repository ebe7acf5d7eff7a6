"""``softmaxkit demo``: the worked comparison of losses for a long-tailed digits problem."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

from pathlib import Path

import typer

from .._app import check_seed, command, console
from ._shared import overwrite_option, print_table, run_experiment, write_report


@command()
def demo(
    out: Path = typer.Option(Path("softmaxkit-demo"), "--out", help="Directory for report.html, figures and metrics."),
    seed: int = typer.Option(0, help="Random seed of the split, the subsampling and the solvers."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Which loss for imbalanced classes, and how over-confident is each? A worked comparison with a report.

    Scikit-learn's digits (10 classes) with the training set made long-tailed (imbalance ratio 50, the
    head class 50× the tail), then SoftmaxRegression trained with cross-entropy, label smoothing,
    class-balanced weights, focal and Poly-1 loss, each calibrated by temperature scaling. Prints a table
    and writes OUT/report.html (self-contained), OUT/figures/*.png and OUT/metrics.{csv,json}.
    """
    from ...datasets import load_dataset
    from .. import _experiment
    from .._io import OutputDir

    check_seed(seed)
    output = OutputDir(out, overwrite=overwrite)
    data = load_dataset("digits")
    console.print("[bold]softmaxkit demo[/bold]: digits, training set long-tailed with imbalance ratio 50 "
                  "(exponential profile); balanced validation and test sets")
    with output as staging:
        experiment = run_experiment(data, list(_experiment.DEMO_LOSSES), long_tail=50.0, profile="exponential",
                                    alpha=1e-3, test_size=0.3, seed=seed, max_iter=300)
        print_table(experiment, "digits, long-tailed ×50: test-set metrics")
        counts = experiment.train_counts
        console.print(f"training rows per class: {counts.tolist()} (head {counts.max()}, tail {counts.min()})")
        write_report(experiment, staging, "softmaxkit demo: losses for a long-tailed digits problem")
    console.print(f"report: [bold]{output.out / 'report.html'}[/bold]")
