"""The one dispatch table: for each op with more than one implementation, which one serves a call.

Policy (the same for every op):

* ``impl="auto"`` takes the first implementation in the op's row (fastest first) whose ``supports`` accepts
  the request; the last entry of every row is a pure-PyTorch path that accepts everything the op accepts.
* An explicit ``impl`` that cannot serve the request raises a :class:`ValueError` saying why; it never
  silently becomes another implementation.
* Asking has no side effects: ``supports`` reads facts (device, dtype, shape, whether a kernel library is
  cached or a compiler is on ``PATH``), it never builds, compiles or launches anything.

Backends (``torch``, ``cpu``, ``triton``) are siblings below this table; they import the neutral core
(:mod:`softmaxkit._core`), never each other. The table names implementations by ``"module:attribute"`` and
imports them on first use, so ``import softmaxkit`` never imports Triton or builds a C kernel.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Request:
    """The facts about one call that decide which implementation may serve it.

    Attributes:
        device: the inputs' device type (``"cpu"``, ``"cuda"``, ``"meta"``, ...).
        dtype: the main input's dtype.
        ndim: the main input's number of dimensions (after any row flattening the function does).
        real_storage: True when every tensor is a plain ``torch.Tensor`` with real storage; False for meta,
            fake, DTensor or any other subclass (those never reach a C pointer).
        unit_class_stride: the class dimension is contiguous (stride 1).
        flags: op-specific facts by name (``probabilities``, ``inplace_backward``, ...).
    """

    device: str
    dtype: torch.dtype
    ndim: int
    real_storage: bool = True
    unit_class_stride: bool = True
    flags: frozenset[str] = field(default_factory=frozenset)

    def has(self, flag: str) -> bool:
        return flag in self.flags


#: ``supports(request)`` returns None when the implementation can serve the request, else the reason it cannot
Supports = Callable[[Request], "str | None"]


@dataclass(frozen=True)
class Implementation:
    """One row entry: the name users pass as ``impl=``, where the code is, and what it can serve."""

    name: str
    target: str  # "package.module:attribute", resolved on first use
    supports: Supports

    def resolve(self) -> Callable:
        module_name, _, attribute = self.target.partition(":")
        module = importlib.import_module(module_name, __name__)
        return getattr(module, attribute)


_TABLE: dict[str, list[Implementation]] = {}
#: implementation names accepted for an op without being in its row (e.g. legacy aliases) -> row name
_ALIASES: dict[str, dict[str, str]] = {}


def register(op: str, implementation: Implementation, *, alias_of: dict[str, str] | None = None) -> None:
    """Append ``implementation`` to ``op``'s row (call order = ``auto`` preference)."""
    row = _TABLE.setdefault(op, [])
    if any(existing.name == implementation.name for existing in row):
        raise ValueError(f"op {op!r} already has an implementation named {implementation.name!r}")
    row.append(implementation)
    if alias_of:
        _ALIASES.setdefault(op, {}).update(alias_of)


def implementations(op: str) -> tuple[str, ...]:
    """The names ``impl=`` accepts for ``op``: ``"auto"`` first, then the row in preference order."""
    return ("auto", *(implementation.name for implementation in _row(op)))


def _row(op: str) -> list[Implementation]:
    if op not in _TABLE:
        raise KeyError(f"no dispatch row for op {op!r}")
    return _TABLE[op]


def select(op: str, impl: str, request: Request) -> Implementation:
    """The implementation of ``op`` that serves ``request`` under the policy above.

    Raises:
        ValueError: ``impl`` is not a name of the op's row, or the named implementation cannot serve the
            request (the message says why and what can).
    """
    row = _row(op)
    names = implementations(op)
    if not isinstance(impl, str) or (impl not in names and impl not in _ALIASES.get(op, {})):
        raise ValueError(f"`impl` must be one of {', '.join(map(repr, names))}, but got {impl!r}")
    impl = _ALIASES.get(op, {}).get(impl, impl)
    if impl == "auto":
        reasons = []
        for implementation in row:
            reason = implementation.supports(request)
            if reason is None:
                return implementation
            reasons.append(f"{implementation.name}: {reason}")
        raise ValueError(f"no implementation of {op} can serve these inputs ({'; '.join(reasons)})")
    implementation = next(entry for entry in row if entry.name == impl)
    reason = implementation.supports(request)
    if reason is not None:
        servable = [entry.name for entry in row if entry.supports(request) is None]
        raise ValueError(
            f"`impl={impl!r}` cannot serve this call: {reason}; implementations that can: "
            f"{', '.join(map(repr, ['auto', *servable]))}"
        )
    return implementation


def describe(op: str, request: Request) -> dict[str, str | None]:
    """For each implementation of ``op``: None if it can serve ``request``, else why not (no side effects)."""
    return {implementation.name: implementation.supports(request) for implementation in _row(op)}


# ---------------------------------------------------------------------------------------------------------
# Reusable facts for ``supports`` predicates. They must stay free of side effects (no builds, no launches).


def needs_device(*devices: str) -> Supports:
    def check(request: Request) -> str | None:
        if request.device not in devices:
            return f"needs {' or '.join(devices)} tensors, got {request.device}"
        return None

    return check


def all_of(*checks: Supports) -> Supports:
    def check(request: Request) -> str | None:
        for single in checks:
            reason = single(request)
            if reason is not None:
                return reason
        return None

    return check


def always(request: Request) -> str | None:
    return None


# ---------------------------------------------------------------------------------------------------------
# The table. Each op's row is registered by the section below that names it; rows are filled in preference
# order. Implementations live in the backends (``backends/<name>/...``) or, for the composite paths, in
# ``functional/``.


# ---------------------------------------------------------------------------------------------------------
# Sparse maps and their Fenchel-Young losses: sparsemax, entmax15, entmax_bisect and their *_loss.
# Every implementation is a torch.library custom op (``torch.ops.softmaxkit.*``) behind a Python entry with
# one signature per kind of op:
#   maps   fn(rows (N, C), kind, alpha_rows (N, 1) | None, scalar_alpha | None, n_iter) -> p (N, C)
#   losses fn(rows (N, C), target (N,), kind, weight, ignore_index, reduction, alpha_rows, scalar_alpha,
#             n_iter) -> loss
# ``kind`` is "sparsemax", "entmax15" or "bisect". Row order: C kernel (CPU), Triton (CUDA), PyTorch (any
# device, meta included). The functional layer (functional/sparse.py) refuses tensor subclasses such as
# DTensor with a TypeError before asking; ``flags`` may carry "subclass" for callers that ask anyway.

_SPARSE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_SPARSE_VARIANTS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def _sparse_plain_rows(request: Request) -> str | None:
    if request.has("subclass"):
        return "needs plain tensors (not a tensor subclass such as DTensor)"
    if request.dtype not in _SPARSE_DTYPES:
        return f"needs float32, float64, bfloat16 or float16 input, got {request.dtype}"
    if request.ndim != 2:
        return f"needs 2-D rows, got {request.ndim}-D"
    return None


def _sparse_cpu_kernel(request: Request) -> str | None:
    from .cpu import _build

    if not _build.usable(_SPARSE_VARIANTS[request.dtype], "sparse"):
        return "the C kernel cannot be built here (SOFTMAXKIT_CPU_KERNELS=0 or no C compiler on PATH)"
    return None


def _sparse_triton_installed(request: Request) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"


_SPARSE_CPU = all_of(needs_device("cpu"), _sparse_plain_rows, _sparse_cpu_kernel)
_SPARSE_TRITON = all_of(needs_device("cuda"), _sparse_plain_rows, _sparse_triton_installed)

for _op in ("sparsemax", "entmax15"):
    register(_op, Implementation("cpu", ".cpu.sparse:cpu_entmax", _SPARSE_CPU))
    register(_op, Implementation("triton", ".triton.sparse:triton_entmax", _SPARSE_TRITON))
    register(_op, Implementation("torch", ".torch.sparse:torch_entmax", always))
    register(f"{_op}_loss", Implementation("cpu", ".cpu.sparse:cpu_fenchel_young", _SPARSE_CPU))
    register(f"{_op}_loss", Implementation("torch", ".torch.sparse:torch_fenchel_young", always))
register("entmax_bisect", Implementation("torch", ".torch.sparse:torch_entmax", always))
register("entmax_bisect_loss", Implementation("torch", ".torch.sparse:torch_fenchel_young", always))
del _op
