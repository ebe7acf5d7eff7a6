"""``python -m benchmarks [OP ...]``: ops × impls × shapes × dtypes × modes → table + CSV.

Examples::

    python -m benchmarks cross_entropy
    python -m benchmarks cross_entropy --impls softmaxkit,torch --dtypes float32,bfloat16 --modes full
    python -m benchmarks --quick            # the quick set of every op (what `softmaxkit bench` runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _harness
from .ops import OPS, load_cases, op_baseline


def measure_ceilings(device: str) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and fp32 matmul rate (FLOP/s), medians."""
    import time

    import torch

    def median_of(fn, n=7):
        # the median, not the best: on a shared VM a single copy now and then runs at twice the usual
        # bandwidth (71 GB/s once, against 35-38 GB/s in every other measurement here), and a ceiling taken
        # from such a fluke would understate every roofline ratio of the run
        fn()
        times = []
        for _ in range(n):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    numel = (256 << 20) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = median_of(lambda: dst.copy_(src))
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    mm_s = median_of(lambda: a @ b, n=3)
    return {"copy_bytes_per_s": 2 * numel * 4 / copy_s, "matmul_flops": 2 * size**3 / mm_s}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="*", help=f"ops to run (default: all of {', '.join(OPS)})")
    parser.add_argument("--op", action="append", default=[], help="same as a positional op")
    parser.add_argument("--impls", default="", help="comma-separated impls to keep (default: all)")
    parser.add_argument("--shapes", default="", help="comma-separated shape labels to keep, e.g. 8192x50257")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--modes", default="", help="comma-separated: forward,backward,full (default: full, or "
                        "the op's only mode for ops without a backward such as metrics)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="each op's small quick set")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per case (at least)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--min-time", type=float, default=1.0, help="keep timing at least this many seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per case")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the child processes")
    parser.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/<op>.csv)")
    parser.add_argument("--no-csv", action="store_true", help="do not write CSV rows")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    return parser.parse_args(argv)


def _fmt_bytes(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = args.ops + args.op or OPS
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        print(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(OPS)}", file=sys.stderr)
        return 2
    keep_impls = {s for s in args.impls.split(",") if s}
    keep_shapes = {s for s in args.shapes.split(",") if s}
    modes = [m for m in args.modes.split(",") if m]
    child_env = dict(item.split("=", 1) for item in args.env)
    env = _harness.environment(device)
    ceilings = measure_ceilings(device)
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}  load {env['load']:.2f}")
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"fp32 matmul {ceilings['matmul_flops'] / 1e9:.0f} GFLOP/s")

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    all_rows: list[dict] = []
    for op in ops:
        rows: list[dict] = []
        for dtype_name in [d for d in args.dtypes.split(",") if d]:
            dtype = getattr(torch, dtype_name)
            for case in load_cases(op, device, dtype, args.quick):
                if (keep_impls and case.impl not in keep_impls) or (keep_shapes and case.shape not in keep_shapes):
                    continue
                wanted = modes or (["full"] if "full" in case.modes else list(case.modes[:1]))
                for mode in wanted:
                    if mode not in case.modes:
                        continue
                    console.print(f"[dim]{op} {case.impl} {case.shape} {case.dtype} {mode}…[/dim]")
                    result = _harness.summarise(_harness.run_case_in_subprocess(
                        op, case.key, mode, device, args.repeat, args.warmup, args.min_time, args.timeout,
                        child_env,
                    ))
                    row = {**env, "op": op, "impl": case.impl, "shape": case.shape, "dtype": case.dtype,
                           "mode": mode, "allocator": child_env.get("LD_PRELOAD", "default") or "default",
                           **{k: v for k, v in result.items() if k != "times"}}
                    if result.get("status") == "ok":
                        # the least traffic (or work) the mode needs, over the device's measured ceiling
                        bytes_moved = case.extra.get("bytes_by_mode", {}).get(
                            mode, case.bytes_moved if mode == "full" else None)
                        flops = case.extra.get("flops_by_mode", {}).get(mode, case.flops if mode == "full" else None)
                        if bytes_moved:
                            row["roofline"] = bytes_moved / row["median_s"] / ceilings["copy_bytes_per_s"]
                        elif flops:
                            row["roofline"] = flops / row["median_s"] / ceilings["matmul_flops"]
                    rows.append(row)
        baseline = op_baseline(op)
        for row in rows:
            base = next((r for r in rows if r["impl"] == baseline and r["shape"] == row["shape"]
                         and r["dtype"] == row["dtype"] and r["mode"] == row["mode"]
                         and r.get("status") == "ok"), None)
            if base and row.get("status") == "ok":
                row["ratio_time"] = row["median_s"] / base["median_s"]
                if row.get("peak_bytes") is not None and base.get("peak_bytes"):
                    row["ratio_peak"] = row["peak_bytes"] / base["peak_bytes"]
                if row.get("peak_allocated_bytes") is not None and base.get("peak_allocated_bytes"):
                    row["ratio_allocated"] = row["peak_allocated_bytes"] / base["peak_allocated_bytes"]
        # on CPU, "peak extra" is the first call's RSS growth and "allocated" the tensors' peak over one warm
        # call (the CUDA figure's meaning); on CUDA "peak extra" is already the allocator's peak
        allocated = any(row.get("peak_allocated_bytes") is not None for row in rows)
        table = Table(title=f"{op} on {env['device']}")
        for column in ("shape", "dtype", "mode", "impl", "median (p20–p80)", "peak extra", f"× {baseline} time",
                       f"× {baseline} mem", *(("allocated", f"× {baseline} alloc") if allocated else ()),
                       "roofline"):
            table.add_column(column, justify="right" if column not in ("impl", "shape") else "left")
        for row in rows:
            if row.get("status") != "ok":
                table.add_row(row["shape"], row["dtype"], row["mode"], row["impl"],
                              escape(f"{row.get('status')}: {row.get('reason', '')}"), "", "", "", "",
                              *(("", "") if allocated else ()))
                continue
            table.add_row(
                row["shape"], row["dtype"], row["mode"], row["impl"],
                f"{row['median_s'] * 1e3:,.1f} ms ({row['p20_s'] * 1e3:,.1f}–{row['p80_s'] * 1e3:,.1f})",
                _fmt_bytes(row.get("peak_bytes")),
                f"{row['ratio_time']:.2f}" if "ratio_time" in row else "",
                f"{row['ratio_peak']:.2f}" if "ratio_peak" in row else "",
                *((_fmt_bytes(row.get("peak_allocated_bytes")),
                   f"{row['ratio_allocated']:.2f}" if "ratio_allocated" in row else "") if allocated else ()),
                f"{row['roofline']:.0%}" if "roofline" in row else "",
            )
        console.print(table)
        if args.markdown:
            extra_head = f" allocated | × {baseline} alloc |" if allocated else ""
            print(f"\n| shape | dtype | mode | impl | median ms (p20–p80) | peak extra | × {baseline} time | "
                  f"× {baseline} mem |{extra_head}")
            print("|---|---|---|---|---|---|---|---|" + ("---|---|" if allocated else ""))
            for row in rows:
                if row.get("status") == "ok":
                    print(f"| {row['shape']} | {row['dtype']} | {row['mode']} | {row['impl']} | "
                          f"{row['median_s'] * 1e3:,.1f} ({row['p20_s'] * 1e3:,.1f}–{row['p80_s'] * 1e3:,.1f}) | "
                          f"{_fmt_bytes(row.get('peak_bytes'))} | {row.get('ratio_time', float('nan')):.2f} | "
                          f"{row.get('ratio_peak', float('nan')):.2f} |"
                          + (f" {_fmt_bytes(row.get('peak_allocated_bytes'))} | "
                             f"{row.get('ratio_allocated', float('nan')):.2f} |" if allocated else ""))
                else:
                    print(f"| {row['shape']} | {row['dtype']} | {row['mode']} | {row['impl']} | "
                          f"{row.get('status')}: {row.get('reason', '')} | | | |" + (" | |" if allocated else ""))
        if not args.no_csv:
            _harness.append_csv(Path(args.csv) if args.csv else _harness.RESULTS / f"{op}.csv", rows)
        all_rows.extend(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
