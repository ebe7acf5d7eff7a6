"""Benchmark harness: each case in a fresh subprocess; median / p20 / p80 time, peak extra memory, CSV.

A case is an ``(op, impl, shape, dtype)`` with a ``setup(mode)`` that builds inputs and returns a
zero-argument function running the op once (``mode`` is ``"forward"`` or ``"full"`` = forward + backward),
or, for ``"backward"``, a pair ``(prepare, run)``: ``prepare()`` (untimed, before every timed call) runs the
forward and ``run()`` the backward alone.

Peak memory is measured on the first call in a fresh process, so no earlier run's allocations are reused:
on CPU as the growth of the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set after ``setup``; on CUDA with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


class Skip(Exception):
    """Raised by a case's ``setup`` when its implementation is unavailable; the message says why."""


@dataclass
class Case:
    op: str
    impl: str
    shape: str
    dtype: str
    setup: Callable[[str], Callable[[], object]]
    bytes_moved: int | None = None
    flops: int | None = None
    modes: tuple[str, ...] = ("forward", "full")
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.op}|{self.impl}|{self.shape}|{self.dtype}"


def timed_call(loss_fn: Callable[[], object], inputs: list, mode: str, grad_outputs=None) -> Callable[[], object]:
    """The function a case times: ``loss_fn()`` under ``no_grad`` for ``"forward"``; for ``"full"`` the
    forward plus ``torch.autograd.grad`` of ``inputs`` (returned, never accumulated into ``.grad``, so no
    implementation pays for an extra copy)."""
    import torch

    if mode == "forward":
        def forward():
            with torch.no_grad():
                return loss_fn()
        return forward

    def full():
        return torch.autograd.grad(loss_fn(), inputs, grad_outputs=grad_outputs, allow_unused=True)
    return full


# ---------------------------------------------------------------------------------------------- memory
def _read_status(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(fn, device: str, repeat: int, warmup: int, min_time: float):
    """Peak extra bytes of the first call, then times (seconds) of ``repeat`` calls after warm-up.

    ``fn`` is a zero-argument callable, or a ``(prepare, run)`` pair of which only ``run`` is timed.
    """
    import gc

    import torch

    prepare = None
    if isinstance(fn, tuple):
        prepare, fn = fn
    # PyTorch's custom-op dispatch imports torch._dynamo (with sympy, triton, torch.distributed, ~150 MiB of
    # resident modules and ~1 s) on the first call of any torch.library.custom_op in a process: a one-time
    # cost of the process, not of the op, so it is paid here, before the baseline, for every impl alike
    import torch._dynamo

    if prepare is not None:
        prepare()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        base = _read_status("VmRSS")
        ok = _reset_peak_rss()
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        peak = _read_status("VmHWM") - base if ok else -1
    gc.collect()
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        fn()
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < deadline:
        if prepare is not None:
            prepare()
            _sync(device)
        if device == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
            fn()
            end_event.record()
            torch.cuda.synchronize()
            times.append(start_event.elapsed_time(end_event) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if len(times) >= 10 * repeat:
            break
    result = {"peak_bytes": max(peak, 0) if peak >= 0 else None, "times": times}
    if device != "cuda":
        result["first_call_s"] = first
        result["peak_allocated_bytes"] = _allocated_peak(fn, prepare)
    return result


def _allocated_peak(fn, prepare) -> int | None:
    """Peak bytes held in tensors by PyTorch's CPU allocator during one warm call, over those held before it.

    The CPU counterpart of CUDA's ``max_memory_allocated`` (what the GPU tables report): the running sum of
    the profiler's allocation events. It leaves out what the process's ``malloc`` keeps after a tensor is
    freed (glibc's heap grows and shrinks only at its top), which the RSS peak counts, and what libraries
    allocate outside PyTorch (MKL, oneDNN scratch: alike for every impl). 0 for a call that allocates nothing;
    ``None`` when the profiler records no events at all.
    """
    import gc

    from torch.profiler import ProfilerActivity, profile

    if prepare is not None:
        prepare()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    recorded = list(prof.profiler.kineto_results.events())
    if not recorded:  # the profiler saw nothing at all (not even the call's ops): no figure
        return None
    events = sorted((e for e in recorded if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = (len(ordered) - 1) * q
    low = int(index)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


# ----------------------------------------------------------------------------------------- subprocess
def run_case_in_subprocess(
    op: str, key: str, mode: str, device: str, repeat: int, warmup: int, min_time: float, timeout: float,
    env: dict | None = None,
) -> dict:
    """Run one case (found again by ``key`` in the child) and return its measurement."""
    payload = json.dumps(
        {"op": op, "key": key, "mode": mode, "device": device, "repeat": repeat, "warmup": warmup,
         "min_time": min_time}
    )
    command = [sys.executable, "-m", "benchmarks._child", payload]
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("PYTHONPATH", str(ROOT))
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"over {timeout:.0f} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "error", "reason": tail[0][:200]}
    return json.loads(lines[-1])


def summarise(result: dict) -> dict:
    if result.get("status") != "ok":
        return result
    times = result["times"]
    result["median_s"] = _percentile(times, 0.5)
    result["p20_s"] = _percentile(times, 0.2)
    result["p80_s"] = _percentile(times, 0.8)
    return result


# ------------------------------------------------------------------------------------------ metadata
def environment(device: str) -> dict:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


CSV_FIELDS = [
    "date", "commit", "device", "torch", "python", "load", "op", "impl", "shape", "dtype", "mode", "status",
    "median_s", "p20_s", "p80_s", "peak_bytes", "first_call_s", "ratio_time", "ratio_peak", "roofline",
    "reason", "allocator", "peak_allocated_bytes", "ratio_allocated",
]


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the results table at ``path``; a table written with fewer columns is widened first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != CSV_FIELDS:
                unknown = set(reader.fieldnames or ()) - set(CSV_FIELDS)
                if unknown:
                    raise ValueError(f"{path} has columns this harness does not write: {sorted(unknown)}")
                rows = [*reader, *rows]
                partial = path.with_name(path.name + ".partial")
                _write_csv(partial, rows, "w")
                os.replace(partial, path)
                return
        _write_csv(path, rows, "a")
    else:
        _write_csv(path, rows, "w")


def _write_csv(path: Path, rows: list[dict], mode: str) -> None:
    """Write (``"w"``, with the header) or append (``"a"``) ``rows`` in ``CSV_FIELDS`` order."""
    with open(path, mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        for row in rows:
            writer.writerow(row)
