"""benchmarks/interleaved.py: the same-process A/B timer (its figures land in docs/benchmarks.md)."""

from __future__ import annotations

import re

import pytest
from benchmarks import interleaved


def test_interleaved_ab_prints_times_and_paired_ratios(capsys):
    interleaved.main(["cross_entropy", "--impls", "torch,softmaxkit", "--quick", "--rounds", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "3 rounds, ratios over torch" in out
    assert re.search(r"softmaxkit\s+[\d.]+ ms \([\d.]+–[\d.]+\)\s+torch/softmaxkit: [\d.]+ \([\d.]+–[\d.]+\)", out)


@pytest.mark.parametrize(("argv", "message"), [
    (["cross_entropy", "--impls", "torch", "--quick"], "at least two"),
    (["cross_entropy", "--impls", "torch,nope", "--quick"], "--impls nope: no such case"),
    (["cross_entropy", "--impls", "torch,softmaxkit", "--dtype", "nope", "--quick"], "--dtype 'nope'"),
    (["cross_entropy", "--impls", "torch,softmaxkit", "--rounds", "0", "--quick"], "--rounds"),
])
def test_interleaved_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        interleaved.main(argv)
    assert message in capsys.readouterr().err
