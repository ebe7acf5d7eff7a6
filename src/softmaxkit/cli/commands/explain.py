"""``softmaxkit explain``: softmax, its Jacobian and gradient on the user's numbers, checked numerically."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

import typer

from .._app import command, console


@command(context_settings={"ignore_unknown_options": True})
def explain(
    logits: list[float] = typer.Argument(..., help="Two or more logits, e.g. 2.0 1.0 0.1 (negative values allowed)."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="Temperature T > 0 dividing the logits."),
    target: int = typer.Option(0, "--target", "-k", help="True class index for the loss and its gradient."),
) -> None:
    """Softmax, Jacobian, eigenvalues, the p − y gradient and temperature, verified by finite differences."""
    from .. import explain as explain_module

    result = explain_module.explain(logits, temperature=temperature, target=target)
    explain_module.render(result, console)
