"""``softmaxkit`` command: entry point and sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="softmaxkit",
    help="softmaxkit: softmax, cross-entropy and friends, from the textbook formula to the fastest kernel.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """softmaxkit: softmax, cross-entropy and friends, from the textbook formula to the fastest kernel."""


@app.command()
def demo() -> None:
    """Show softmax and cross-entropy on the seeds' worked example (the full demo is not built yet)."""
    import torch

    import softmaxkit

    logits = torch.tensor([2.0, 1.0, 0.1])
    probs = softmaxkit.softmax(logits)
    loss = softmaxkit.cross_entropy(logits, torch.tensor(0))
    typer.echo(f"logits            {logits.tolist()}")
    typer.echo(f"softmax           {[round(p, 3) for p in probs.tolist()]}")
    typer.echo(f"cross-entropy(y=0) {loss.item():.4f}")
    typer.echo("The full demo (training, loss comparison, calibration, HTML report) is not built yet.")


def main() -> None:
    app()
