"""The report's confidence and confusion panel: how sure each model is, and which classes it mixes up.

Confidence is read three ways (:func:`softmaxkit.metrics.confidence`): the top probability, the gap between
the top two (the texts' "gap between the largest and second-largest probability") and the entropy, each
averaged over the right and the wrong test predictions — a useful confidence is high on the first and low
on the second. The confusion side lists the most confused class pairs
(:func:`softmaxkit.metrics.most_confused_pairs`).
"""

from __future__ import annotations

import html

import numpy as np


def rows(experiment, k: int = 3) -> list[dict]:
    """Per model: mean confidence measures on right / wrong rows, and the ``k`` most confused pairs."""
    from ... import metrics

    out = []
    for result in experiment.results:
        probs = np.asarray(result.test_proba, dtype=np.float64)
        probs = probs / probs.sum(axis=1, keepdims=True)
        measures = metrics.confidence(probs)
        right = probs.argmax(axis=1) == experiment.y_test
        entry = {"model": result.label, "right": int(right.sum()), "wrong": int((~right).sum())}
        for name in ("max_probability", "margin", "entropy"):
            values = getattr(measures, name)
            entry[f"{name}_right"] = float(values[right].mean()) if right.any() else float("nan")
            entry[f"{name}_wrong"] = float(values[~right].mean()) if (~right).any() else float("nan")
        entry["pairs"] = metrics.most_confused_pairs(experiment.y_test, probs, k,
                                                     num_classes=len(experiment.class_names))
        out.append(entry)
    return out


def section(experiment) -> str:
    names = experiment.class_names
    table = ["<table><thead><tr><th>model</th><th>max p (right / wrong)</th><th>top-1 − top-2 (right / wrong)</th>"
             "<th>entropy, nats (right / wrong)</th><th>most confused (true → predicted: count)</th></tr></thead>"
             "<tbody>"]
    for entry in rows(experiment):
        pairs = ", ".join(f"{html.escape(str(names[p.true]))} → {html.escape(str(names[p.predicted]))}: {p.count}"
                          for p in entry["pairs"]) or "none"
        cells = [f"<td class='name'>{html.escape(entry['model'])}</td>"]
        for name in ("max_probability", "margin", "entropy"):
            cells.append(f"<td>{entry[name + '_right']:.3f} / {entry[name + '_wrong']:.3f}</td>")
        cells.append(f"<td>{pairs}</td>")
        table.append("<tr>" + "".join(cells) + "</tr>")
    table.append("</tbody></table>")
    return (
        "<h2>Confidence and confusion</h2>"
        "<p>Mean confidence on the test rows a model gets right and on those it gets wrong (a useful "
        "confidence separates them), and the class pairs it confuses most often.</p>" + "".join(table)
    )
