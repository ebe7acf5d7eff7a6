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
        "confusion.png": figures.confusion_grid(experiment),
        "per_class_f1.png": figures.per_class_f1(experiment),
        "loss_curves.png": figures.loss_curves(experiment),
    }
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


def _counts_table(experiment) -> str:
    head = "".join(f"<th>{html.escape(name[:12])}</th>" for name in experiment.class_names)
    train = "".join(f"<td>{n}</td>" for n in experiment.train_counts)
    test = "".join(f"<td>{n}</td>" for n in experiment.test_counts)
    return (f"<table class='counts'><thead><tr><th>class</th>{head}</tr></thead><tbody>"
            f"<tr><td class='name'>train</td>{train}</tr><tr><td class='name'>test</td>{test}</tr></tbody></table>")


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
        f"{experiment.n_features} features. Stratified split into {settings['n_train']} training rows "
        f"(training pool {tail}), {settings['n_validation']} validation rows (used only to fit the temperature) "
        f"and {settings['n_test']} test rows (every number below). Features standardised with the training "
        f"statistics. Each model is <code>softmaxkit.SoftmaxRegression</code> (L-BFGS, "
        f"L2 α = {settings['alpha']:g}, at most {settings['max_iter']} iterations).</p>",
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
        "<h2>Confusion matrices</h2>",
        _image(pngs, "confusion.png", "confusion matrices"),
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
