r"""``softmaxkit explain``: the softmax of a few logits, its Jacobian and gradient, checked numerically.

For logits ``z``, temperature ``T`` and target class ``k``:

* ``p = softmax(z / T)``;
* the Jacobian ``∂p/∂z = (diag(p) − p pᵀ) / T``: symmetric, rows summing to 0, positive semi-definite with
  one zero eigenvalue along ``(1, …, 1)`` (adding a constant to every logit changes nothing);
* the loss ``ℓ = −log p_k`` and its gradient ``∂ℓ/∂z = (p − onehot(k)) / T``, the famous ``p − y``.

Each derivative is compared with central finite differences of the float64 reference
(:mod:`softmaxkit.reference`), so the printed formulas are verified on the user's own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import reference
from ._io import UserError

#: temperatures shown in the "effect of temperature" table (the user's T is added).
TEMPERATURES = (0.5, 1.0, 2.0, 5.0)
#: central-difference step: balances truncation (~h²) and rounding (~eps/h) errors at ~1e-10.
STEP = 1e-5


@dataclass
class Explanation:
    logits: np.ndarray
    temperature: float
    target: int
    probs: np.ndarray
    loss: float
    jacobian: np.ndarray
    eigenvalues: np.ndarray
    gradient: np.ndarray
    jacobian_fd_error: float
    gradient_fd_error: float
    temperatures: list[tuple[float, np.ndarray, float, float]]  # (T, p, entropy in nats, ‖∂ℓ/∂z‖)
    scales: np.ndarray  # logit scale factors s of the saturation table
    scale_gradient_norms: np.ndarray  # ‖softmax(s·z/T) − y‖ for each s


def _loss(z: np.ndarray, target: int, temperature: float) -> float:
    return float(-reference.log_softmax(z, temperature=temperature)[target])


def explain(logits, temperature: float = 1.0, target: int = 0) -> Explanation:
    """Compute (and verify by finite differences) everything ``softmaxkit explain`` prints."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 1 or z.size < 2:
        raise UserError(f"give at least two logits, e.g. `softmaxkit explain 2.0 1.0 0.1`; got {z.size}")
    if not np.all(np.isfinite(z)):
        raise UserError("every logit must be a finite number")
    if not (np.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a finite number > 0, but got {temperature}")
    if not 0 <= target < z.size:
        raise UserError(f"--target must be a class index in [0, {z.size}), but got {target}")
    probs = reference.softmax(z, temperature=temperature)
    jacobian = reference.softmax_jacobian(probs) / temperature
    eigenvalues = reference.jacobian_eigenvalues(probs) / temperature
    onehot = np.eye(z.size)[target]
    gradient = (probs - onehot) / temperature

    # Central differences of the reference functions, one logit at a time, at the shifted logits z − max z
    # (the same softmax; a step of STEP would vanish in rounding next to a logit of 1e300).
    shifted = z - z.max()
    jacobian_fd = np.empty_like(jacobian)
    gradient_fd = np.empty_like(gradient)
    for j in range(z.size):
        step = np.zeros_like(z)
        step[j] = STEP
        jacobian_fd[:, j] = (reference.softmax(shifted + step, temperature=temperature)
                             - reference.softmax(shifted - step, temperature=temperature)) / (2 * STEP)
        gradient_fd[j] = (_loss(shifted + step, target, temperature)
                          - _loss(shifted - step, target, temperature)) / (2 * STEP)

    rows = []
    temperatures = sorted({*TEMPERATURES, float(temperature)})
    gradient_norms = reference.temperature_gradient_factor(z, target, temperatures)["gradient_norm"]
    for t, norm in zip(temperatures, gradient_norms):
        p = reference.softmax(z, temperature=t)
        entropy = float(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)))
        rows.append((t, p, entropy, float(norm)))
    scales = np.array([0.1, 1.0, 3.0, 10.0, 100.0])
    return Explanation(
        logits=z, temperature=float(temperature), target=int(target), probs=probs,
        loss=_loss(z, target, temperature), jacobian=jacobian, eigenvalues=eigenvalues, gradient=gradient,
        jacobian_fd_error=float(np.abs(jacobian - jacobian_fd).max()),
        gradient_fd_error=float(np.abs(gradient - gradient_fd).max()),
        temperatures=rows, scales=scales,
        scale_gradient_norms=reference.gradient_norm_vs_scale(shifted / temperature, target, scales),
    )


def _vector(values, digits: int = 4) -> str:
    return "(" + ", ".join(f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.{digits}g}" for v in values) + ")"


def render(result: Explanation, console) -> None:
    """Print the explanation with rich."""
    from rich.table import Table

    z, T, k = result.logits, result.temperature, result.target
    C = z.size
    console.print(f"[bold]logits[/bold] z = {_vector(z, 3)}")
    console.print(f"temperature T = {T:g}, target class k = {k}")
    console.print()
    console.print("[bold]softmax[/bold]  p_i = exp(z_i/T) / Σ_j exp(z_j/T)")
    console.print(f"  p = {_vector(result.probs, 3)}   (sums to {result.probs.sum():.12f})")
    console.print()
    console.print(f"[bold]cross-entropy[/bold]  ℓ = −log p_k = −log {result.probs[k]:.4f} = {result.loss:.4f}")
    console.print()
    console.print("[bold]gradient[/bold]  ∂ℓ/∂z = (p − y) / T  with y = onehot(k)")
    console.print(f"  ∂ℓ/∂z = {_vector(result.gradient)}   (sums to {result.gradient.sum():.1e})")
    console.print(f"  finite-difference check: max |analytic − numeric| = {result.gradient_fd_error:.1e}")
    console.print()
    console.print("[bold]Jacobian[/bold]  ∂p_i/∂z_j = p_i (δ_ij − p_j) / T")
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
    table.add_column("")
    for j in range(C):
        table.add_column(f"∂/∂z_{j}", justify="right")
    for i in range(C):
        table.add_row(f"p_{i}", *(f"{result.jacobian[i, j]:+.4f}" for j in range(C)))
    console.print(table)
    console.print(f"  eigenvalues {_vector(result.eigenvalues)}")
    console.print("  one is 0 (along (1, …, 1): shifting every logit changes nothing); the rest are > 0")
    console.print(f"  rows sum to {np.abs(result.jacobian.sum(axis=1)).max():.1e}; "
                  f"symmetric: {bool(np.allclose(result.jacobian, result.jacobian.T, rtol=0, atol=1e-15))}")
    console.print(f"  finite-difference check: max |analytic − numeric| = {result.jacobian_fd_error:.1e}")
    console.print()
    console.print("[bold]effect of temperature[/bold]  (T < 1 sharpens, T > 1 flattens, T → ∞ gives uniform)")
    table = Table(show_header=True, header_style="bold")
    table.add_column("T", justify="right")
    for j in range(C):
        table.add_column(f"p_{j}", justify="right")
    table.add_column("max p", justify="right")
    table.add_column("entropy (nats)", justify="right")
    table.add_column("‖∂ℓ/∂z‖", justify="right")
    for t, p, entropy, norm in result.temperatures:
        style = "bold" if t == T else None
        table.add_row(f"{t:g}", *(f"{v:.3f}" for v in p), f"{p.max():.3f}", f"{entropy:.3f}", f"{norm:.4f}",
                      style=style)
    console.print(table)
    console.print(f"  uniform entropy log C = {np.log(C):.3f} nats; ‖∂ℓ/∂z‖ = ‖p_T − y‖ / T carries the 1/T "
                  "of the chain rule (why distillation multiplies by T²)")
    console.print()
    console.print("[bold]saturation[/bold]  ‖∂ℓ/∂z‖ when every logit is multiplied by s")
    console.print("  " + "   ".join(f"s={s:g}: {n:.4f}" for s, n in zip(result.scales, result.scale_gradient_norms)))
    wrong = int(np.argmax(result.logits)) != k
    console.print("  → √2 = 1.4142 as s grows: confidently wrong, the gradient stays large" if wrong else
                  "  → 0 as s grows: the arg-max is the target, the loss saturates and learning stops")
