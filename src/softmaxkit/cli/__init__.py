"""The ``softmaxkit`` command line (needs the ``softmaxkit[cli]`` extra)."""

from __future__ import annotations

import importlib.util
import sys

#: the modules the command line needs beyond torch and numpy (the ``cli`` extra), by import name.
REQUIRED = ("typer", "rich", "sklearn", "scipy", "matplotlib", "pandas", "skops")


def missing_modules() -> list[str]:
    """The modules of :data:`REQUIRED` that cannot be imported (checked without importing them)."""
    missing = []
    for name in REQUIRED:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> None:
    """Run the ``softmaxkit`` command (``argv`` defaults to ``sys.argv[1:]``)."""
    missing = missing_modules()
    if missing:
        from .. import EXTRA

        sys.stderr.write(
            f"softmaxkit: error: the command line needs the optional dependencies of softmaxkit[{EXTRA}] "
            f"({', '.join(missing)} not installed); install them with: pip install 'softmaxkit[{EXTRA}]'\n"
        )
        raise SystemExit(2)
    from .main import run

    globals()["main"] = _entry  # importing the submodule `main` rebinds this name to it: keep the function
    run(argv)


_entry = main


def __getattr__(name: str):
    if name == "app":
        from .main import app

        return app
    raise AttributeError(f"module 'softmaxkit.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
