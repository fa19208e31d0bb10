"""Static performance report of every CUDA and Triton kernel on the H200, made on a machine without a GPU.

Usage (from the repository root): ``python -m tools.gpu.perf_report [--out bench/results/NAME] [--no-triton]``
writes NAME.json and NAME.md (default: bench/results/static-h200-<today>) and prints the modelled times.

CUDA kernels are compiled for sm_90a (ptxas registers, spills, shared memory; SASS load widths, loads in
flight per load site, fragment loads, tensor-core instructions); their launch plans at the key shapes come
from the launchers themselves, run one block per launch in the CPU emulator. Triton kernels are compiled
ahead of time for sm_90 with the configs their autotune policy would consider at each key shape. Every time
printed is **modelled** (tools/gpu/model.py, explained in docs/performance.md), never measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

from tools.gpu import cuda_launches, cuda_static, model

ROOT = cuda_static.ROOT
MODELLED = "modelled (static analysis, no GPU run)"


def _kernel_commit() -> str:
    """The last commit that changed the kernels (csrc/, annkernels/), "+changes" if they differ from it."""
    sources = ["csrc", "annkernels"]
    last = subprocess.run(["git", "log", "-1", "--format=%h", "--", *sources], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", *sources], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (last or "unknown") + ("+changes" if dirty else "")


def kernel_record(kernel: cuda_static.KernelStatic) -> dict:
    record = dataclasses.asdict(kernel)
    record.update(tensor_core=kernel.tensor_core, mean_in_flight=round(kernel.mean_in_flight, 3),
                  mean_load_bytes=kernel.mean_load_bytes)
    return record


def cuda_case(case: model.Case, launches: list[dict], kernels: dict[str, cuda_static.KernelStatic]) -> dict:
    """The modelled time of one op at one shape from its launches and their kernels' static facts."""
    costs, rows, global_bytes, shared_s = [], [], 0.0, 0.0
    for launch in launches:
        kernel = kernels[launch["kernel"]]
        ctas = math.prod(launch["grid"])
        resident, limiter = model.ctas_per_sm(kernel.registers, launch["threads"],
                                              kernel.static_smem + launch["dynamic_smem"])
        # Bytes read by asynchronous copies take one round trip per wait that lands them, not one per load.
        loaded_bytes = launch["block_read_bytes"] - launch["block_async_read_bytes"]
        cost = model.LaunchCost(
            kernel=launch["kernel"], ctas=ctas, ctas_per_sm=resident,
            loads_per_thread=loaded_bytes / launch["threads"] / kernel.mean_load_bytes,
            mean_in_flight=kernel.mean_in_flight,
            async_waits_per_thread=launch["block_async_landing_waits"] / launch["threads"])
        costs.append(cost)
        global_bytes += ctas * (launch["block_read_bytes"] + launch["block_written_bytes"])
        # The kernel's own shared accesses as counted, bank conflicts included; WMMA fragments at the ideal
        # 128 bytes per wavefront (the emulator does not model how the hardware lays them across banks).
        block_wavefronts = launch["block_shared_wavefronts"] + launch["block_fragment_shared_bytes"] / \
            model.SHARED_BYTES_PER_CYCLE
        shared_s += model.shared_time_s(ctas, block_wavefronts)
        rows.append({**launch, "ctas": ctas, "ctas_per_sm": resident, "limited_by": limiter, "waves": cost.waves,
                     "sm_fill": round(min(ctas, resident * model.SM_COUNT) / (resident * model.SM_COUNT), 3),
                     "loads_per_thread": round(cost.loads_per_thread, 1), "round_trips": round(cost.round_trips, 1),
                     "block_wavefronts": round(block_wavefronts)})
    main = kernels[launches[0]["kernel"]]
    result = model.modelled_time(case, costs, global_bytes, model.unit_for(main.tensor_core, case.dtype),
                                 shared_s=shared_s)
    return {**result, "global_bytes": global_bytes, "minimal_bytes": case.minimal_bytes, "launches": rows}


def cuda_report(cases: list[model.Case]) -> dict:
    kernels = cuda_static.analyse_tree()
    plans = cuda_launches.launches(cases)
    return {
        "kernels": {label: kernel_record(k) for label, k in sorted(kernels.items())},
        "cases": {case.name: cuda_case(case, plans[case.name], kernels) for case in cases},
    }


def build_report(with_triton: bool = True) -> dict:
    cases = model.key_cases()
    report = {
        "label": MODELLED,
        "date": datetime.date.today().isoformat(),
        "kernels_at": _kernel_commit(),
        "device": "H200 SXM (modelled)",
        "host": f"{platform.machine()}, Python {platform.python_version()}",
        "constants": {name: getattr(model, name) for name in (
            "SM_COUNT", "CLOCK_GHZ", "SHARED_BYTES_PER_CYCLE", "HBM_BYTES_PER_S", "L2_BYTES_PER_S",
            "L2_LATENCY_CYCLES", "HBM_LATENCY_CYCLES", "PEAK_FLOPS", "FLOOR_FLOPS")},
        "cases": {c.name: {"floor_s": c.floor_s, "minimal_bytes": c.minimal_bytes, "flops": c.flops} for c in cases},
    }
    missing = cuda_static.missing_tools()
    report["cuda"] = {"skipped": missing} if missing else cuda_report(cases)
    if with_triton:
        from tools.gpu import triton_static

        report["triton"] = triton_static.triton_report(cases)
    return report


def fractions(report: dict) -> dict[str, float]:
    """{"cuda: CASE" or "triton: CASE": modelled fraction of the floor} (the gate compares these)."""
    out = {}
    for backend in ("cuda", "triton"):
        for name, case in report.get(backend, {}).get("cases", {}).items():
            if "fraction_of_floor" in case:
                out[f"{backend}: {name}"] = case["fraction_of_floor"]
    return out


# ---- markdown ----

def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def _widths(counts: dict) -> str:
    return " ".join(f"{bits}b:{n}" for bits, n in counts.items()) or "-"


def markdown(report: dict) -> str:
    lines = [f"# Static performance report, H200 (modelled), {report['date']}", "",
             f"Kernels at commit {report['kernels_at']}; made on {report['host']} without a GPU by "
             "`python -m tools.gpu.perf_report`.",
             "**Every time here is modelled** (docs/performance.md section 3, the static model), never measured.", "",
             "## Modelled time against the H200 floor", "",
             "| case | floor µs | CUDA modelled µs | bound | CUDA % floor "
             "| Triton modelled µs | bound | Triton % floor |",
             "|---|---|---|---|---|---|---|---|"]
    cuda_cases = report["cuda"].get("cases", {})
    triton_cases = report.get("triton", {}).get("cases", {})
    for name, case in report["cases"].items():
        cells = [name, _us(case["floor_s"])]
        for backend in (cuda_cases, triton_cases):
            entry = backend.get(name)
            if entry and "time_s" in entry:
                cells += [_us(entry["time_s"]), entry["bound"], f"{100 * entry['fraction_of_floor']:.0f}%"]
            else:
                cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`bound` names the largest term. The CUDA kernels' shared term counts their shared-memory "
              "wavefronts under the emulator, bank conflicts included (WMMA fragments at 128 bytes per wavefront); "
              "Triton's is not counted (the compiler lays out and swizzles its shared tiles). The model ignores "
              "instruction throughput."]
    if "skipped" in report["cuda"]:
        lines += ["", f"CUDA kernels skipped: {report['cuda']['skipped']}."]
    else:
        lines += _cuda_markdown(report["cuda"])
    if "triton" in report:
        from tools.gpu import triton_static

        lines += triton_static.markdown(report["triton"])
    return "\n".join(lines) + "\n"


def _cuda_markdown(cuda: dict) -> list[str]:
    lines = ["", "## CUDA kernels (sm_90a)", "",
             "Loads in flight: for each global load site in a loop, the other global loads in flight with it "
             "before its first use (histogram `in flight: sites`). Fragment loads: shared (LDS, of which LDSM) / "
             "generic LD.", "",
             "| kernel | regs | spill B | static smem | global loads | global stores | loads in flight (hot sites) "
             "| fragment loads LDS(LDSM)/LD | HMMA | wgmma | cp.async | TMA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, k in cuda["kernels"].items():
        histogram = " ".join(f"{n}:{c}" for n, c in k["in_flight_histogram"].items()) or "-"
        lines.append(f"| `{label}` | {k['registers']} | {k['spill_stores']} | {k['static_smem']} | "
                     f"{_widths(k['global_loads'])} | {_widths(k['global_stores'])} | {histogram} | "
                     f"{k['shared_fragment_loads']}({k['ldsm']})/{k['generic_loads']} | {k['hmma']} | {k['wgmma']} | "
                     f"{k['async_copies']} | {k['tma']} |")
    lines += ["", "## CUDA launches at the key shapes (plans from the launchers, via the emulator)", "",
              "| case | kernel | CTAs | threads | smem | CTAs/SM (limit) | waves | SM fill | loads/thread "
              "| round trips | shared wavefronts/CTA |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in cuda["cases"].items():
        for launch in case["launches"]:
            lines.append(f"| {name} | `{launch['kernel']}` | {launch['ctas']} | {launch['threads']} | "
                         f"{launch['dynamic_smem']} | {launch['ctas_per_sm']} ({launch['limited_by']}) | "
                         f"{launch['waves']} | {100 * launch['sm_fill']:.0f}% | {launch['loads_per_thread']} | "
                         f"{launch['round_trips']} | {launch['block_wavefronts']} |")
    lines += ["", "## CUDA model terms (µs, modelled)", "",
              "| case | bytes | compute (unit) | latency | shared | global MB (emulated) | minimal MB |",
              "|---|---|---|---|---|---|---|"]
    for name, case in cuda["cases"].items():
        lines.append(f"| {name} | {_us(case['bytes_s'])} | {_us(case['compute_s'])} ({case['unit']}) | "
                     f"{_us(case['latency_s'])} | {_us(case['shared_s'])} | {case['global_bytes'] / 1e6:.1f} | "
                     f"{case['minimal_bytes'] / 1e6:.1f} |")
    return lines


def write(report: dict, out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    parser.add_argument("--no-triton", action="store_true", help="CUDA kernels only")
    args = parser.parse_args(argv)
    report = build_report(with_triton=not args.no_triton)
    out = args.out or ROOT / "bench" / "results" / f"static-h200-{report['date']}"
    json_path, md_path = write(report, out)
    print(markdown(report).split("\n## CUDA kernels")[0])
    print(f"wrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path} and {md_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
