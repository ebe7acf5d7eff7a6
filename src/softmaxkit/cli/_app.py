"""What every sub-command shares: the Typer app, the consoles, user errors, notes, warnings and progress.

User errors (a missing or malformed file, an unknown loss, a bad option value) print one line to stderr,
``softmaxkit COMMAND: error: ...``, and exit with status 2; no traceback. Python warnings raised while a
command runs are printed as one line, ``softmaxkit COMMAND: warning: ...``, without source paths.
Progress is a live bar on a terminal and plain lines at a steady interval when the output is piped.

Nothing here imports torch: ``softmaxkit --help`` and option errors answer before it is loaded.
"""


from __future__ import annotations

import functools
import math
import os
import re
import shlex
import sys
import time
import warnings

import typer
from rich.console import Console

from ._io import UserError

app = typer.Typer(
    name="softmaxkit",
    help="softmaxkit: softmax, cross-entropy and friends, from the textbook formula to the fastest kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

DATA_HELP = (
    "A dataset shipped with scikit-learn (digits, iris, wine, breast_cancer) or a table: CSV / TSV / any "
    "delimited text (optionally .gz/.bz2/.xz/.zip), NPZ or Parquet, with a label column."
)
#: seconds between two progress lines when the output is not a terminal.
PROGRESS_INTERVAL = float(os.environ.get("SOFTMAXKIT_PROGRESS_INTERVAL", "10"))
#: the estimator's parameter names as the command line spells them.
FLAGS = {
    "alpha": "--alpha", "hidden_layer_sizes": "--hidden", "label_smoothing": "--label-smoothing",
    "class_weight": "--class-weight", "solver": "--solver", "max_iter": "--max-iter", "loss": "--loss",
    "random_state": "--seed", "imbalance_ratio": "--long-tail", "n_bins": "--bins",
}
_state = {"command": "softmaxkit"}


def cli_wording(message: str) -> str:
    """An estimator's message with its parameter names (`` `alpha` ``) replaced by the command's flags."""
    for name, flag in FLAGS.items():
        message = message.replace(f"`{name}`", flag).replace(f"{name}=", f"{flag} ")
    return re.sub(r"np\.(?:int|float|str_)\d*\(([^()]*)\)", r"\1", message)


def _one_line(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    return cli_wording(" ".join(message.split()))


def error_line(text: str) -> None:
    errors.print(f"{_state['command']}: error: {text}", markup=False, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    """A one-line note on stdout (a decision the command took for the user)."""
    console.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    errors.print(f"{_state['command']}: warning: {cli_wording(text)}", markup=False, highlight=False,
                 soft_wrap=True)


def command(**settings):
    """Register a sub-command: user errors become one line on stderr and exit status 2."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            _state["command"] = f"softmaxkit {function.__name__}"
            previous = warnings.showwarning
            warnings.showwarning = _show_warning
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("default")
                    warnings.showwarning = _show_warning
                    return function(*args, **kwargs)
            except (UserError, ValueError, TypeError, OSError) as error:
                if isinstance(error, TypeError) and not _raised_by_validation(error):
                    raise
                error_line(_one_line(error))
                raise typer.Exit(2) from None
            except ImportError as error:
                from .. import missing_extra_message

                error_line(missing_extra_message(error, "the command line"))
                raise typer.Exit(2) from None
            finally:
                warnings.showwarning = previous

        app.command(**settings)(wrapper)
        return function

    return decorate


def _raised_by_validation(error: TypeError) -> bool:
    """A TypeError from softmaxkit's own argument checks (they name the argument in backticks)."""
    return "`" in str(error) or "--" in str(error)


def command_line() -> str:
    return "softmaxkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ---------------------------------------------------------------- option checks (before any work)
def check_fraction(flag: str, value: float) -> float:
    if not 0 < value < 1:
        raise UserError(f"{flag} must lie in (0, 1), but got {value:g}")
    return value


def check_positive_int(flag: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{flag} must be an integer >= 1, but got {value}")
    return value


def check_seed(value: int) -> int:
    if not 0 <= value < 2**32:
        raise UserError(f"--seed must be an integer in [0, 2**32 - 1], but got {value}")
    return value


def check_long_tail(value: float | None) -> float | None:
    if value is not None and not (value >= 1 and math.isfinite(value)):
        raise UserError(f"--long-tail must be a finite imbalance ratio >= 1, but got {value:g}")
    return value


def parse_alpha(text: str) -> float | None:
    """``--alpha``: a number >= 0, or ``auto`` (None: chosen from the data)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--alpha must be a number >= 0 or 'auto', but got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise UserError(f"--alpha must be a finite number >= 0 or 'auto', but got {text!r}")
    return value


def parse_columns(flag: str, text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"{flag} must be comma-separated column names, but got {text!r}")
    return names


# ---------------------------------------------------------------- progress
class Progress:
    """Progress of ``total`` steps: a live bar on a terminal, plain lines when the output is piped.

    Piped, a line is printed when a step starts, every :data:`PROGRESS_INTERVAL` seconds while it runs
    (with its iteration count) and when it ends, so a log shows that a long run is alive.
    """

    def __init__(self, total: int, verb: str = "training"):
        self.total, self.verb = total, verb
        self.live = console.is_terminal
        self.index, self.label, self.started, self.last_line = 0, "", 0.0, 0.0
        self._bar = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = [TextColumn("{task.description}")]
            if self.total > 1:
                columns += [BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
            self._bar = Progress(*columns, console=console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.verb, total=self.total, detail="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def _line(self, text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.last_line = time.perf_counter()

    def start(self, label: str) -> None:
        self.index += 1
        self.label, self.started = label, time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.verb} {label}", detail="")
        else:
            self._line(f"[{self.index}/{self.total}] {self.verb} {label} ...")

    def iteration(self, done: int, limit: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, detail=f"iteration {done}/{limit}")
        elif time.perf_counter() - self.last_line >= PROGRESS_INTERVAL:
            seconds = time.perf_counter() - self.started
            self._line(f"[{self.index}/{self.total}] {self.verb} {self.label}: iteration {done}/{limit}, "
                       f"{seconds:.0f} s")

    def done(self, summary: str) -> None:
        seconds = time.perf_counter() - self.started
        if self._bar is not None:
            self._bar.update(self._task, advance=1, detail=summary)
        else:
            self._line(f"[{self.index}/{self.total}] {self.label}: {summary}, {seconds:.1f} s")


class status:
    """A spinner on a terminal, one plain line otherwise."""

    def __init__(self, text: str):
        self.text = text
        self._status = console.status(text) if console.is_terminal else None

    def __enter__(self):
        if self._status is not None:
            self._status.__enter__()
        else:
            console.print(f"{self.text} ...", markup=False, highlight=False, soft_wrap=True)
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)
