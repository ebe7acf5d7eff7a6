"""CPU fast paths: C kernels built on first use (see :mod:`._build`), falling back to the PyTorch path.

``python -m softmaxkit.backends.cpu`` builds (or finds) the kernel library and prints where it is, e.g. to
prebuild it in a container image.
"""

from __future__ import annotations


def available() -> bool:
    """Whether the compiled CPU kernels can be used on this machine (builds the fp32 one on the first call)."""
    from . import _build

    return _build.load("f32") is not None
