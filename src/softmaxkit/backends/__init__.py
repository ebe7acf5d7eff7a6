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
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch as _torch  # `torch` is also the name of the subpackage backends.torch

from .._core import constant_result, has_real_storage


@dataclass(frozen=True)
class Request:
    """The facts about one call that decide which implementation may serve it.

    Attributes:
        device: the inputs' device type (``"cpu"``, ``"cuda"``, ``"meta"``, ...).
        dtype: the main input's dtype.
        ndim: the main input's number of dimensions (after any row flattening the function does).
        real_storage: True when every tensor is a plain ``_torch.Tensor`` with real storage; False for meta,
            fake, DTensor or any other subclass (those never reach a C pointer).
        unit_class_stride: the class dimension is contiguous (stride 1).
        flags: op-specific facts by name (``probabilities``, ``inplace_backward``, ...).
    """

    device: str
    dtype: _torch.dtype
    ndim: int
    real_storage: bool = True
    unit_class_stride: bool = True
    flags: frozenset[str] = field(default_factory=frozenset)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def with_flag(self, flag: str) -> Request:
        return replace(self, flags=self.flags | {flag})

    @classmethod
    def of(cls, main: _torch.Tensor, *others: _torch.Tensor | None, ndim: int | None = None, class_dim: int = -1,
           flags: tuple[str, ...] = ()) -> Request:
        """The request of a call whose main input is ``main`` (``others``: the other tensors of the call).

        While ``torch.compile``/``torch.export`` trace, the tensors seen are stand-ins for real ones, so they
        count as having storage: the custom ops' fake kernels serve the trace and the real kernel the run.
        """
        real = _torch.compiler.is_compiling() or has_real_storage(main, *others)
        if not real and any(_is_subclass(t) for t in (main, *others)):
            flags = (*flags, SUBCLASS)
        if not _torch.compiler.is_compiling() and _torch._C._are_functorch_transforms_active():
            flags = (*flags, FUNCTORCH)
        unit = main.dim() == 0 or main.shape[class_dim] <= 1 or main.stride(class_dim) == 1
        return cls(main.device.type, main.dtype, main.dim() if ndim is None else ndim, real, unit,
                   frozenset(flags))


#: ``supports(request)`` returns None when the implementation can serve the request, else the reason it cannot,
#: phrased to follow the implementation's name ("needs CUDA tensors, got cpu")
Supports = Callable[[Request], "str | None"]


@dataclass(frozen=True)
class Implementation:
    """One row entry: the name users pass as ``impl=``, where the code is, and what it can serve."""

    name: str
    target: str  # "package.module:attribute", resolved on first use
    supports: Supports

    def resolve(self) -> Callable:
        module_name, _, attribute = self.target.partition(":")
        # a module imported before (every eager call, and the first trace) is looked up, not imported again:
        # torch.compile traces a dict lookup, not importlib
        module = sys.modules.get(module_name)
        if module is None:
            module = importlib.import_module(module_name)
        return getattr(module, attribute)


_TABLE: dict[str, list[Implementation]] = {}
#: flag :func:`select` adds for an explicitly named implementation (some serve only when asked by name,
#: e.g. Triton kernels interpreted on the CPU under ``TRITON_INTERPRET=1``)
EXPLICIT = "explicit"
#: flag of a call with a tensor subclass other than a fake tensor (a DTensor, ...): the custom ops have no rule
#: for them, so plain torch ops (the composite path) serve them or they are refused
SUBCLASS = "subclass"
#: flag of a call made under a ``torch.func`` transform (``grad``, ``vmap``, ...): this torch's custom ops have
#: no functorch rule (their generated autograd Function lacks ``setup_context``), so plain torch ops serve it
FUNCTORCH = "functorch"
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
    reason = implementation.supports(request.with_flag(EXPLICIT))
    if reason is not None:
        servable = [entry.name for entry in row if entry.supports(request) is None]
        raise ValueError(
            f"`impl={impl!r}` {reason}; implementations that can serve this call: "
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


def needs_flag_absent(flag: str, reason: str) -> Supports:
    def check(request: Request) -> str | None:
        return reason if request.has(flag) else None

    return check


def needs_ndim(name: str, *ndims: int) -> Supports:
    def check(request: Request) -> str | None:
        if request.ndim not in ndims:
            return f"handles {' or '.join(f'{n}-d' for n in ndims)} {name}, got {request.ndim}-d"
        return None

    return check


def _is_subclass(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return tensor is not None and type(tensor) not in (_torch.Tensor, _torch.nn.Parameter, FakeTensor)


def needs_no_subclass(request: Request) -> str | None:
    """Custom ops serve plain, meta and fake tensors (the fake kernel), not other subclasses (DTensor, ...)."""
    if request.has(SUBCLASS):
        return "needs plain, meta or fake tensors (not a DTensor or another tensor subclass)"
    return None


def needs_real_storage(request: Request) -> str | None:
    if not request.real_storage:
        return "needs plain tensors with storage (not meta, fake, DTensor or another tensor subclass)"
    return None


def only_when_named(reason: str) -> Supports:
    def check(request: Request) -> str | None:
        return None if request.has(EXPLICIT) else reason

    return check


@constant_result
def _triton_installed() -> bool:
    """Whether Triton can be imported (a fact of the environment; torch.compile folds it to a constant)."""
    return importlib.util.find_spec("triton") is not None


@constant_result
def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_MODULES = tuple(f"softmaxkit.backends.triton.{name}"
                        for name in ("cross_entropy", "linear_cross_entropy", "fused_linear_cross_entropy"))


@constant_result
def _import_triton_backends() -> bool:
    """Import the Triton backend modules (registering their ops). Under torch.compile this runs at trace time,
    outside the traced code, so ``Implementation.resolve`` then finds them in ``sys.modules``."""
    for name in _TRITON_MODULES:
        importlib.import_module(name)
    return True


def _triton_device(request: Request) -> str | None:
    """CUDA with Triton installed; a CPU tensor only when named explicitly under ``TRITON_INTERPRET=1``."""
    if not _triton_installed():
        return "Triton is not installed"
    if request.device == "cuda" or request.has(EXPLICIT):
        _import_triton_backends()
    if request.device == "cuda":
        return None if _torch.cuda.is_available() else "CUDA is not available"
    if request.device == "cpu" and _interpreting_triton() and request.has(EXPLICIT):
        return None
    return f"needs CUDA tensors (or TRITON_INTERPRET=1 and impl='triton' for CPU tensors), got {request.device}"


def _cpu_kernel(request: Request) -> str | None:
    from .cpu.cross_entropy import why_not

    return why_not(request)


def _low_precision_or_named(request: Request) -> str | None:
    """``auto`` takes the CPU chunk kernel for bf16/fp16 inputs only. In fp32 the loop's torch passes were
    level or faster in the hf_causal_lm step on three CPUs (docs/benchmarks.md, runs K, L and M: the kernel's
    worker threads contend with the OpenMP threads that still spin after each GEMM); ``impl="cpu"`` still
    names it for any dtype it handles."""
    if request.has(EXPLICIT) or request.dtype in (_torch.bfloat16, _torch.float16):
        return None
    return f"is taken by impl='auto' for bf16/fp16 only (got {request.dtype}; name impl='cpu' to use it)"


_NOT_FUNCTORCH = needs_flag_absent(
    FUNCTORCH, "is a custom op, which torch.func transforms (grad, vmap, ...) cannot see through in this torch; "
    "the composite path serves them"
)
_CLASS_INDEX_ROWS = all_of(
    _NOT_FUNCTORCH,
    needs_ndim("logits", 1, 2),
    needs_flag_absent("probabilities", "handles class-index targets, not class probabilities"),
)
_NOT_INPLACE = needs_flag_absent(
    "inplace_backward", "computes its gradient by autograd: `inplace_backward=True` needs a fused path "
    "(impl='auto', 'torch', 'cpu' or 'triton')"
)

# cross_entropy(logits, target, weight, options) on 2-D logits and (N,) targets (composite: any shape)
register("cross_entropy", Implementation(
    "triton", "softmaxkit.backends.triton.cross_entropy:triton_cross_entropy",
    all_of(_CLASS_INDEX_ROWS, needs_real_storage, _triton_device),
))
register("cross_entropy", Implementation(
    "cpu", "softmaxkit.backends.cpu.cross_entropy:cpu_cross_entropy", all_of(_CLASS_INDEX_ROWS, _cpu_kernel),
))
register("cross_entropy", Implementation(
    "torch", "softmaxkit.backends.torch.cross_entropy:torch_cross_entropy",
    all_of(_CLASS_INDEX_ROWS, needs_no_subclass),
))
register("cross_entropy", Implementation(
    "composite", "softmaxkit.functional.cross_entropy:composite_cross_entropy", _NOT_INPLACE,
))

# linear_cross_entropy(hidden (N, D), weight, bias, target, class_weight, options)
register("linear_cross_entropy", Implementation(
    "triton", "softmaxkit.backends.triton.linear_cross_entropy:triton_linear_cross_entropy",
    all_of(needs_flag_absent("probabilities", "handles class-index targets, not class probabilities"),
           _NOT_FUNCTORCH, needs_real_storage, _triton_device),
))
register("linear_cross_entropy", Implementation(
    "triton_fused", "softmaxkit.backends.triton.fused_linear_cross_entropy:fused_linear_cross_entropy",
    all_of(only_when_named("is chosen only by name (impl='triton_fused')"),
           needs_flag_absent("probabilities", "handles class-index targets, not class probabilities"),
           _NOT_FUNCTORCH, needs_real_storage, _triton_device),
))
register("linear_cross_entropy", Implementation(
    "cpu", "softmaxkit.backends.cpu.linear_cross_entropy:cpu_linear_cross_entropy",
    all_of(_NOT_FUNCTORCH, needs_flag_absent("probabilities", "handles class-index targets, not class probabilities"),
           _cpu_kernel, _low_precision_or_named),
))
register("linear_cross_entropy", Implementation(
    "torch", "softmaxkit.backends.torch.linear_cross_entropy:torch_linear_cross_entropy",
    all_of(_NOT_FUNCTORCH, needs_no_subclass),
))
register("linear_cross_entropy", Implementation(
    "composite", "softmaxkit.functional.linear_cross_entropy:composite_linear_cross_entropy", _NOT_INPLACE,
))

# focal_loss: the closed-form backward of backends/torch/focal.py (any device, any tensor type)
register("focal_loss", Implementation("torch", "softmaxkit.backends.torch.focal:focal_loss_rows", always))

# hierarchical_nll(hidden (N, D), weight, bias, nodes (N, L), signs (N, L), chunk_rows, sparse) -> (N,):
# HierarchicalSoftmax's per-row loss, the custom op of backends/torch/hierarchical.py (any device; fake kernel)
register("hierarchical_nll", Implementation(
    "torch", "softmaxkit.backends.torch.hierarchical:torch_hierarchical_nll", always,
))

# vocab_parallel_cross_entropy(logits_shard (N, C_r), target, class_weight, options, reduce): the rows of
# softmaxkit.distributed's loss, the per-row statistics combined across processes by `reduce` (an autograd
# Function each; the collectives are in the chunk loop, so they are not custom ops). C kernel on plain CPU
# tensors, else chunked torch ops (any device, NCCL on CUDA included).
register("vocab_parallel_cross_entropy", Implementation(
    "cpu", "softmaxkit.backends.cpu.vocab_parallel:cpu_vocab_parallel_cross_entropy",
    all_of(_NOT_FUNCTORCH, needs_ndim("logits", 2), _cpu_kernel),
))
register("vocab_parallel_cross_entropy", Implementation(
    "torch", "softmaxkit.backends.torch.vocab_parallel:torch_vocab_parallel_cross_entropy", always,
))


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

_SPARSE_DTYPES = (_torch.float32, _torch.float64, _torch.bfloat16, _torch.float16)
_SPARSE_VARIANTS = {_torch.float32: "f32", _torch.float64: "f64", _torch.bfloat16: "bf16", _torch.float16: "f16"}


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
    return None if _triton_installed() else "Triton is not installed"


_SPARSE_CPU = all_of(needs_device("cpu"), _sparse_plain_rows, _sparse_cpu_kernel)
_SPARSE_TRITON = all_of(needs_device("cuda"), _sparse_plain_rows, _sparse_triton_installed)

for _op in ("sparsemax", "entmax15"):
    register(_op, Implementation("cpu", "softmaxkit.backends.cpu.sparse:cpu_entmax", _SPARSE_CPU))
    register(_op, Implementation("triton", "softmaxkit.backends.triton.sparse:triton_entmax", _SPARSE_TRITON))
    register(_op, Implementation("torch", "softmaxkit.backends.torch.sparse:torch_entmax", always))
    register(f"{_op}_loss", Implementation("cpu", "softmaxkit.backends.cpu.sparse:cpu_fenchel_young", _SPARSE_CPU))
    register(f"{_op}_loss", Implementation("torch", "softmaxkit.backends.torch.sparse:torch_fenchel_young", always))
register("entmax_bisect", Implementation("torch", "softmaxkit.backends.torch.sparse:torch_entmax", always))
register("entmax_bisect_loss", Implementation("torch", "softmaxkit.backends.torch.sparse:torch_fenchel_young", always))
del _op

# The pure-PyTorch and CPU ops are registered with torch.library at import (cheap: no Triton, no C build), so
# their modules are in sys.modules before any trace (``Implementation.resolve`` then traces a dict lookup).
from .cpu import cross_entropy as _cpu_cross_entropy  # noqa: E402,F401
from .cpu import linear_cross_entropy as _cpu_linear_cross_entropy  # noqa: E402,F401
from .cpu import sparse as _cpu_sparse  # noqa: E402,F401
from .torch import cross_entropy as _torch_cross_entropy  # noqa: E402,F401
from .torch import focal as _torch_focal  # noqa: E402,F401
from .torch import hierarchical as _torch_hierarchical  # noqa: E402,F401
from .torch import linear_cross_entropy as _torch_linear_cross_entropy  # noqa: E402,F401
from .torch import sparse as _torch_sparse  # noqa: E402,F401
