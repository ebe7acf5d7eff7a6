"""Build-on-first-use of the C kernels, with a per-machine cache and a silent fallback.

The kernels are plain C (no Python or torch headers), so any C compiler builds them in well under a second
(one library per source and dtype, ~0.5 s of compiler time each, built when a tensor of that dtype first needs
it) and
the result does not depend on the torch or Python version. The shared library is cached under
``$SOFTMAXKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/softmaxkit`` or ``~/.cache/softmaxkit``), keyed by a
hash of the source, the compiler flags, the compiler's version and the CPU's feature flags (``-march=native``
code must not be loaded on a different CPU sharing the cache). Where no compiler is found, the build fails or
``SOFTMAXKIT_CPU_KERNELS=0`` is set, :func:`load` returns None and callers use the PyTorch path.

Sources (:data:`SOURCES`): ``"cross_entropy"`` (``_cross_entropy.c``, the default) and ``"sparse"``
(``_sparse.c``: sparsemax / 1.5-entmax). Each exports its own ABI-version function, checked on loading.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

SOURCE = Path(__file__).with_name("_cross_entropy.c")
ABI_VERSION = 3


class _Source(NamedTuple):
    """One C source: its file, the ``-D<macro>_<VARIANT>`` that selects a dtype, its ABI-version symbol."""

    path: Path
    macro: str
    abi_symbol: str
    abi_version: int


#: the C sources :func:`load` builds, by name (the file stem without its underscore names the cache file)
SOURCES = {
    "cross_entropy": _Source(SOURCE, "SKCE", "skce_abi_version", ABI_VERSION),
    "sparse": _Source(Path(__file__).with_name("_sparse.c"), "SKSP", "sksp_abi_version", 1),
}
# -O2 plus the vectoriser compiles in ~1 s and runs as fast as -O3 (which takes 2-4 s) on this code.
_FLAGS_PORTABLE = ["-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic", "-fPIC", "-shared", "-fno-math-errno",
                   "-std=gnu99"]
_FLAGS_NATIVE = [*_FLAGS_PORTABLE, "-march=native"]

#: kernel variants, one shared library each (built only when a tensor of that dtype first needs it)
VARIANTS = ("f32", "bf16", "f16", "f64")

_lock = threading.Lock()
#: loaded libraries by (source, variant)
_libraries: dict[tuple[str, str], ctypes.CDLL | None] = {}
#: why the last :func:`load` returned None ("" when it did not)
failure_reason = ""


def cache_dir() -> Path:
    explicit = os.environ.get("SOFTMAXKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmaxkit"


def _cpu_signature() -> str:
    """The CPU model and feature flags (what ``-march=native`` depends on)."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                if len(parts) >= 5:
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=10, check=False)
        return result.stdout.splitlines()[0] if result.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile(compiler: str, flags: list[str], target: Path, variant: str, source: _Source) -> str:
    """Compile ``source`` into ``target`` atomically; return "" on success or the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *flags, f"-D{source.macro}_{variant.upper()}", "-o", temporary, str(source.path), "-lm"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-500:] or f"exit status {result.returncode}"
        os.replace(temporary, target)  # atomic: concurrent builders (pytest -n) never see a partial file
        return ""
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _open(path: Path, source: _Source) -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(path))
        abi_version = getattr(library, source.abi_symbol)
        abi_version.restype = ctypes.c_int64
        if abi_version() != source.abi_version:
            return None
        return library
    except (OSError, AttributeError):
        return None


def _disabled() -> bool:
    return os.environ.get("SOFTMAXKIT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def usable(variant: str = "f32", source: str = "cross_entropy") -> bool:
    """Whether :func:`load` may give a library for this variant, without building or loading anything.

    True when it is already loaded, or when kernels are not disabled and a compiler is on ``PATH``. The
    dispatch table asks this; a build that then fails makes the caller fall back to the PyTorch path.
    """
    key = (source, variant)
    if key in _libraries:
        return _libraries[key] is not None
    return not _disabled() and _compiler() is not None


def load(variant: str = "f32", source: str = "cross_entropy") -> ctypes.CDLL | None:
    """The compiled kernel library of one dtype variant (``"f32"``, ``"bf16"``, ``"f16"``, ``"f64"``) of one
    C source (``"cross_entropy"`` or ``"sparse"``, see :data:`SOURCES`).

    Builds it on the first call (about 0.5 s of compiler time), then reuses the cached file; None when it
    cannot be had (:data:`failure_reason` says why).
    """
    key = (source, variant)
    if key in _libraries:
        return _libraries[key]
    with _lock:
        if key not in _libraries:
            _libraries[key] = _load_uncached(variant, source)
        return _libraries[key]


def _load_uncached(variant: str, source_name: str = "cross_entropy") -> ctypes.CDLL | None:
    global failure_reason
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, but got {variant!r}")
    if source_name not in SOURCES:
        raise ValueError(f"`source` must be one of {tuple(SOURCES)}, but got {source_name!r}")
    spec = SOURCES[source_name]
    if _disabled():
        failure_reason = "disabled by SOFTMAXKIT_CPU_KERNELS=0"
        return None
    compiler = _compiler()
    if compiler is None:
        failure_reason = "no C compiler found (set CC, or install gcc/clang)"
        return None
    # the source and the headers it includes from this folder (_dtypes.h): a change to either rebuilds
    source = spec.path.read_bytes() + b"".join(path.read_bytes() for path in sorted(spec.path.parent.glob("*.h")))
    version = _compiler_version(compiler)
    errors = []
    for flags in (_FLAGS_NATIVE, _FLAGS_PORTABLE):
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), variant.encode(), version.encode(),
                        _cpu_signature().encode()])
        ).hexdigest()[:16]
        for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"softmaxkit-{os.getuid()}"):
            path = directory / f"{source_name}_{variant}_{key}.so"
            if not path.exists():
                error = _compile(compiler, flags, path, variant, spec)
                if error:
                    errors.append(error)
                    continue
            library = _open(path, spec)
            if library is not None:
                failure_reason = ""
                return library
            errors.append(f"could not load {path}")
    failure_reason = f"building the C kernel ({spec.path.name}) failed: " + (errors[-1] if errors else "unknown error")
    return None
