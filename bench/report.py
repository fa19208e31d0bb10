"""Markdown and plots from result files, and the tables the READMEs quote.

Every number here is read from a result JSON (harness.write_results); nothing is measured. The tables in
README.md and bench/README.md sit between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers and are
rewritten by ``update_readmes`` (run by every `python bench/compare.py`).
"""

from __future__ import annotations

import glob
import os
import re
import statistics

from harness import REFERENCE, Row, paired_ratios, read_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
# The ANN paper (arXiv 1908.07678, table 1): APNB against non-local at [1, 2048, 128, 256], fp32, on a GPU.
PAPER_SPEEDUP, PAPER_MEMORY_RATIO = 6.0, 28.0
PAPER_PEERS = ("nonlocal_matmul", "nonlocal_sdpa")
BASELINE = "fuse_only"


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def times(value) -> str:
    """A ratio as "2.95x", or "-" where there is none."""
    return "-" if value is None else f"{fmt(value)}x"


def dims_text(row: Row) -> str:
    return " ".join(f"{k}={v}" for k, v in row.dims.items())


def _ratio_text(row: Row) -> str:
    if row.vs_reference is None:
        return "-"
    return f"{fmt(row.vs_reference)} [{fmt(row.vs_reference_p20)}, {fmt(row.vs_reference_p80)}]"


def environment_lines(env: dict) -> list:
    return [
        f"- device: {env['device']} ({env['device_type']}), host {env['host']}, {env['torch_threads']} torch threads "
        f"of {env['cpu_count']} cores, {env['memory_gib']:.0f} GiB",
        f"- load average (1 min) at start / end: {fmt(env['load_avg_1m'])} / {fmt(env.get('load_avg_1m_end'))}",
        f"- torch {env['torch']}, commit {env['git_commit'][:10]} ({env['git_dirty_files']} files uncommitted), "
        f"{env['date_utc']}",
        f"- timing: {env['timing']}; peak memory: {env['peak_memory']}",
    ]


def markdown(env: dict, config: dict, rows: list) -> str:
    lines = [f"# annkernels bench, suite {config.get('suite')}: {env['device']}", "", *environment_lines(env), ""]
    lines += ["`x ref` = median over rounds of (reference time / this time) in the same round, with its 20th-80th "
              "percentiles: > 1 is faster than mmsegmentation's computation (the `reference` backend). "
              + ("`CPU ms` = process CPU time of all threads; well under threads x wall time means the call "
                 "waited for cores other jobs held." if env["device_type"] == "cpu" else ""), ""]
    cpu = env["device_type"] == "cpu"
    for op in dict.fromkeys(row.op for row in rows):
        measured = [row for row in rows if row.op == op and row.ok]
        if not measured:
            continue
        lines += [f"## {op}", "", "| shape | dims | dtype | pass | provider | median ms | p20-p80 ms | "
                  + ("CPU ms | " if cpu else "") + "peak MiB | x ref | GB/s | TFLOP/s |",
                  "|---|---|---|---|---|---|---|" + ("---|" if cpu else "") + "---|---|---|---|"]
        for row in measured:
            cpu_ms = f"{fmt(statistics.median(row.cpu_ms) if row.cpu_ms else None)} | " if cpu else ""
            lines.append(f"| {row.shape} | {dims_text(row)} | {row.dtype} | {row.pass_} | {row.provider} | "
                         f"{fmt(row.median_ms)} | {fmt(row.p20_ms)}-{fmt(row.p80_ms)} | {cpu_ms}{fmt(row.peak_mib)} | "
                         f"{_ratio_text(row)} | {fmt(row.gbps)} | {fmt(row.tflops)} |")
        notes = dict.fromkeys(f"{r.shape} {r.dtype} {r.pass_} {r.provider}: {r.note}" for r in measured if r.note)
        lines += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])
    comparisons = paper_comparisons(rows)
    if comparisons:
        lines += ["## APNB against non-local (the paper's comparison)", "", *paper_table(comparisons), ""]
    other = [row for row in rows if not row.ok]
    if other:
        lines += ["## Not measured", ""]
        lines += [f"- {r.op} {r.shape} {r.dtype} {r.pass_} {r.provider}: {r.status}" for r in other] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The paper's comparison


def paper_comparisons(rows: list) -> list:
    """APNB (each backend) against each non-local peer, eval forward, with the fuse-only baseline subtracted.

    Time ratios are medians of per-round ratios (the rows of a group share their rounds); the subtracted one
    is (non-local - baseline) / (APNB - baseline) per round. Memory is one call each.
    """
    found = []
    groups: dict = {}
    for row in rows:
        if row.op == "apnb" and row.pass_ == "fwd" and row.dims.get("mode") == "eval" and row.ok:
            groups.setdefault((row.shape, row.dtype), {})[row.provider] = row
    for (shape, dtype), group in groups.items():
        base = group.get(BASELINE)
        for apnb in (row for row in group.values() if row.kind == "backend"):
            for peer in (group[name] for name in PAPER_PEERS if name in group):
                item = {"shape": shape, "dims": apnb.dims, "dtype": dtype, "apnb": apnb, "nonlocal": peer,
                        "base": base, "time": statistics.median(paired_ratios(peer, apnb)),
                        "memory": _divide(peer.peak_mib, apnb.peak_mib), "time_net": None, "memory_net": None}
                if base is not None:
                    net = [(p - b) / (a - b) for a, p, b in zip(apnb.times_ms, peer.times_ms, base.times_ms,
                                                                 strict=True) if a > b]
                    item["time_net"] = statistics.median(net) if len(net) == len(apnb.times_ms) else None
                    if None not in (peer.peak_mib, apnb.peak_mib, base.peak_mib):
                        item["memory_net"] = _divide(peer.peak_mib - base.peak_mib, apnb.peak_mib - base.peak_mib)
                found.append(item)
    return sorted(found, key=lambda item: (item["dims"]["H"] * item["dims"]["W"], item["apnb"].provider,
                                           item["nonlocal"].provider))


def _divide(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def paper_table(comparisons: list) -> list:
    lines = ["| N = HxW | C | APNB backend | non-local | APNB ms | non-local ms | fuse-only ms | time ratio | "
             "net of fuse | APNB MiB | non-local MiB | fuse-only MiB | memory ratio | net of fuse |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for item in comparisons:
        d, apnb, peer, base = item["dims"], item["apnb"], item["nonlocal"], item["base"]
        lines.append(
            f"| {d['H'] * d['W']} = {d['H']}x{d['W']} | {d['C']} | {apnb.provider} | {peer.provider} | "
            f"{fmt(apnb.median_ms)} | {fmt(peer.median_ms)} | {fmt(base.median_ms if base else None)} | "
            f"**{times(item['time'])}** | {times(item['time_net'])} | {fmt(apnb.peak_mib)} | {fmt(peer.peak_mib)} | "
            f"{fmt(base.peak_mib if base else None)} | **{times(item['memory'])}** | {times(item['memory_net'])} |")
    return lines


def plot_paper(comparisons: list, env: dict, path: str) -> bool:
    """Time and memory ratios (raw and net of the fuse-only baseline) against N, beside the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not comparisons:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = ((axes[0], "time", PAPER_SPEEDUP, "time: non-local / APNB"),
              (axes[1], "memory", PAPER_MEMORY_RATIO, "peak memory: non-local / APNB"))
    series = dict.fromkeys((item["apnb"].provider, item["nonlocal"].provider) for item in comparisons)
    for axis, key, paper, title in panels:
        for (apnb, peer) in series:
            items = [i for i in comparisons if (i["apnb"].provider, i["nonlocal"].provider) == (apnb, peer)]
            n = [i["dims"]["H"] * i["dims"]["W"] for i in items]
            line, = axis.plot(n, [i[key] for i in items], "o-", label=f"{apnb} vs {peer}")
            net = [(x, i[f"{key}_net"]) for x, i in zip(n, items, strict=True) if i[f"{key}_net"] is not None]
            if net:  # a round where APNB was no slower than the fuse alone leaves that point out
                axis.plot(*zip(*net, strict=True), "s--", color=line.get_color(), alpha=0.6,
                          label=f"{apnb} vs {peer}, net of fuse")
        axis.axhline(paper, color="tab:red", linestyle=":", label=f"paper {paper:g}x (N = 32768, GPU)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("positions N = H x W (C = 2048, batch 1, fp32, eval forward)")
        axis.set_title(title)
        axis.legend(fontsize=7)
    figure.suptitle(f"{env['device']}, {env['torch_threads']} threads, load {fmt(env['load_avg_1m'])}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# ----------------------------------------------------------------------------------------------------------------
# The tables the READMEs quote


def latest_results(suite: str, device_type: str = "cpu") -> tuple | None:
    """(path, env, config, rows) of the newest committed result file of ``suite`` on ``device_type``."""
    found = []
    for path in glob.glob(os.path.join(RESULTS_DIR, f"{suite}-*.json")):
        try:
            env, config, rows = read_results(path)
        except (ValueError, KeyError, TypeError):
            continue
        if env["device_type"] == device_type:
            found.append((env["date_utc"], path, env, config, rows))
    return max(found, key=lambda item: item[0])[1:] if found else None


def _source(path: str, env: dict) -> str:
    return (f"{env['device']}, {env['torch_threads']} threads, load {fmt(env['load_avg_1m'])}, {env['date_utc'][:10]}"
            f" ([{os.path.basename(path)}]({os.path.relpath(path, ROOT)}))")


def performance_table() -> list:
    """README: the default CPU backend against the reference at the main CPU shapes, and the paper's shape."""
    lines = []
    found = latest_results("cpu")
    if found:
        path, env, _, rows = found
        wanted = {"pyramid_pool": "train_kv", "short_attention": "train", "apnb": "cpu_train", "afnb": "cpu_train"}
        lines += [f"CPU, measured: {_source(path, env)}. `x ref` is the median over interleaved rounds of "
                  "reference time / backend time (20th-80th percentile in brackets).", "",
                  "| op | shape | pass | reference ms | cpu ms | x ref | reference MiB | cpu MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row.provider != "cpu" or not row.ok or wanted.get(row.op) != row.shape:
                continue
            ref = next(r for r in rows if (r.op, r.shape, r.dtype, r.pass_, r.provider) ==
                       (row.op, row.shape, row.dtype, row.pass_, REFERENCE))
            lines.append(f"| {row.op} | {dims_text(row)} | {row.pass_} | {fmt(ref.median_ms)} | {fmt(row.median_ms)} | "
                         f"{_ratio_text(row)} | {fmt(ref.peak_mib)} | {fmt(row.peak_mib)} |")
        lines.append("")
    paper = latest_results("paper")
    if paper:
        path, env, _, rows = paper
        for item in paper_comparisons(rows):
            if item["shape"] != "paper" or item["apnb"].provider != "cpu":
                continue
            lines.append(f"- The paper's shape [1, 2048, 128, 256], fp32 eval forward, APNB (cpu backend) against "
                         f"{item['nonlocal'].provider}: **{times(item['time'])}** faster "
                         f"({times(item['time_net'])} net of the shared fuse), "
                         f"**{times(item['memory'])}** less peak memory ({times(item['memory_net'])} net); the paper: "
                         f"{PAPER_SPEEDUP:g}x / {PAPER_MEMORY_RATIO:g}x on a GPU. {_source(path, env)}")
    return lines


def paper_section() -> list:
    """bench/README: the whole paper comparison, every shape and backend, with its plot."""
    found = latest_results("paper")
    if not found:
        return ["No paper-suite result yet: `python bench/compare.py --suite paper`."]
    path, env, _, rows = found
    plot = os.path.splitext(os.path.relpath(path, os.path.join(ROOT, "bench")))[0] + ".png"
    return [f"Measured: {_source(path, env)}.", "", *paper_table(paper_comparisons(rows)), "",
            f"![APNB against non-local]({plot})"]


def cpu_section() -> list:
    """bench/README: x ref of every backend and peer at every CPU shape, one line per group."""
    found = latest_results("cpu")
    if not found:
        return ["No CPU-suite result yet: `python bench/compare.py`."]
    path, env, _, rows = found
    groups: dict = {}
    for row in rows:
        if row.ok and row.provider != REFERENCE:
            groups.setdefault((row.op, row.shape, row.pass_), []).append(row)
    lines = [f"Measured: {_source(path, env)}; full table in the .md beside it.", "",
             "| op | shape | pass | reference ms | x ref of each provider (median over rounds) |",
             "|---|---|---|---|---|"]
    for (op, shape, pass_), group in groups.items():
        ref = next((r for r in rows if (r.op, r.shape, r.pass_, r.provider) == (op, shape, pass_, REFERENCE)), None)
        ratios = ", ".join(f"{r.provider} {fmt(r.vs_reference)}" for r in group if r.vs_reference is not None)
        lines.append(f"| {op} | {dims_text(group[0])} | {pass_} | {fmt(ref.median_ms if ref else None)} | {ratios} |")
    return lines


SECTIONS = {"performance": performance_table, "paper": paper_section, "cpu": cpu_section}
README_FILES = (os.path.join(ROOT, "README.md"), os.path.join(ROOT, "bench", "README.md"))


def update_readmes(files=README_FILES) -> list:
    """Rewrite every marked table in ``files``; returns the files changed."""
    changed = []
    for path in files:
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            text = handle.read()

        def fill(match):
            return f"{match.group(1)}\n" + "\n".join(SECTIONS[match.group(2)]()) + f"\n{match.group(3)}"

        new = re.sub(r"(<!-- bench:(\w+) -->)\n.*?\n?(<!-- /bench:\2 -->)", fill, text, flags=re.DOTALL)
        if new != text:
            with open(path, "w") as handle:
                handle.write(new)
            changed.append(path)
    return changed


def write_report(path: str) -> list:
    """<stem>.md (and <stem>.png where the file holds a paper comparison) beside a result file."""
    env, config, rows = read_results(path)
    stem = os.path.splitext(path)[0]
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(env, config, rows))
    written = [stem + ".md"]
    if config.get("plots", True) and plot_paper(paper_comparisons(rows), env, stem + ".png"):
        written.append(stem + ".png")
    return written


