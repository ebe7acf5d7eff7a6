"""``softmaxkit bench``: the benchmark suite's quick set (needs the repository checkout)."""

# ruff: noqa: B008  (typer declares options as argument defaults, by design)
from __future__ import annotations

import sys
from pathlib import Path

import typer

from .._app import command
from .._io import UserError

DEVICES = ("cpu", "cuda")


def find_benchmarks():
    """Import the repository's ``benchmarks`` package (it is not installed with softmaxkit)."""
    import importlib

    try:
        return importlib.import_module("benchmarks.__main__")
    except ImportError:
        pass
    for directory in [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[4]]:
        if (directory / "benchmarks" / "_harness.py").exists():
            sys.path.insert(0, str(directory))
            try:
                return importlib.import_module("benchmarks.__main__")
            except ImportError:
                sys.path.pop(0)
    return None


def check_device(device: str | None) -> None:
    if device is None:
        return
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, but got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available on this machine "
                            "(torch.cuda.is_available() is False); use --device cpu")


@command()
def bench(
    op: list[str] = typer.Option([], "--op", help="Only this op (repeatable); default: every op's quick set."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    save_csv: bool = typer.Option(False, "--save-csv",
                                  help="Also append the rows to benchmarks/results/<op>.csv (off: quick runs "
                                       "on a busy machine should not mix with recorded results)."),
) -> None:
    """Run the benchmark suite's quick set on this machine and print the ratio table (needs the repository)."""
    check_device(device)
    module = _self().find_benchmarks()
    if module is None:
        raise UserError(
            "the benchmark suite lives in the softmaxkit repository, not in the installed package: clone it "
            "and run `softmaxkit bench` (or `python -m benchmarks --quick`) from the clone"
        )
    argv = ["--quick", *op]
    if device:
        argv += ["--device", device]
    if not save_csv:
        argv.append("--no-csv")
    status = module.main(argv)
    if status:
        raise typer.Exit(int(status))


def _self():
    return sys.modules[__name__]
