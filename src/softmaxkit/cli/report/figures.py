"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

One consistent look: a colour per model (the same in every figure), light grid, titles that say what is
plotted and axis labels with units.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
DPI = 110
#: above this many classes the report shows summaries instead of per-class figures.
MANY_CLASSES = 30


def _style(ax) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def to_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def reliability_bins(proba: np.ndarray, labels: np.ndarray, n_bins: int = 15):
    """The non-empty confidence bins (:func:`softmaxkit.metrics.reliability_curve`)."""
    from ... import metrics

    return metrics.reliability_curve(proba, labels, n_bins=n_bins)


def _reliability_panel(ax, proba, labels, n_bins, color, title, ece) -> None:
    curve = reliability_bins(proba, labels, n_bins)
    centres = (np.asarray(curve.lower) + np.asarray(curve.upper)) / 2
    widths = np.asarray(curve.upper) - np.asarray(curve.lower)
    accuracy, confidence = np.asarray(curve.accuracy), np.asarray(curve.confidence)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfect calibration")
    share = np.asarray(curve.count, dtype=float) / max(float(np.sum(curve.count)), 1.0)
    bars = ax.bar(centres, accuracy, width=widths, color=color, edgecolor="white", label="accuracy")
    for bar, weight in zip(bars, share):  # paler bars hold fewer predictions (less weight in the ECE)
        bar.set_alpha(0.3 + 0.6 * np.sqrt(min(1.0, weight / max(share.max(), 1e-12))))
    ax.bar(centres, np.abs(confidence - accuracy), bottom=np.minimum(accuracy, confidence), width=widths,
           color="none", edgecolor="#d62728", hatch="//", linewidth=0.6, label="gap to mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.text(0.04, 0.92, f"ECE {ece:.3f}", transform=ax.transAxes, fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round,pad=0.25"})
    _style(ax)


def reliability_grid(experiment, n_bins: int = 15) -> bytes:
    """Reliability diagrams: one column per model, before (top) and after (bottom) temperature scaling."""
    results = experiment.results
    columns = len(results)
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns + 0.6, 5.6), squeeze=False)
    for j, result in enumerate(results):
        color = COLORS[j % len(COLORS)]
        _reliability_panel(axes[0, j], result.test_proba, experiment.y_test, n_bins, color,
                           f"{result.label}\nbefore", result.metrics["ece"])
        _reliability_panel(axes[1, j], result.calibrated_proba, experiment.y_test, n_bins, color,
                           f"after T = {result.temperature:.2f}", result.calibrated_metrics["ece"])
        axes[1, j].set_xlabel("confidence (max probability)")
    for i in range(2):
        axes[i, 0].set_ylabel("accuracy in bin")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle("Reliability diagrams on the test set (bars below the diagonal: over-confident; "
                 "paler bars: fewer predictions)", y=1.01)
    fig.tight_layout()
    return to_png(fig)


def confusion_grid(experiment) -> bytes:
    """Row-normalised confusion matrices, one per model."""
    results = experiment.results
    n_classes = len(experiment.class_names)
    columns = len(results)
    longest = max(map(len, experiment.class_names))
    size = 2.4 if n_classes <= 12 else 3.2
    size += min(longest, 24) * 0.05 if n_classes <= 12 else 0
    fig, axes = plt.subplots(1, columns, figsize=(size * columns + 0.8, size + 0.8), squeeze=False)
    image = None
    for j, result in enumerate(results):
        ax = axes[0, j]
        matrix = result.metrics["confusion"].astype(float)
        rows = matrix.sum(axis=1, keepdims=True)
        normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{result.label}\nbalanced acc. {result.metrics['balanced_accuracy']:.3f}", fontsize=9)
        ticks = np.arange(n_classes)
        names = experiment.class_names  # full names: truncation made class_0 / class_1 read the same
        if n_classes <= 12:
            ax.set_xticks(ticks, names, fontsize=7, rotation=90 if longest > 2 else 0)
            ax.set_yticks(ticks, names if j == 0 else [], fontsize=7)
            if n_classes <= 10:
                for (r, c), value in np.ndenumerate(normalised):
                    if value >= 0.05:
                        ax.text(c, r, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center",
                                fontsize=6, color="white" if value > 0.6 else "#333333")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("predicted")
        if j == 0:
            ax.set_ylabel("true class")
    fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.015, pad=0.02, label="fraction of the true class")
    fig.suptitle("Confusion matrices on the test set (rows sum to 1)", y=1.02)
    return to_png(fig)


def per_class_f1(experiment) -> bytes:
    """F1 per class for every model, classes ordered as in training (head first), train counts on the axis.

    With more than :data:`MANY_CLASSES` classes: a histogram of the per-class F1 of each model.
    """
    results = experiment.results
    n_classes = len(experiment.class_names)
    if n_classes > MANY_CLASSES:
        return per_class_f1_histogram(experiment)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(min(11.0, max(7.0, 0.2 * n_classes * len(results) + 2)), 4.2))
    x = np.arange(n_classes)
    for j, result in enumerate(results):
        ax.bar(x - 0.4 + width * (j + 0.5), result.metrics["per_class_f1"], width=width,
               color=COLORS[j % len(COLORS)], label=result.label)
    labels = [f"{name}\nn={count}" for name, count in zip(experiment.class_names, experiment.train_counts)]
    longest = max(map(len, experiment.class_names))
    ax.set_xticks(x, labels, fontsize=8, rotation=90 if longest * n_classes > 90 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 on the test set")
    ax.set_xlabel("class (n = training samples)")
    ax.set_title("Per-class F1: the tail classes are where the losses differ")
    ax.legend(fontsize=8, ncol=len(results), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    _style(ax)
    fig.tight_layout()
    return to_png(fig)


def per_class_f1_histogram(experiment) -> bytes:
    """How many classes reach each F1 on the test set, one outlined histogram per model."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    edges = np.linspace(0, 1, 21)
    for j, result in enumerate(experiment.results):
        f1 = np.asarray(result.metrics["per_class_f1"], dtype=float)
        ax.hist(f1, bins=edges, histtype="step", linewidth=1.8, color=COLORS[j % len(COLORS)],
                label=f"{result.label} (median {np.median(f1):.2f})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on the test set")
    ax.set_ylabel("number of classes")
    ax.set_title(f"Per-class F1 of the {len(experiment.class_names)} classes")
    ax.legend(fontsize=8)
    _style(ax)
    fig.tight_layout()
    return to_png(fig)


def loss_curves(experiment) -> bytes:
    """Training objective per L-BFGS iteration (or AdamW epoch), one line per model."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for j, result in enumerate(experiment.results):
        curve = np.asarray(result.model.loss_curve_, dtype=float)
        ax.plot(np.arange(1, len(curve) + 1), curve, color=COLORS[j % len(COLORS)], label=result.label)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training objective (loss + L2)")
    ax.set_title("Training curves (each loss has its own scale)")
    ax.legend(fontsize=8)
    _style(ax)
    fig.tight_layout()
    return to_png(fig)


def temperature_sweep(experiment, temperatures) -> bytes:
    """Test NLL and ECE of ``softmax(z / T)`` against ``T``, with each model's fitted temperature marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    for j, result in enumerate(experiment.results):
        color = COLORS[j % len(COLORS)]
        left.plot(temperatures, result.sweep_nll, color=color, label=result.label)
        right.plot(temperatures, result.sweep_ece, color=color, label=result.label)
        t = result.temperature  # the dot: the test metrics of softmax(z / T) at the fitted T
        left.plot([t], [result.calibrated_metrics["nll"]], "o", color=color, markersize=6, markeredgecolor="black")
        right.plot([t], [result.calibrated_metrics["ece"]], "o", color=color, markersize=6,
                   markeredgecolor="black")
    for ax, name in ((left, "negative log-likelihood"), (right, "expected calibration error")):
        ax.set_xscale("log", base=2)
        ax.axvline(1.0, color="#999999", linestyle=":", linewidth=1)
        ax.set_xlabel("temperature T  (softmax(z / T); T > 1 softens)")
        ax.set_ylabel(name)
        _style(ax)
    left.set_title("Test NLL vs temperature (dots: T fitted on validation)")
    right.set_title("Test ECE vs temperature")
    right.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def single_reliability(proba_before, proba_after, labels, *, title_after, n_bins: int = 15) -> bytes:
    """Before/after reliability diagrams for one set of scores (the ``calibrate`` command).

    Each panel is :func:`softmaxkit.plot.reliability_diagram` (accuracy bars, the gap in red, ECE and
    MCE in the legend).
    """
    from ... import plot

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.6))
    plot.reliability_diagram(proba_before, labels, n_bins, ax=axes[0], title="before calibration",
                             show_histogram=False)
    plot.reliability_diagram(proba_after, labels, n_bins, ax=axes[1], title=title_after, show_histogram=False)
    for ax in axes:
        ax.set_xlabel("confidence (max probability)")
    fig.tight_layout()
    return to_png(fig)
