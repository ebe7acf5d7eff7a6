"""The HTML report of ``softmaxkit demo`` / ``compare`` / ``train``: one self-contained file.

Figures are embedded as base64 PNG ``data:`` URIs and the style sheet is inline, so ``report.html`` can be
mailed or archived on its own. :func:`render` returns the HTML text and the PNGs (the command line also
writes them next to the report).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from importlib import resources

from . import confidence, figures, gradients

_METRIC_COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("balanced_accuracy", "balanced acc.", "{:.3f}"),
    ("nll", "NLL", "{:.3f}"),
)


def build_figures(experiment) -> dict[str, bytes]:
    """Every figure of the report, by file name."""
    from .._experiment import SWEEP

    pngs = {
        "reliability.png": figures.reliability_grid(experiment),
        "per_class_f1.png": figures.per_class_f1(experiment),
        "loss_curves.png": figures.loss_curves(experiment),
    }
    if not _many(experiment):  # a C×C matrix of thousands of classes is a blank square: pairs instead
        pngs["confusion.png"] = figures.confusion_grid(experiment)
    pngs["gradients.png"] = gradients.figure(experiment)
    if all(len(r.sweep_nll) for r in experiment.results):
        pngs["temperature_sweep.png"] = figures.temperature_sweep(experiment, SWEEP)
    return pngs


def metrics_rows(experiment) -> list[dict]:
    """One row per model: the numbers of the terminal table and of the report's table."""
    rows = []
    for result in experiment.results:
        m, c = result.metrics, result.calibrated_metrics
        rows.append({
            "model": result.label, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "balanced_accuracy": m["balanced_accuracy"], "nll": m["nll"], "nll_after": c["nll"],
            "ece": m["ece"], "ece_after": c["ece"], "temperature": result.temperature,
            "iterations": int(result.model.n_iter_), "fit_seconds": result.fit_seconds,
            "converged": bool(result.converged), "temperature_at_bound": bool(result.temperature_at_bound),
        })
    return rows


def _image(pngs: dict[str, bytes], name: str, alt: str) -> str:
    if name not in pngs:
        return ""
    data = base64.b64encode(pngs[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(experiment) -> str:
    rows = metrics_rows(experiment)
    best = {
        key: (max if key in ("accuracy", "macro_f1", "balanced_accuracy") else min)(r[key] for r in rows)
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "nll", "ece", "ece_after")
    }
    head = "".join(f"<th>{label}</th>" for _, label, _ in _METRIC_COLUMNS)
    out = [
        "<table><thead><tr><th>model</th>" + head
        + "<th>ECE before</th><th>ECE after</th><th>NLL after</th><th>fitted T</th><th>iterations</th>"
        "<th>fit time</th></tr></thead><tbody>"
    ]
    for row in rows:
        cells = [f"<td class='name'>{html.escape(row['model'])}</td>"]
        for key, _, fmt in _METRIC_COLUMNS:
            cls = " class='best'" if row[key] == best[key] else ""
            cells.append(f"<td{cls}>{fmt.format(row[key])}</td>")
        for key in ("ece", "ece_after"):
            cls = " class='best'" if row[key] == best[key] else ""
            cells.append(f"<td{cls}>{row[key]:.3f}</td>")
        cells.append(f"<td>{row['nll_after']:.3f}</td><td>{row['temperature']:.2f}</td>"
                     f"<td>{row['iterations']}</td><td>{row['fit_seconds']:.2f} s</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _many(experiment) -> bool:
    return len(experiment.class_names) > figures.MANY_CLASSES


def _counts_table(experiment) -> str:
    if _many(experiment):
        parts = []
        for split, counts in (("train", experiment.train_counts), ("test", experiment.test_counts)):
            counts = list(map(int, counts))
            parts.append(f"{split}: {min(counts)} to {max(counts)} rows per class (median "
                         f"{int(sorted(counts)[len(counts) // 2])})")
        return f"<p>Rows per class — {'; '.join(parts)}.</p>"
    head = "".join(f"<th>{html.escape(name)}</th>" for name in experiment.class_names)
    train = "".join(f"<td>{n}</td>" for n in experiment.train_counts)
    test = "".join(f"<td>{n}</td>" for n in experiment.test_counts)
    return (f"<div class='scroll'><table class='counts'><thead><tr><th>class</th>{head}</tr></thead><tbody>"
            f"<tr><td class='name'>train</td>{train}</tr><tr><td class='name'>test</td>{test}</tr></tbody></table></div>")


def confused_pairs(confusion, k: int = 15) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal cells ``(true, predicted, count)`` of a confusion matrix."""
    from ... import metrics

    return [(pair.true, pair.predicted, pair.count) for pair in metrics.confused_pairs_of(confusion, k)]


def _summaries(experiment) -> str:
    """Many classes: the most confused pairs and the worst classes of each model, as tables."""
    import numpy as np

    names = experiment.class_names
    out = ["<p>With more than "
           f"{figures.MANY_CLASSES} classes a confusion matrix is unreadable; these are its largest entries and the "
           "classes with the lowest F1.</p>"]
    for result in experiment.results:
        support = np.asarray(result.metrics["confusion"]).sum(axis=1)
        out.append(f"<h3>{html.escape(result.label)}</h3><div class='pair'>")
        rows = "".join(
            f"<tr><td class='name'>{html.escape(names[i])}</td><td class='name'>{html.escape(names[j])}</td>"
            f"<td>{n}</td><td>{n / max(int(support[i]), 1):.0%}</td></tr>"
            for i, j, n in confused_pairs(result.metrics["confusion"]))
        out.append("<table><thead><tr><th>true class</th><th>predicted as</th><th>rows</th><th>of the class</th>"
                   f"</tr></thead><tbody>{rows}</tbody></table>")
        f1 = np.asarray(result.metrics["per_class_f1"], dtype=float)
        worst = np.argsort(f1, kind="stable")[:15]
        rows = "".join(f"<tr><td class='name'>{html.escape(names[c])}</td><td>{f1[c]:.3f}</td>"
                       f"<td>{int(experiment.train_counts[c])}</td><td>{int(support[c])}</td></tr>" for c in worst)
        out.append("<table><thead><tr><th>worst classes</th><th>F1</th><th>train rows</th><th>test rows</th>"
                   f"</tr></thead><tbody>{rows}</tbody></table></div>")
    return "\n".join(out)


def _interpretation(experiment) -> str:
    """A few sentences read off the numbers (never hard-coded: computed from this run)."""
    rows = metrics_rows(experiment)
    by_f1 = max(rows, key=lambda r: r["macro_f1"])
    by_ece = min(rows, key=lambda r: r["ece"])
    over = [r for r in rows if r["temperature"] > 1.05]
    under = [r for r in rows if r["temperature"] < 0.95]
    parts = [
        f"Best macro-F1: <b>{html.escape(by_f1['model'])}</b> ({by_f1['macro_f1']:.3f}); "
        f"best calibrated out of the box (lowest ECE before scaling): <b>{html.escape(by_ece['model'])}</b> "
        f"({by_ece['ece']:.3f})."
    ]
    if over:
        names = ", ".join(html.escape(r["model"]) for r in over)
        parts.append(f"A fitted temperature above 1 means the model was over-confident: {names}.")
    if under:
        names = ", ".join(html.escape(r["model"]) for r in under)
        parts.append(f"Below 1 means under-confident (its probabilities were too flat): {names}.")
    parts.append("Temperature scaling divides all logits by one number, so it never changes a prediction: "
                 "accuracy and F1 are the same before and after; only NLL and ECE move.")
    return " ".join(parts)


def _features(experiment) -> str:
    encoded = experiment.settings.get("n_encoded_features", experiment.n_features)
    if experiment.preprocessor is None:
        return f"{experiment.n_features} features"
    categorical = experiment.categorical
    what = (f"{len(categorical)} categorical one-hot encoded ({html.escape(', '.join(categorical[:5]))}"
            f"{', ...' if len(categorical) > 5 else ''}), " if categorical else "")
    return (f"{experiment.n_features} feature columns ({what}missing values imputed; {encoded} features after "
            "preprocessing, fitted on the training rows)")


def _convergence(experiment) -> str:
    """A warning paragraph for models that stopped short and temperatures at a bound (empty otherwise)."""
    parts = []
    for result in experiment.results:
        if not result.converged:
            parts.append(f"<b>{html.escape(result.label)}</b>: L-BFGS {html.escape(result.stop_reason)}; the model "
                         "may be far from its optimum.")
        if result.temperature_at_bound:
            parts.append(f"<b>{html.escape(result.label)}</b>: the fitted temperature T = {result.temperature:g} is "
                         "at a bound of its search range (a bound, not an estimate).")
    return f"<p class='warning'>{' '.join(parts)}</p>" if parts else ""


def render(experiment, *, title: str, command: str, pngs: dict[str, bytes] | None = None) -> tuple[str, dict]:
    """The report's HTML text and its figures (PNG bytes by file name)."""
    import softmaxkit

    pngs = build_figures(experiment) if pngs is None else pngs
    css = resources.files(__package__).joinpath("style.css").read_text(encoding="utf-8")
    settings = experiment.settings
    tail = (f"made long-tailed: imbalance ratio {experiment.long_tail:g}, {settings['profile']} profile"
            if experiment.long_tail else "used as is")
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>softmaxkit {softmaxkit.__version__} · {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
        f" · <code>{html.escape(command)}</code></p>",
        "<h2>Setup</h2>",
        f"<p>Dataset <b>{html.escape(experiment.dataset)}</b>: {len(experiment.class_names)} classes, "
        f"{_features(experiment)}. Stratified split into {settings['n_train']} training rows "
        f"(training pool {tail}), {settings['n_validation']} validation rows (used only to fit the temperature) "
        f"and {settings['n_test']} test rows (every number below). Features standardised with the training "
        f"statistics. Each model is <code>softmaxkit.SoftmaxRegression</code> (L-BFGS, "
        f"L2 α = {settings['alpha']:g}, at most {settings['max_iter']} iterations).</p>",
        _convergence(experiment),
        _counts_table(experiment),
        "<h2>Results</h2>",
        _table(experiment),
        f"<p>{_interpretation(experiment)}</p>",
        "<p class='note'>NLL: mean negative log-likelihood of the true class. ECE: expected calibration "
        "error with 15 equal-width confidence bins. Fitted T: the temperature minimising validation NLL "
        "(<code>softmaxkit.calibration.TemperatureScaling</code>); ECE/NLL after use softmax(z / T).</p>",
        "<h2>Reliability diagrams</h2>",
        "<p>Accuracy against confidence in each bin. Bars under the diagonal are over-confident bins; the "
        "hatched part is the gap that ECE averages (weighted by how many predictions fall in the bin).</p>",
        _image(pngs, "reliability.png", "reliability diagrams"),
        "<h2>Temperature sweep</h2>",
        "<p>What dividing the logits by T does to the test NLL and ECE. The dot is the temperature fitted on "
        "the validation set; the dotted line is T = 1 (the model as trained).</p>",
        _image(pngs, "temperature_sweep.png", "temperature sweep"),
        confidence.section(experiment),
        gradients.section(experiment, _image(pngs, "gradients.png", "gradient against the error")),
        "<h2>Per-class F1</h2>",
        _image(pngs, "per_class_f1.png", "per-class F1"),
        "<h2>Confusion matrices</h2>" if not _many(experiment) else "<h2>Most confused classes</h2>",
        _image(pngs, "confusion.png", "confusion matrices") if not _many(experiment) else _summaries(experiment),
        "<h2>Training curves</h2>",
        _image(pngs, "loss_curves.png", "loss curves"),
    ]
    body = "\n".join(s for s in sections if s)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{css}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    )
    return page, pngs


def render_simple(title: str, paragraphs: list[str], images: dict[str, bytes], table_html: str = "") -> str:
    """A small self-contained page (the ``calibrate`` command's report)."""
    css = resources.files(__package__).joinpath("style.css").read_text(encoding="utf-8")
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{p}</p>" for p in paragraphs), table_html]
    body += [_image(images, name, name) for name in images]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{css}</style></head>\n<body><main>\n"
        + "\n".join(b for b in body if b) + "\n</main></body></html>\n"
    )
