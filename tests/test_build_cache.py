"""The CPU kernel cache (``backends/cpu/_build.py``) in real deployments, each case in its own process.

Cases: a prebuilt cache loads without a compiler (also for another user and, portable, on another CPU);
N processes starting at once build each library once (compiler invocations counted by a logging ``CC``
wrapper); a killed build leaves no partial library; a non-root user whose HOME cannot be written gets the
kernels from a private directory (and, when not even that exists, the PyTorch path), with one warning and no
exception out of the loss; a library planted in a foreign-owned or group/other-writable directory, or a
foreign-owned library in one's own directory, is never loaded; no compiler warns once; :func:`usable` has no
side effects.

Most cases import ``_build.py`` alone (no torch, ~50 ms a process); the loss-level ones import softmaxkit. The
non-root cases start as root, import what they need, then drop to ``nobody`` (the interpreter lives under a
root-only HOME here, so it cannot be started as another user): they are skipped with the reason when the
tests do not run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from softmaxkit.backends.cpu import _build

SRC = Path(__file__).resolve().parents[1] / "src"
BUILD_PY = Path(_build.__file__).resolve()
NOBODY = 65534
COMPILER = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(COMPILER is None or not hasattr(os, "geteuid"),
                                reason="needs a C compiler and a POSIX system")
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="creates files owned by other users and drops privileges to `nobody`: needs to run as root",
)

# A process that imports _build.py alone (no torch), optionally drops to another user, runs BODY with
# warnings recorded, and prints {"warnings": [...], **result} as JSON.
_BARE = """
import importlib.util, json, os, sys, tempfile, warnings
spec = importlib.util.spec_from_file_location("skbuild", {build!r})
_build = importlib.util.module_from_spec(spec)
sys.modules["skbuild"] = _build
spec.loader.exec_module(_build)
"""
_FULL = """
import json, os, sys, tempfile, warnings
import torch, torch.nn.functional as F
import torch._dynamo  # imported by a custom op's first call; the dropped user here cannot read /root's stdlib
import softmaxkit
from softmaxkit.backends.cpu import _build
"""
_DROP_AND_RUN = """
if os.environ.get("DROP_TO_UID"):
    uid = int(os.environ["DROP_TO_UID"])
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
result = {{}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
{body}
result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print("RESULT " + json.dumps(result))
"""


def _run(body: str, env: dict[str, str], *, full: bool = False, timeout: float = 120, user: int | None = None,
         **popen) -> dict:
    head = _FULL if full else _BARE.format(build=str(BUILD_PY))
    code = head + _DROP_AND_RUN.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), **env}
    if user is not None:
        environment["DROP_TO_UID"] = str(user)
    completed = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                               timeout=timeout, check=False, **popen)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture
def shared_dir():
    """A directory under /tmp that every user can traverse (pytest's tmp_path is root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="sk-cache-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _wrapper(path: Path, log: Path, *, slow: bool = False) -> Path:
    """A ``CC`` that logs each invocation; ``slow``: writes a partial output, says so, then hangs."""
    if slow:
        script = f"""#!/bin/sh
echo "$$ $*" >> {log}
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
printf 'partial library' > "$out"
touch {log}.started
sleep 120
"""
    else:
        script = f'#!/bin/sh\necho "$$ $*" >> {log}\nexec {COMPILER} "$@"\n'
    path.write_text(script)
    path.chmod(0o755)
    return path


def _no_compiler_env(directory: Path) -> dict[str, str]:
    empty = directory / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"CC": str(directory / "no-such-compiler"), "PATH": str(empty)}


def _compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _planted(directory: Path, name: str, marker: Path) -> Path:
    """A library that, if ever loaded, writes ``marker`` from its constructor (and claims the right ABI)."""
    source = directory / "planted.c"
    source.write_text(
        "#include <stdio.h>\n#include <stdint.h>\n"
        f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
        'if (f) { fputs("planted", f); fclose(f); } }\n'
        f"int64_t skce_abi_version(void) {{ return {_build.ABI_VERSION}; }}\n"
    )
    target = directory / name
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(target), str(source)], check=True, timeout=60)
    source.unlink()
    return target


# ------------------------------------------------------------------------------ prebuilt, no compiler
def test_prebuilt_cache_loads_without_a_compiler(tmp_path):
    cache = tmp_path / "cache"
    built = _run('result["path"] = str(_build.prebuild("f64")[0])', {"SOFTMAXKIT_CACHE_DIR": str(cache)})
    assert built["path"].startswith(str(cache))
    result = _run(
        """
library = _build.load("f64")
result["compiler"] = _build._compiler()
result["loaded"] = library is not None and library._name
result["usable"] = _build.usable("f64")
result["f32"] = _build.load("f32") is not None
result["reason"] = _build.failure_reason
""",
        {"SOFTMAXKIT_CACHE_DIR": str(cache), **_no_compiler_env(tmp_path)},
    )
    assert result["compiler"] is None
    assert result["loaded"] == built["path"] and result["usable"]
    assert not result["f32"] and "no C compiler" in result["reason"]  # not prebuilt: the PyTorch path
    assert len(result["warnings"]) == 1 and "python -m softmaxkit.backends.cpu" in result["warnings"][0]


def test_portable_prebuild_is_found_on_another_cpu(tmp_path):
    cache = tmp_path / "cache"
    _run('assert _build.prebuild("f32", portable=True)[0]', {"SOFTMAXKIT_CACHE_DIR": str(cache)})
    result = _run(
        """
_build._cpu_signature = lambda: "x86_64\\nLinux\\nmodel name : some other CPU"
result["loaded"] = _build.load("f32") is not None
""",
        {"SOFTMAXKIT_CACHE_DIR": str(cache), **_no_compiler_env(tmp_path)},
    )
    assert result == {"loaded": True, "warnings": []}


@needs_root
def test_prebuilt_image_serves_another_user_without_a_compiler(shared_dir):
    """The deployment case: root prebuilds with the CLI (--shared), a non-root user without a compiler runs."""
    cache = shared_dir / "cache"
    env = {"SOFTMAXKIT_CACHE_DIR": str(cache), "HOME": str(shared_dir)}
    completed = subprocess.run([sys.executable, "-m", "softmaxkit.backends.cpu", "--shared"], capture_output=True,
                               text=True, timeout=300, check=False,
                               env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SRC), **env})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (cache.stat().st_mode & 0o777) == 0o755
    result = _run(
        """
x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True); t = torch.randint(0, 11, (6,))
loss = softmaxkit.cross_entropy(x, t)
result["close"] = abs(loss.item() - F.cross_entropy(x, t).item()) < 1e-12
s = softmaxkit.sparsemax(torch.randn(3, 9))
result["sums"] = s.sum(1).tolist()
result["loaded"] = [_build._libraries.get(k) is not None for k in (("cross_entropy", "f64"), ("sparse", "f32"))]
""",
        {**env, **_no_compiler_env(shared_dir)}, full=True, user=NOBODY,
    )
    assert result["close"] and result["loaded"] == [True, True] and result["warnings"] == []


# ------------------------------------------------------------------------------ concurrency and kills
def test_concurrent_first_builds_compile_each_library_once(tmp_path):
    cache, log, go = tmp_path / "cache", tmp_path / "cc.log", tmp_path / "go"
    env = {"SOFTMAXKIT_CACHE_DIR": str(cache), "CC": str(_wrapper(tmp_path / "cc", log))}
    body = f"""
import random, time
while not os.path.exists({str(go)!r}):
    time.sleep(0.005)
variants = ["f32", "bf16", "f64"]
random.shuffle(variants)
result["loaded"] = all(_build.load(v) is not None for v in variants)
"""
    head = _BARE.format(build=str(BUILD_PY))
    code = head + _DROP_AND_RUN.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    processes = [subprocess.Popen([sys.executable, "-c", code], env={"PATH": os.environ["PATH"], **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(0.5)  # let all four start and wait at the barrier
    go.touch()
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        assert '"loaded": true' in out and '"warnings": []' in out
    assert _compiles(log) == 3, log.read_text()
    assert sorted(path.name.split("_")[2] for path in cache.glob("*.so")) == ["bf16", "f32", "f64"]


def test_killed_build_leaves_no_partial_library(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "cc.log"
    env = {"SOFTMAXKIT_CACHE_DIR": str(cache), "CC": str(_wrapper(tmp_path / "slow-cc", log, slow=True))}
    head = _BARE.format(build=str(BUILD_PY))
    process = subprocess.Popen([sys.executable, "-c", head + '_build.load("f64")'],
                               env={"PATH": os.environ["PATH"], **env}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{log}.started").exists():
            assert time.monotonic() < deadline and process.poll() is None, "the build never started"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the process and its compiler, as a container kill would
        process.wait(timeout=30)
    assert not list(cache.glob("*.so")), "a killed build left a library under its final name"
    assert list(cache.glob(".*.tmp")), "the slow compiler should have left its partial output"
    # the next process builds it properly and removes the stray
    env["CC"] = str(_wrapper(tmp_path / "cc", tmp_path / "cc2.log"))
    result = _run('result["loaded"] = _build.load("f64") is not None', env)
    assert result == {"loaded": True, "warnings": []}
    assert not list(cache.glob(".*.tmp")) and len(list(cache.glob("*.so"))) == 1


# ------------------------------------------------------------------------------ unwritable caches
@needs_root
def test_unwritable_home_builds_in_a_private_directory(shared_dir):
    home = shared_dir / "home"  # root-owned 0755: `nobody` cannot create ~/.cache
    home.mkdir(mode=0o755)
    tmp = shared_dir / "tmp"
    tmp.mkdir()
    os.chown(tmp, NOBODY, NOBODY)
    result = _run(
        """
x = torch.randn(5, 13, requires_grad=True); t = torch.randint(0, 13, (5,))
loss = softmaxkit.cross_entropy(x, t)
loss.backward()
result["close"] = abs(loss.item() - F.cross_entropy(x, t).item()) < 1e-5
result["more"] = softmaxkit.cross_entropy(x.double(), t).item() > 0
result["kernel"] = _build._libraries.get(("cross_entropy", "f32")) is not None
private = _build._private
result["private"] = str(private)
result["mode"] = os.stat(private).st_mode & 0o777
""",
        {"HOME": str(home), "TMPDIR": str(tmp)}, full=True, user=NOBODY,
    )
    assert result["close"] and result["more"] and result["kernel"]
    assert result["private"].startswith(str(tmp)) and result["mode"] == 0o700
    assert not os.path.exists(result["private"]), "the private directory outlived its process"
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "SOFTMAXKIT_CACHE_DIR" in result["warnings"][0] and "cannot be created" in result["warnings"][0]


@needs_root
def test_no_writable_directory_at_all_uses_the_torch_path(shared_dir):
    home = shared_dir / "home"
    home.mkdir(mode=0o755)
    result = _run(
        f"""
tempfile.tempdir = {str(home)!r}  # no writable temporary directory either
x = torch.randn(5, 13, requires_grad=True); t = torch.randint(0, 13, (5,))
loss = softmaxkit.cross_entropy(x, t)
loss.backward()
result["close"] = abs(loss.item() - F.cross_entropy(x, t).item()) < 1e-5
result["grad"] = bool(torch.isfinite(x.grad).all())
softmaxkit.cross_entropy(x.double(), t)
result["kernel"] = _build._libraries.get(("cross_entropy", "f32")) is not None
result["reason"] = _build.failure_reason
""",
        {"HOME": str(home)}, full=True, user=NOBODY,
    )
    assert result["close"] and result["grad"] and not result["kernel"]
    assert "no usable directory" in result["reason"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "SOFTMAXKIT_CACHE_DIR" in result["warnings"][0] and "PyTorch path" in result["warnings"][0]


def test_new_cache_directories_are_private(tmp_path):
    cache = tmp_path / "a" / "cache"
    result = _run('result["loaded"] = _build.load("f64") is not None',
                  {"SOFTMAXKIT_CACHE_DIR": str(cache), "CC": COMPILER})
    assert result == {"loaded": True, "warnings": []}
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert all(path.stat().st_mode & 0o022 == 0 for path in cache.iterdir())


# ------------------------------------------------------------------------------ planted libraries
_PLANT_BODY = """
library = _build.load("f32")
result["loaded"] = library is not None
result["path"] = library._name if library is not None else None
"""


def _plant_both(directory: Path, marker: Path) -> None:
    for portable in (False, True):
        _planted(directory, _build.library_name("f32", portable=portable), marker)


@needs_root
@pytest.mark.parametrize(("victim", "owner"), [(0, NOBODY), (NOBODY, 12345)], ids=["root-victim", "user-victim"])
def test_planted_library_in_a_foreign_directory_is_not_loaded(shared_dir, victim, owner):
    cache, marker = shared_dir / "cache", shared_dir / "marks" / "planted-ran"
    marker.parent.mkdir()
    marker.parent.chmod(0o777)
    cache.mkdir(mode=0o755)
    _plant_both(cache, marker)
    for path in (cache, *cache.iterdir()):
        os.chown(path, owner, owner)
    tmp = shared_dir / "tmp"
    tmp.mkdir()
    os.chown(tmp, victim, victim)
    result = _run(_PLANT_BODY, {"SOFTMAXKIT_CACHE_DIR": str(cache), "TMPDIR": str(tmp), "CC": COMPILER},
                  user=victim if victim else None)
    assert not marker.exists(), "the planted library was loaded"
    assert result["loaded"] and not result["path"].startswith(str(cache))
    assert len(result["warnings"]) == 1 and f"owned by uid {owner}" in result["warnings"][0]


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777], ids=oct)
def test_planted_library_in_a_group_or_world_writable_directory_is_not_loaded(tmp_path, mode):
    cache, marker = tmp_path / "cache", tmp_path / "planted-ran"
    cache.mkdir()
    _plant_both(cache, marker)
    cache.chmod(mode)
    result = _run(_PLANT_BODY, {"SOFTMAXKIT_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path), "CC": COMPILER})
    assert not marker.exists(), "the planted library was loaded"
    assert result["loaded"] and not result["path"].startswith(str(cache))
    assert len(result["warnings"]) == 1 and "writable by" in result["warnings"][0]
    # with no compiler it is not loaded either: the PyTorch path
    result = _run(_PLANT_BODY, {"SOFTMAXKIT_CACHE_DIR": str(cache), **_no_compiler_env(tmp_path)})
    assert not marker.exists() and not result["loaded"]


@needs_root
def test_foreign_library_in_ones_own_directory_is_replaced_not_loaded(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "planted-ran"
    cache.mkdir(mode=0o700)
    _plant_both(cache, marker)
    for path in cache.iterdir():
        os.chown(path, NOBODY, NOBODY)
    assert _run(_PLANT_BODY, {"SOFTMAXKIT_CACHE_DIR": str(cache), **_no_compiler_env(tmp_path)})["loaded"] is False
    result = _run(_PLANT_BODY, {"SOFTMAXKIT_CACHE_DIR": str(cache), "CC": COMPILER})
    assert not marker.exists(), "the planted library was loaded"
    assert result["loaded"] and result["path"].startswith(str(cache))  # rebuilt in place: the directory is ours
    assert os.stat(result["path"]).st_uid == os.geteuid()


def test_group_writable_library_file_is_not_loaded(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "planted-ran"
    cache.mkdir(mode=0o700)
    _plant_both(cache, marker)
    for path in cache.iterdir():
        path.chmod(0o775)
    result = _run(_PLANT_BODY, {"SOFTMAXKIT_CACHE_DIR": str(cache), **_no_compiler_env(tmp_path)})
    assert not marker.exists() and not result["loaded"]


# ------------------------------------------------------------------------------ no compiler, usable()
def test_no_compiler_warns_once_and_falls_back(tmp_path):
    result = _run(
        """
result["loaded"] = [_build.load(v) is not None for v in ("f32", "f64", "bf16")]
result["sparse"] = _build.load("f32", source="sparse") is not None
result["reason"] = _build.failure_reason
""",
        {"SOFTMAXKIT_CACHE_DIR": str(tmp_path / "cache"), **_no_compiler_env(tmp_path)},
    )
    assert result["loaded"] == [False, False, False] and not result["sparse"]
    assert "no C compiler" in result["reason"]
    assert len(result["warnings"]) == 1 and "PyTorch path" in result["warnings"][0]


def test_disabled_kernels_do_not_warn(tmp_path):
    result = _run('result["loaded"] = _build.load("f32") is not None',
                  {"SOFTMAXKIT_CPU_KERNELS": "0", **_no_compiler_env(tmp_path)})
    assert result == {"loaded": False, "warnings": []}


def test_usable_has_no_side_effects(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "cc.log"
    result = _run('result["usable"] = _build.usable("f32"), _build.usable("f64", "sparse")',
                  {"SOFTMAXKIT_CACHE_DIR": str(cache), "CC": str(_wrapper(tmp_path / "cc", log))})
    assert result["usable"] == [True, True] and not cache.exists() and _compiles(log) == 0
    result = _run('result["usable"] = _build.usable("f32")',
                  {"SOFTMAXKIT_CACHE_DIR": str(cache), **_no_compiler_env(tmp_path)})
    assert result["usable"] is False and not cache.exists()
    result = _run('result["usable"] = _build.usable("f32")', {"SOFTMAXKIT_CPU_KERNELS": "off", "CC": COMPILER})
    assert result["usable"] is False
