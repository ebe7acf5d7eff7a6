"""benchmarks/interleaved.py: the paired A/B timer, in one process or in fresh ones (its figures land in
docs/benchmarks.md)."""

from __future__ import annotations

import re

import pytest
from benchmarks import interleaved


def test_interleaved_ab_prints_times_and_paired_ratios(capsys):
    interleaved.main(["cross_entropy", "--impls", "torch,softmaxkit", "--quick", "--rounds", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "3 rounds in one process, ratios over torch" in out
    assert re.search(r"softmaxkit\s+[\d.]+ ms \([\d.]+–[\d.]+\)\s+torch/softmaxkit: [\d.]+ \([\d.]+–[\d.]+\)", out)


@pytest.mark.parametrize(("argv", "message"), [
    (["cross_entropy", "--impls", "torch", "--quick"], "at least two"),
    (["cross_entropy", "--impls", "torch,nope", "--quick"], "--impls nope: no such case"),
    (["cross_entropy", "--impls", "torch,softmaxkit", "--dtype", "nope", "--quick"], "--dtype 'nope'"),
    (["cross_entropy", "--impls", "torch,softmaxkit", "--rounds", "0", "--quick"], "--rounds"),
    (["cross_entropy", "--impls", "torch,softmaxkit", "--fresh", "--calls", "0", "--quick"], "--calls"),
])
def test_interleaved_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        interleaved.main(argv)
    assert message in capsys.readouterr().err


def test_fresh_rounds_run_each_impl_in_its_own_child_in_rotating_order(monkeypatch, capsys):
    calls = []
    fake_times = {"torch": [0.004, 0.002, 0.009], "softmaxkit": [0.001, 0.001, 0.003]}  # medians 4 and 1 ms

    def fake_child(op, key, mode, device, repeat, warmup, min_time, timeout, env=None):
        impl = key.split("|")[1]
        calls.append((impl, repeat, warmup, min_time))
        return {"status": "ok", "times": fake_times[impl]}

    monkeypatch.setattr(interleaved, "run_case_in_subprocess", fake_child)
    interleaved.main(["cross_entropy", "--impls", "torch,softmaxkit", "--quick", "--fresh", "--rounds", "3",
                      "--calls", "3", "--warmup", "1"])
    assert [impl for impl, *_ in calls] == ["torch", "softmaxkit", "softmaxkit", "torch", "torch", "softmaxkit"]
    assert all(tuple(rest) == (3, 1, 0.0) for _, *rest in calls)
    out = capsys.readouterr().out
    assert "3 rounds in a fresh process per impl and round, ratios over torch" in out
    assert re.search(r"softmaxkit\s+1\.0 ms \(1\.0–1\.0\)\s+torch/softmaxkit: 4\.00 \(4\.00–4\.00\)", out)


def test_fresh_rounds_measure_in_real_children(capsys):
    interleaved.main(["cross_entropy", "--impls", "torch,softmaxkit", "--quick", "--fresh", "--rounds", "1",
                      "--calls", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert re.search(r"softmaxkit\s+[\d.]+ ms \([\d.]+–[\d.]+\)\s+torch/softmaxkit: [\d.]+", out)


def test_a_failing_child_names_the_impl(monkeypatch, capsys):
    monkeypatch.setattr(interleaved, "run_case_in_subprocess",
                        lambda *args, **kwargs: {"status": "error", "reason": "boom"})
    with pytest.raises(SystemExit):
        interleaved.main(["cross_entropy", "--impls", "torch,softmaxkit", "--quick", "--fresh", "--rounds", "1"])
    assert "torch: error: boom" in capsys.readouterr().err
