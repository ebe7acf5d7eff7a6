"""The GPU readiness script's CPU dry run (``python -m benchmarks.gpu_check --dry-run``): tiny shapes, the
Triton kernels under the interpreter, every step but the nested ``pytest -m gpu`` (this suite runs those)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("accuracy", "compile", "cuda_graph", "timing", "hf_causal_lm")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--steps", ",".join(STEPS)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False,
    )
    assert completed.returncode in (0, 1), completed.stderr[-3000:]  # 1: a check failed; anything else: a crash
    return completed, json.loads((out / "gpu_check.json").read_text()), out


def test_dry_run_runs_every_step_and_writes_its_results(dry_run):
    _, summary, out = dry_run
    assert summary["dry_run"] is True
    assert {check["step"] for check in summary["checks"]} == set(STEPS)
    names = [check["name"] for check in summary["checks"]]
    for fragment in ("cross_entropy triton", "N·C", "linear_cross_entropy triton_fused", "sparsemax", "entmax15",
                     "fullgraph=True) cross_entropy", "fullgraph=True) linear_cross_entropy"):
        assert any(fragment in name for name in names), fragment
    with open(out / "gpu_check_timings.csv") as handle:
        rows = list(csv.DictReader(handle))
    impls = {(row["op"], row["impl"]) for row in rows}
    assert {("cross_entropy", "torch"), ("cross_entropy", "torch_compile"), ("cross_entropy", "softmaxkit"),
            ("cross_entropy", "liger"), ("linear_cross_entropy", "cut_cross_entropy")} <= impls
    assert all(row["status"] in ("ok", "skipped", "error") for row in rows)
    assert summary["finished"] is True


def test_dry_run_times_a_training_step_of_the_tiny_causal_lm(dry_run):
    """The hf_causal_lm step: every impl in both dtypes, the own loss first, ratios to it; Liger skipped on CPU."""
    pytest.importorskip("transformers")
    _, summary, out = dry_run
    checks = [check for check in summary["checks"] if check["step"] == "hf_causal_lm"]
    with open(out / "gpu_check_hf_causal_lm.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(checks) == 8  # (torch, softmaxkit, torch_chunked, liger) x (float32, bfloat16)
    for dtype in ("float32", "bfloat16"):
        by_impl = {row["impl"]: row for row in rows if row["dtype"] == dtype}
        assert by_impl["torch"]["status"] == by_impl["softmaxkit"]["status"] == "ok", dtype
        assert by_impl["liger"]["status"] == "skipped" and "CUDA" in by_impl["liger"]["reason"]
    patched = [check for check in checks if " softmaxkit " in check["name"]]
    assert len(patched) == 2 and all(0 < check["memory_vs_own"] < 1 and check["time_vs_own"] > 0 for check in patched)


def test_the_report_is_written_after_every_check(tmp_path):
    """A run cut short (the device's time limit) leaves every check it finished in gpu_check.json."""
    from benchmarks.gpu_check import Report

    report = Report(tmp_path / "gpu_check.json", {"device": "test"})
    report.run("accuracy", "first", lambda: {"error_max": 1e-7})
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["finished"] is False and written["device"] == "test"
    assert [check["name"] for check in written["checks"]] == ["first"]
    report.run("accuracy", "second", lambda: 1 / 0)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [check["status"] for check in written["checks"]] == ["ok", "FAIL"] and written["failed"] == 1


def test_dry_run_accuracy_checks_pass(dry_run):
    _, summary, _ = dry_run
    failed = [check for check in summary["checks"] if check["step"] == "accuracy" and check["status"] != "ok"]
    assert not failed, failed


def test_dry_run_passes_every_check(dry_run):
    """Compile (fullgraph, no graph break) and timing included: what `make gpu-check` must show on a GPU."""
    completed, summary, _ = dry_run
    failed = [(check["name"], check.get("error")) for check in summary["checks"] if check["status"] == "FAIL"]
    assert not failed and completed.returncode == 0, failed
