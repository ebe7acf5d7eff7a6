r"""The seeds' "table 3" as a measurement: how hard each loss pushes the true-class logit, against the error.

For a row with scores ``z`` and true class ``y``, the *error* is ``e = 1 − q_y`` (``q`` the model's
probabilities: ``softmax(z)`` for every loss here but sparsemax) and the *push* is ``|∂ℓ/∂z_y|``, measured by
autograd through the loss the model was trained with:

* cross-entropy: ``|p_y − 1| = e`` exactly: the larger the error, the stronger the gradient;
* MSE on raw scores: ``2|z_y − 1|/C``, linear in the score;
* MSE on softmax probabilities: ``(2/C) p_y |(p_y − 1) − ⟨p − t, p⟩|``, which vanishes as ``p_y → 0``;
* hinge: piecewise constant (``#violations/C`` for Weston–Watkins, 1 for Crammer–Singer, then 0).

:func:`sweep` traces the curves on a synthetic family of rows, :func:`measured` reads the points off a trained
model's test rows, :func:`figure` draws both for an experiment and :func:`section` writes the report's panel.
"""

from __future__ import annotations

import html

import numpy as np

#: loss name (as ``SoftmaxRegression(loss=...)``) → label of the curve
SWEEP_LOSSES = {
    "cross_entropy": "cross-entropy",
    "mse_scores": "MSE on raw scores",
    "mse": "MSE on softmax probabilities",
    "hinge": "hinge (Weston–Watkins)",
    "crammer_singer": "hinge (Crammer–Singer)",
    "sigmoid": "one-vs-rest sigmoid",
}


def _loss_call(loss: str, options: dict | None = None):
    """``f(logits, target) -> summed loss`` for a ``SoftmaxRegression`` loss name (and its options)."""
    from ...estimator import _loss_function

    function = _loss_function(loss)
    kwargs = dict(options or {})

    def call(logits, target):
        return function(logits, target, reduction="sum", **kwargs)

    return call


def true_class_gradient(loss: str, logits: np.ndarray, labels: np.ndarray, options: dict | None = None) -> np.ndarray:
    """``∂ℓ_i/∂z_{i y_i}`` for every row (float64 autograd through the softmaxkit loss)."""
    import torch

    z = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    target = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    _loss_call(loss, options)(z, target).backward()
    return z.grad.gather(1, target[:, None]).squeeze(1).numpy()


def sweep(losses=tuple(SWEEP_LOSSES), num_classes: int = 10, points: int = 401) -> dict:
    """The curves for rows ``z = (s, 0, …, 0)`` with true class 0, ``s`` from −8 to 8.

    Returns ``{"error": (points,), "score": (points,), loss: (points,) gradient magnitudes, ...}``.
    """
    s = np.linspace(-8.0, 8.0, points)
    logits = np.zeros((points, num_classes))
    logits[:, 0] = s
    labels = np.zeros(points, dtype=np.int64)
    p_y = np.exp(s - np.logaddexp(s, np.log(num_classes - 1.0)))
    out = {"error": 1.0 - p_y, "score": s}
    for loss in losses:
        out[loss] = np.abs(true_class_gradient(loss, logits, labels))
    return out


def measured(result, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(error, |∂ℓ/∂z_y|)`` on a trained model's test rows, with the loss it was trained with."""
    model = result.model
    options = {}
    if model.loss == "focal":
        options["gamma"] = model.gamma
    elif model.loss == "poly1":
        options["epsilon"] = model.epsilon
    if model.label_smoothing > 0:
        options["label_smoothing"] = model.label_smoothing
    # class weights are left out: the panel shows each row's push before its weight w_y scales it
    gradient = np.abs(true_class_gradient(model.loss, result.test_logits, y_test, options))
    error = 1.0 - result.test_proba[np.arange(len(y_test)), y_test]
    return error, gradient


def figure(experiment) -> bytes:
    """One panel per model: its test rows (dots) and, for the comparison losses, the synthetic curve."""
    from .figures import COLORS, _style, plt, to_png

    results = experiment.results
    num_classes = len(experiment.class_names)
    curves = sweep(tuple({r.model.loss for r in results if r.model.loss in SWEEP_LOSSES}), max(num_classes, 2))
    columns = min(len(results), 4)
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.9 * rows), squeeze=False)
    for index, result in enumerate(results):
        ax = axes[index // columns, index % columns]
        color = COLORS[index % len(COLORS)]
        error, gradient = measured(result, experiment.y_test)
        ax.scatter(error, gradient, s=8, alpha=0.45, color=color, label="test rows")
        if result.model.loss in curves:
            order = np.argsort(curves["error"])
            ax.plot(curves["error"][order], curves[result.model.loss][order], color="#333333", linewidth=1,
                    label="z = (s, 0, …, 0)")
        ax.set_title(result.label, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("error 1 − q_y")
        if index % columns == 0:
            ax.set_ylabel("|∂ℓ/∂z_y|")
        _style(ax)
    for index in range(len(results), rows * columns):
        axes[index // columns, index % columns].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle("Gradient on the true-class logit against the error, per loss", y=1.01)
    fig.tight_layout()
    return to_png(fig)


def section(experiment, image_html: str) -> str:
    """The report's panel: the figure and a sentence per loss read off the measured points."""
    parts = []
    for result in experiment.results:
        error, gradient = measured(result, experiment.y_test)
        if len(error) < 3 or np.ptp(error) == 0:
            continue
        correlation = float(np.corrcoef(error, gradient)[0, 1]) if np.ptp(gradient) > 0 else float("nan")
        wrong = error > 0.5
        mean_wrong = float(gradient[wrong].mean()) if wrong.any() else float("nan")
        mean_right = float(gradient[~wrong].mean()) if (~wrong).any() else float("nan")
        parts.append(f"<li><b>{html.escape(result.label)}</b>: correlation of |∂ℓ/∂z_y| with the error "
                     f"{correlation:.2f}; mean |∂ℓ/∂z_y| {mean_right:.3g} on rows with error ≤ 0.5, "
                     f"{mean_wrong:.3g} on rows with error &gt; 0.5.</li>")
    return (
        "<h2>Gradient against the error (the texts' table 3, measured)</h2>"
        "<p>How hard each loss pushes the true-class logit <i>z<sub>y</sub></i> on the test rows, against the "
        "error 1 − q<sub>y</sub>. Cross-entropy's push equals the error; MSE on raw scores is linear in the "
        "score; MSE on probabilities fades where the model is confidently wrong; a hinge is constant until "
        "the margin is met, then 0. The line is the same loss on synthetic rows z = (s, 0, …, 0). Class "
        "weights are left out (a weighted model's push is w_y times the one shown).</p>"
        + image_html + "<ul>" + "".join(parts) + "</ul>"
    )
