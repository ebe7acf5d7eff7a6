"""``softmaxkit claims``: check the numeric and mathematical claims of the softmax texts.

The claims and their checks live in :mod:`softmaxkit.cli.claims`; this module is the command: its
options, the table it prints and the output folder (OUT/report.html, OUT/claims.json).
"""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .._app import Progress, command, command_line, console
from ._shared import overwrite_option


@command()
def claims(
    only: str | None = typer.Option(None, "--only", help="Comma-separated claim ids (see --list); default: every claim."),
    seeds: str | None = typer.Option(None, "--seeds",
                                     help="Seeds of the empirical checks, comma-separated (default 0,1,2; 0 with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer random trials, the two smallest datasets, for a fast check."),
    list_claims: bool = typer.Option(False, "--list", help="List the claim ids and exit."),
    out: Path = typer.Option(Path("softmaxkit-claims"), "--out", help="Directory for report.html and claims.json."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Check every numeric or mathematical claim of the softmax texts; print the verdicts with the evidence.

    Each row: the text (000-004) and section, the claim, the verdict (holds / does not hold / depends), the
    measured evidence and the command that reproduces it. Writes OUT/report.html and OUT/claims.json.
    """
    from rich import box
    from rich.table import Table

    from .. import claims as checks
    from .._io import OutputDir, write_text_atomic

    if list_claims:
        for item in checks.CLAIMS:
            console.print(f"{item.id:28} {item.text} {item.section}: {item.claim}", markup=False, highlight=False)
        return
    items = checks.select(only)
    ctx = checks.Context(seeds=checks.parse_seeds(seeds if seeds is not None else ("0" if quick else "0,1,2")),
                         quick=quick)
    output = OutputDir(out, overwrite=overwrite)
    start = time.perf_counter()
    rows = []
    with Progress(len(items), verb="checking") as progress:
        for item in items:
            progress.start(item.id)
            (row,) = checks.run([item], ctx)
            rows.append(row)
            progress.done(row["verdict"])
    seconds = time.perf_counter() - start
    table = Table(title="softmax texts: claims checked", box=box.SIMPLE_HEAVY, header_style="bold", show_lines=True)
    table.add_column("text §", ratio=2, overflow="fold")
    table.add_column("claim", ratio=5, overflow="fold")
    table.add_column("verdict", ratio=2, overflow="fold")
    table.add_column("evidence", ratio=11, overflow="fold")
    table.add_column("reproduce", ratio=3, style="dim", overflow="fold")
    colours = {checks.HOLDS: "green", checks.FAILS: "red", checks.DEPENDS: "yellow"}
    for r in rows:
        table.add_row(f"{r['text']} {r['section']}", r["claim"], f"[{colours[r['verdict']]}]{r['verdict']}[/]",
                      r["evidence"], r["reproduce"])
    console.print(table)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in checks.VERDICTS}
    console.print(f"{len(rows)} claims: {counts[checks.HOLDS]} hold, {counts[checks.FAILS]} do not hold, "
                  f"{counts[checks.DEPENDS]} depend ({seconds:.0f} s)")
    line = command_line()
    with output as staging:
        write_text_atomic(staging / "claims.json", json.dumps({"command": line, "seeds": ctx.seeds, "quick": quick,
                                                               "claims": rows}, indent=2, default=float) + "\n")
        write_text_atomic(staging / "report.html", checks.render_html(rows, line, seconds))
    console.print(f"report: [bold]{output.out / 'report.html'}[/bold]")
