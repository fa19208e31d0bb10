"""Run the benchmark matrix once and write bench/results/<device>-<date>.{json,md} plus PNG plots.

    python bench/compare.py                        # every case for the default device (CUDA if present)
    python bench/compare.py --ops short_attention --dtypes float32 --quick
    python bench/compare.py --from-json bench/results/<file>.json   # redraw the table and plots only

Every ratio in the outputs compares rows of the same run (see bench/utils.py for the timing and memory
methods). The JSON is rewritten after each op, so a run cut short by a timeout still leaves its rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/compare.py`, Python puts bench/ on the path, not the root
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import utils  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "bench", "results")
# The ANN paper's abstract: APNB vs non-local at a 256x128 feature map (docs/performance.md section 1).
PAPER_SPEEDUP, PAPER_MEMORY_RATIO = 6.0, 28.0


def all_benches() -> list:
    from bench import bench_blocks, bench_model, bench_pyramid_pool, bench_short_attention

    return [bench_pyramid_pool.BENCH, bench_short_attention.BENCH, *bench_blocks.BENCHES, bench_model.BENCH]


def _split(text: str | None) -> list | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def select_cases(benches, device: str, ops=None, shapes=None, dtypes=None, backends=None, large=False) -> list:
    """Cases after the command-line filters, size-gated ones dropped."""
    cases = []
    if ops:  # run in the order asked, so a time-limited run measures what matters most first
        benches = sorted((bench for bench in benches if bench.op in ops), key=lambda bench: ops.index(bench.op))
    for bench in benches:
        for case, skip in bench.cases(device, include_large=large, dtypes=dtypes):
            if skip or (shapes and case.shape.name not in shapes):
                continue
            if backends and case.provider.name not in backends and case.provider.name != utils.REFERENCE:
                continue  # the reference stays: every ratio needs it
            cases.append(case)
    return cases


def run(args, benches=None) -> str:
    """Measure the selected cases of ``benches`` (default: every bench module); returns the output stem.

    The JSON and the markdown are rewritten after every row, so a run cut short keeps what it measured.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    benches = all_benches() if benches is None else benches
    cases = select_cases(benches, device.type, _split(args.ops), _split(args.shapes), _split(args.dtypes),
                         _split(args.backends), args.large)
    env = utils.environment(device)
    config = {key: value for key, value in vars(args).items() if key != "from_json"}
    config["cases"] = len(cases)
    stem = args.output or os.path.join(args.out_dir, f"{utils.device_slug(env)}-{datetime.date.today().isoformat()}")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    document = utils.result_document([], env, config)
    write_outputs(document, stem)  # the files exist (with no rows) even if the first case takes the process down
    budget = utils.Budget.for_device(device, quick=args.quick)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    print(f"{len(cases)} cases on {env['device']} (torch {env['torch']}, threads {env['torch_threads']}, "
          f"annkernels backends {env['annkernels_backends']}) -> {stem}.json", flush=True)

    from tqdm import tqdm

    progress = tqdm(total=len(cases), unit="case", dynamic_ncols=True, file=sys.stderr)

    def save(row):
        document["rows"].append(row)
        progress.update(1)
        progress.write(utils.format_row(row))
        utils.attach_reference_ratios(document["rows"])
        write_outputs(document, stem)

    utils.run_cases(cases, device, budget, memory=not args.no_memory, deadline=deadline, on_row=save)
    progress.close()
    env["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report(document, stem, plots=not args.no_plots)
    return stem


def write_outputs(document: dict, stem: str) -> None:
    utils.write_json(document, stem + ".json")
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(document))


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value, digits=3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _dims(row) -> str:
    return " ".join(f"{k}={v}" for k, v in row["dims"].items())


def _note(row) -> str | None:
    """What a row's provider chose, and a back-to-back timing that could not use a CUDA graph."""
    method = row.get("b2b_method")
    said = [text for text in (row.get("note"), method if method and method != "cuda-graph" else None) if text]
    return f"{row['shape']} {row['dtype']} {row['pass']} {row['backend']}: {'; '.join(said)}" if said else None


def markdown(document: dict) -> str:
    env, rows = document["env"], document["rows"]
    lines = [f"# annkernels benchmark: {env['device']}, {env['date_utc']}", ""]
    lines += [
        "| | |", "|---|---|",
        f"| device | {env['device']} ({env['device_type']}, capability {env.get('gpu_capability', '-')}) |",
        f"| torch / CUDA / triton | {env['torch']} / {env['torch_cuda']} / {env['triton']} |",
        f"| git commit | {env['git_commit']} ({env['git_dirty_files']} uncommitted files) |",
        f"| threads / cores | {env['torch_threads']} / {env['cpu_count']} |",
        f"| load average (1 min) start / end | {_fmt(env['load_avg_1m'])} / {_fmt(env.get('load_avg_1m_end'))} |",
        f"| TF32 matmul / cuDNN, cudnn.benchmark | {env['tf32_matmul']} / {env['tf32_cudnn']}, "
        f"{env['cudnn_benchmark']} |",
        f"| timing | {env['timing']}; median and 20th/80th percentiles of per-call times |",
        f"| peak memory | {env['peak_memory_method']}, above what was allocated before the call |",
        f"| annkernels backends | {env['annkernels_backends']} |",
        f"| run id | {document['run_id']} |", "",
    ]  # fmt: skip
    if env["device_type"] == "cpu":
        lines += [
            "**Noise:** CPU run on a machine whose cores are shared with other jobs (see the load average), "
            "so medians can move by tens of percent between runs; ratios within one row group are the "
            "meaningful part. No GPU number appears in this file."
            + ("" if document["config"].get("large") else " GPU-sized cases (N = 32768, the paper's 2048-channel "
               "block, odd 97x97 maps, ann_r50_d8) were left out (`--large` runs them)."),
            "",
        ]
    lines += [
        "Columns: `x ref` = reference median / this median (same run; > 1 is faster than the reference "
        "backend, mmsegmentation's computation). GB/s and TFLOP/s use minimal traffic and FLOP models "
        "(bench_*.py); `% floor` = physical floor / median where the device has floors "
        "(docs/performance.md section 4).",
        "",
    ]
    cpu = env["device_type"] == "cpu"
    if cpu:
        lines += ["`CPU ms` = median process CPU time per call, all threads: well below threads x wall time means "
                  "the call waited for cores other jobs held.", ""]
    else:
        lines += ["`b2b ms` = the pass captured in a CUDA graph and replayed back to back, L2 hot, no per-call "
                  "dispatch (`median ms` is cold: L2 flushed before each call).", ""]
    extra_head, extra_rule = ("CPU ms | ", "---|") if cpu else ("b2b ms | ", "---|")
    for op in dict.fromkeys(row["op"] for row in rows):
        op_rows = [row for row in rows if row["op"] == op and row["status"] == "ok"]
        if not op_rows:
            continue
        lines += [f"## {op}", "", "| shape | dims | dtype | backend | pass | median ms | p20-p80 ms | " + extra_head
                  + "peak MiB | x ref | GB/s | TFLOP/s | % floor |",
                  "|---|---|---|---|---|---|---|" + extra_rule + "---|---|---|---|---|"]
        for row in op_rows:
            fraction = row.get("fraction_of_floor")
            extra = row.get("cpu_time_ms") if cpu else row.get("b2b_ms")
            lines.append(
                f"| {row['shape']} | {_dims(row)} | {row['dtype']} | {row['backend']} | {row['pass']} | "
                f"{_fmt(row['median_ms'])} | {_fmt(row['p20_ms'])}-{_fmt(row['p80_ms'])} | {_fmt(extra)} | "
                f"{_fmt(row['peak_mem_mb'])} | {_fmt(row['speedup_vs_reference'])} | {_fmt(row['achieved_gbps'])} | "
                f"{_fmt(row['achieved_tflops'])} | {'' if fraction is None else f'{100 * fraction:.0f}%'} |"
            )
        lines.append("")
        notes = [_note(row) for row in op_rows if _note(row)]
        if notes:
            lines += [f"- {note}" for note in dict.fromkeys(notes)] + [""]
    lines += paper_section(rows) + model_section(rows)
    other = [row for row in rows if row["status"] != "ok"]
    if other:
        lines += ["## Not measured", ""]
        lines += [f"- {r['op']} {r['shape']} {r['dtype']} {r['backend']} {r['pass']}: {r['status']}" for r in other]
        lines.append("")
    return "\n".join(lines)


def paper_comparisons(rows: list) -> list:
    """APNB rows against the non-local peers of the same shape/dtype/pass: time and memory ratios."""
    found = []
    for row in rows:
        if row["op"] != "apnb" or row["kind"] != "backend" or row["status"] != "ok" or row["pass"] != "fwd":
            continue
        if row["dims"].get("mode") != "eval":  # the paper measured eval-mode inference
            continue
        for peer in rows:
            same = all(peer[k] == row[k] for k in ("shape", "dtype", "pass"))
            if peer["op"] == "apnb" and peer["kind"] == "peer" and same and peer["status"] == "ok":
                memory_ratio = None
                if row["peak_mem_mb"] and peer["peak_mem_mb"] is not None:
                    memory_ratio = peer["peak_mem_mb"] / row["peak_mem_mb"]
                found.append({"shape": row["shape"], "dims": row["dims"], "dtype": row["dtype"],
                              "apnb": row["backend"], "nonlocal": peer["backend"],
                              "apnb_ms": row["median_ms"], "nonlocal_ms": peer["median_ms"],
                              "time_ratio": peer["median_ms"] / row["median_ms"],
                              "apnb_mib": row["peak_mem_mb"], "nonlocal_mib": peer["peak_mem_mb"],
                              "memory_ratio": memory_ratio})
    return found


def paper_section(rows: list) -> list:
    found = paper_comparisons(rows)
    if not found:
        return []
    lines = ["## APNB vs full non-local (the paper's comparison)", "",
             f"Forward, eval, no_grad. The paper reports ~{PAPER_SPEEDUP:g}x faster and ~{PAPER_MEMORY_RATIO:g}x "
             "less memory at [1, 2048, 128, 256] in fp32 on an unnamed GPU (shape `paper`); `cpu_paper` is a "
             "CPU-sized stand-in and is not comparable to the paper's figures.", "",
             "| shape | dims | dtype | APNB backend | non-local | APNB ms | non-local ms | time ratio | "
             "APNB MiB | non-local MiB | memory ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for item in found:
        lines.append(
            f"| {item['shape']} | {_dims(item)} | {item['dtype']} | {item['apnb']} | {item['nonlocal']} | "
            f"{_fmt(item['apnb_ms'])} | {_fmt(item['nonlocal_ms'])} | {_fmt(item['time_ratio'])}x | "
            f"{_fmt(item['apnb_mib'])} | {_fmt(item['nonlocal_mib'])} | {_fmt(item['memory_ratio'])}x |"
        )
    return lines + [""]


def model_section(rows: list) -> list:
    from bench.bench_model import PUBLISHED

    model_rows = [row for row in rows if row["op"] == "model" and row["status"] == "ok"]
    if not model_rows:
        return []
    lines = ["## Whole model", "",
             f"mmsegmentation publishes {PUBLISHED['train_mem_gb']} GB training memory (ann_r50_d8, 512x1024, "
             f"2 images per GPU, SyncBN) and {PUBLISHED['infer_fps']} images/s inference at 1024x2048 on a "
             f"{PUBLISHED['infer_gpu']} in fp32. Only the r50 rows on a GPU are comparable to those.", "",
             "| shape | dims | backend | pass | median ms | images/s | peak MiB (delta) | peak GB (absolute) | x ref |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in model_rows:
        total = row.get("peak_mem_total_mb")
        lines.append(
            f"| {row['shape']} | {_dims(row)} | {row['backend']} | {row['pass']} | {_fmt(row['median_ms'])} | "
            f"{_fmt(row['items_per_s'])} | {_fmt(row['peak_mem_mb'])} | "
            f"{'' if total is None else _fmt(total / 1024)} | {_fmt(row['speedup_vs_reference'])} |"
        )
    return lines + [""]


# ----------------------------------------------------------------------------------------------------------------
# Plots


def _positions(row) -> int | None:
    """Query positions per image for the scaling plot; None leaves the row out of it."""
    dims = row["dims"]
    if row["op"] == "short_attention":
        return dims["N"]
    if row["op"] == "pyramid_pool" and dims.get("C") == 512:  # one channel count, so N is the only variable
        return dims["H"] * dims["W"]
    return None


def plot_scaling(rows: list, path: str) -> bool:
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["status"] == "ok" and _positions(r) is not None and r["pass"] in ("fwd", "full")]
    if not chosen:
        return False
    panels = sorted({(r["op"], r["pass"]) for r in chosen}, key=lambda panel: (panel[0], panel[1] != "fwd"))
    figure, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    for column, (op, pass_) in enumerate(panels):
        series = {}
        for row in chosen:
            if (row["op"], row["pass"]) == (op, pass_):
                series.setdefault((row["backend"], row["dtype"]), []).append(row)
        for (backend, dtype), items in sorted(series.items()):
            items.sort(key=_positions)
            x = [_positions(r) for r in items]
            label = f"{backend} {dtype}"
            axes[0][column].plot(x, [r["median_ms"] / r["dims"]["B"] for r in items], "o-", label=label)
            if all(r["peak_mem_mb"] is not None for r in items):
                axes[1][column].plot(x, [r["peak_mem_mb"] / r["dims"]["B"] for r in items], "o-", label=label)
        axes[0][column].set_title(f"{op} {pass_}")
        axes[0][column].set_ylabel("median ms per image")
        axes[1][column].set_ylabel("peak MiB per image")
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("positions per image N")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_paper(rows: list, path: str) -> bool:
    import matplotlib.pyplot as plt

    found = paper_comparisons(rows)
    if not found:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [f"{f['shape']} {f['dtype']}\n{f['apnb']} vs {f['nonlocal']}" for f in found]
    for axis, key, paper, title in ((axes[0], "time_ratio", PAPER_SPEEDUP, "time: non-local / APNB"),
                                    (axes[1], "memory_ratio", PAPER_MEMORY_RATIO, "peak memory: non-local / APNB")):
        values = [f[key] or 0.0 for f in found]
        bars = axis.bar(range(len(found)), values, color="tab:blue")
        axis.axhline(paper, color="tab:red", linestyle="--", label=f"paper ~{paper:g}x ([1,2048,128,256], GPU)")
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(f"{value:.1f}x", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
        axis.set_xticks(range(len(found)), labels, fontsize=7, rotation=20)
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_floor(rows: list, path: str) -> bool:
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["status"] == "ok" and r.get("fraction_of_floor") is not None]
    if not chosen:
        return False
    ops = list(dict.fromkeys(r["op"] for r in chosen))
    most = max(len({(r["shape"], r["dtype"], r["pass"]) for r in chosen if r["op"] == op}) for op in ops)
    figure, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.5 * most), 4.5 * len(ops)), squeeze=False)
    for axis, op in zip(axes[:, 0], ops, strict=True):
        op_rows = [r for r in chosen if r["op"] == op]
        groups = list(dict.fromkeys((r["shape"], r["dtype"], r["pass"]) for r in op_rows))
        backends = list(dict.fromkeys(r["backend"] for r in op_rows))
        width = 0.8 / len(backends)
        for index, backend in enumerate(backends):
            values = {(r["shape"], r["dtype"], r["pass"]): r["fraction_of_floor"] for r in op_rows
                      if r["backend"] == backend}
            axis.bar([g + index * width for g in range(len(groups))], [100 * values.get(g, 0.0) for g in groups],
                     width, label=backend)
        axis.axhline(100, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], ["\n".join(g) for g in groups],
                        fontsize=6)
        axis.set_ylabel("% of floor (floor time / median)")
        axis.set_title(f"{op}: achieved fraction of the bandwidth/compute floor")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def report(document: dict, stem: str, plots: bool = True) -> list:
    """Write <stem>.json, <stem>.md and (unless ``plots`` is false) the PNGs; returns the paths written."""
    write_outputs(document, stem)
    written = [stem + ".json", stem + ".md"]
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        for suffix, plot in (("-scaling.png", plot_scaling), ("-paper.png", plot_paper), ("-floor.png", plot_floor)):
            if plot(document["rows"], stem + suffix):
                written.append(stem + suffix)
    print("wrote", ", ".join(written), flush=True)
    return written


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="comma-separated ops, measured in the order given "
                        "(pyramid_pool, short_attention, apnb, afnb, model)")
    parser.add_argument("--shapes", help="comma-separated shape names (see SHAPES in bench_*.py)")
    parser.add_argument("--dtypes", help="comma-separated dtypes (default: float32,bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--backends", help="comma-separated providers to keep (the reference always runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, not a measurement")
    parser.add_argument("--large", action="store_true", help="on CPU, also run the GPU-sized cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop measuring after this long; the remaining cases are recorded as skipped")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--output", help="output path without suffix (default: <out-dir>/<device>-<date>)")
    parser.add_argument("--no-plots", action="store_true", help="write only the JSON and the markdown")
    parser.add_argument("--from-json", help="only redraw the .md and plots of an existing result file")
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as handle:
            document = json.load(handle)
        report(document, os.path.splitext(args.from_json)[0], plots=not args.no_plots)
        return
    run(args)


if __name__ == "__main__":
    main()
