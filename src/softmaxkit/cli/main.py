"""``softmaxkit`` command: the entry point and the list of sub-commands.

Each sub-command is one module in :mod:`softmaxkit.cli.commands` that registers itself on the shared
Typer app (:mod:`softmaxkit.cli._app`); a new one is a new module and one entry in :data:`COMMANDS`.
"""


from __future__ import annotations

import importlib

import typer

from ._app import app, console

#: the sub-commands, in the order ``softmaxkit --help`` lists them (modules of softmaxkit.cli.commands).
COMMANDS = ("demo", "compare", "train", "predict", "calibrate", "explain", "bench")

for _name in COMMANDS:
    importlib.import_module(f"{__package__}.commands.{_name}")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"softmaxkit {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """softmaxkit: softmax, cross-entropy and friends, from the textbook formula to the fastest kernel."""


def run(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="softmaxkit")


def main() -> None:
    run()
