"""Triton kernels, imported lazily (only when a CUDA tensor, or ``impl="triton"``, asks for them).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter: that is how
CPU-only CI checks them against the float64 oracle (slowly, so on small shapes).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether the Triton kernels can run on a CUDA device here (triton installed and a GPU visible)."""
    if not _triton_installed():
        return False
    import torch

    return torch.cuda.is_available()
