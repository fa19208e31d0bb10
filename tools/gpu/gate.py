"""The rules tests/test_perf_gate.py holds the kernels to, as functions of the static report, so that the
gate and its planted regressions run the same code. Each returns a list of failures, one line each, that
names the kernel (and the SASS offset of a load site)."""

from __future__ import annotations

from tools.gpu.cuda_static import KernelStatic


def spill_failures(kernels: dict[str, dict], dtypes: tuple[str, ...]) -> list[str]:
    """Kernels (records of the report, by label) of the given element types that spill registers."""
    failures = []
    for label, kernel in kernels.items():
        if any(f"<{d}" in label or f" {d}" in label for d in dtypes) and kernel["spill_stores"]:
            failures.append(f"{label}: {kernel['spill_stores']} bytes spill stores, {kernel['spill_loads']} loads")
    return failures


def in_flight_failures(label: str, kernel: dict | KernelStatic, minimum: int) -> list[str]:
    """Global load sites in loops with fewer than ``minimum`` other loads in flight before first use."""
    sites = kernel.load_sites if isinstance(kernel, KernelStatic) else kernel["load_sites"]
    return [f"{label} load site {s['offset']} `{s['sass']}`: {s['in_flight']} other loads in flight before its "
            f"first use at {s['first_use']} (at least {minimum} wanted)"
            for s in sites if s["in_loop"] and s["in_flight"] < minimum]


def fraction_regressions(current: dict[str, float], baseline: dict[str, float], max_drop: float) -> list[str]:
    """Cases whose modelled fraction of the floor fell more than ``max_drop`` (relative) below the baseline,
    or that the current report lacks."""
    failures = []
    for case, before in baseline.items():
        now = current.get(case)
        if now is None:
            failures.append(f"{case}: missing from the current report (baseline {before:.1%} of the floor)")
        elif now < before * (1 - max_drop):
            failures.append(f"{case}: modelled {now:.1%} of the floor, baseline {before:.1%} "
                            f"(more than {max_drop:.0%} below)")
    return failures
