"""GPU readiness check: ``python -m benchmarks.gpu_check [--out DIR] [--dry-run]`` (or ``make gpu-check``).

On one CUDA device (sized for an H100/H200: under 8 minutes) it runs, in order:

1. ``tests``: the ``gpu``-marked tests (``pytest -m gpu`` over the files that have them);
2. ``accuracy``: every Triton path through its public function against a float64 reference at real sizes —
   ``cross_entropy(impl="triton")`` fp32/bf16 (with options) and at ``N·C > 2³¹`` (bf16), the linear CE in
   ``impl="triton"`` and ``"triton_fused"``, ``sparsemax``/``entmax15`` on CUDA (rows sum to 1, and the
   oracle on a sample of rows). The reference is the shifted float64 form of
   :mod:`softmaxkit.reference` evaluated with torch in float64 row chunk by row chunk (checked against the
   NumPy oracle itself on a few rows);
3. ``compile``: ``torch.compile(fullgraph=True)`` of the CE and linear-CE ops (graph breaks counted with
   ``torch._dynamo.explain``; values and gradients equal to eager);
4. ``cuda_graph``: capture of forward + backward of the same ops in a CUDA graph, replayed and compared;
5. ``timing``: forward+backward medians (``benchmarks._harness.measure``) of torch eager, torch.compile,
   softmaxkit, Liger-Kernel and cut-cross-entropy (where installed), as CSV;
6. ``hf_causal_lm``: one training step of a tiny Llama (issue 11's, and one with a 128256 × 1024 head) with
   its own loss, ``patch(model)``, PyTorch's ``F.linear_cross_entropy``, cut-cross-entropy and Liger-Kernel:
   medians, peak memory and their ratios to the model's own loss, as CSV.

Results go to ``--out`` (default ``$OUT`` or ``benchmarks/results/gpu_check``): ``gpu_check.json`` (every
check with its status and figures, rewritten after every check so a run cut short keeps them; ``"finished"``
says whether it ran to the end), ``gpu_check_timings.csv`` and ``gpu_check_hf_causal_lm.csv`` (rows appended
as measured). The exit status is 0 when every check
passed (skipped ones aside). ``--dry-run`` — automatic without CUDA when ``TRITON_INTERPRET=1`` — runs the
same steps at tiny shapes on the CPU (Triton kernels under the interpreter), to keep the script working in CI;
its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (rows, classes) for cross-entropy; (rows, features, classes) for linear CE
REAL = {
    "ce": [(8192, 32000, "float32"), (8192, 128256, "bfloat16")],
    "ce_huge": (16448, 131072, "bfloat16"),  # 2 155 872 256 > 2^31 logits
    "lce": [(8192, 2048, 32000, "float32"), (8192, 4096, 128256, "bfloat16")],
    "sparse": [(4096, 32000, "float32"), (2048, 128256, "bfloat16")],
    "timing_ce": (8192, 128256, "bfloat16"),
    "timing_lce": (8192, 4096, 128256, "bfloat16"),
    # hf_causal_lm (batch, sequence, vocabulary, hidden, layers) and dtypes: issue 11's tiny Llama, and a
    # Llama-3-sized head (128256 × 1024) under a 4 × 1024 batch
    "hf": [((4, 256, 32000, 256, 2), ("float32", "bfloat16")), ((4, 1024, 128256, 1024, 2), ("bfloat16",))],
}
TINY = {
    "ce": [(5, 70, "float32"), (4, 33, "bfloat16")],
    "ce_huge": (3, 257, "bfloat16"),
    "lce": [(6, 8, 40, "float32"), (5, 16, 33, "bfloat16")],
    "sparse": [(4, 40, "float32"), (3, 33, "bfloat16")],
    "timing_ce": (8, 64, "float32"),
    "timing_lce": (8, 8, 64, "float32"),
    "hf": [((2, 32, 2000, 64, 1), ("float32", "bfloat16"))],
}
#: hf_causal_lm impls timed (softmaxkit_compiled is left out: compiling the model costs a minute of the budget,
#: and the compile step already checks the ops under fullgraph compile); compiled peers only off the dry run
HF_IMPLS = ("torch", "softmaxkit", "torch_chunked", "cut_cross_entropy", "liger")
#: tolerances, by dtype: fp32 results within a few fp32 ulps of sums over C terms; bf16 results are rounded
#: to bf16 once (relative 2^-8) after fp32 arithmetic
TOL = {"float32": (2e-5, 1e-6), "bfloat16": (1.6e-2, 1e-5)}


class Report:
    """The checks so far. With ``path``, ``gpu_check.json`` is rewritten after every check (``summary`` gives
    its other fields), so a run cut short (the device's time limit) still leaves everything it measured."""

    def __init__(self, path: Path | None = None, summary: dict | None = None) -> None:
        self.checks: list[dict] = []
        self.path, self.summary = path, dict(summary or {})
        self.start = time.perf_counter()

    def write(self, finished: bool = False) -> None:
        if self.path is None:
            return
        summary = {**self.summary, "finished": finished, "seconds": round(time.perf_counter() - self.start, 1),
                   "failed": len(self.failed), "checks": self.checks}
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(summary, indent=2))
        os.replace(partial, self.path)

    def record(self, step: str, name: str, status: str, **figures) -> None:
        entry = {"step": step, "name": name, "status": status, **figures}
        self.checks.append(entry)
        self.write()
        detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"[{status:>7}] {step}: {name}" + (f" ({detail})" if detail else ""), flush=True)

    def run(self, step: str, name: str, function, *args, **kwargs) -> None:
        start = time.perf_counter()
        try:
            figures = function(*args, **kwargs) or {}
            status = figures.pop("status", "ok")
        except Skipped as skip:
            status, figures = "skipped", {"reason": str(skip)}
        except Exception as error:  # a failed check is recorded, the others still run
            status = "FAIL"
            figures = {"error": f"{type(error).__name__}: {error}"[:500],
                       "where": traceback.format_exc().strip().splitlines()[-3][:300]}
        figures["seconds"] = round(time.perf_counter() - start, 2)
        self.record(step, name, status, **figures)

    @property
    def failed(self) -> list[dict]:
        return [check for check in self.checks if check["status"] == "FAIL"]


class Skipped(Exception):
    pass


# ----------------------------------------------------------------------------------------------- reference
def _reference_ce(logits, target, weight=None, label_smoothing=0.0, z_loss=0.0, chunk_rows=1024):
    """Per-row loss and gradient (reduction "sum") in float64, shifted form, row chunks on the device.

    The same maths as ``softmaxkit.reference.cross_entropy`` / ``cross_entropy_grad``: d = z − max z,
    log p = d − log Σ e^d, ∂ℓ/∂z = (A + 2λ·LSE)·p − a.
    """
    import torch

    losses, grads = [], []
    num_classes = logits.shape[1]
    w = None if weight is None else weight.double()
    for start in range(0, logits.shape[0], chunk_rows):
        z = logits[start:start + chunk_rows].double()
        y = target[start:start + chunk_rows]
        valid = y != -100
        safe = torch.where(valid, y, torch.zeros_like(y))
        m = z.amax(1, keepdim=True)
        d = z - m
        log_s = torch.logsumexp(d, 1, keepdim=True)
        log_p = d - log_s
        p = log_p.exp()
        onehot = torch.nn.functional.one_hot(safe, num_classes).double()
        a = (1 - label_smoothing) * onehot + label_smoothing / num_classes
        if w is not None:
            a = a * w
        a = a * valid[:, None]
        loss = -(a * log_p).sum(1)
        lse = (m + log_s)[:, 0]
        coefficient = a.sum(1, keepdim=True)
        if z_loss:
            loss = loss + z_loss * lse**2 * valid
            coefficient = coefficient + 2 * z_loss * lse[:, None] * valid[:, None]
        losses.append(loss)
        grads.append(coefficient * p - a)
    return torch.cat(losses), torch.cat(grads)


def _compare(name, actual, expected, dtype):
    import torch

    rtol, atol = TOL[dtype]
    actual = actual.double()
    error = (actual - expected).abs()
    allowed = rtol * expected.abs() + atol * max(1.0, float(expected.abs().max()))
    worst = float((error - allowed).max())
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{name}: non-finite values where the reference is finite")
    if worst > 0:
        raise AssertionError(f"{name}: error {float(error.max()):.3g} beyond rtol={rtol}, atol={atol}")
    return float(error.max())


def _dtype(name):
    import torch

    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------- steps
def step_tests(report: Report, dry_run: bool) -> None:
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-n", "0", *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    def run():
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240,
                                   check=False)
        summary = (completed.stdout.strip().splitlines() or ["(no output)"])[-1]
        # 5: no test collected (pytest's code), e.g. when every gpu test is deselected
        if completed.returncode not in (0, 5):
            raise AssertionError(f"pytest -m gpu: {summary}")
        return {"summary": summary, "files": len(files)}

    report.run("tests", "pytest -m gpu", run)


def step_accuracy(report: Report, device: str, shapes: dict) -> None:
    import torch

    import softmaxkit
    from softmaxkit import reference

    generator = torch.Generator(device="cpu").manual_seed(0)

    def logits_and_target(n, c, dtype):
        logits = (torch.randn(n, c, generator=generator) * 3).to(device=device, dtype=_dtype(dtype))
        target = torch.randint(0, c, (n,), generator=generator).to(device)
        target[::13] = -100
        return logits, target

    def check_reference_agrees():
        logits, target = logits_and_target(4, 50, "float32")
        loss, grad = _reference_ce(logits, target, label_smoothing=0.1, z_loss=1e-3)
        x, y = logits.double().cpu().numpy(), target.cpu().numpy()
        oracle = reference.cross_entropy(x, y, reduction="none", label_smoothing=0.1, z_loss=1e-3)
        oracle_grad = reference.cross_entropy_grad(x, y, reduction="none", label_smoothing=0.1, z_loss=1e-3)
        torch.testing.assert_close(loss.cpu(), torch.from_numpy(oracle), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad.cpu(), torch.from_numpy(oracle_grad), rtol=1e-12, atol=1e-12)

    report.run("accuracy", "device float64 reference == softmaxkit.reference", check_reference_agrees)

    def cross_entropy_case(n, c, dtype, options):
        logits, target = logits_and_target(n, c, dtype)
        weight = torch.rand(c, generator=generator).to(device) + 0.5 if options.get("weight") else None
        kwargs = {k: v for k, v in options.items() if k != "weight"}
        leaf = logits.detach().requires_grad_()
        loss = softmaxkit.cross_entropy(leaf, target, weight=weight, reduction="none", impl="triton", **kwargs)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        del leaf
        expected_loss, expected_grad = _reference_ce(logits, target, weight=weight, **kwargs)
        loss_error = _compare("loss", loss, expected_loss, dtype)
        grad_error = 0.0
        for start in range(0, n, 2048):  # compare the gradient chunk by chunk (it may be > 2^31 entries)
            grad_error = max(grad_error, _compare("grad", grad[start:start + 2048],
                                                  expected_grad[start:start + 2048], dtype))
        return {"loss_err": loss_error, "grad_err": grad_error}

    for n, c, dtype in shapes["ce"]:
        for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4, "weight": True}):
            label = ",".join(options) or "plain"
            report.run("accuracy", f"cross_entropy triton {n}x{c} {dtype} {label}", cross_entropy_case, n, c,
                       dtype, options)

    def huge_case():
        n, c, dtype = shapes["ce_huge"]
        figures = cross_entropy_case(n, c, dtype, {})
        figures["elements"] = n * c
        return figures

    n, c, dtype = shapes["ce_huge"]
    report.run("accuracy", f"cross_entropy triton {n}x{c} {dtype} (N·C = {n * c:,}"
               f"{' > 2^31' if n * c > 2**31 else ', dry run'})", huge_case)

    def linear_case(n, d, c, dtype, impl):
        h = (torch.randn(n, d, generator=generator) / d**0.25).to(device=device, dtype=_dtype(dtype))
        w = (torch.randn(c, d, generator=generator) / d**0.25).to(device=device, dtype=_dtype(dtype))
        target = torch.randint(0, c, (n,), generator=generator).to(device)
        target[::11] = -100
        h_leaf, w_leaf = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = softmaxkit.linear_cross_entropy(h_leaf, w_leaf, target, reduction="sum", impl=impl)
        grad_h, grad_w = torch.autograd.grad(loss, [h_leaf, w_leaf])
        h64, w64 = h.double(), w.double()
        expected, expected_h, expected_w = 0.0, torch.zeros_like(h64), torch.zeros_like(w64)
        for start in range(0, n, 1024):
            rows = slice(start, start + 1024)
            row_loss, g = _reference_ce(h64[rows] @ w64.T, target[rows])
            expected += float(row_loss.sum())
            expected_h[rows] = g @ w64
            expected_w += g.T @ h64[rows]
        # error budget: PyTorch's own op in this dtype (F.linear, then F.cross_entropy), against the same
        # reference; the logits are rounded to the dtype by the matmul, which no tolerance on outputs covers
        peer_h, peer_w = h.detach().requires_grad_(), w.detach().requires_grad_()
        peer = torch.nn.functional.cross_entropy(torch.nn.functional.linear(peer_h, peer_w), target,
                                                 reduction="sum")
        peer_h_grad, peer_w_grad = torch.autograd.grad(peer, [peer_h, peer_w])
        figures = {}
        for label, ours, theirs, exact in (("loss", loss, peer, torch.tensor(expected, device=device)),
                                           ("grad_h", grad_h, peer_h_grad, expected_h),
                                           ("grad_w", grad_w, peer_w_grad, expected_w)):
            error = float((ours.double() - exact).abs().max())
            budget = (4 * float((theirs.double() - exact).abs().max())
                      + (torch.finfo(ours.dtype).eps + 1e-6) * float(exact.abs().max()))  # + one output rounding
            if not (error <= budget):
                raise AssertionError(f"{label}: error {error:.3g} beyond 4x PyTorch's ({budget:.3g})")
            figures[f"{label}_err"] = error
        return figures

    for n, d, c, dtype in shapes["lce"]:
        for impl in ("triton", "triton_fused"):
            report.run("accuracy", f"linear_cross_entropy {impl} {n}x{d}x{c} {dtype}", linear_case, n, d, c,
                       dtype, impl)

    def sparse_case(n, c, dtype, op):
        x = (torch.randn(n, c, generator=generator) * 2).to(device=device, dtype=_dtype(dtype))
        x[0] = 0.0
        x[0, 0] = 0.08  # a near-uniform row: the fp32 prefix sums' hard case
        p = getattr(softmaxkit, op)(x, -1)
        sums = p.float().sum(-1)
        bound = 1e-4 if dtype == "float32" else 2e-2
        if not bool(((sums - 1).abs() <= bound).all()) or bool((p < 0).any()):
            raise AssertionError(f"rows sum to [{float(sums.min())}, {float(sums.max())}] or hold negatives")
        rows = [0, 1, n - 1]
        exact = getattr(reference, op)(x[rows].double().cpu().numpy())
        error = float((p[rows].double().cpu() - torch.from_numpy(exact)).abs().max())
        if not error <= bound:
            raise AssertionError(f"sampled rows {error:.3g} from the oracle")
        return {"max_sum_err": float((sums - 1).abs().max()), "oracle_err": error}

    for n, c, dtype in shapes["sparse"]:
        for op in ("sparsemax", "entmax15"):
            report.run("accuracy", f"{op} {n}x{c} {dtype}", sparse_case, n, c, dtype, op)


def _impls(device: str) -> tuple[str, str]:
    """The CE and linear-CE impls compiled, captured and timed: the Triton paths on CUDA; on the CPU of a dry
    run ``"auto"`` (tracing the Triton interpreter itself would take minutes and prove nothing)."""
    return ("triton", "triton_fused") if device == "cuda" else ("auto", "auto")


def _ops(device: str, shapes: dict):
    """The two ops compiled and captured: CE and linear CE through their public functions (Triton paths)."""
    import torch

    import softmaxkit

    n, c, dtype = shapes["timing_ce"]
    generator = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(n, c, generator=generator).to(device=device, dtype=_dtype(dtype))
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    n2, d, c2, dtype2 = shapes["timing_lce"]
    hidden = (torch.randn(n2, d, generator=generator) / d**0.25).to(device=device, dtype=_dtype(dtype2))
    weight = (torch.randn(c2, d, generator=generator) / d**0.25).to(device=device, dtype=_dtype(dtype2))
    target2 = torch.randint(0, c2, (n2,), generator=generator).to(device)

    ce_impl, lce_impl = _impls(device)

    def ce(x):
        return softmaxkit.cross_entropy(x, target, impl=ce_impl)

    def lce(h, w):
        return softmaxkit.linear_cross_entropy(h, w, target2, impl=lce_impl)

    return {"cross_entropy": (ce, [logits]), "linear_cross_entropy": (lce, [hidden, weight])}


def _loss_and_grads(function, inputs):
    import torch

    leaves = [x.detach().requires_grad_() for x in inputs]
    loss = function(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def step_compile(report: Report, device: str, shapes: dict) -> None:
    import torch

    for name, (function, inputs) in _ops(device, shapes).items():
        def check(function=function, inputs=inputs):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(function)(*inputs)
            breaks = explanation.graph_break_count
            compiled = torch.compile(function, fullgraph=True)
            loss, grads = _loss_and_grads(compiled, inputs)
            expected_loss, expected_grads = _loss_and_grads(function, inputs)
            torch.testing.assert_close(loss, expected_loss)
            for grad, expected in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected)
            if breaks:
                raise AssertionError(f"{breaks} graph breaks: {[str(r) for r in explanation.break_reasons][:3]}")
            return {"graph_breaks": breaks}

        report.run("compile", f"torch.compile(fullgraph=True) {name}", check)


def step_cuda_graph(report: Report, device: str, shapes: dict) -> None:
    import torch

    for name, (function, inputs) in _ops(device, shapes).items():
        def check(function=function, inputs=inputs):
            if device != "cuda":
                raise Skipped("CUDA graphs need a CUDA device")
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles, allocator pools) outside the capture
                for _ in range(2):
                    torch.autograd.grad(function(*leaves), leaves)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = function(*leaves)
                grads = torch.autograd.grad(loss, leaves)
            graph.replay()
            torch.cuda.synchronize()
            expected_loss, expected_grads = _loss_and_grads(function, inputs)
            torch.testing.assert_close(loss.detach(), expected_loss)
            for grad, expected in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected)
            return {}

        report.run("cuda_graph", f"capture + replay {name}", check)


def step_timing(report: Report, device: str, shapes: dict, out: Path, dry_run: bool) -> None:
    import torch
    import torch.nn.functional as F

    import softmaxkit

    from . import _harness
    from .ops import cross_entropy as ce_bench
    from .ops import linear_cross_entropy as lce_bench

    n, c, dtype = shapes["timing_ce"]
    n2, d, c2, dtype2 = shapes["timing_lce"]
    ce_impl, lce_impl = _impls(device)
    ce_impls = {
        "torch": lambda: F.cross_entropy,
        "torch_compile": lambda: torch.compile(F.cross_entropy),
        "softmaxkit": lambda: (lambda x, y: softmaxkit.cross_entropy(x, y, impl=ce_impl)),
        "softmaxkit_compile": lambda: torch.compile(lambda x, y: softmaxkit.cross_entropy(x, y, impl=ce_impl)),
        "liger": lambda: ce_bench._liger(device),
    }

    def torch_linear(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y)

    lce_impls = {
        "torch": lambda: torch_linear,
        "torch_compile": lambda: torch.compile(torch_linear),
        "softmaxkit": lambda: (lambda h, w, y: softmaxkit.linear_cross_entropy(h, w, y, impl=lce_impl)),
        "liger": lambda: lce_bench._liger(device),
        "cut_cross_entropy": lambda: lce_bench._cut_cross_entropy(device),
    }
    generator = torch.Generator(device="cpu").manual_seed(2)
    logits = torch.randn(n, c, generator=generator).to(device=device, dtype=_dtype(dtype)).requires_grad_()
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    hidden = (torch.randn(n2, d, generator=generator) / d**0.25).to(device=device, dtype=_dtype(dtype2))
    weight = (torch.randn(c2, d, generator=generator) / d**0.25).to(device=device, dtype=_dtype(dtype2))
    hidden.requires_grad_()
    weight.requires_grad_()
    target2 = torch.randint(0, c2, (n2,), generator=generator).to(device)
    environment = _harness.environment(device)
    path = out / "gpu_check_timings.csv"
    path.unlink(missing_ok=True)
    cases = [("cross_entropy", f"{n}x{c}", dtype, ce_impls, lambda f: f(logits, target), [logits]),
             ("linear_cross_entropy", f"{n2}x{d}x{c2}", dtype2, lce_impls,
              lambda f: f(hidden, weight, target2), [hidden, weight])]
    for op, shape, dtype_name, impls, call, inputs in cases:
        for impl, make in impls.items():
            row = {**environment, "op": op, "impl": impl, "shape": shape, "dtype": dtype_name,
                   "mode": "full"}

            def make_run(make=make, call=call, inputs=inputs):
                function = make()
                return _harness.timed_call(lambda: call(function), inputs, "full")

            _measured_row(report, "timing", f"{op} {impl}", row, path, make_run, device, dry_run,
                          lambda result: {"median_ms": 1e3 * result["median_s"]})


def _measured_row(report: Report, step: str, name: str, row: dict, path: Path, make_run, device: str,
                  dry_run: bool, figures_of) -> dict | None:
    """Measure ``make_run()``'s function (``benchmarks._harness.measure``), record it in the report with
    ``figures_of(result)`` and append ``row`` to the CSV at ``path`` as soon as it is measured (a run cut short
    keeps its rows). Returns the result, or None when the case was skipped or failed."""
    from . import _harness
    from ._harness import Skip

    repeat, warmup, min_time = (2, 1, 0.0) if dry_run else (10, 3, 1.0)
    result = None
    try:
        measured = _harness.summarise({"status": "ok", **_harness.measure(make_run(), device, repeat, warmup,
                                                                           min_time)})
        row.update({k: measured.get(k) for k in ("status", "median_s", "p20_s", "p80_s", "peak_bytes")})
        report.record(step, name, "ok", **figures_of(measured))
        result = measured
    except Skip as skip:
        row.update({"status": "skipped", "reason": str(skip)})
        report.record(step, name, "skipped", reason=str(skip))
    except Exception as error:
        row.update({"status": "error", "reason": f"{type(error).__name__}: {error}"[:200]})
        report.record(step, name, "FAIL", error=row["reason"])
    _harness.append_csv(path, [row])
    return result


def _step_figures(result: dict, baseline: dict | None) -> dict:
    """A training step's median and peak memory, and both as ratios to the model's own loss (``baseline``)."""
    figures = {"median_ms": 1e3 * result["median_s"], "peak_mib": (result["peak_bytes"] or 0) / 2**20}
    if baseline is not None:
        figures["time_vs_own"] = result["median_s"] / baseline["median_s"]
        if baseline["peak_bytes"]:
            figures["memory_vs_own"] = (result["peak_bytes"] or 0) / baseline["peak_bytes"]
    return figures


def step_hf_causal_lm(report: Report, device: str, shapes: dict, out: Path, dry_run: bool) -> None:
    """One training step of a tiny Hugging Face causal LM by how its loss is computed
    (:mod:`benchmarks.ops.hf_causal_lm`): median, peak memory, and both as ratios to the model's own loss."""
    import gc

    import torch

    from . import _harness
    from .ops import hf_causal_lm as hf

    environment = _harness.environment(device)
    path = out / "gpu_check_hf_causal_lm.csv"
    path.unlink(missing_ok=True)
    for shape, dtypes in shapes["hf"]:
        for dtype_name in dtypes:
            cases = [case for case in hf.cases(device, _dtype(dtype_name), quick=dry_run, shapes=[shape])
                     if case.impl in HF_IMPLS]
            baseline = None  # the model's own loss (the first case): every ratio's denominator
            for case in cases:
                row = {**environment, "op": "hf_causal_lm", "impl": case.impl, "shape": case.shape,
                       "dtype": dtype_name, "mode": "full"}
                result = _measured_row(report, "hf_causal_lm", f"hf_causal_lm {case.impl} {case.shape} {dtype_name}",
                                       row, path, lambda case=case: case.setup("full"), device, dry_run,
                                       lambda result, baseline=baseline: _step_figures(result, baseline))
                if case.impl == "torch":
                    baseline = result
                gc.collect()  # the case's model and buffers go before the next one is built
                if device == "cuda":
                    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: $OUT, else benchmarks/results/gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--steps", default="tests,accuracy,compile,cuda_graph,timing,hf_causal_lm",
                        help="comma-separated subset of the steps to run")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    dry_run = args.dry_run or (not cuda and os.environ.get("TRITON_INTERPRET") == "1")
    if not cuda and not dry_run:
        print("no CUDA device: run with --dry-run (tiny shapes on the CPU, TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if dry_run and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # only read when the kernels are first imported
    device = "cuda" if cuda and not args.dry_run else "cpu"
    shapes = TINY if dry_run else REAL
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = Report(out / "gpu_check.json", {"device": device_name, "dry_run": dry_run})
    report.write()
    print(f"gpu_check on {device}{' (dry run: tiny shapes)' if dry_run else ''}; results in {out}", flush=True)
    if "tests" in steps:
        step_tests(report, dry_run)
    if "accuracy" in steps:
        step_accuracy(report, device, shapes)
    if "compile" in steps:
        step_compile(report, device, shapes)
    if "cuda_graph" in steps:
        step_cuda_graph(report, device, shapes)
    if "timing" in steps:
        step_timing(report, device, shapes, out, dry_run)
    if "hf_causal_lm" in steps:
        step_hf_causal_lm(report, device, shapes, out, dry_run)
    report.write(finished=True)
    elapsed = time.perf_counter() - report.start
    print(f"{len(report.checks)} checks, {len(report.failed)} failed, {elapsed:.0f} s; see {out / 'gpu_check.json'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
