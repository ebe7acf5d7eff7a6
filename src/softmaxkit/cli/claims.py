r"""The claims behind ``softmaxkit claims``: every checkable claim of the softmax texts, checked.

Each claim is quoted from its text (``000`` … ``004``, the blog posts this project implements), restated,
and checked the way its kind allows:

* **math**: numerically in float64, on random rows of several scales and on adversarial rows (ties,
  huge gaps, two classes, many classes), against finite differences or autograd where a derivative is claimed;
* **empirical**: by training :class:`softmaxkit.SoftmaxRegression` on the bundled datasets (scikit-learn's
  iris, wine, breast_cancer, digits) with several seeds;
* **performance**: from the benchmark suite's committed figures (``benchmarks/results/*.csv``), which
  say on which machine and commit they were measured.

The verdict is ``holds``, ``does not hold`` or ``depends`` (true under a condition the text does not state,
or only partly true), always with the measured numbers, and a command that reproduces the row
(``softmaxkit claims --only ID``). Nothing is hard-coded: every number comes from the run.

The command itself (options, table, output folder) is :mod:`softmaxkit.cli.commands.claims`.
"""

from __future__ import annotations

import html
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOLDS, FAILS, DEPENDS = "holds", "does not hold", "depends"
VERDICTS = (HOLDS, FAILS, DEPENDS)


@dataclass
class Result:
    verdict: str
    evidence: str
    numbers: dict = field(default_factory=dict)


@dataclass
class Claim:
    id: str
    text: str
    section: str
    quote: str
    claim: str
    kind: str  # "math", "empirical" or "performance"
    check: Callable[[Context], Result]


@dataclass
class Context:
    seeds: list[int]
    quick: bool
    cache: dict = field(default_factory=dict)

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng(1234 + salt)

    @property
    def trials(self) -> int:
        return 300 if self.quick else 3000

    @property
    def datasets(self) -> tuple[str, ...]:
        return ("iris", "wine") if self.quick else ("iris", "wine", "breast_cancer", "digits")


CLAIMS: list[Claim] = []


def claim(id: str, text: str, section: str, quote: str, statement: str, kind: str = "math"):
    def register(check):
        CLAIMS.append(Claim(id, text, section, quote, statement, kind, check))
        return check

    return register


# ----------------------------------------------------------------------------------------------- helpers
def _softmax(z, axis=-1):
    from ..reference import softmax

    return softmax(z, axis=axis)


def _random_logits(ctx: Context, salt: int, classes=(2, 3, 10, 100), scales=(0.1, 1.0, 5.0, 30.0)):
    """Random rows of several sizes and scales (a list of ``(n, C)`` arrays)."""
    rng = ctx.rng(salt)
    per = max(1, ctx.trials // (len(classes) * len(scales)))
    return [scale * rng.normal(size=(per, c)) for c in classes for scale in scales]


def _adversarial_logits():
    """Rows that break careless reasoning: ties, one dominant class, huge gaps, two classes."""
    return [
        np.array([[0.0, 0.0]]), np.array([[1.0, 1.0, 1.0]]), np.array([[3.0, 3.0, -3.0]]),
        np.array([[40.0, 0.0, 0.0]]), np.array([[800.0, 0.0]]), np.array([[-745.0, 0.0, 0.0]]),
        np.array([[1e4, -1e4, 0.0]]), np.zeros((1, 1000)),
    ]


def _jacobian(p):
    from ..reference import softmax_jacobian

    return softmax_jacobian(p)


def _seeds(ctx: Context) -> str:
    return "1 seed" if len(ctx.seeds) == 1 else f"{len(ctx.seeds)} seeds"


def _split(name: str, seed: int, test_size: float = 0.3):
    from sklearn.model_selection import train_test_split

    from ..datasets import load_dataset

    data = load_dataset(name)
    _, y = np.unique(data.y, return_inverse=True)
    return train_test_split(data.X, y, test_size=test_size, stratify=y, random_state=seed)


def _standardise(X_train, *others):
    mean, scale = X_train.mean(0), X_train.std(0)
    scale[scale == 0] = 1.0
    return [(X - mean) / scale for X in (X_train, *others)]


def _fit(X, y, seed, **params):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from ..estimator import SoftmaxRegression

    settings = {"alpha": 1e-3, "max_iter": 300, "random_state": seed, **params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return SoftmaxRegression(**settings).fit(X, y)


def _ce_model(ctx: Context, name: str = "digits", seed: int | None = None):
    """A cross-entropy model on ``name`` with a validation split: (model, X_val, y_val, X_test, y_test)."""
    seed = ctx.seeds[0] if seed is None else seed
    key = ("ce", name, seed)
    if key not in ctx.cache:
        from sklearn.model_selection import train_test_split

        X_train, X_test, y_train, y_test = _split(name, seed)
        X_train, X_val, y_train, y_val = train_test_split(X_train, y_train, test_size=0.3, stratify=y_train,
                                                          random_state=seed)
        X_train, X_val, X_test = _standardise(X_train, X_val, X_test)
        model = _fit(X_train, y_train, seed, alpha=1e-4)
        ctx.cache[key] = (model, X_val, y_val, X_test, y_test)
    return ctx.cache[key]


# =========================================================================================== mathematics
@claim("softmax-range", "001", "§2 table; 003 §1", "所有输出 ∈(0,1) … 所有输出总和为 1",
       "Every softmax output lies strictly in (0, 1) and the outputs sum to 1.")
def _range(ctx):
    rows = _random_logits(ctx, 1) + _adversarial_logits()
    low = min(float(_softmax(z).min()) for z in rows)
    high = max(float(_softmax(z).max()) for z in rows)
    total = max(float(np.abs(_softmax(z).sum(-1) - 1).max()) for z in rows)
    gap = _softmax(np.array([0.0, 800.0]))
    verdict = DEPENDS if low == 0.0 or high == 1.0 else HOLDS
    return Result(verdict, f"exact arithmetic: yes; float64: min p = {low:.3g}, max p = {high!r} (z = (0, 800) gives "
                  f"p = ({float(gap[0]):.3g}, {float(gap[1])!r}): the open interval fails once logits differ by more than ~745); "
                  f"|Σp − 1| ≤ {total:.2g}", {"min": low, "max": high, "sum_error": total})


@claim("softmax-not-sparse", "001", "§9 limitation 2", "输出非稀疏:即使概率接近 0,也不会真正为 0",
       "Softmax is never sparse: even a tiny probability is never exactly 0.")
def _not_sparse(ctx):
    zero_gap = {}
    for dtype in (np.float16, np.float32, np.float64):
        for gap in range(1, 2000):
            z = np.array([0.0, -float(gap)], dtype=dtype)
            shifted = (z - z.max()).astype(dtype)
            e = np.exp(shifted).astype(dtype)
            if (e / e.sum()).astype(dtype)[1] == 0:
                zero_gap[np.dtype(dtype).name] = gap
                break
    text = ", ".join(f"{k}: from a gap of {v}" for k, v in zero_gap.items())
    return Result(DEPENDS, f"true in exact arithmetic; in floating point the smaller probability is exactly 0 ({text}). "
                  "sparsemax / entmax15 / topk_softmax give exact zeros by design", zero_gap)


@claim("softmax-example", "003", "§1 code example", "z = [2.0, 1.0, 0.1] … 输出:[0.6590, 0.2424, 0.0986]",
       "softmax([2.0, 1.0, 0.1]) = [0.6590, 0.2424, 0.0986].")
def _example(ctx):
    p = _softmax(np.array([2.0, 1.0, 0.1]))
    stated = np.array([0.6590, 0.2424, 0.0986])
    ok = np.all(np.abs(p - stated) <= 5e-5)
    return Result(HOLDS if ok else FAILS, f"float64: [{', '.join(f'{x:.6f}' for x in p)}]; rounds to the stated "
                  f"values" if ok else f"float64 gives {p}", {"p": p.tolist()})


@claim("softmax-order", "000", "§2 table 2; 003 §1", "该转换具有保序性(维持logits大小关系)",
       "Softmax preserves the order of the logits (monotonicity).")
def _order(ctx):
    rows = _random_logits(ctx, 2)
    broken = 0
    total = 0
    for z in rows:
        p = _softmax(z)
        for i in range(z.shape[1] - 1):
            strict = z[:, i] > z[:, i + 1]
            broken += int(np.sum(strict & (p[:, i] < p[:, i + 1])))
            total += int(strict.sum())
    ties = _softmax(np.array([0.0, -800.0, -900.0]))
    return Result(HOLDS, f"{broken} order inversions in {total} strictly ordered random pairs; float64 can merge two "
                  f"tiny probabilities into a tie (z = (0, −800, −900) gives {ties[1]:.3g} = {ties[2]:.3g}), never invert them",
                  {"inversions": broken, "pairs": total})


@claim("saturation", "000", "§2", "当logits差值超过一定阈值时,梯度会趋于零",
       "When the gap between logits exceeds a threshold, the softmax gradient tends to zero.")
def _saturation(ctx):
    gaps = np.array([1.0, 5.0, 10.0, 20.0, 40.0])
    entries = [float(np.abs(_jacobian(_softmax(np.array([g, 0.0, 0.0])))).max()) for g in gaps]
    text = ", ".join(f"gap {g:g}: {e:.2g}" for g, e in zip(gaps, entries))
    monotone = all(b < a for a, b in itertools.pairwise(entries))
    return Result(HOLDS if monotone else FAILS, f"largest |∂p_i/∂z_j| with one dominant logit: {text} (exponential decay, "
                  "roughly e^−gap); see also the row |z| > 3 below", {"gaps": gaps.tolist(), "entries": entries})


@claim("l1-norm", "000", "§4", "通过概率归一化强制输出向量的L1范数为1",
       "Normalisation forces the output vector's L1 norm to be 1.")
def _l1(ctx):
    worst = max(float(np.abs(np.abs(_softmax(z)).sum(-1) - 1).max()) for z in _random_logits(ctx, 3) + _adversarial_logits())
    return Result(HOLDS, f"max |‖p‖₁ − 1| = {worst:.2g} over random and adversarial rows (entries are ≥ 0, so ‖p‖₁ = Σp)",
                  {"max_error": worst})


@claim("stable-softmax", "001", "§6; 000 §8", "减去最大值不会改变输出结果(因为是比值)",
       "Subtracting max(z) leaves the softmax unchanged and avoids overflow (the LogSumExp trick).")
def _stable(ctx):
    worst = 0.0
    for z in _random_logits(ctx, 4, scales=(0.1, 1.0, 5.0)):
        with np.errstate(over="ignore", invalid="ignore"):
            naive = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        worst = max(worst, float(np.abs(naive - _softmax(z)).max()))
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.array([1000.0, 999.0])
        naive = np.exp(z) / np.exp(z).sum()
    stable = _softmax(z)
    return Result(HOLDS, f"max |naive − stable| = {worst:.2g} where exp does not overflow; at z = (1000, 999) the "
                  f"naive formula gives {naive.tolist()} and the shifted one [{stable[0]:.4f}, {stable[1]:.4f}]",
                  {"max_difference": worst})


@claim("ce-gradient", "001", "§5; 002 §3; 003 §2", "∂L/∂z_i = p_i − y_i",
       "The gradient of softmax + cross-entropy with respect to the logits is p − y.")
def _ce_gradient(ctx):
    import torch

    worst_autograd, worst_fd = 0.0, 0.0
    for z in _random_logits(ctx, 5, classes=(2, 3, 10), scales=(0.1, 1.0, 5.0)):
        y = np.argmax(z + ctx.rng(6).normal(size=z.shape), axis=1)
        zt = torch.tensor(z, requires_grad=True)
        torch.nn.functional.cross_entropy(zt, torch.from_numpy(y), reduction="sum").backward()
        closed = _softmax(z) - np.eye(z.shape[1])[y]
        worst_autograd = max(worst_autograd, float(np.abs(zt.grad.numpy() - closed).max()))
        # central differences on the first row
        h = 1e-6
        row, target = z[0], y[0]
        loss = lambda v, target=target: -np.log(_softmax(v)[target])  # noqa: E731
        fd = np.array([(loss(row + h * e) - loss(row - h * e)) / (2 * h) for e in np.eye(len(row))])
        worst_fd = max(worst_fd, float(np.abs(fd - closed[0]).max()))
    return Result(HOLDS, f"max |autograd − (p − y)| = {worst_autograd:.2g}; max |central difference − (p − y)| = "
                  f"{worst_fd:.2g} (step 1e-6)", {"autograd": worst_autograd, "finite_difference": worst_fd})


@claim("jacobian-signs", "001", "§4", "对角线为正 … 非对角线为负",
       "The softmax Jacobian has a positive diagonal and a negative off-diagonal.")
def _signs(ctx):
    diag_min, off_max = math.inf, -math.inf
    for z in _random_logits(ctx, 7, scales=(0.1, 1.0, 5.0)):
        J = _jacobian(_softmax(z))
        eye = np.eye(z.shape[1], dtype=bool)
        diag_min = min(diag_min, float(J[:, eye].min()))
        off_max = max(off_max, float(J[:, ~eye].max()))
    extreme = _jacobian(_softmax(np.array([800.0, 0.0, 0.0])))
    return Result(HOLDS, f"random rows: min diagonal {diag_min:.3g} > 0, max off-diagonal {off_max:.3g} < 0 (exactly "
                  f"p_i(1 − p_i) and −p_i p_j); float64 underflow can round both to 0 (z = (800, 0, 0): diagonal "
                  f"{extreme[0, 0]:.3g}, off-diagonal {extreme[0, 1]:.3g})", {"diag_min": diag_min, "off_max": off_max})


@claim("jacobian-range", "004", "§1 derivative table", "i=j … [0, 0.25];  i≠j … [−0.25, 0)",
       "Diagonal entries lie in [0, 0.25], off-diagonal entries in [−0.25, 0).")
def _jacobian_range(ctx):
    lo_d, hi_d, lo_o, hi_o = math.inf, -math.inf, math.inf, -math.inf
    for z in _random_logits(ctx, 8) + _adversarial_logits():
        J = _jacobian(_softmax(z))
        eye = np.eye(z.shape[1], dtype=bool)
        lo_d, hi_d = min(lo_d, float(J[:, eye].min())), max(hi_d, float(J[:, eye].max()))
        if z.shape[1] > 1:
            lo_o, hi_o = min(lo_o, float(J[:, ~eye].min())), max(hi_o, float(J[:, ~eye].max()))
    inside = 0 <= lo_d and hi_d <= 0.25 and -0.25 <= lo_o and hi_o <= 0
    return Result(HOLDS if inside else FAILS,
                  f"diagonal in [{lo_d:.3g}, {hi_d:.3g}], off-diagonal in [{lo_o:.3g}, {hi_o:.3g}]; both bounds ±0.25 "
                  "are reached at z = (0, 0) (p = ½: p(1 − p) = p_i p_j = ¼); the off-diagonal is < 0 in exact "
                  "arithmetic, −0.0 after float64 underflow", {"diagonal": [lo_d, hi_d], "off_diagonal": [lo_o, hi_o]})


@claim("jacobian-symmetric-singular", "004", "§3 matrix properties", "对称性 G_ij = G_ji;行列式 det(G) = 0(奇异矩阵)",
       "The Jacobian is symmetric and singular (det = 0).")
def _symmetric(ctx):
    asym, null, smallest = 0.0, 0.0, 0.0
    for z in _random_logits(ctx, 9, classes=(2, 3, 10), scales=(0.1, 1.0, 5.0)):
        J = _jacobian(_softmax(z))
        asym = max(asym, float(np.abs(J - np.swapaxes(J, -1, -2)).max()))
        null = max(null, float(np.abs(J.sum(-1)).max()))
        smallest = max(smallest, float(np.abs(np.linalg.eigvalsh(J)).min(-1).max()))
    return Result(HOLDS, f"max |J − Jᵀ| = {asym:.2g}; J·1 = 0 (max |row sum| {null:.2g}), so det J = 0 "
                  f"(smallest |eigenvalue| ≤ {smallest:.2g})", {"asymmetry": asym, "row_sum": null})


@claim("jacobian-eigenvalues", "004", "§3 matrix properties", "特征值 | 包含0特征值,其余为负值",
       "The Jacobian's eigenvalues are 0 and otherwise negative.")
def _eigenvalues(ctx):
    lowest, highest, negative = math.inf, -math.inf, 0
    count = 0
    for z in _random_logits(ctx, 10, classes=(2, 3, 10, 50), scales=(0.1, 1.0, 5.0)) + _adversarial_logits()[:4]:
        eig = np.linalg.eigvalsh(_jacobian(_softmax(z)))
        lowest, highest = min(lowest, float(eig.min())), max(highest, float(eig.max()))
        negative += int(np.sum(eig < -1e-12))
        count += eig.shape[0]
    return Result(FAILS, f"over {count} matrices: smallest eigenvalue {lowest:.2g} (0 up to rounding), largest "
                  f"{highest:.3g} > 0, {negative} eigenvalues below −1e-12. J = diag(p) − ppᵀ is positive "
                  "semi-definite: xᵀJx = Σp_i x_i² − (Σp_i x_i)² = Var_p(x) ≥ 0, so the non-zero eigenvalues are "
                  "positive", {"min": lowest, "max": highest, "negative": negative})


@claim("soft-label-cost", "004", "§1 gradient table", "软标签(概率分布) | ∑(p_i − t_i) | O(K^2)",
       "With soft labels the gradient is Σ(p_i − t_i) and costs O(K²).")
def _soft_labels(ctx):
    import torch

    worst, sums = 0.0, 0.0
    rng = ctx.rng(11)
    for k in (3, 10, 100):
        z = 3 * rng.normal(size=(50, k))
        t = rng.dirichlet(np.ones(k), size=50)
        zt = torch.tensor(z, requires_grad=True)
        torch.nn.functional.cross_entropy(zt, torch.from_numpy(t), reduction="sum").backward()
        worst = max(worst, float(np.abs(zt.grad.numpy() - (_softmax(z) - t)).max()))
        sums = max(sums, float(np.abs((_softmax(z) - t).sum(-1)).max()))
    return Result(FAILS, f"the gradient is p − t componentwise (max |autograd − (p − t)| = {worst:.2g}): K subtractions "
                  f"after the softmax, O(K) like hard labels; the table's Σ(p_i − t_i) is identically 0 for a "
                  f"distribution (max |Σ| = {sums:.2g})", {"autograd": worst, "sum": sums})


@claim("saturation-thresholds", "004", "§3 gradient vanishing table", "|z_i| ≤ 1 → [0.2, 1] 正常收敛;|z_i| > 3 → < 0.01 梯度消失",
       "For |z_i| ≤ 1 the gradient norm lies in [0.2, 1]; for |z_i| > 3 it is below 0.01.")
def _thresholds(ctx):
    rng = ctx.rng(12)
    small_lo, small_hi, large_hi = math.inf, -math.inf, -math.inf
    for k in (2, 3, 10, 100):
        z = rng.uniform(-1, 1, size=(ctx.trials, k))
        y = rng.integers(0, k, ctx.trials)
        g = np.linalg.norm(_softmax(z) - np.eye(k)[y], axis=1)
        small_lo, small_hi = min(small_lo, float(g.min())), max(small_hi, float(g.max()))
        z = rng.uniform(3, 6, size=(ctx.trials, k)) * rng.choice([-1, 1], size=(ctx.trials, k))
        g = np.linalg.norm(_softmax(z) - np.eye(k)[y], axis=1)
        large_hi = max(large_hi, float(g.max()))
    spectral = float(np.linalg.eigvalsh(_jacobian(_softmax(np.array([3.1, 3.2])))).max())
    return Result(FAILS, f"‖p − y‖₂ with every |z_i| ≤ 1 ranges over [{small_lo:.3g}, {small_hi:.3g}] (not [0.2, 1]); with "
                  f"every |z_i| > 3 it reaches {large_hi:.3g} (a confidently wrong row has the largest gradient). The "
                  f"Jacobian reading fails too: z = (3.1, 3.2) has spectral norm {spectral:.3g}. Saturation depends on "
                  "the gaps z_i − z_j and on whether the prediction is right, not on |z_i|",
                  {"small": [small_lo, small_hi], "large_max": large_hi})


@claim("temperature-jacobian", "004", "§6", "∂p_i/∂z_j = (1/T) p_i (δ_ij − p_j)",
       "With temperature T the Jacobian is scaled by 1/T: ∂p_i/∂z_j = (1/T) p_i(δ_ij − p_j), p = softmax(z/T).")
def _temperature(ctx):
    worst = 0.0
    rng = ctx.rng(13)
    for T in (0.25, 0.5, 2.0, 10.0):
        for _ in range(20 if ctx.quick else 100):
            z = 2 * rng.normal(size=5)
            p = _softmax(z / T)
            h = 1e-6
            fd = np.stack([(_softmax((z + h * e) / T) - _softmax((z - h * e) / T)) / (2 * h) for e in np.eye(5)], 1)
            worst = max(worst, float(np.abs(fd - _jacobian(p) / T).max()))
    return Result(HOLDS, f"max |central difference − J(p_T)/T| = {worst:.2g} for T ∈ {{0.25, 0.5, 2, 10}}", {"max_error": worst})


@claim("binary-sigmoid", "004", "§8", "当K=2时 … p_1 = σ(z_1 − z_2)",
       "For K = 2, softmax is the sigmoid of the logit difference: p₁ = σ(z₁ − z₂).")
def _binary(ctx):
    rng = ctx.rng(14)
    z = 10 * rng.normal(size=(ctx.trials, 2))
    sigma = 1 / (1 + np.exp(-(z[:, 0] - z[:, 1])))
    worst = float(np.abs(_softmax(z)[:, 0] - sigma).max())
    return Result(HOLDS, f"max |softmax(z)₁ − σ(z₁ − z₂)| = {worst:.2g} over {ctx.trials} rows", {"max_error": worst})


@claim("binary-derivative-formula", "004", "§5 softmax vs sigmoid", "∂p_1/∂z_1 = p_1(1−p_1) = σ'(z_1)·(1 − σ(z_2))",
       "For K = 2, ∂p₁/∂z₁ = p₁(1 − p₁) = σ′(z₁)·(1 − σ(z₂)).")
def _binary_formula(ctx):
    rng = ctx.rng(15)
    z = 3 * rng.normal(size=(ctx.trials, 2))
    p1 = _softmax(z)[:, 0]
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    stated = sig(z[:, 0]) * (1 - sig(z[:, 0])) * (1 - sig(z[:, 1]))
    correct = sig(z[:, 0] - z[:, 1]) * (1 - sig(z[:, 0] - z[:, 1]))
    first = float(np.abs(p1 * (1 - p1) - correct).max())
    second = float(np.abs(p1 * (1 - p1) - stated).max())
    return Result(FAILS, f"the first equality holds (max error {first:.2g}); the second does not: at z = (0, 0) "
                  f"p₁(1 − p₁) = 0.25 but σ′(0)(1 − σ(0)) = 0.125; max gap {second:.3g} over {ctx.trials} rows. The "
                  "right form is σ′(z₁ − z₂)", {"first": first, "second": second})


@claim("binary-gradient", "004", "§8", "∂L/∂z_1 = σ(z_1 − z_2) − y_1;∂L/∂z_2 = −σ(z_1 − z_2) + y_1",
       "For K = 2 the cross-entropy gradient is ±(σ(z₁ − z₂) − y₁).")
def _binary_gradient(ctx):
    rng = ctx.rng(16)
    z = 3 * rng.normal(size=(ctx.trials, 2))
    y1 = rng.integers(0, 2, ctx.trials).astype(float)
    grad = _softmax(z) - np.stack([y1, 1 - y1], 1)
    s = 1 / (1 + np.exp(-(z[:, 0] - z[:, 1])))
    worst = float(max(np.abs(grad[:, 0] - (s - y1)).max(), np.abs(grad[:, 1] + (s - y1)).max()))
    return Result(HOLDS, f"max error {worst:.2g} over {ctx.trials} rows", {"max_error": worst})


@claim("temperature-limits", "001", "§8", "T→0:输出趋近于 one-hot;T→∞:输出变得平滑(接近均匀分布)",
       "As T → 0 the output tends to one-hot; as T → ∞ to the uniform distribution.")
def _limits(ctx):
    rng = ctx.rng(17)
    z = rng.normal(size=(200, 6))
    cold = float(np.abs(_softmax(z / 1e-3) - np.eye(6)[z.argmax(1)]).max())
    hot = float(np.abs(_softmax(z / 1e6) - 1 / 6).max())
    tied = _softmax(np.array([1.0, 1.0, 0.0]) / 1e-3)
    return Result(DEPENDS, f"T = 1e6: max |p − 1/C| = {hot:.2g} (uniform: holds); T = 1e-3: max |p − onehot(argmax)| = "
                  f"{cold:.2g} for rows with a unique maximum, but with tied maxima the limit is uniform over the ties "
                  f"(z = (1, 1, 0) → [{tied[0]:.2f}, {tied[1]:.2f}, {tied[2]:.2f}]), not one-hot",
                  {"hot": hot, "cold": cold})


@claim("temperature-smoothing", "003", "§5.1", "温度T>1时概率分布更平滑,T<1时更尖锐",
       "T > 1 makes the distribution smoother, T < 1 sharper.")
def _smoothing(ctx):
    rng = ctx.rng(18)
    z = 3 * rng.normal(size=(ctx.trials, 8))
    temperatures = np.geomspace(0.1, 10, 25)
    entropy = np.stack([-(p * np.log(np.maximum(p, 1e-300))).sum(1) for p in (_softmax(z / t) for t in temperatures)], 1)
    decreasing = int(np.sum(np.diff(entropy, axis=1) < -1e-12))
    return Result(HOLDS, f"entropy is non-decreasing in T on every row ({decreasing} decreases in {entropy.size} steps); "
                  f"mean entropy {entropy[:, 0].mean():.3f} nats at T = 0.1, {entropy[:, 12].mean():.3f} at T = 1, "
                  f"{entropy[:, -1].mean():.3f} at T = 10 (max log 8 = {math.log(8):.3f})", {"decreases": decreasing})


@claim("max-entropy", "001", "§3", "在满足均值约束下,Softmax 是熵最大的概率分布",
       "Under a mean constraint, softmax is the maximum-entropy distribution.")
def _max_entropy(ctx):
    rng = ctx.rng(19)
    worst = -math.inf
    entropy = lambda q: float(-(q * np.log(q)).sum())  # noqa: E731
    for _ in range(50 if ctx.quick else 300):
        z = rng.normal(size=6)
        p = _softmax(z)
        basis = np.linalg.svd(np.stack([np.ones(6), z]))[2][2:]  # directions keeping Σq and E_q[z]
        for _ in range(10):
            step = basis.T @ rng.normal(size=4)
            step *= 0.9 * np.min(np.where(step < 0, p / -step, np.inf))  # stay inside the simplex
            worst = max(worst, entropy(p + step) - entropy(p))
    return Result(HOLDS, "perturbing p = softmax(z) inside the simplex while keeping Σq = 1 and E_q[z] fixed never "
                  f"raises the entropy (largest change {worst:.3g}); p is the Gibbs distribution of the constraint "
                  "E_q[z] = E_p[z]", {"max_gain": worst})


@claim("label-smoothing-0.1/K", "003", "§4.2", "标签平滑:将硬标签替换为软标签(如yᵢ=0.9, yⱼ=0.1/K for j≠i)",
       "Label smoothing: y_i = 0.9 and y_j = 0.1/K for j ≠ i.")
def _smoothing_recipe(ctx):
    sums = {k: 0.9 + (k - 1) * 0.1 / k for k in (2, 10, 1000)}
    text = ", ".join(f"K = {k}: {s:.4g}" for k, s in sums.items())
    return Result(FAILS, f"the target sums to 1 − 0.1/K, not 1 ({text}); a distribution needs y_j = 0.1/(K − 1), or "
                  "the usual (1 − ε)·onehot + ε/K (y_i = 0.9 + 0.1/K), which is softmaxkit's label_smoothing", sums)


@claim("label-smoothing-standard", "004", "§4 training advice", "将硬标签 y_i 替换为 (1−ε)y_i + ε/K",
       "Label smoothing replaces y_i by (1 − ε)y_i + ε/K.")
def _smoothing_standard(ctx):
    import torch

    import softmaxkit

    rng = ctx.rng(20)
    z = torch.tensor(rng.normal(size=(50, 7)))
    y = torch.from_numpy(rng.integers(0, 7, 50))
    smoothed = softmaxkit.cross_entropy(z, y, label_smoothing=0.1)
    explicit = softmaxkit.cross_entropy(z, 0.9 * torch.nn.functional.one_hot(y, 7).double() + 0.1 / 7)
    total = float((0.9 * np.eye(7)[0] + 0.1 / 7).sum())
    return Result(HOLDS, f"the smoothed target sums to {total:.15g}; cross_entropy(label_smoothing=0.1) equals CE against "
                  f"it (difference {abs(float(smoothed - explicit)):.2g})", {"sum": total})


@claim("inverse-frequency-weights", "003", "§3.2", "类别0:1000例,类别1:100例,类别2:10例 … [1.0, 10.0, 100.0];逆频率法(wᵢ=N/Nᵢ)",
       "For class counts 1000/100/10 the weights [1, 10, 100] are the inverse-frequency weights N/N_i.")
def _weights(ctx):
    import torch

    import softmaxkit

    counts = np.array([1000.0, 100.0, 10.0])
    inverse = counts.sum() / counts
    ours = softmaxkit.class_weights(torch.tensor(counts), method="inverse").numpy()
    ratio = inverse / inverse[0]
    return Result(HOLDS, f"N/N_i = [{', '.join(f'{w:.4g}' for w in inverse)}]: proportional to [1, 10, 100] (ratios "
                  f"{ratio.tolist()}), only the scale differs; softmaxkit.class_weights(method='inverse') normalises to "
                  f"mean 1: [{', '.join(f'{w:.4g}' for w in ours)}]", {"inverse": inverse.tolist()})


# =========================================================================================== gradients vs error
def _gradient_curves(ctx):
    if "curves" not in ctx.cache:
        from .report.gradients import sweep

        ctx.cache["curves"] = sweep(num_classes=10, points=401 if not ctx.quick else 161)
    return ctx.cache["curves"]


@claim("table3-ce", "000", "§3 table 3", "Softmax+CE | 误差越大梯度越强",
       "With softmax + CE, the larger the error, the stronger the gradient.")
def _table3_ce(ctx):
    c = _gradient_curves(ctx)
    order = np.argsort(c["error"])
    g = c["cross_entropy"][order]
    deviation = float(np.abs(c["cross_entropy"] - c["error"]).max())
    monotone = bool(np.all(np.diff(g) >= -1e-12))
    return Result(HOLDS if monotone else FAILS, f"|∂ℓ/∂z_y| = 1 − p_y = the error exactly (max deviation {deviation:.2g}), "
                  "increasing from 0 to 1; see the compare report's gradient panel", {"deviation": deviation})


@claim("table3-mse", "000", "§3 table 3", "MSE | 线性梯度",
       "MSE has a linear gradient.")
def _table3_mse(ctx):
    c = _gradient_curves(ctx)
    s, raw, prob, err = c["score"], c["mse_scores"], c["mse"], c["error"]
    slope = np.polyfit(s[s > 1.5], raw[s > 1.5], 1)
    fit = float(np.abs(np.polyval(slope, s[s > 1.5]) - raw[s > 1.5]).max())
    peak = float(err[np.argmax(prob)])
    at_worst = float(prob[np.argmax(err)])
    return Result(DEPENDS, f"on raw scores: |∂ℓ/∂z_y| = 2|z_y − 1|/C, linear in the score (max residual of a line "
                  f"{fit:.2g}) but not monotone in the error (it also pushes correct rows with z_y > 1 back); on softmax "
                  f"probabilities the gradient goes through the Jacobian and is not linear: it peaks at error "
                  f"{peak:.2f} ({prob.max():.3f}) and fades to {at_worst:.2g} for a confidently wrong row",
                  {"raw_residual": fit, "probability_peak_error": peak})


@claim("table3-hinge", "000", "§3 table 3", "合页损失 | 分段线性",
       "The hinge loss is piecewise linear.")
def _table3_hinge(ctx):
    import torch

    import softmaxkit

    s = torch.linspace(-4, 4, 801, dtype=torch.float64)
    z = torch.zeros(801, 10, dtype=torch.float64)
    z[:, 0] = s
    loss = softmaxkit.multi_margin_loss(z, torch.zeros(801, dtype=torch.long), reduction="none").numpy()
    curvature = np.abs(np.diff(loss, 2))
    kinks = int(np.sum(curvature > 1e-9))
    c = _gradient_curves(ctx)
    values = sorted({round(float(v), 6) for v in c["hinge"]})
    return Result(HOLDS, f"the Weston–Watkins loss along z_y has {kinks} kink(s) (second differences 0 elsewhere); its "
                  f"gradient on z_y takes only the values {values} (0 once the margin is met, however uncertain p is)",
                  {"kinks": kinks, "gradient_values": values})


# =========================================================================================== experiments
def _relative(a, b):
    return (a - b) / a if a > 0 else 0.0


@claim("ce-vs-mse-12.7%", "000", "§4", "相较于未归一化的输出直接计算MSE,Softmax+CE训练的模型在测试集上的泛化误差平均降低12.7%",
       "Compared with MSE on unnormalised outputs, softmax + CE lowers the test error by 12.7% on average.", "empirical")
def _ce_vs_mse(ctx):
    per, rows = {}, []
    for name in ctx.datasets:
        errors = {"ce": [], "mse_scores": [], "mse": []}
        for seed in ctx.seeds:
            X_train, X_test, y_train, y_test = _split(name, seed)
            X_train, X_test = _standardise(X_train, X_test)
            for key, loss in (("ce", "cross_entropy"), ("mse_scores", "mse_scores"), ("mse", "mse")):
                model = _fit(X_train, y_train, seed, loss=loss)
                errors[key].append(float(np.mean(model.predict(X_test) != y_test)))
        ce, raw, prob = (float(np.mean(errors[k])) for k in ("ce", "mse_scores", "mse"))
        per[name] = {"ce_error": ce, "mse_scores_error": raw, "mse_error": prob, "relative": _relative(raw, ce)}
        rows.append(f"{name} {ce:.3f} vs {raw:.3f} ({100 * _relative(raw, ce):+.0f}%)")
    relative = float(np.mean([v["relative"] for v in per.values()]))
    if relative <= 0:
        verdict = FAILS
    elif abs(100 * relative - 12.7) <= 5 and all(v["relative"] > 0 for v in per.values()):
        verdict = HOLDS
    else:
        verdict = DEPENDS
    prob_text = ", ".join(f"{n} {v['mse_error']:.3f}" for n, v in per.items())
    return Result(verdict, f"test error CE vs MSE on raw scores (mean of {_seeds(ctx)}, linear model, "
                  f"α = 1e-3): {'; '.join(rows)}; mean relative reduction {100 * relative:.1f}% (claimed 12.7%). "
                  f"MSE on softmax probabilities: {prob_text}", {"datasets": per, "mean_relative": relative})


def _imbalanced(name, seed, minority, share=0.02):
    """A binary train split whose ``minority`` class is ``share`` of the rows; the test split is untouched."""
    X_train, X_test, y_train, y_test = _split(name, seed)
    rng = np.random.default_rng(seed)
    majority_rows = np.flatnonzero(y_train != minority)
    minority_rows = np.flatnonzero(y_train == minority)
    keep = max(1, round(share / (1 - share) * len(majority_rows)))
    chosen = np.concatenate([majority_rows, rng.choice(minority_rows, min(keep, len(minority_rows)), replace=False)])
    X_train, X_test = _standardise(X_train[chosen], X_test)
    return X_train, y_train[chosen], X_test, y_test


@claim("imbalance-98:2", "000", "§5", "在98%:2%的极端不平衡场景下,模型倾向于将所有样本预测为多数类",
       "Under a 98%:2% imbalance the model tends to predict every sample as the majority class.", "empirical")
def _imbalance(ctx):
    problems = [("breast_cancer", 0)] if ctx.quick else [("breast_cancer", 0), ("wine", 2)]
    per, rows = {}, []
    for name, minority in problems:
        recall, majority_share, weighted_recall = [], [], []
        for seed in ctx.seeds:
            X_train, y_train, X_test, y_test = _imbalanced(name, seed, minority)
            if name == "wine":  # binary: the minority class against the rest
                y_train, y_test = (y_train == minority).astype(int), (y_test == minority).astype(int)
                target = 1
            else:
                target = minority
            model = _fit(X_train, y_train, seed)
            pred = model.predict(X_test)
            recall.append(float(np.mean(pred[y_test == target] == target)))
            majority_share.append(float(np.mean(pred != target)))
            balanced = _fit(X_train, y_train, seed, class_weight="balanced").predict(X_test)
            weighted_recall.append(float(np.mean(balanced[y_test == target] == target)))
        per[name] = {"minority_recall": float(np.mean(recall)), "predicted_majority": float(np.mean(majority_share)),
                     "balanced_recall": float(np.mean(weighted_recall)), "test_majority": float(np.mean(y_test != target))}
        rows.append(f"{name}: minority recall {np.mean(recall):.2f} (class-balanced weights {np.mean(weighted_recall):.2f}), "
                    f"{100 * np.mean(majority_share):.0f}% of test rows predicted majority vs "
                    f"{100 * per[name]['test_majority']:.0f}% true")
    recalls = [v["minority_recall"] for v in per.values()]
    verdict = HOLDS if max(recalls) < 0.5 else FAILS if min(recalls) > 0.8 else DEPENDS
    return Result(verdict, f"training sets cut to 98:2, test sets as they are, {_seeds(ctx)}: " + "; ".join(rows)
                  + ". The minority is under-predicted, not abandoned: how much depends on how separable it is",
                  per)


@claim("no-output-bias", "003", "§6.1", "移除输出层的偏置项(bias=False)通常不会影响性能,甚至能轻微提升准确率",
       "Removing the output layer's bias usually does not hurt and may slightly improve accuracy.", "empirical")
def _bias(ctx):
    per, rows = {}, []
    for name in ctx.datasets:
        diffs = []
        for seed in ctx.seeds:
            X_train, X_test, y_train, y_test = _split(name, seed)
            X_train, X_test = _standardise(X_train, X_test)
            with_bias = np.mean(_fit(X_train, y_train, seed).predict(X_test) == y_test)
            without = np.mean(_fit(X_train, y_train, seed, fit_intercept=False).predict(X_test) == y_test)
            diffs.append(float(without - with_bias))
        per[name] = float(np.mean(diffs))
        rows.append(f"{name} {100 * per[name]:+.2f} pt")
    long_tail = []
    for seed in ctx.seeds:  # where the bias carries the class prior
        X_train, y_train, X_test, y_test = _imbalanced("breast_cancer", seed, 0, share=0.1)
        with_bias = np.mean(_fit(X_train, y_train, seed).predict(X_test) == y_test)
        without = np.mean(_fit(X_train, y_train, seed, fit_intercept=False).predict(X_test) == y_test)
        long_tail.append(float(without - with_bias))
    worst = min(per.values())
    verdict = HOLDS if worst >= -0.005 else DEPENDS
    return Result(verdict, f"test accuracy without − with the output bias (standardised features, {_seeds(ctx)}): "
                  f"{', '.join(rows)}; breast_cancer cut to 90:10 (the bias carries the prior): "
                  f"{100 * np.mean(long_tail):+.2f} pt", {"datasets": per, "imbalanced": float(np.mean(long_tail))})


@claim("confidence-margin", "000", "§6", "通过分析预测概率的分布形态(如最大值与次大值的差距),可以评估模型的置信度",
       "The gap between the largest and second-largest probability measures the model's confidence.", "empirical")
def _margin(ctx):
    from sklearn.metrics import roc_auc_score

    from .. import metrics

    per = {}
    for name in ("digits", "wine") if not ctx.quick else ("wine",):
        scores = {"margin": [], "max_probability": [], "negative_entropy": []}
        for seed in ctx.seeds:
            model, _, _, X_test, y_test = _ce_model(ctx, name, seed)
            probs = model.predict_proba(X_test)
            right = probs.argmax(1) == y_test
            if right.all() or not right.any():
                continue
            c = metrics.confidence(probs)
            scores["margin"].append(roc_auc_score(right, c.margin))
            scores["max_probability"].append(roc_auc_score(right, c.max_probability))
            scores["negative_entropy"].append(roc_auc_score(right, -c.entropy))
        if scores["margin"]:
            per[name] = {k: float(np.mean(v)) for k, v in scores.items()}
    if not per:
        return Result(DEPENDS, "every test row was classified correctly: nothing to separate", {})
    text = "; ".join(f"{n}: AUROC margin {v['margin']:.3f}, max p {v['max_probability']:.3f}, −entropy "
                     f"{v['negative_entropy']:.3f}" for n, v in per.items())
    verdict = HOLDS if min(v["margin"] for v in per.values()) > 0.75 else DEPENDS
    return Result(verdict, f"how well each confidence separates right from wrong test predictions (CE model): {text}",
                  per)


@claim("confused-pairs", "003", "§3.3", "混淆矩阵分析:识别易混淆类别对",
       "The confusion matrix identifies easily confused class pairs.", "empirical")
def _pairs(ctx):
    from .. import metrics

    tops = []
    for seed in ctx.seeds:
        model, _, _, X_test, y_test = _ce_model(ctx, "digits", seed)
        pairs = metrics.most_confused_pairs(y_test, model.predict(X_test), k=3)
        tops.append([(p.true, p.predicted, p.count) for p in pairs])
    sets = [{(a, b) for a, b, _ in top} for top in tops]
    recurring = set.intersection(*sets) if sets else set()
    first = ", ".join(f"{a}→{b} ({n})" for a, b, n in tops[0]) if tops else "none"
    verdict = HOLDS if (len(ctx.seeds) == 1 and tops[0]) or recurring else DEPENDS
    return Result(verdict, f"digits, CE model, seed {ctx.seeds[0]}: most confused (true→predicted, count) {first}; pairs in "
                  f"the top 3 of every one of {_seeds(ctx)}: {sorted(recurring) or 'none'} (mistakes are few, "
                  "so small test sets make the ranking noisy)", {"top_pairs": tops})


@claim("overconfidence", "003", "§6.2", "原始Softmax输出的概率常存在过度自信问题。可通过温度缩放或Platt scaling进行校准",
       "Raw softmax probabilities are often over-confident; temperature scaling or Platt scaling calibrates them.",
       "empirical")
def _calibration(ctx):
    from .. import calibration, metrics

    results = {"T": [], "before": [], "temperature": [], "platt": [], "dirichlet": []}
    for seed in ctx.seeds:
        model, X_val, y_val, X_test, y_test = _ce_model(ctx, "digits", seed)
        val_logits, test_logits = model.decision_function(X_val), model.decision_function(X_test)
        results["before"].append(metrics.expected_calibration_error(model.predict_proba(X_test), y_test))
        scaler = calibration.TemperatureScaling().fit(val_logits, y_val)
        results["T"].append(scaler.temperature_)
        results["temperature"].append(metrics.expected_calibration_error(scaler.predict_proba(test_logits), y_test))
        for key, cls in (("platt", calibration.PlattScaling), ("dirichlet", calibration.DirichletCalibration)):
            probs = cls().fit(val_logits, y_val).predict_proba(test_logits)
            results[key].append(metrics.expected_calibration_error(probs, y_test))
    mean = {k: float(np.mean(v)) for k, v in results.items()}
    over = mean["T"] > 1
    verdict = HOLDS if over and mean["temperature"] < mean["before"] and mean["platt"] < mean["before"] else DEPENDS
    return Result(verdict, f"digits, CE model (α = 1e-4), {_seeds(ctx)}: fitted temperature {mean['T']:.2f} "
                  f"({'over' if over else 'under'}-confident); test ECE {mean['before']:.3f} before, {mean['temperature']:.3f} "
                  f"after temperature scaling, {mean['platt']:.3f} after Platt scaling (one-vs-rest), "
                  f"{mean['dirichlet']:.3f} after Dirichlet calibration", mean)


@claim("isotonic-snippet", "003", "§6.2 code", "calibrator.fit(val_probs.max(axis=1), val_true)",
       "The isotonic snippet calibrates the softmax probabilities.", "empirical")
def _snippet(ctx):
    from sklearn.isotonic import IsotonicRegression

    model, X_val, y_val, X_test, _ = _ce_model(ctx, "digits")
    calibrator = IsotonicRegression(out_of_bounds="clip")
    calibrator.fit(model.predict_proba(X_val).max(axis=1), y_val)
    out = calibrator.predict(model.predict_proba(X_test).max(axis=1))
    return Result(FAILS, f"it regresses the top probability on the class index (val_true), so its outputs are class "
                  f"numbers, not probabilities: on digits they range over [{out.min():.2f}, {out.max():.2f}]. Fit on "
                  "correctness (val_true == argmax) instead, or use softmaxkit.calibration.IsotonicCalibration",
                  {"min": float(out.min()), "max": float(out.max())})


@claim("sigmoid-vs-softmax", "001", "§7", "输出总和是否为 1 … Sigmoid ❌ 否;“每个类都可能属于或不属于”(如多标签任务),使用 Sigmoid",
       "Sigmoid outputs do not sum to 1 and suit multi-label tasks; softmax suits mutually exclusive classes.",
       "empirical")
def _sigmoid(ctx):
    import torch

    from .. import metrics

    per = {}
    for name in ("digits",) if not ctx.quick else ("wine",):
        acc, nll, sums = {"cross_entropy": [], "sigmoid": []}, {"cross_entropy": [], "sigmoid": []}, []
        for seed in ctx.seeds:
            X_train, X_test, y_train, y_test = _split(name, seed)
            X_train, X_test = _standardise(X_train, X_test)
            for loss in acc:
                model = _fit(X_train, y_train, seed, loss=loss)
                probs = model.predict_proba(X_test)
                acc[loss].append(float(np.mean(probs.argmax(1) == y_test)))
                nll[loss].append(metrics.log_loss(probs, y_test))
                if loss == "sigmoid":
                    sums.extend(torch.sigmoid(torch.from_numpy(model.decision_function(X_test))).sum(1).tolist())
        per[name] = {"accuracy": {k: float(np.mean(v)) for k, v in acc.items()},
                     "nll": {k: float(np.mean(v)) for k, v in nll.items()},
                     "sigmoid_sum": [float(np.min(sums)), float(np.max(sums))]}
    name, v = next(iter(per.items()))
    better = v["nll"]["cross_entropy"] <= v["nll"]["sigmoid"]
    return Result(HOLDS if better else DEPENDS,
                  f"{name} (mutually exclusive classes): Σ_c σ(z_c) ranges over [{v['sigmoid_sum'][0]:.2f}, "
                  f"{v['sigmoid_sum'][1]:.2f}]; accuracy softmax {v['accuracy']['cross_entropy']:.3f} vs one-vs-rest "
                  f"sigmoid {v['accuracy']['sigmoid']:.3f}, NLL {v['nll']['cross_entropy']:.3f} vs "
                  f"{v['nll']['sigmoid']:.3f} (sigmoid renormalised). Multi-label targets: "
                  "softmaxkit.multilabel_soft_margin_loss takes multi-hot rows", per)


@claim("topk-sparse", "003", "§4.1; §7", "稀疏计算:对低概率类别采用近似计算;稀疏Softmax:仅计算top-k类别的概率",
       "Computing only the top-k classes' probabilities is a good approximation of the softmax.", "empirical")
def _topk(ctx):
    import torch

    import softmaxkit

    model, _, _, X_test, _ = _ce_model(ctx, "digits")
    logits = torch.from_numpy(model.decision_function(X_test))
    full = torch.softmax(logits, 1)
    per = {}
    for k in (1, 2, 3, 5):
        sparse = softmaxkit.topk_softmax(logits, k)
        tv = 0.5 * (sparse - full).abs().sum(1)
        per[k] = {"mean_tv": float(tv.mean()), "max_tv": float(tv.max()),
                  "same_argmax": float((sparse.argmax(1) == full.argmax(1)).double().mean())}
    text = ", ".join(f"k = {k}: mean {v['mean_tv']:.2g}, max {v['max_tv']:.2g}" for k, v in per.items())
    return Result(DEPENDS, f"digits CE model (C = 10): total-variation distance of topk_softmax to the softmax, which "
                  f"equals the probability mass left out: {text}; the argmax never changes. Good when the tail mass is "
                  "small, i.e. for confident rows; uncertain rows lose most", per)


# =========================================================================================== performance
def _benchmark_rows():
    import csv

    from .commands.bench import find_benchmarks

    module = find_benchmarks()
    roots = [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[3]]
    if module is not None:
        roots.insert(0, Path(module.__file__).resolve().parents[1])
    for root in roots:
        path = root / "benchmarks" / "results" / "cross_entropy.csv"
        if path.exists():
            with path.open(newline="") as handle:
                return path, list(csv.DictReader(handle))
    return None, []


@claim("optimised-2.8x-40%", "000", "§8", "经过优化的Softmax计算相比原始实现提速2.8倍,内存占用降低40%",
       "An optimised softmax is 2.8× faster than the original implementation, with 40% less memory.", "performance")
def _performance(ctx):
    path, rows = _benchmark_rows()
    if not rows:
        return Result(DEPENDS, "benchmarks/results/cross_entropy.csv not found (the figures live in the repository); "
                      "run `softmaxkit bench` from a clone", {})
    # the harness's own ratios (softmaxkit over F.cross_entropy, measured in the same run), forward + backward,
    # default allocator only (peak memory is not comparable under a retaining one)
    pick = [r for r in rows if r["status"] == "ok" and r["mode"] == "full" and r["impl"] == "softmaxkit"
            and r.get("allocator", "default") == "default"]
    if not pick:
        return Result(DEPENDS, f"{path} holds no softmaxkit forward + backward rows", {})
    speed = np.array([1.0 / float(r["ratio_time"]) for r in pick])
    memory = np.array([1.0 - float(r["ratio_peak"]) for r in pick])
    quiet = np.array([float(r["load"]) < 2.0 for r in pick])
    devices = sorted({r["device"] for r in pick})
    text = (f"committed figures ({path.name}, {'; '.join(devices)}; cross-entropy forward + backward, {len(pick)} runs "
            f"over {len({(r['shape'], r['dtype']) for r in pick})} shape/dtype pairs): softmaxkit vs F.cross_entropy "
            f"{speed.min():.1f}–{speed.max():.1f}× faster (median {np.median(speed):.1f}×"
            + (f", {np.median(speed[quiet]):.1f}× on a quiet machine" if quiet.any() else "")
            + f"), {100 * memory.min():.0f}–{100 * memory.max():.0f}% less peak memory (median "
            f"{100 * np.median(memory):.0f}%). So an optimised softmax path can beat 2.8× / 40% here, but the "
            "figures depend on the baseline, shape, dtype, device and machine load; the texts name none of them")
    return Result(DEPENDS, text, {"speedup": [float(speed.min()), float(np.median(speed)), float(speed.max())],
                                  "memory_saving": [float(memory.min()), float(np.median(memory)), float(memory.max())]})


@claim("gpu-3-5x", "000", "§8", "现代GPU通过并行化exp/log运算单元,可将批量计算的吞吐量提升3-5倍",
       "GPUs raise the batched softmax throughput 3–5×.", "performance")
def _gpu(ctx):
    import torch

    if not torch.cuda.is_available():
        return Result(DEPENDS, "not measurable on this machine (no CUDA device); `softmaxkit bench --device cuda` on a "
                      "GPU machine gives the figure, against its CPU", {})
    x = torch.randn(4096, 32000)
    times = {}
    for device in ("cpu", "cuda"):
        data = x.to(device)
        torch.softmax(data, -1)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            torch.softmax(data, -1)
        if device == "cuda":
            torch.cuda.synchronize()
        times[device] = (time.perf_counter() - start) / 5
    ratio = times["cpu"] / times["cuda"]
    return Result(DEPENDS, f"torch.softmax 4096×32000 fp32: {ratio:.0f}× faster on {torch.cuda.get_device_name()} than "
                  "on this CPU; the factor is a property of the two devices, not of the softmax", {"ratio": ratio})


# =========================================================================================== selecting and running
def select(only: str | None) -> list[Claim]:
    if not only:
        return list(CLAIMS)
    known = {c.id: c for c in CLAIMS}
    chosen = []
    for raw in only.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in known:
            from ._io import UserError

            raise UserError(f"unknown claim {name!r} in --only; `softmaxkit claims --list` shows the ids")
        chosen.append(known[name])
    if not chosen:
        from ._io import UserError

        raise UserError("--only is empty; give comma-separated claim ids such as table3-ce,jacobian-eigenvalues")
    return chosen


def parse_seeds(text: str) -> list[int]:
    from ._io import UserError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2, but got {text!r}") from None
    if not seeds:
        raise UserError("--seeds is empty; give comma-separated integers such as 0,1,2")
    if any(s < 0 for s in seeds):
        raise UserError(f"--seeds must be non-negative, but got {text!r}")
    return seeds


def reproduce(item: Claim, seeds: list[int], quick: bool) -> str:
    command = f"softmaxkit claims --only {item.id}"
    if item.kind == "empirical":
        command += f" --seeds {','.join(map(str, seeds))}"
        if quick:
            command += " --quick"
    return command


def run(items: list[Claim], ctx: Context, on_start=None) -> list[dict]:
    rows = []
    for item in items:
        if on_start:
            on_start(item)
        start = time.perf_counter()
        try:
            result = item.check(ctx)
        except Exception as error:  # a failing check is reported in its row, not as a traceback
            result = Result(DEPENDS, f"the check could not run: {type(error).__name__}: {error}", {})
        if result.verdict not in VERDICTS:  # pragma: no cover - every check returns one of the three
            raise AssertionError(f"claim {item.id} returned verdict {result.verdict!r}")
        rows.append({"id": item.id, "text": item.text, "section": item.section, "quote": item.quote,
                     "claim": item.claim, "kind": item.kind, "verdict": result.verdict, "evidence": result.evidence,
                     "numbers": result.numbers, "reproduce": reproduce(item, ctx.seeds, ctx.quick),
                     "seconds": time.perf_counter() - start})
    return rows


_COLOURS = {HOLDS: "#1a7f37", FAILS: "#cf222e", DEPENDS: "#9a6700"}


def render_html(rows: list[dict], command: str, seconds: float) -> str:
    from importlib import resources

    import softmaxkit

    css = resources.files("softmaxkit.cli.report").joinpath("style.css").read_text(encoding="utf-8")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    body = [
        "<h1>softmaxkit claims: what the softmax texts say, checked</h1>",
        f"<p class='meta'>softmaxkit {softmaxkit.__version__} · <code>{html.escape(command)}</code> · "
        f"{seconds:.0f} s</p>",
        f"<p>{len(rows)} claims: <b>{counts[HOLDS]}</b> hold, <b>{counts[FAILS]}</b> do not hold, "
        f"<b>{counts[DEPENDS]}</b> depend on a condition the text does not state. Mathematical claims are checked "
        "in float64 on random and adversarial inputs; empirical ones by training SoftmaxRegression on the bundled "
        "datasets; performance ones from the benchmark suite's committed figures.</p>",
        "<table><thead><tr><th>text</th><th>section</th><th>claim</th><th>verdict</th><th>evidence</th>"
        "<th>reproduce</th></tr></thead><tbody>",
    ]
    for r in rows:
        colour = _COLOURS[r["verdict"]]
        body.append(
            f"<tr id='{html.escape(r['id'])}'><td>{html.escape(r['text'])}</td><td>{html.escape(r['section'])}</td>"
            f"<td>{html.escape(r['claim'])}<br><small lang='zh'>{html.escape(r['quote'])}</small></td>"
            f"<td style='color:{colour};font-weight:bold;white-space:nowrap'>{html.escape(r['verdict'])}</td>"
            f"<td>{html.escape(r['evidence'])}</td><td><code>{html.escape(r['reproduce'])}</code></td></tr>"
        )
    body.append("</tbody></table>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>softmaxkit claims</title><style>{css}</style></head>\n<body><main>\n"
            + "\n".join(body) + "\n</main></body></html>\n")
