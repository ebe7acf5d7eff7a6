"""Plots of a classifier's metrics: reliability diagram, confusion-matrix heat map, per-class F1 bars.

Importing this module imports matplotlib (nothing else in softmaxkit does). Each function draws into the
``ax`` it is given, or into a new :class:`matplotlib.figure.Figure` made without ``pyplot`` — no global
figure registry, no backend switch, safe in servers and threads — and returns the Figure. Save it with
``fig.savefig("plot.png")`` (rendered by Agg), or show it in a notebook by evaluating it.

Inputs are those of :mod:`softmaxkit.metrics` (NumPy arrays or tensors), which computes every number drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from . import _validation as v
from . import metrics

__all__ = ["confusion_matrix_heatmap", "per_class_f1_bars", "reliability_diagram"]

_ACCURACY_COLOUR = "#1f77b4"
_GAP_COLOUR = "#d62728"
_CONFIDENCE_COLOUR = "#7f7f7f"


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"`ax` must be a matplotlib Axes or None, but got {type(ax).__name__}")
        return ax.figure, ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def _set_xticks(ax: Axes, positions: np.ndarray, names: list[str]) -> None:
    """Class names under the x-axis, slanted when they are long."""
    if max(map(len, names)) > 3:
        ax.set_xticks(positions, names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(positions, names)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(f"`class_names` must name each of the {num_classes} classes, but has {len(names)} names")
    return names


def reliability_diagram(
    probs: object,
    labels: object,
    n_bins: int = 15,
    strategy: str = "uniform",
    *,
    class_index: int | None = None,
    ax: Axes | None = None,
    show_histogram: bool = True,
    title: str | None = None,
) -> Figure:
    """Reliability diagram with its confidence histogram (Guo et al. 2017, figure 1).

    Top: for each non-empty bin of confidence, a bar of the bin's accuracy spanning the bin, the gap to
    the bin's mean confidence in red, and the diagonal of perfect calibration; the legend gives the ECE
    and MCE. Bottom: how many rows fall in each bin, with the overall accuracy and mean confidence
    marked (a model whose confidence line sits right of its accuracy line is over-confident).

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: number of bins.
        strategy: ``"uniform"`` or ``"quantile"`` bins, as :func:`softmaxkit.metrics.reliability_curve`.
        class_index: None for the top-label diagram, or a class for its one-vs-rest diagram.
        ax: draw the diagram here (the histogram then goes on a twin y-axis of ``ax``); by default a new
            Figure with the histogram in a panel below.
        show_histogram: draw the histogram.
        title: axes title (default: says which curve and how many rows).

    Returns:
        The :class:`~matplotlib.figure.Figure` drawn on.

    Example:
        >>> import numpy as np
        >>> from softmaxkit.plot import reliability_diagram
        >>> probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> reliability_diagram(probs, [0, 1, 1, 0], n_bins=5).savefig(__import__("io").BytesIO(), format="png")
    """
    curve = metrics.reliability_curve(probs, labels, n_bins, strategy, class_index=class_index)
    total = int(curve.count.sum())
    weights = curve.count / total
    gaps = np.abs(curve.accuracy - curve.confidence)
    ece, mce = float(np.sum(weights * gaps)), float(gaps.max())

    panel = ax is None and show_histogram  # the histogram in its own panel below (else on a twin axis)
    if ax is None:
        figure = Figure(figsize=(5.0, 6.0 if show_histogram else 4.5), layout="constrained")
        if show_histogram:
            grid = figure.add_gridspec(2, 1, height_ratios=(3, 1))
            ax = figure.add_subplot(grid[0])
            histogram_ax = figure.add_subplot(grid[1], sharex=ax)
        else:
            ax = figure.add_subplot()
            histogram_ax = None
    else:
        figure, ax = _figure_and_axes(ax, (5.0, 4.5))
        histogram_ax = ax.twinx() if show_histogram else None

    widths = curve.upper - curve.lower
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
    ax.bar(curve.lower, curve.accuracy, width=widths, align="edge", color=_ACCURACY_COLOUR,
           edgecolor="white", alpha=0.85, label="accuracy" if class_index is None else "frequency")
    ax.bar(curve.lower, curve.confidence - curve.accuracy, bottom=curve.accuracy, width=widths, align="edge",
           color=_GAP_COLOUR, alpha=0.35, edgecolor=_GAP_COLOUR, hatch="//", label="gap to confidence")
    ax.plot(curve.confidence, curve.accuracy, marker="o", markersize=3, color="black", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy" if class_index is None else f"fraction of class {class_index}")
    ax.legend(loc="upper left", fontsize="small", title=f"ECE {ece:.4f}   MCE {mce:.4f}",
              title_fontsize="small")
    if title is None:
        which = "top label" if class_index is None else f"class {class_index} vs rest"
        title = f"Reliability ({which}, {total:,} rows, {strategy} bins)"
    ax.set_title(title, fontsize="medium")

    x_label = "confidence" if class_index is None else f"p(class {class_index})"
    if histogram_ax is not None:
        histogram_ax.bar(curve.lower, curve.count, width=widths, align="edge", color=_CONFIDENCE_COLOUR,
                         alpha=0.6 if panel else 0.25, edgecolor="white")
        histogram_ax.set_ylabel("rows")
        if not panel:  # on a twin axis: keep the bars in the lower third, behind the diagram
            histogram_ax.set_ylim(0, 3 * max(1, int(curve.count.max())))
            ax.set_zorder(histogram_ax.get_zorder() + 1)
            ax.patch.set_visible(False)
    if panel:  # mark the mean accuracy and confidence under the histogram
        mean_accuracy = float(np.sum(weights * curve.accuracy))
        mean_confidence = float(np.sum(weights * curve.confidence))
        histogram_ax.axvline(mean_accuracy, color=_ACCURACY_COLOUR, linestyle="--", linewidth=1.2,
                             label=f"{'accuracy' if class_index is None else 'frequency'} {mean_accuracy:.3f}")
        histogram_ax.axvline(mean_confidence, color=_GAP_COLOUR, linestyle="--", linewidth=1.2,
                             label=f"mean confidence {mean_confidence:.3f}")
        histogram_ax.legend(loc="upper left", fontsize="x-small")
        histogram_ax.set_xlabel(x_label)
        ax.tick_params(labelbottom=False)
    else:
        ax.set_xlabel(x_label)
    return figure


def confusion_matrix_heatmap(
    labels: object,
    preds: object,
    num_classes: int | None = None,
    *,
    normalize: str | None = "true",
    class_names: Sequence[str] | None = None,
    annotate: bool | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heat map of the confusion matrix (rows: true class, columns: predicted class).

    Args:
        labels: ``(N,)`` true class indices.
        preds: ``(N,)`` predictions or ``(N, C)`` scores, as :func:`softmaxkit.metrics.confusion_matrix`.
        num_classes: ``C`` (inferred by default).
        normalize: ``"true"`` (each row sums to 1: recall on the diagonal), ``"pred"`` (each column sums
            to 1: precision on the diagonal), ``"all"`` or ``None`` (counts). Empty rows/columns show 0.
        class_names: tick labels, one per class.
        annotate: write the value in each cell; by default only when ``C <= 20``.
        ax: axes to draw in (default: a new Figure).
        title: axes title.

    Returns:
        The :class:`~matplotlib.figure.Figure` drawn on.

    Example:
        >>> from softmaxkit.plot import confusion_matrix_heatmap
        >>> figure = confusion_matrix_heatmap([0, 1, 2, 2], [0, 2, 2, 2], class_names=["cat", "dog", "fox"])
        >>> figure.axes[0].get_xlabel()
        'predicted class'
    """
    if normalize is not None:
        v.check_choice("normalize", normalize, ("true", "pred", "all"))
    counts = metrics.confusion_matrix(labels, preds, num_classes)
    num_classes = counts.shape[0]
    names = _class_names(class_names, num_classes)
    values = counts.astype(np.float64)
    if normalize == "true":
        values = _safe_ratio(values, values.sum(axis=1, keepdims=True))
    elif normalize == "pred":
        values = _safe_ratio(values, values.sum(axis=0, keepdims=True))
    elif normalize == "all":
        values = values / values.sum()

    size = min(12.0, 3.0 + 0.4 * num_classes)
    figure, ax = _figure_and_axes(ax, (size + 1.0, size))
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction" if normalize else "rows")
    ticks = np.arange(num_classes)
    if num_classes <= 50:
        _set_xticks(ax, ticks, names)
        ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if annotate is None:
        annotate = num_classes <= 20
    if annotate:
        threshold = 0.5 if normalize else 0.5 * float(values.max())  # white text on the darker half
        for (row, column), value in np.ndenumerate(values):
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            ax.text(column, row, text, ha="center", va="center", fontsize="x-small",
                    color="white" if value > threshold else "black")
    ax.set_title(title or f"Confusion matrix ({'normalised over ' + normalize if normalize else 'counts'})",
                 fontsize="medium")
    return figure


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def per_class_f1_bars(
    labels: object,
    preds: object,
    num_classes: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    sort: bool = False,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Bar chart of each class's F1, with the macro and weighted averages as horizontal lines.

    Args:
        labels: ``(N,)`` true class indices.
        preds: ``(N,)`` predictions or ``(N, C)`` scores.
        num_classes: ``C`` (inferred by default).
        class_names: tick labels, one per class.
        sort: order the bars from worst to best F1.
        ax: axes to draw in (default: a new Figure).
        title: axes title.

    Returns:
        The :class:`~matplotlib.figure.Figure` drawn on.

    Example:
        >>> from softmaxkit.plot import per_class_f1_bars
        >>> figure = per_class_f1_bars([0, 0, 1, 2], [0, 1, 1, 1])
        >>> [round(float(bar.get_height()), 3) for bar in figure.axes[0].patches]
        [0.667, 0.5, 0.0]
    """
    per_class = metrics.precision_recall_f1(labels, preds, None, num_classes=num_classes)
    macro = metrics.precision_recall_f1(labels, preds, "macro", num_classes=num_classes).f1
    weighted = metrics.precision_recall_f1(labels, preds, "weighted", num_classes=num_classes).f1
    f1 = per_class.f1
    names = _class_names(class_names, f1.shape[0])
    order = np.argsort(f1, kind="stable") if sort else np.arange(f1.shape[0])
    figure, ax = _figure_and_axes(ax, (min(14.0, 3.0 + 0.3 * f1.shape[0]), 4.0))
    positions = np.arange(f1.shape[0])
    ax.bar(positions, f1[order], color=_ACCURACY_COLOUR, alpha=0.85)
    ax.axhline(macro, color=_GAP_COLOUR, linestyle="--", linewidth=1.2, label=f"macro F1 {macro:.3f}")
    ax.axhline(weighted, color="black", linestyle=":", linewidth=1.2, label=f"weighted F1 {weighted:.3f}")
    if f1.shape[0] <= 60:
        _set_xticks(ax, positions, [names[i] for i in order])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("F1")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "F1 per class", fontsize="medium")
    return figure
