r"""Explanations of the softmax's gradient, as numbers: the helpers behind ``softmaxkit explain``.

Three facts, each computed here from its formula so that it can be printed, plotted or tested:

1. **The Jacobian's spectrum.** ``J = diag(p) − p pᵀ`` is symmetric positive semi-definite with one zero
   eigenvalue along ``(1, …, 1)`` (shifting every logit changes nothing); its other eigenvalues interlace the
   sorted ``p`` (each lies between two consecutive ``p_(i)``), and their sum is ``1 − ‖p‖²``. So the
   softmax's sensitivity is at most ``max_i p_i`` and vanishes as ``p`` becomes one-hot.
2. **Saturation with logit scale.** The cross-entropy gradient with respect to the logits is ``p − e_y``.
   Multiplying the logits by ``s`` sharpens ``p``: as ``s → ∞`` the gradient norm goes to 0 when the
   arg-max is the target, and to ``√2`` when it is another class (confidently wrong).
3. **Temperature.** For ``ℓ(x) = CE(x / T, y)`` the chain rule gives ``∂ℓ/∂x = (p_T − e_y)/T``: a factor
   ``1/T`` on top of the change in ``p_T = softmax(x/T)``. This is why distillation multiplies its loss by
   ``T²`` (Hinton et al. 2015): the soft-target gradient ``(σ_T − π_T)/T`` shrinks like ``1/T²`` for large ``T``.
"""

from __future__ import annotations

import numpy as np

from .softmax import softmax, softmax_jacobian


def jacobian_eigenvalues(p) -> np.ndarray:
    r"""Eigenvalues of the softmax Jacobian ``J = diag(p) − p pᵀ`` at probabilities ``p``, ascending.

    Args:
        p: ``(C,)`` probabilities, or a batch ``(..., C)``.

    Returns:
        ``(C,)`` (or ``(..., C)``) float64 eigenvalues in ascending order; the first is 0 (up to rounding),
        all lie in ``[0, max p]`` and they sum to ``1 − ‖p‖²``. For uniform ``p`` they are ``0`` and ``1/C``
        (``C − 1`` times); for two classes ``0`` and ``2 p_1 p_2``.

    Example:
        >>> import numpy as np
        >>> np.round(jacobian_eigenvalues([0.5, 0.5]), 6)
        array([0. , 0.5])
    """
    # J is positive semi-definite: a rounding below 0 (~1e-17) is clipped, never printed as a negative
    return np.maximum(np.linalg.eigvalsh(softmax_jacobian(p)), 0.0)


def gradient_norm_vs_scale(logits, target, scales) -> np.ndarray:
    r"""``‖∂ CE(s·x, y) / ∂z‖₂`` at ``z = s·x`` for each scale ``s``: the saturation of the softmax.

    .. math:: \Big\|\frac{∂ CE}{∂z}\Big\|_2 = \|\mathrm{softmax}(s x) − e_y\|_2

    Args:
        logits: ``(C,)`` or ``(N, C)`` logits ``x``.
        target: the class index (an int) or ``(N,)`` class indices.
        scales: a sequence of ``S`` scale factors ``s``.

    Returns:
        ``(S,)`` gradient norms for one row, ``(S, N)`` for ``N`` rows (float64). They tend to 0 for rows
        whose arg-max is the target and to ``√2`` for rows whose unique arg-max is another class.

    Example:
        >>> gradient_norm_vs_scale([2.0, 0.0], 0, [0.0, 100.0]).round(4)
        array([0.7071, 0.    ])
    """
    x = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target)
    onehot = np.eye(x.shape[-1])[target]
    x = x - np.max(x, axis=-1, keepdims=True)  # softmax is shift invariant; s·x then cannot overflow
    norms = [np.linalg.norm(softmax(s * x, axis=-1) - onehot, axis=-1) for s in np.asarray(scales, dtype=np.float64)]
    return np.asarray(norms)


def temperature_gradient_factor(logits, target, temperatures) -> dict[str, np.ndarray]:
    r"""How temperature changes the cross-entropy gradient ``∂ CE(x/T, y)/∂x = (p_T − e_y)/T``.

    Splits the gradient norm into the chain-rule factor ``1/T`` and the norm of ``p_T − e_y``.

    Args:
        logits: ``(C,)`` or ``(N, C)`` logits.
        target: the class index or ``(N,)`` class indices.
        temperatures: a sequence of ``S`` temperatures ``T > 0``.

    Returns:
        A dict of float64 arrays: ``"temperature"`` ``(S,)``; ``"chain_factor"`` ``(S,)`` = ``1/T``;
        ``"residual_norm"`` ``‖p_T − e_y‖`` and ``"gradient_norm"`` = their product, each ``(S,)`` for one
        row or ``(S, N)`` for ``N`` rows.

    Example:
        >>> out = temperature_gradient_factor([1.0, 0.0], 0, [1.0, 2.0])
        >>> out["chain_factor"]
        array([1. , 0.5])
    """
    t = np.asarray(temperatures, dtype=np.float64)
    if np.any(~(t > 0)):
        raise ValueError(f"`temperatures` must all be > 0, but got {t.tolist()}")
    x = np.asarray(logits, dtype=np.float64)
    onehot = np.eye(x.shape[-1])[np.asarray(target)]
    residual = np.asarray([np.linalg.norm(softmax(x, axis=-1, temperature=tt) - onehot, axis=-1) for tt in t])
    factor = 1.0 / t
    shaped = factor.reshape((-1,) + (1,) * (residual.ndim - 1))
    return {
        "temperature": t,
        "chain_factor": factor,
        "residual_norm": residual,
        "gradient_norm": shaped * residual,
    }
