"""Run a benchmark suite and write bench/results/<suite>-<device>.{json,md,png}; refresh the README tables.

    python bench/compare.py                          # suite "cpu" (or "gpu" with a GPU): every op's matrix
    python bench/compare.py --suite paper            # APNB vs non-local at the paper's [1, 2048, 128, 256]
    python bench/compare.py --ops short_attention --shapes train --quick --output /tmp/x
    python bench/compare.py --report                 # only redraw the .md/.png and README tables from the JSONs

The JSON is the one result format; the markdown, the plot and the tables in README.md and bench/README.md
are generated from it (report.py). It is rewritten after every group, so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import bench_blocks
import bench_model
import bench_pyramid_pool
import bench_short_attention
import harness
import report
import torch

BENCHES = (bench_pyramid_pool.BENCH, bench_short_attention.BENCH, bench_blocks.BENCH, bench_blocks.AFNB_BENCH,
           bench_model.BENCH)
# A suite: which ops and shapes, and whether shapes not meant for the device (GPU-sized ones on a CPU) run.
SUITES = {
    "cpu": dict(ops=None, shapes=None, large=False),
    "gpu": dict(ops=None, shapes=None, large=False),
    "paper": dict(ops=("apnb",), shapes=bench_blocks.PAPER_SHAPES, large=True),
}


def _split(text: str | None) -> list | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def select_cases(benches, device: str, suite: str, ops=None, shapes=None, dtypes=None, providers=None) -> list:
    """The suite's cases after the command-line filters; the reference always stays, every ratio needs it."""
    chosen = SUITES[suite]
    ops, shapes = ops or chosen["ops"], shapes or chosen["shapes"]
    cases = []
    for bench in benches:
        if ops and bench.op not in ops:
            continue
        for case in bench.cases(device, dtypes=dtypes, large=chosen["large"]):
            if shapes and case.shape.name not in shapes:
                continue
            if providers and case.provider.name not in providers and case.provider.name != harness.REFERENCE:
                continue
            cases.append(case)
    return cases


def run(args, benches=BENCHES) -> str:
    """Measure the selected cases group by group; returns the result file's path."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    cases = select_cases(benches, device.type, suite, _split(args.ops), _split(args.shapes), _split(args.dtypes),
                         _split(args.providers))
    env = harness.environment(device)
    config = {"suite": suite, "argv": sys.argv[1:], "quick": args.quick, "rounds": args.rounds,
              "plots": not args.no_plots, "cases": len(cases)}
    path = (args.output or os.path.join(args.out_dir, f"{suite}-{harness.device_slug(env['device'])}")) + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    budget = harness.Budget.for_device(device, quick=args.quick)
    if args.rounds:
        budget = harness.Budget(0.0, args.rounds, args.rounds)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    print(f"{len(cases)} cases on {env['device']} (torch {env['torch']}, {env['torch_threads']} threads, "
          f"load {env['load_avg_1m']:.1f}) -> {path}", flush=True)
    rows: list = []
    for group in harness.grouped(cases):
        if deadline is not None and time.monotonic() > deadline:
            rows += [harness.Row.of(case, "skipped: time budget spent") for case in group]
            continue
        measured = harness.measure_group(group, device, budget, memory=not args.no_memory)
        for row in measured:
            print(_progress(row), flush=True)
        rows += measured
        env["load_avg_1m_end"] = os.getloadavg()[0]
        harness.write_results(path, env, config, rows)
    harness.write_results(path, env, config, rows)
    written = report.write_report(path)
    if args.output is None:  # a run into bench/results/ refreshes the tables quoted from there
        written += report.update_readmes()
    print("wrote", ", ".join(written), flush=True)
    return path


def _progress(row: harness.Row) -> str:
    head = f"{row.op:<15} {row.shape:<13} {row.dtype:<8} {row.pass_:<10} {row.provider:<16}"
    if not row.ok:
        return f"{head} {row.status}"
    ratio = f"  x ref {row.vs_reference:.3g}" if row.vs_reference is not None else ""
    memory = f"  {row.peak_mib:.1f} MiB" if row.peak_mib is not None else ""
    return f"{head} {row.median_ms:10.3f} ms [{row.p20_ms:.3f}, {row.p80_ms:.3f}] x{len(row.times_ms)}{ratio}{memory}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), help="default: cpu, or gpu on a CUDA device")
    parser.add_argument("--ops", help="comma-separated ops (pyramid_pool, short_attention, apnb, afnb, model)")
    parser.add_argument("--shapes", help="comma-separated shape names (SHAPES in bench_*.py)")
    parser.add_argument("--dtypes", help="comma-separated dtypes (default: float32,bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--providers", help="comma-separated providers to keep (the reference always runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    parser.add_argument("--rounds", type=int, help="exactly this many timed rounds per group (after one warm-up "
                        "call each); the paper suite at N = 32768 takes minutes per round on two cores")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--no-plots", action="store_true", help="write no plot")
    parser.add_argument("--max-seconds", type=float, help="start no group after this long; the rest are skipped")
    parser.add_argument("--out-dir", default=report.RESULTS_DIR)
    parser.add_argument("--output", help="result path without .json (default: <out-dir>/<suite>-<device>); "
                        "README tables are refreshed only for runs into bench/results/")
    parser.add_argument("--report", action="store_true", help="measure nothing: redraw every result file's .md and "
                        "plot, and the README tables")
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.report:
        written = []
        for path in sorted(glob.glob(os.path.join(args.out_dir, "*.json"))):
            try:
                written += report.write_report(path)
            except (ValueError, KeyError) as exc:  # another tool's file (e.g. a static GPU report) stays as it is
                print(f"left {os.path.basename(path)} alone: {exc}")
        print("wrote", ", ".join(written + report.update_readmes()))
        return
    run(args)


if __name__ == "__main__":
    main()
