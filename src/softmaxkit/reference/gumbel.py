r"""Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017) in NumPy float64, given the noise.

With ``g_i = −\log(−\log u_i)``, ``u_i ∼ U(0, 1)`` independent standard Gumbel noise,

.. math:: y = \mathrm{softmax}\big((x + g)/τ\big)

is a relaxed one-hot sample: ``\arg\max_i (x_i + g_i)`` is distributed as ``softmax(x)`` (the Gumbel-max
trick), and ``y`` tends to that one-hot vector as ``τ → 0``.
"""

from __future__ import annotations

import numpy as np

from .softmax import softmax


def gumbel_noise(uniform) -> np.ndarray:
    r"""Standard Gumbel noise ``g = −\log(−\log u)`` from uniforms ``u ∈ (0, 1)``."""
    return -np.log(-np.log(np.asarray(uniform, dtype=np.float64)))


def gumbel_softmax(logits, gumbels, tau: float = 1.0, axis: int = -1) -> np.ndarray:
    r"""The relaxed sample ``softmax((x + g)/τ)`` for given noise ``g`` (same shape as ``x``)."""
    x = np.asarray(logits, dtype=np.float64)
    return softmax((x + np.asarray(gumbels, dtype=np.float64)) / tau, axis=axis)
