"""Interleaved A/B timing of two or more impls of one case, in one process.

``python -m benchmarks.interleaved hf_causal_lm --impls softmaxkit,cut_cross_entropy --dtype bfloat16``

On a VM whose speed drifts between runs minutes apart, the fresh-process tables of ``python -m benchmarks``
can differ by more than the impls do. Here every impl's case is set up once (compiled ones warmed there), then
the impls run in turn, round after round, and each round's time of every impl is divided by the first impl's
in the same round: drift common to a round cancels. Prints medians (p20–p80) of times and of the paired
ratios. No peak memory here (cases share the process): take memory from ``python -m benchmarks``.

``--fresh``: each round runs every impl in a fresh child process instead (the harness's child: set-up,
``--warmup`` calls, then ``--calls`` timed calls, of which the round takes the median), the impls' order
rotating from round to round. Impls sharing one process are not independent: one's heap, page and thread
state changes another's speed (hf_causal_lm bf16, run O: cut-cross-entropy's compiled step took ~120 ms
next to softmaxkit's in one process and 133–139 ms alone), while a training run holds one loss alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ._harness import Skip, _percentile, run_case_in_subprocess
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
    parser.add_argument("--fresh", action="store_true",
                        help="every impl in a fresh process each round (rotating order), not all in this one")
    parser.add_argument("--calls", type=int, default=8, help="with --fresh: timed calls per process (median)")
    parser.add_argument("--timeout", type=float, default=600.0, help="with --fresh: seconds allowed per process")
    args = parser.parse_args(argv)
    impls = [name for name in args.impls.split(",") if name]
    if len(impls) < 2:
        parser.error("--impls needs at least two impls to compare")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        parser.error(f"--dtype {args.dtype!r} is not a torch dtype")
    cases = load_cases(args.op, args.device, dtype, quick=args.quick)
    shape = args.shape or cases[0].shape
    chosen = {case.impl: case for case in cases if case.shape == shape and case.impl in impls}
    missing = [impl for impl in impls if impl not in chosen]
    if missing:
        parser.error(f"--impls {','.join(missing)}: no such case for {args.op} at shape {shape}")
    if args.fresh:
        times = _fresh_rounds(parser, args, impls, chosen)
    else:
        times = _shared_rounds(parser, args, impls, chosen)
    where = "a fresh process per impl and round" if args.fresh else "one process"
    print(f"{args.op} {shape} {args.dtype} {args.mode}: {args.rounds} rounds in {where}, ratios over {impls[0]}")
    for impl in impls:
        median, low, high = _quantiles([t * 1e3 for t in times[impl]])
        line = f"  {impl:24s} {median:10.1f} ms ({low:.1f}–{high:.1f})"
        if impl != impls[0]:
            ratio = _quantiles([a / b for a, b in zip(times[impls[0]], times[impl])])
            line += f"   {impls[0]}/{impl}: {ratio[0]:.2f} ({ratio[1]:.2f}–{ratio[2]:.2f})"
        print(line)


def _fresh_rounds(parser, args, impls, chosen) -> dict[str, list[float]]:
    """Per impl, the median call time (s) of each round's fresh child process."""
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for round_index in range(args.rounds):
        shift = round_index % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            result = run_case_in_subprocess(args.op, chosen[impl].key, args.mode, args.device, args.calls,
                                            args.warmup, 0.0, args.timeout)
            if result.get("status") != "ok":
                parser.error(f"{impl}: {result.get('status')}: {result.get('reason')}")
            times[impl].append(statistics.median(result["times"]))  # exactly --calls (min_time 0)
    return times


def _shared_rounds(parser, args, impls, chosen) -> dict[str, list[float]]:
    """Per impl, each round's time (s) of one call, every impl set up once in this process."""
    import torch

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
    return times


if __name__ == "__main__":
    main()
