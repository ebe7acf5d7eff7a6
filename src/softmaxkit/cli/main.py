"""``softmaxkit`` command: the entry point and the list of sub-commands.

Each sub-command is one module in :mod:`softmaxkit.cli.commands` that registers itself on the shared
Typer app (:mod:`softmaxkit.cli._app`); a new one is a new module and one entry in :data:`COMMANDS`.
"""


from __future__ import annotations

import importlib

import typer

from ._app import app, console

#: the sub-commands, in the order ``softmaxkit --help`` lists them (modules of softmaxkit.cli.commands).
COMMANDS = ("demo", "compare", "train", "predict", "calibrate", "explain", "bench", "claims")

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
    """Run the app; a usage error (an unknown option, a value of the wrong type) is one line, exit 2."""
    import sys

    # typer's own click (older typer: the click package); BadParameter derives from UsageError in both
    usage_error = typer.BadParameter.__mro__[1]
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["--help"]
    try:
        status = app(args=argv, prog_name="softmaxkit", standalone_mode=False)
    except usage_error as error:
        name = error.ctx.command_path if error.ctx is not None else "softmaxkit"
        message = " ".join(error.format_message().split())
        sys.stderr.write(f"{name}: error: {message} (see `{name} --help`)\n")
        raise SystemExit(2) from None
    except typer.Abort:
        sys.stderr.write("softmaxkit: interrupted\n")
        raise SystemExit(130) from None
    raise SystemExit(status if isinstance(status, int) else 0)


def main() -> None:
    run()
