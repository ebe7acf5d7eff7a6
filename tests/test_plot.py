"""softmaxkit.plot: each plot renders to PNG with Agg, draws the numbers softmaxkit.metrics computes, uses
the axes it is given, and leaves pyplot's global state alone."""

from __future__ import annotations

import doctest
import io
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

import softmaxkit.plot
from softmaxkit import metrics
from softmaxkit import reference as ref
from softmaxkit.plot import confusion_matrix_heatmap, per_class_f1_bars, reliability_diagram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(800, 5)) * 3
    probs = ref.softmax(logits)
    labels = (ref.softmax(logits / 3).cumsum(1) > rng.random((800, 1))).argmax(1)
    return probs, labels


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


def test_reliability_diagram_draws_the_curve(problem):
    probs, labels = problem
    figure = reliability_diagram(probs, labels, n_bins=10)
    assert isinstance(figure, Figure)
    data = _png(figure)
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    curve = metrics.reliability_curve(probs, labels, 10)
    diagram, histogram = figure.axes
    accuracy_bars = diagram.containers[0]
    np.testing.assert_allclose([bar.get_height() for bar in accuracy_bars], curve.accuracy)
    np.testing.assert_allclose([bar.get_x() for bar in accuracy_bars], curve.lower)
    np.testing.assert_allclose([bar.get_height() for bar in histogram.containers[0]], curve.count)
    ece = metrics.expected_calibration_error(probs, labels, 10)
    assert f"ECE {ece:.4f}" in diagram.get_legend().get_title().get_text()


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("class_index", [None, 2])
def test_reliability_diagram_into_given_axes(problem, strategy, class_index):
    probs, labels = problem
    figure = Figure()
    left, right = figure.subplots(1, 2)
    returned = reliability_diagram(probs, labels, 8, strategy, class_index=class_index, ax=right)
    assert returned is figure
    assert not left.has_data() and right.has_data()
    assert len(figure.axes) == 3  # the two axes and the histogram's twin
    assert _png(figure).startswith(PNG_MAGIC)
    alone = reliability_diagram(probs, labels, 8, strategy, class_index=class_index, show_histogram=False)
    assert len(alone.axes) == 1


@pytest.mark.parametrize("normalize", ["true", "pred", "all", None])
def test_confusion_matrix_heatmap_shows_the_matrix(problem, normalize):
    probs, labels = problem
    figure = confusion_matrix_heatmap(labels, probs, normalize=normalize, class_names=list("abcde"))
    assert _png(figure).startswith(PNG_MAGIC)
    counts = metrics.confusion_matrix(labels, probs).astype(float)
    expected = {
        "true": counts / counts.sum(1, keepdims=True),
        "pred": counts / counts.sum(0, keepdims=True),
        "all": counts / counts.sum(),
        None: counts,
    }[normalize]
    image = figure.axes[0].get_images()[0]
    np.testing.assert_allclose(image.get_array(), expected)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == list("abcde")
    assert len(figure.axes[0].texts) == 25  # annotated: 5 x 5 <= 20 classes


def test_confusion_matrix_heatmap_empty_classes_show_zero():
    figure = confusion_matrix_heatmap([0, 0, 1], [0, 1, 1], num_classes=4)
    values = figure.axes[0].get_images()[0].get_array()
    assert np.isfinite(values).all() and values[2:].sum() == 0


def test_per_class_f1_bars_show_f1(problem):
    probs, labels = problem
    figure = per_class_f1_bars(labels, probs, sort=True)
    assert _png(figure).startswith(PNG_MAGIC)
    f1 = metrics.precision_recall_f1(labels, probs, None).f1
    heights = [bar.get_height() for bar in figure.axes[0].patches]
    np.testing.assert_allclose(heights, np.sort(f1))
    macro = metrics.precision_recall_f1(labels, probs, "macro").f1
    assert any(f"macro F1 {macro:.3f}" == text.get_text() for text in figure.axes[0].get_legend().get_texts())


def test_plot_argument_errors(problem):
    probs, labels = problem
    with pytest.raises(ValueError, match=r"`class_names` must name each of the 5 classes, but has 2"):
        confusion_matrix_heatmap(labels, probs, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"`normalize` must be one of 'true', 'pred', 'all'"):
        confusion_matrix_heatmap(labels, probs, normalize="rows")
    with pytest.raises(TypeError, match=r"`ax` must be a matplotlib Axes or None"):
        per_class_f1_bars(labels, probs, ax="left")
    with pytest.raises(ValueError, match=r"rows sum to 1"):
        reliability_diagram(probs * 2, labels)


def test_no_pyplot_and_lazy_matplotlib():
    """``import softmaxkit`` does not import matplotlib; ``softmaxkit.plot`` does not import pyplot and
    plotting registers no pyplot figure. Checked in a fresh interpreter."""
    code = (
        "import sys, softmaxkit, softmaxkit.metrics, softmaxkit.calibration\n"
        "assert 'matplotlib' not in sys.modules, 'softmaxkit imported matplotlib'\n"
        "import numpy as np, softmaxkit.plot as p\n"
        "p.reliability_diagram(np.array([[0.8, 0.2], [0.3, 0.7]]), [0, 0]).savefig(__import__('io').BytesIO())\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_docstring_examples():
    failures, tried = doctest.testmod(softmaxkit.plot, verbose=False)
    assert tried >= 6 and failures == 0
