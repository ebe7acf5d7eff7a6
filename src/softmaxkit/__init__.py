"""softmaxkit: the softmax family of functions and losses, from the textbook formula to the fastest kernel.

The public functions live here (``softmaxkit.cross_entropy``, ...); modules in :mod:`softmaxkit.nn`, the
NumPy float64 oracle in :mod:`softmaxkit.reference`.

``import softmaxkit`` imports the library (PyTorch, every public name and every registered
``torch.ops.softmaxkit`` op), except in the ``softmaxkit`` command itself (the console script,
``python -m softmaxkit`` or ``python -m softmaxkit.cli``): there each name is imported on first use, so
``softmaxkit --help`` and option errors answer without loading PyTorch.
"""

# ruff: noqa: F401  (_load_all binds the public names through locals())
import importlib as _importlib
import os as _os
import sys as _sys
from typing import TYPE_CHECKING

_loaded = False


def _load_all() -> None:
    """Import the public names (and with them PyTorch and every registered op) into this module."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # subpackages reachable as attributes, like torch.nn
    calibration, metrics, nn, reference = (
        _importlib.import_module(f"{__name__}.{module}") for module in ("calibration", "metrics", "nn", "reference")
    )
    from .distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    from .functional import cross_entropy, log_softmax, logsumexp, softmax
    from .functional.comparison import (
        crammer_singer_loss,
        multi_margin_loss,
        multilabel_soft_margin_loss,
        score_mse_loss,
        softmax_mse_loss,
    )
    from .functional.distillation import distillation_loss
    from .functional.focal import focal_loss, poly1_cross_entropy
    from .functional.gumbel import gumbel_softmax
    from .functional.linear_cross_entropy import linear_cross_entropy
    from .functional.sampled import sampled_softmax_loss
    from .functional.sparse import (
        entmax15,
        entmax15_loss,
        entmax_bisect,
        entmax_bisect_loss,
        sparsemax,
        sparsemax_loss,
    )
    from .functional.topk import topk_softmax
    from .functional.weights import class_weights

    globals().update({name: value for name, value in locals().items() if not name.startswith("_")})


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs (at run time: _load_all)
    from . import calibration, metrics, nn, reference
    from .distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    from .estimator import SoftmaxRegression
    from .functional import cross_entropy, log_softmax, logsumexp, softmax
    from .functional.comparison import (
        crammer_singer_loss,
        multi_margin_loss,
        multilabel_soft_margin_loss,
        score_mse_loss,
        softmax_mse_loss,
    )
    from .functional.distillation import distillation_loss
    from .functional.focal import focal_loss, poly1_cross_entropy
    from .functional.gumbel import gumbel_softmax
    from .functional.linear_cross_entropy import linear_cross_entropy
    from .functional.sampled import sampled_softmax_loss
    from .functional.sparse import (
        entmax15,
        entmax15_loss,
        entmax_bisect,
        entmax_bisect_loss,
        sparsemax,
        sparsemax_loss,
    )
    from .functional.topk import topk_softmax
    from .functional.weights import class_weights

__version__ = "0.1.0"

__all__ = [
    "SoftmaxRegression",
    "__version__",
    "calibration",
    "class_weights",
    "crammer_singer_loss",
    "cross_entropy",
    "distillation_loss",
    "entmax15",
    "entmax15_loss",
    "entmax_bisect",
    "entmax_bisect_loss",
    "focal_loss",
    "gumbel_softmax",
    "linear_cross_entropy",
    "load_model",
    "log_softmax",
    "logsumexp",
    "metrics",
    "multi_margin_loss",
    "multilabel_soft_margin_loss",
    "nn",
    "poly1_cross_entropy",
    "reference",
    "sampled_softmax_loss",
    "score_mse_loss",
    "softmax",
    "softmax_mse_loss",
    "sparsemax",
    "sparsemax_loss",
    "topk_softmax",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


#: the extra that SoftmaxRegression, calibration and the command line need.
EXTRA = "cli"
_NEEDS_EXTRA = ("sklearn", "scipy", "matplotlib", "rich", "typer", "pandas", "skops")


def missing_extra_message(error: ImportError, what: str) -> str:
    """One line: ``what`` needs the ``cli`` extra (``error`` names the missing module)."""
    module = (error.name or str(error)).split(".")[0]
    return (f"{what} needs the optional dependencies of softmaxkit[{EXTRA}] ({module} is not installed); "
            f"install them with: pip install 'softmaxkit[{EXTRA}]'")


def load_model(path):
    """Load a model saved by ``softmaxkit train``: one object that predicts from raw features.

    Its ``predict_proba(X)`` applies, in order, the saved preprocessing (imputation of missing values and
    one-hot encoding of categorical columns), the standardisation and the fitted temperature ``T`` to the
    raw feature table ``X`` (a pandas DataFrame with the training columns, or an array in their order) and
    returns ``softmax(z / T)``. See :class:`softmaxkit.cli._model.SavedModel`.
    """
    from .cli._model import load_saved_model

    return load_saved_model(path)


def __getattr__(name: str):
    # SoftmaxRegression pulls in scikit-learn (~1.5 s); load it on first use, not on `import softmaxkit`.
    if name == "SoftmaxRegression":
        try:
            from .estimator import SoftmaxRegression
        except ImportError as error:
            if (error.name or "").split(".")[0] not in _NEEDS_EXTRA:
                raise
            raise ImportError(missing_extra_message(error, "softmaxkit.SoftmaxRegression")) from None
        return SoftmaxRegression
    if name in __all__ and not name.startswith("__"):
        _load_all()
        if name in globals():
            return globals()[name]
    if not name.startswith("__"):
        try:  # a submodule not imported yet (softmaxkit.plot, softmaxkit.datasets, ...)
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'softmaxkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _is_command_line() -> bool:
    """Whether this process is the ``softmaxkit`` command (which imports what each sub-command needs)."""
    script = _os.path.basename(_sys.argv[0] if _sys.argv else "")
    if _os.path.splitext(script)[0] == "softmaxkit":  # the console script (softmaxkit, softmaxkit.exe)
        return True
    argv = list(getattr(_sys, "orig_argv", ()))
    return any(argv[i] == "-m" and argv[i + 1] in ("softmaxkit", "softmaxkit.cli") for i in range(len(argv) - 1))


if not _is_command_line():
    _load_all()
