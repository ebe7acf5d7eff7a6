"""benchmarks/_harness.py: the CPU allocator peak and the results tables the figures in docs/benchmarks.md come from."""

from __future__ import annotations

import csv

import torch
from benchmarks import _harness


def test_allocated_peak_counts_what_a_call_holds_at_once():
    n = 1 << 20  # 4 MiB of float32, over any per-op scratch of the calls below

    def two_buffers():
        a = torch.ones(n)
        b = torch.ones(n)  # both held: peak 8 MiB
        del a, b
        c = torch.ones(n)  # one held afterwards: not a new peak
        return c.sum()

    peak = _harness._allocated_peak(two_buffers, None)
    assert 2 * 4 * n <= peak < 3 * 4 * n


def test_allocated_peak_is_over_what_was_held_before():
    held = torch.ones(1 << 22)  # allocated before the call: not counted
    peak = _harness._allocated_peak(lambda: held.add_(1), None)
    assert peak < 1 << 20


def test_measure_on_cpu_reports_both_peaks():
    x = torch.randn(256, 256)
    result = _harness.measure(lambda: x @ x, "cpu", repeat=2, warmup=1, min_time=0.0)
    assert result["peak_allocated_bytes"] >= 256 * 256 * 4
    assert len(result["times"]) >= 2


def test_append_csv_widens_a_table_written_with_fewer_columns(tmp_path):
    path = tmp_path / "op.csv"
    old_fields = [f for f in _harness.CSV_FIELDS if f not in ("peak_allocated_bytes", "ratio_allocated")]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({"op": "cross_entropy", "impl": "torch", "median_s": "0.5"})
    _harness.append_csv(path, [{"op": "cross_entropy", "impl": "softmaxkit", "median_s": 0.25,
                                "peak_allocated_bytes": 1024}])
    _harness.append_csv(path, [{"op": "cross_entropy", "impl": "softmaxkit", "median_s": 0.2}])
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == _harness.CSV_FIELDS
    assert [(r["impl"], r["median_s"], r["peak_allocated_bytes"]) for r in rows] == [
        ("torch", "0.5", ""), ("softmaxkit", "0.25", "1024"), ("softmaxkit", "0.2", "")]
    assert not (tmp_path / "op.csv.partial").exists()


def test_allocated_peak_of_a_call_that_allocates_nothing_is_zero():
    x, out = torch.randn(64, 64), torch.empty(64, 64)
    assert _harness._allocated_peak(lambda: torch.mm(x, x, out=out), None) == 0
