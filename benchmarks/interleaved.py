"""Interleaved A/B timing of two or more impls of one case, in one process.

``python -m benchmarks.interleaved hf_causal_lm --impls softmaxkit,cut_cross_entropy --dtype bfloat16``

On a VM whose speed drifts between runs minutes apart, the fresh-process tables of ``python -m benchmarks``
can differ by more than the impls do. Here every impl's case is set up once (compiled ones warmed there), then
the impls run in turn, round after round, and each round's time of every impl is divided by the first impl's
in the same round: drift common to a round cancels. Prints medians (p20–p80) of times and of the paired
ratios. No peak memory here (cases share the process): take memory from ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ._harness import Skip, _percentile
from .ops import load_cases


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """Median, p20 and p80, as the harness's tables give them."""
    return statistics.median(values), _percentile(values, 0.2), _percentile(values, 0.8)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", help="a benchmark op (benchmarks/ops/<op>.py)")
    parser.add_argument("--impls", required=True, help="comma-separated, at least two; ratios divide by the first")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", default=None, help="a shape label of the op (default: its first full shape)")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the op's quick shapes (seconds; what the tests run)")
    args = parser.parse_args(argv)
    impls = [name for name in args.impls.split(",") if name]
    if len(impls) < 2:
        parser.error("--impls needs at least two impls to compare")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        parser.error(f"--dtype {args.dtype!r} is not a torch dtype")
    cases = load_cases(args.op, args.device, dtype, quick=args.quick)
    shape = args.shape or cases[0].shape
    chosen = {case.impl: case for case in cases if case.shape == shape and case.impl in impls}
    missing = [impl for impl in impls if impl not in chosen]
    if missing:
        parser.error(f"--impls {','.join(missing)}: no such case for {args.op} at shape {shape}")
    steps = {}
    for impl in impls:
        try:
            steps[impl] = chosen[impl].setup(args.mode)
        except Skip as reason:
            parser.error(f"{impl} cannot run here: {reason}")
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[impl].append(time.perf_counter() - start)
    print(f"{args.op} {shape} {args.dtype} {args.mode}: {args.rounds} rounds, ratios over {impls[0]}")
    for impl in impls:
        median, low, high = _quantiles([t * 1e3 for t in times[impl]])
        line = f"  {impl:24s} {median:10.1f} ms ({low:.1f}–{high:.1f})"
        if impl != impls[0]:
            ratio = _quantiles([a / b for a, b in zip(times[impls[0]], times[impl])])
            line += f"   {impls[0]}/{impl}: {ratio[0]:.2f} ({ratio[1]:.2f}–{ratio[2]:.2f})"
        print(line)


if __name__ == "__main__":
    main()
