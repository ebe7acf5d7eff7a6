"""Build-on-first-use of the C kernels, with a private per-user cache that survives deployment.

The kernels are plain C (no Python or torch headers), so any C compiler builds them in well under a second
(one library per source and dtype, ~0.5 s of compiler time each, built when a tensor of that dtype first needs
it) and the result does not depend on the torch or Python version.

**Where.** The shared libraries live in ``$SOFTMAXKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/softmaxkit`` or
``~/.cache/softmaxkit``), one file per source, dtype and key. The key hashes the source (with the headers it
includes), the compiler flags and, for ``-march=native`` builds, the CPU's model and feature flags (native code
must not be loaded on another CPU that shares the cache). The compiler and its version are not part of the
key: any build of the same source with the same flags for the same CPU is interchangeable, and each library's
ABI-version symbol is checked on loading. So a cache prebuilt with ``python -m softmaxkit.backends.cpu``
(``--portable`` adds builds without ``-march=native``, for images that run on other CPUs) is found in a
runtime image that has no compiler: :func:`load` looks the cache up *before* it looks for a compiler.

**Concurrency.** A build holds an exclusive ``fcntl`` lock on the directory's ``.lock`` file, so N processes that
start at once build each library once (the others wait, then load it). The compiler writes to a temporary
name in the cache directory and the result is renamed into place atomically: a killed build leaves no partial
library, and the next build (under the same lock) removes its stray temporary file.

**Security.** The cache holds code that is loaded into the process, so a directory or library is used only
when it is owned by the current user (or root) and not writable by group or others; new directories are
created 0700. A cache directory that fails this check (or cannot be created or written) is replaced by a fresh
private directory from :func:`tempfile.mkdtemp` (one per process, removed at exit), with one warning that
names the reason and the fix (``SOFTMAXKIT_CACHE_DIR``). Where not even that is possible, where no compiler
exists and nothing is cached, or where the build fails, :func:`load` returns None (one warning, and
:data:`failure_reason` says why) and callers use the PyTorch path; nothing here raises out of a loss.
``SOFTMAXKIT_CPU_KERNELS=0`` disables the kernels without a warning.

Sources (:data:`SOURCES`): ``"cross_entropy"`` (``_cross_entropy.c``, the default) and ``"sparse"``
(``_sparse.c``: sparsemax / 1.5-entmax). Each exports its own ABI-version function, checked on loading.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: builds are still atomic, only not de-duplicated
    fcntl = None

SOURCE = Path(__file__).with_name("_cross_entropy.c")
ABI_VERSION = 5


class _Source(NamedTuple):
    """One C source: its file, the ``-D<macro>_<VARIANT>`` that selects a dtype, its ABI-version symbol."""

    path: Path
    macro: str
    abi_symbol: str
    abi_version: int


#: the C sources :func:`load` builds, by name (the name starts the cache file's name)
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

#: stray temporary files of builds by older softmaxkit versions (``tmp*.so``) older than this are removed
_LEGACY_STRAY_AGE_S = 600.0

_lock = threading.Lock()
#: loaded libraries by (source, variant)
_libraries: dict[tuple[str, str], ctypes.CDLL | None] = {}
#: why the last :func:`load` returned None ("" when it did not)
failure_reason = ""
#: the warnings already given in this process, by kind (each kind is given once)
_warned: set[str] = set()
#: this process's private build directory (made on demand when the cache directory is unusable)
_private: Path | None = None
_private_pid = 0


def cache_dir() -> Path:
    """The configured cache directory (it may not exist yet, nor be usable: see the module docstring)."""
    explicit = os.environ.get("SOFTMAXKIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):  # XDG: a relative path is invalid and ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmaxkit"


@functools.lru_cache(maxsize=1)
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


def _disabled() -> bool:
    return os.environ.get("SOFTMAXKIT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------- trust
def _owner_problem(status: os.stat_result, what: str) -> str:
    """Why a file or directory with this status must not be trusted ("" when it may)."""
    if status.st_uid not in (os.geteuid(), 0):
        return f"{what} is owned by uid {status.st_uid}, not by this user (uid {os.geteuid()}) or root"
    writable = [name for name, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if status.st_mode & bit]
    if writable:
        return f"{what} is writable by {' and '.join(writable)} (mode {stat.S_IMODE(status.st_mode):04o})"
    return ""


def _directory_problem(directory: Path) -> str:
    """Why ``directory`` (which exists) must not hold kernels ("" when it may)."""
    try:
        status = os.stat(directory)
    except OSError as error:
        return f"{directory} cannot be read ({error.strerror})"
    if not stat.S_ISDIR(status.st_mode):
        return f"{directory} is not a directory"
    return _owner_problem(status, str(directory))


def _file_state(path: Path) -> str | None:
    """None when ``path`` does not exist, "" when it is a library that may be loaded, else why not."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    if not stat.S_ISREG(status.st_mode):
        return f"{path} is not a regular file"
    return _owner_problem(status, str(path))


# ----------------------------------------------------------------------------------------------- keys
@functools.cache
def _source_bytes(source_name: str) -> bytes:
    # the source and the headers it includes from this folder (_dtypes.h): a change to either rebuilds
    path = SOURCES[source_name].path
    return path.read_bytes() + b"".join(header.read_bytes() for header in sorted(path.parent.glob("*.h")))


def _flag_sets(portable_only: bool = False) -> list[list[str]]:
    return [_FLAGS_PORTABLE] if portable_only else [_FLAGS_NATIVE, _FLAGS_PORTABLE]


def library_name(variant: str, source: str = "cross_entropy", *, portable: bool = False) -> str:
    """The cache file name of one library: ``<source>_<variant>_<key>.so`` (the key is in the module docstring).

    Portable builds are keyed by the machine architecture only; native builds also by the CPU's features.
    """
    flags = _FLAGS_PORTABLE if portable else _FLAGS_NATIVE
    target = _cpu_signature() if not portable else f"{platform.machine()}\n{platform.system()}"
    key = hashlib.sha256(
        b"\0".join([_source_bytes(source), " ".join(flags).encode(), variant.encode(), target.encode()])
    ).hexdigest()[:16]
    return f"{source}_{variant}_{key}.so"


def _names(variant: str, source: str, portable_only: bool = False) -> list[tuple[list[str], str]]:
    return [(flags, library_name(variant, source, portable=flags is _FLAGS_PORTABLE))
            for flags in _flag_sets(portable_only)]


# -------------------------------------------------------------------------------------------- folders
def _configured_problem(directory: Path, create: bool) -> str:
    """Why the configured cache directory cannot take new builds ("" when it can); creates it (0700) if asked."""
    if not directory.exists():
        if not create:
            return f"{directory} does not exist"
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as error:
            return f"{directory} cannot be created ({error.strerror})"
    problem = _directory_problem(directory)
    if problem:
        return problem
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    return ""


def _private_directory() -> Path:
    """This process's private build directory (``tempfile.mkdtemp``: 0700, unpredictable; removed at exit)."""
    global _private, _private_pid
    if _private is None or _private_pid != os.getpid() or _directory_problem(_private):
        _private = Path(tempfile.mkdtemp(prefix="softmaxkit-kernels-"))
        _private_pid = os.getpid()
        atexit.register(_remove_private, _private, _private_pid)
    return _private


def _remove_private(directory: Path, pid: int) -> None:
    if os.getpid() == pid:  # not from a forked child: the parent still uses it
        shutil.rmtree(directory, ignore_errors=True)


def _lookup_directories() -> list[Path]:
    """Directories whose libraries may be loaded: the cache directory if it is trustworthy, the private one."""
    directories = []
    configured = cache_dir()
    if configured.is_dir() and not _directory_problem(configured):
        directories.append(configured)
    if _private is not None and _private_pid == os.getpid() and _private.is_dir():
        directories.append(_private)
    return directories


def _cached(variant: str, source: str) -> Path | None:
    """A library of this variant already in a trusted cache directory (no side effects)."""
    for directory in _lookup_directories():
        for _, name in _names(variant, source):
            if _file_state(directory / name) == "":
                return directory / name
    return None


# --------------------------------------------------------------------------------------------- builds
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (created 0600); released when the holder exits or dies."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _remove_strays(directory: Path, name: str) -> None:
    """Remove temporary files of earlier builds of ``name`` (called under its lock, so none is running)."""
    stem = Path(name).stem
    for stray in directory.glob(f".{stem}.*.tmp"):
        with contextlib.suppress(OSError):
            stray.unlink()
    now = time.time()
    for stray in directory.glob("tmp*.so"):  # older versions' temporary names (no lock: only old ones)
        with contextlib.suppress(OSError):
            if now - stray.stat().st_mtime > _LEGACY_STRAY_AGE_S:
                stray.unlink()


def _compile(compiler: str, flags: list[str], target: Path, variant: str, source: _Source) -> str:
    """Compile ``source`` into ``target`` atomically; return "" on success or the compiler's complaint.

    The compiler writes a temporary file next to ``target`` (same file system), which is made read-only for
    group and others and renamed onto ``target``: a reader never sees a partial library.
    """
    handle, temporary = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *flags, f"-D{source.macro}_{variant.upper()}", "-o", temporary, str(source.path), "-lm"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-500:] or f"exit status {result.returncode}"
        os.chmod(temporary, 0o755)  # the linker honours the umask, which may leave it group-writable
        os.replace(temporary, target)
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


def _build_in(directory: Path, compiler: str, variant: str, source_name: str, errors: list[str],
              portable_only: bool = False) -> tuple[ctypes.CDLL | None, Path | None]:
    """Find or build the library in ``directory`` (trusted and writable) under the lock; OSError if unwritable."""
    spec = SOURCES[source_name]
    for flags, name in _names(variant, source_name, portable_only):
        target = directory / name
        with _file_lock(directory / ".lock"):
            _remove_strays(directory, name)
            state = _file_state(target)
            if state == "":  # another process built it while this one waited for the lock
                library = _open(target, spec)
                if library is not None:
                    return library, target
                state = f"{target} could not be loaded"
            if state is not None:  # unusable; this directory is ours, so replace it
                errors.append(state)
                with contextlib.suppress(OSError):
                    target.unlink()
            error = _compile(compiler, flags, target, variant, spec)
            if error:
                errors.append(error)
                continue
            library = _open(target, spec)
            if library is not None:
                return library, target
            errors.append(f"could not load {target}")
    return None, None


_FIX = ("set SOFTMAXKIT_CACHE_DIR to a directory that only you can write (it is created with mode 0700), "
        "or prebuild the kernels there with `python -m softmaxkit.backends.cpu`")


def usable(variant: str = "f32", source: str = "cross_entropy") -> bool:
    """Whether :func:`load` may give a library for this variant, without building or loading anything.

    True when it is already loaded, when a trusted cached library exists, or when kernels are not disabled
    and a compiler is on ``PATH``. The dispatch table asks this; a build that then fails makes the caller
    fall back to the PyTorch path.
    """
    key = (source, variant)
    if key in _libraries:
        return _libraries[key] is not None
    if _disabled() or variant not in VARIANTS or source not in SOURCES:
        return False
    return _cached(variant, source) is not None or _compiler() is not None


def load(variant: str = "f32", source: str = "cross_entropy") -> ctypes.CDLL | None:
    """The compiled kernel library of one dtype variant (``"f32"``, ``"bf16"``, ``"f16"``, ``"f64"``) of one
    C source (``"cross_entropy"`` or ``"sparse"``, see :data:`SOURCES`).

    Loads it from the cache, else builds it (about 0.5 s of compiler time); None when it cannot be had
    (:data:`failure_reason` says why, and a warning was given once). Never raises for an unusable cache.
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
    if _disabled():
        failure_reason = "disabled by SOFTMAXKIT_CPU_KERNELS=0"
        return None
    spec = SOURCES[source_name]
    # 1. the cache, before anything else: a prebuilt library needs no compiler
    for directory in _lookup_directories():
        for _, name in _names(variant, source_name):
            if _file_state(directory / name) == "":
                library = _open(directory / name, spec)
                if library is not None:
                    failure_reason = ""
                    return library
    # 2. a compiler
    compiler = _compiler()
    if compiler is None:
        failure_reason = "no C compiler found (set CC, or install gcc/clang)"
        configured = cache_dir()
        untrusted = _directory_problem(configured) if configured.exists() else ""
        where = f"{configured} (not used: {untrusted})" if untrusted else str(configured)
        _warn_once("compiler", (
            f"softmaxkit: no C compiler found and no prebuilt CPU kernel in {where}; the CPU losses use "
            "the PyTorch path, several times slower. Install gcc or clang (or set CC), or prebuild the kernels "
            "where a compiler exists with `python -m softmaxkit.backends.cpu` and point SOFTMAXKIT_CACHE_DIR "
            "at that directory."))
        return None
    # 3. a build, in the cache directory if it is usable, else in a private temporary directory
    errors: list[str] = []
    configured = cache_dir()
    problem = _configured_problem(configured, create=True)
    if not problem:
        try:
            library, _ = _build_in(configured, compiler, variant, source_name, errors)
        except OSError as error:  # e.g. a read-only file system that os.access did not see
            problem = f"{configured} cannot be written ({error.strerror})"
        else:
            if library is not None:
                failure_reason = ""
                return library
            return _build_failed(spec, errors, "")
    try:
        library, _ = _build_in(_private_directory(), compiler, variant, source_name, errors)
    except OSError as error:
        problem += f", and no private temporary directory could be used ({error.strerror})"
        failure_reason = f"no usable directory for the CPU kernels: {problem}"
        _warn_once("cache", (
            f"softmaxkit: the kernel cache {configured} cannot be used: {problem}. The CPU losses use the "
            f"PyTorch path, several times slower. To use the CPU kernels, {_FIX}."))
        return None
    if library is None:
        return _build_failed(spec, errors, f" (in a private temporary directory, because {problem})")
    _warn_once("cache", (
        f"softmaxkit: the kernel cache {configured} cannot be used: {problem}. The CPU kernels are built "
        f"in a private temporary directory instead, once per process. To keep them, {_FIX}."))
    failure_reason = ""
    return library


def _build_failed(spec: _Source, errors: list[str], where: str) -> None:
    global failure_reason
    failure_reason = (f"building the C kernel ({spec.path.name}) failed{where}: "
                      + (errors[-1] if errors else "unknown error"))
    _warn_once("build", f"softmaxkit: {failure_reason}. The CPU losses use the PyTorch path, several times slower.")
    return None


def prebuild(variant: str, source: str = "cross_entropy", *, portable: bool = False) -> tuple[Path | None, str]:
    """Build (or find) one library in the cache directory itself, for ``python -m softmaxkit.backends.cpu``.

    Returns its path, or None and why it could not be built. ``portable`` builds without ``-march=native``
    (keyed by the machine architecture only, so it is found on any CPU of that architecture).
    """
    directory = cache_dir()
    problem = _configured_problem(directory, create=True)
    if problem:
        return None, problem
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    errors: list[str] = []
    try:
        library, path = _build_in(directory, compiler, variant, source, errors, portable_only=portable)
    except OSError as error:
        return None, f"{directory} cannot be written ({error.strerror})"
    if library is None:
        return None, errors[-1] if errors else "unknown error"
    return path, ""
