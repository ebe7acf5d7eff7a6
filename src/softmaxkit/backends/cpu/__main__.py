"""``python -m softmaxkit.backends.cpu``: build the CPU kernels now and report where they are cached.

Run it where a compiler exists (e.g. while building a container image); the runtime needs none, because the
cache is looked up before any compiler. ``--portable`` also builds libraries without ``-march=native`` (found
on any CPU of this architecture, for images that run on other machines); ``--shared`` makes the cache
readable (never writable) by every user, for images whose runtime user is not the one who built it.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time

from . import _build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softmaxkit.backends.cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--portable", action="store_true",
                        help="also build libraries without -march=native (for images that run on other CPUs)")
    parser.add_argument("--shared", action="store_true",
                        help="make the cache directory readable by every user (mode 0755; never writable)")
    args = parser.parse_args(argv)
    if _build._disabled():
        print("CPU kernels are disabled by SOFTMAXKIT_CPU_KERNELS=0; nothing to build.")
        return 1
    directory = _build.cache_dir()
    for source in _build.SOURCES:
        for variant in _build.VARIANTS:
            for portable in (False, True) if args.portable else (False,):
                start = time.perf_counter()
                path, reason = _build.prebuild(variant, source, portable=portable)
                if path is None:
                    print(f"CPU kernels unavailable: {reason}; softmaxkit uses its PyTorch path.")
                    return 1
                kind = "portable" if portable else "native"
                print(f"CPU kernel {source} {variant} ({kind}) ready: {path} ({time.perf_counter() - start:.2f} s)")
    if args.shared:
        os.chmod(directory, 0o755)
        for path in directory.glob("*.so"):
            os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o022 | 0o555)
    print(f"cache directory: {directory} (set SOFTMAXKIT_CACHE_DIR to use another)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
