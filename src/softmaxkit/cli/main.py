"""``softmaxkit`` command: entry point and sub-commands.

User errors (a missing or malformed file, an unknown loss, a bad option value) print one line to stderr
and exit with status 2; no traceback. Every output file is written atomically.
"""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

import functools
import json
import shlex
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from ._io import UserError

app = typer.Typer(
    name="softmaxkit",
    help="softmaxkit: softmax, cross-entropy and friends, from the textbook formula to the fastest kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

DATA_HELP = (
    "A dataset shipped with scikit-learn (digits, iris, wine, breast_cancer) or a CSV / NPZ / Parquet file "
    "with a label column."
)


def _user_errors(command):
    """Turn user errors into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UserError, ValueError, OSError) as error:
            message = str(error) or type(error).__name__
            if isinstance(error, OSError) and error.filename and error.strerror:
                message = f"{error.filename}: {error.strerror}"
            errors.print(f"softmaxkit {command.__name__}: error: {message}", markup=False, highlight=False,
                         soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _command_line() -> str:
    return "softmaxkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@app.callback()
def _root() -> None:
    """softmaxkit: softmax, cross-entropy and friends, from the textbook formula to the fastest kernel."""


# ---------------------------------------------------------------- shared: experiment → table + report
def _run_experiment(data, losses, *, long_tail, profile, alpha, test_size, seed, max_iter, overrides=None):
    from . import _experiment

    _experiment.check_models(losses, alpha=alpha, max_iter=max_iter, seed=seed, overrides=overrides)
    steps = len(losses)
    with _progress() as progress:
        task = progress.add_task("training", total=steps)

        def start(label):
            progress.update(task, description=f"training {label}")

        def done(label):
            progress.advance(task)

        experiment = _experiment.run(
            data, losses, long_tail=long_tail, profile=profile, alpha=alpha, test_size=test_size, seed=seed,
            max_iter=max_iter, overrides=overrides, on_model_start=start, on_model_done=done,
        )
        progress.update(task, description="trained")
    return experiment


def _print_table(experiment, title: str) -> None:
    from rich.table import Table

    from .report import metrics_rows

    rows = metrics_rows(experiment)
    from rich import box

    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAVY, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    table.add_column("model", no_wrap=True)
    for column in ("acc.", "F1", "bal.acc", "NLL", "ECE", "ECE(T)", "T"):
        table.add_column(column, justify="right", min_width=max(5, len(column)), no_wrap=True)
    best_f1 = max(r["macro_f1"] for r in rows)
    for r in rows:
        f1 = f"{r['macro_f1']:.3f}"
        table.add_row(r["model"], f"{r['accuracy']:.3f}", f"[bold green]{f1}[/]" if r["macro_f1"] == best_f1 else f1,
                      f"{r['balanced_accuracy']:.3f}", f"{r['nll']:.3f}", f"{r['ece']:.3f}",
                      f"{r['ece_after']:.3f}", f"{r['temperature']:.2f}")
    console.print(table)


def _write_report(experiment, out: Path, title: str) -> Path:
    from . import report
    from ._io import write_bytes_atomic, write_csv_atomic, write_text_atomic

    with console.status("drawing the report's figures"):
        page, pngs = report.render(experiment, title=title, command=_command_line())
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


def _load(data: str, label_column: str):
    from ..datasets import load_dataset

    return load_dataset(data, label_column=label_column)


def _check_fraction(name: str, value: float) -> float:
    if not 0 < value < 1:
        raise UserError(f"{name} must lie in (0, 1), but got {value}")
    return value


def _check_long_tail(value: float | None) -> float | None:
    if value is not None and not value >= 1:
        raise UserError(f"--long-tail must be an imbalance ratio >= 1, but got {value}")
    return value


class Profile(str, Enum):
    exponential = "exponential"
    step = "step"


# ---------------------------------------------------------------- demo
@app.command()
@_user_errors
def demo(
    out: Path = typer.Option(Path("softmaxkit-demo"), "--out", help="Directory for report.html, figures and metrics."),
    seed: int = typer.Option(0, help="Random seed of the split, the subsampling and the solvers."),
) -> None:
    """Which loss for imbalanced classes, and how over-confident is each? A worked comparison with a report.

    Scikit-learn's digits (10 classes) with the training set made long-tailed (imbalance ratio 50, the
    head class 50× the tail), then SoftmaxRegression trained with cross-entropy, label smoothing,
    class-balanced weights, focal and Poly-1 loss, each calibrated by temperature scaling. Prints a table
    and writes OUT/report.html (self-contained), OUT/figures/*.png and OUT/metrics.{csv,json}.
    """
    from . import _experiment
    from ._io import prepare_out_dir

    out = prepare_out_dir(out)
    data = _load("digits", "label")
    console.print("[bold]softmaxkit demo[/bold]: digits, training set long-tailed with imbalance ratio 50 "
                  "(exponential profile); balanced validation and test sets")
    experiment = _run_experiment(data, list(_experiment.DEMO_LOSSES), long_tail=50.0, profile="exponential",
                                 alpha=1e-3, test_size=0.3, seed=seed, max_iter=300)
    _print_table(experiment, "digits, long-tailed ×50: test-set metrics")
    counts = experiment.train_counts
    console.print(f"training rows per class: {counts.tolist()} (head {counts.max()}, tail {counts.min()})")
    path = _write_report(experiment, out, "softmaxkit demo: losses for a long-tailed digits problem")
    console.print(f"report: [bold]{path}[/bold]")


# ---------------------------------------------------------------- compare
@app.command()
@_user_errors
def compare(
    data: str = typer.Argument(..., help=DATA_HELP),
    losses: str = typer.Option("ce,ls,cb,focal,poly1", "--losses",
                               help="Comma-separated losses: ce, ls (label smoothing), cb (class-balanced), "
                                    "focal, poly1, sparsemax, and the comparisons hinge (Weston-Watkins), "
                                    "crammer_singer, mse (on softmax probabilities), mse_scores (on raw "
                                    "scores), sigmoid (one-vs-rest)."),
    long_tail: float | None = typer.Option(None, "--long-tail", help="Make the training set long-tailed with this imbalance ratio (>= 1)."),
    profile: Profile = typer.Option(Profile.exponential, help="Long-tail profile: exponential, or step (two levels, e.g. 98:2)."),
    alpha: float = typer.Option(1e-3, help="L2 strength on the weights."),
    label_column: str = typer.Option("label", "--label-column", help="Name of the label column in a file."),
    test_size: float = typer.Option(0.25, "--test-size", help="Fraction of rows held out for testing."),
    max_iter: int = typer.Option(300, "--max-iter", help="L-BFGS iterations per model."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(Path("softmaxkit-compare"), "--out", help="Output directory."),
) -> None:
    """Compare losses on any dataset: the demo's table and report for DATA."""
    from . import _experiment
    from ._io import prepare_out_dir

    names = _experiment.parse_losses(losses)
    _check_fraction("--test-size", test_size)
    _check_long_tail(long_tail)
    if max_iter < 1:
        raise UserError(f"--max-iter must be >= 1, but got {max_iter}")
    dataset = _load(data, label_column)
    out = prepare_out_dir(out)
    experiment = _run_experiment(dataset, names, long_tail=long_tail, profile=profile.value, alpha=alpha,
                                 test_size=test_size, seed=seed, max_iter=max_iter)
    _print_table(experiment, f"{dataset.name}: test-set metrics")
    path = _write_report(experiment, out, f"softmaxkit compare: {dataset.name}")
    console.print(f"report: [bold]{path}[/bold]")


# ---------------------------------------------------------------- train
@app.command()
@_user_errors
def train(
    data: str = typer.Argument(..., help=DATA_HELP),
    loss: str = typer.Option("ce", help="ce, ls (label smoothing 0.1), cb (class-balanced), focal, poly1 or sparsemax."),
    alpha: float = typer.Option(1e-3, help="L2 strength on the weights."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Override the label smoothing ε."),
    class_weight: str | None = typer.Option(None, "--class-weight", help="balanced or effective_number."),
    solver: str = typer.Option("lbfgs", help="lbfgs (full batch) or adamw (mini-batch)."),
    hidden: str = typer.Option("", help="MLP hidden widths, e.g. 64,32 (default: linear model)."),
    long_tail: float | None = typer.Option(None, "--long-tail", help="Make the training set long-tailed with this imbalance ratio."),
    label_column: str = typer.Option("label", "--label-column", help="Name of the label column in a file."),
    test_size: float = typer.Option(0.25, "--test-size", help="Fraction of rows held out for testing."),
    max_iter: int = typer.Option(300, "--max-iter", help="L-BFGS iterations or AdamW epochs."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(Path("softmaxkit-train"), "--out", help="Output directory (model/ and report.html)."),
) -> None:
    """Train one SoftmaxRegression on DATA; save the model (JSON + NPZ, no pickle) and a report."""
    from . import _experiment
    from ._io import prepare_out_dir, save_model

    (name,) = _experiment.parse_losses(loss)[:1]
    _check_fraction("--test-size", test_size)
    _check_long_tail(long_tail)
    if max_iter < 1:
        raise UserError(f"--max-iter must be >= 1, but got {max_iter}")
    overrides = {"solver": solver}
    if label_smoothing is not None:
        overrides["label_smoothing"] = label_smoothing
    if class_weight is not None:
        overrides["class_weight"] = class_weight
    if hidden.strip():
        try:
            overrides["hidden_layer_sizes"] = tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError:
            raise UserError(f"--hidden must be comma-separated integers such as 64,32, but got {hidden!r}") from None
    dataset = _load(data, label_column)
    out = prepare_out_dir(out)
    experiment = _run_experiment(dataset, [name], long_tail=long_tail, profile="exponential", alpha=alpha,
                                 test_size=test_size, seed=seed, max_iter=max_iter, overrides=overrides)
    _print_table(experiment, f"{dataset.name}: test-set metrics")
    result = experiment.results[0]
    model_dir = save_model(result.model, out / "model", feature_names=experiment.feature_names,
                           mean=experiment.mean, scale=experiment.scale,
                           extra={"dataset": dataset.name, "class_names": experiment.class_names,
                                  "temperature": result.temperature})
    path = _write_report(experiment, out, f"softmaxkit train: {result.label} on {dataset.name}")
    console.print(f"model: [bold]{model_dir}[/bold] (model.json + model.npz)")
    console.print(f"report: [bold]{path}[/bold]")


# ---------------------------------------------------------------- calibrate
class Method(str, Enum):
    temperature = "temperature"
    vector = "vector"
    isotonic = "isotonic"
    histogram = "histogram"
    platt = "platt"
    dirichlet = "dirichlet"


@app.command()
@_user_errors
def calibrate(
    scores: str = typer.Argument(..., help="CSV / NPZ / Parquet with one logit column per class and a label column."),
    method: Method = typer.Option(Method.temperature,
                                  help="temperature, vector, isotonic, histogram, platt (one-vs-rest sigmoid) or "
                                       "dirichlet (matrix scaling, Kull et al. 2019)."),
    label_column: str = typer.Option("label", "--label-column", help="Name of the label column."),
    test_size: float = typer.Option(0.5, "--test-size",
                                     help="Fraction of rows held out to measure ECE/NLL before and after (the rest fits the calibrator)."),
    bins: int = typer.Option(15, help="Confidence bins of the ECE and the reliability diagram."),
    seed: int = typer.Option(0, help="Random seed of the split."),
    out: Path = typer.Option(Path("softmaxkit-calibrate"), "--out", help="Output directory."),
) -> None:
    """Fit a calibrator to a model's scores; print its parameters and ECE/NLL before and after.

    Writes OUT/calibrated.csv (calibrated probabilities of every row), OUT/reliability.png,
    OUT/calibration.json (parameters and metrics), OUT/calibrator.json (the fitted calibrator, reloadable
    with softmaxkit.calibration.load) and OUT/report.html.
    """
    import numpy as np
    from rich.table import Table

    from .. import calibration, metrics, reference
    from ._io import prepare_out_dir, write_bytes_atomic, write_csv_atomic, write_text_atomic
    from .report import figures, render_simple

    _check_fraction("--test-size", test_size)
    if bins < 1:
        raise UserError(f"--bins must be >= 1, but got {bins}")
    data = _load(scores, label_column)
    logits = data.X
    n_classes = logits.shape[1]
    if n_classes < 2:
        raise UserError(f"{scores} must have one logit column per class (at least 2), but has {n_classes}")
    labels = data.y
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= n_classes:
        raise UserError(
            f"{scores}: column {label_column!r} must hold class indices in [0, {n_classes}) matching the "
            f"{n_classes} logit columns ({', '.join(data.feature_names)})"
        )
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=n_classes)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    index = np.arange(len(labels))
    fit_index, eval_index = train_test_split(index, test_size=test_size, stratify=stratify, random_state=seed)
    calibrator = {
        "temperature": calibration.TemperatureScaling, "vector": calibration.VectorScaling,
        "isotonic": calibration.IsotonicCalibration, "histogram": calibration.HistogramBinning,
        "platt": calibration.PlattScaling, "dirichlet": calibration.DirichletCalibration,
    }[method.value]()
    with console.status(f"fitting {method.value} calibration on {len(fit_index)} rows"):
        calibrator.fit(logits[fit_index], labels[fit_index])
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
    parameters, shown = _calibrator_parameters(calibrator)

    console.print(f"[bold]{method.value} calibration[/bold] fitted on {len(fit_index)} rows, "
                  f"measured on {len(eval_index)} held-out rows")
    for key, text in shown.items():
        console.print(f"  {key} = {text}")
    table = Table(header_style="bold")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right")
    table.add_row("ECE", f"{result['ece_before']:.4f}", f"{result['ece_after']:.4f}")
    table.add_row("NLL", f"{result['nll_before']:.4f}", f"{result['nll_after']:.4f}")
    table.add_row("accuracy", f"{result['accuracy_before']:.4f}", f"{result['accuracy_after']:.4f}")
    console.print(table)

    out = prepare_out_dir(out)
    all_after = np.asarray(calibrator.predict_proba(logits), dtype=np.float64)
    header = [f"p_{name}" for name in data.feature_names] + [label_column, "split"]
    split = np.where(np.isin(index, fit_index), "fit", "eval")
    rows = [[f"{p:.10g}" for p in all_after[i]] + [int(labels[i]), split[i]] for i in range(len(labels))]
    write_csv_atomic(out / "calibrated.csv", header, rows)
    png = figures.single_reliability(before, after, y_eval, title_after=f"after {method.value} calibration",
                                     n_bins=bins)
    write_bytes_atomic(out / "reliability.png", png)
    summary = {"scores": str(scores), "method": method.value, "parameters": parameters, **result,
               "n_fit": len(fit_index), "n_eval": len(eval_index)}
    write_text_atomic(out / "calibration.json", json.dumps(summary, indent=2) + "\n")
    # the fitted calibrator itself, reloadable with softmaxkit.calibration.load(path)
    write_text_atomic(out / "calibrator.json", json.dumps(calibrator.to_dict(), indent=2) + "\n")
    page = render_simple(
        f"softmaxkit calibrate: {method.value} on {data.name}",
        [f"<code>{_command_line()}</code>",
         f"ECE {result['ece_before']:.4f} → {result['ece_after']:.4f}, NLL {result['nll_before']:.4f} → "
         f"{result['nll_after']:.4f} on {len(eval_index)} held-out rows."],
        {"reliability.png": png},
    )
    write_text_atomic(out / "report.html", page)
    console.print(f"calibrated probabilities: [bold]{out / 'calibrated.csv'}[/bold]; "
                  f"reliability diagram: [bold]{out / 'reliability.png'}[/bold]")


def _calibrator_parameters(calibrator) -> tuple[dict, dict]:
    """The fitted attributes (``name_``): JSON-able values and short texts for the terminal."""
    import numpy as np

    values, texts = {}, {}
    for name in sorted(vars(calibrator)):
        if not name.endswith("_") or name.startswith("_"):
            continue
        value = getattr(calibrator, name)
        if isinstance(value, (int, float, np.number)):
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


# ---------------------------------------------------------------- explain
@app.command(context_settings={"ignore_unknown_options": True})
@_user_errors
def explain(
    logits: list[float] = typer.Argument(..., help="Two or more logits, e.g. 2.0 1.0 0.1 (negative values allowed)."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="Temperature T > 0 dividing the logits."),
    target: int = typer.Option(0, "--target", "-k", help="True class index for the loss and its gradient."),
) -> None:
    """Softmax, Jacobian, eigenvalues, the p − y gradient and temperature, verified by finite differences."""
    from . import explain as explain_module

    result = explain_module.explain(logits, temperature=temperature, target=target)
    explain_module.render(result, console)


# ---------------------------------------------------------------- bench
def _find_benchmarks():
    """Import the repository's ``benchmarks`` package (it is not installed with softmaxkit)."""
    import importlib

    try:
        return importlib.import_module("benchmarks.__main__")
    except ImportError:
        pass
    for directory in [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[3]]:
        if (directory / "benchmarks" / "_harness.py").exists():
            sys.path.insert(0, str(directory))
            try:
                return importlib.import_module("benchmarks.__main__")
            except ImportError:
                sys.path.pop(0)
    return None


@app.command()
@_user_errors
def bench(
    op: list[str] = typer.Option([], "--op", help="Only this op (repeatable); default: every op's quick set."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    save_csv: bool = typer.Option(False, "--save-csv",
                                  help="Also append the rows to benchmarks/results/<op>.csv (off: quick runs "
                                       "on a busy machine should not mix with recorded results)."),
) -> None:
    """Run the benchmark suite's quick set on this machine and print the ratio table (needs the repository)."""
    module = _find_benchmarks()
    if module is None:
        raise UserError(
            "the benchmark suite lives in the softmaxkit repository, not in the installed package: clone it "
            "and run `softmaxkit bench` (or `python -m benchmarks --quick`) from the clone"
        )
    argv = ["--quick", *op]
    if device:
        argv += ["--device", device]
    if not save_csv:
        argv.append("--no-csv")
    status = module.main(argv)
    if status:
        raise typer.Exit(int(status))


# ---------------------------------------------------------------- claims (its own module: cli/claims.py)
from .claims import claims as _claims  # noqa: E402

app.command(name="claims")(_user_errors(_claims))


def main() -> None:
    app()
