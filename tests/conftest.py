"""Test configuration: one autouse seed, the gpu marker, Triton's interpreter on CPU-only machines."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels run under its interpreter (set before any kernel module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("fuzz", max_examples=2000, deadline=None)  # the long fuzz (tests/test_fuzz.py)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist each worker already has a core: more torch threads per worker oversubscribe the machine
# (small ops then stall ~20x); single-process runs use up to 2 threads so multi-threaded paths are exercised.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002  (seeds code that uses the legacy global RNG)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
