"""``python -m softmaxkit.backends.cpu``: build the CPU kernels now and report where they are cached."""

from __future__ import annotations

import sys
import time

from . import _build


def main() -> int:
    for source in _build.SOURCES:
        for variant in _build.VARIANTS:
            start = time.perf_counter()
            library = _build.load(variant, source=source)
            if library is None:
                print(f"CPU kernels unavailable: {_build.failure_reason}; softmaxkit uses its PyTorch path.")
                return 1
            print(f"CPU kernel {source} {variant} ready: {library._name} ({time.perf_counter() - start:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
