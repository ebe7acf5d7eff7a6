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
STEPS = ("accuracy", "compile", "cuda_graph", "timing")


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


def test_dry_run_accuracy_checks_pass(dry_run):
    _, summary, _ = dry_run
    failed = [check for check in summary["checks"] if check["step"] == "accuracy" and check["status"] != "ok"]
    assert not failed, failed


def test_dry_run_passes_every_check(dry_run):
    """Compile (fullgraph, no graph break) and timing included: what `make gpu-check` must show on a GPU."""
    completed, summary, _ = dry_run
    failed = [(check["name"], check.get("error")) for check in summary["checks"] if check["status"] == "FAIL"]
    assert not failed and completed.returncode == 0, failed
