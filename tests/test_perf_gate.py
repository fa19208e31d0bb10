"""Performance gate without a GPU: the static report of tools/gpu (python -m tools.gpu.perf_report) must keep
every kernel spill-free, keep global loads in flight in the hot loops, and hold each kernel's modelled
fraction of the H200 floor against the committed baseline. Planted regressions (tests/perf_gate/*.cu and a
lowered fraction) prove that each rule can fail.

Nothing here measures speed: the fractions are modelled (docs/performance.md section 3, the static model). The
report's compiles and emulator runs are cached by content under ~/.cache/annkernels-perf, so a run on an
unchanged tree takes seconds; a cold run compiles csrc/cuda for sm_90a and the Triton kernels for sm_90.
Skipped without nvcc and cuobjdump.
"""

import json
from pathlib import Path

import pytest

from tools.gpu import cuda_static, gate, model, sass
from tools.gpu.perf_report import build_report, fractions

ROOT = Path(__file__).resolve().parents[1]
PLANTED = Path(__file__).resolve().parent / "perf_gate"
# The committed report the modelled fractions are held against. A redesign that gains writes a new dated
# baseline (python -m tools.gpu.perf_report --out bench/results/static-h200-DATE-NAME) and points this at it.
# static-h200-2026-12-05-shared: the model with its shared-memory term (bank conflicts counted by the emulator),
# after the conflict-free tile stores and the grouped pool backward; static-h200-2026-12-05-shared-before is the
# same model on the kernels before them (the earlier baselines, without the term, are not comparable).
# static-h200-2026-12-06-resident: the persistent forward (K and V resident, query chunks by asynchronous copies,
# one round trip per landing wait in the latency term, which changes no kernel without such copies).
BASELINE = ROOT / "bench" / "results" / "static-h200-2026-12-06-resident.json"

# The gate's thresholds, in one table; the redesign issues raise them as they land.
THRESHOLDS = {
    # Other global loads in flight before a load's first use, at every load site in a loop of a CUDA kernel.
    "min_loads_in_flight": 4,
    # Largest relative drop of a case's modelled fraction of the floor below BASELINE.
    "max_fraction_drop": 0.10,
    # Element types whose kernels must not spill (fp64 exists for gradcheck and may: it is printed).
    "spill_free_dtypes": ("fp16", "bf16", "fp32"),
}

# Below target, issue 19 (the CUDA redesign): kernels that still break a rule, by rule. An entry that starts to
# pass fails the gate too, so that it is removed and the rule holds the kernel from then on; a kernel not
# listed must pass. The redesign batches every tile load (8 in flight at most sites); since the loaders'
# addresses became affine in the batch step (bench/results/static-h200-2026-12-05-shared.md), the attention
# kernels keep their batches whole. What is left:
BELOW_TARGET_ISSUE_19 = {
    "min_loads_in_flight": {
        # Gather of at most num_bins gradient values per plane, one at a time (a small share of the traffic).
        "pyramid_pool_backward_kernel<bf16>", "pyramid_pool_backward_kernel<fp16>",
        "pyramid_pool_backward_kernel<fp32>", "pyramid_pool_backward_kernel<fp64>",
    },
}

requires_cuda_tools = pytest.mark.skipif(cuda_static.missing_tools() is not None,
                                         reason=f"static CUDA analysis needs {cuda_static.missing_tools()}")


@pytest.fixture(scope="module")
def report():
    if cuda_static.missing_tools():
        pytest.skip(f"static performance report needs {cuda_static.missing_tools()}")
    return build_report(with_triton=True)


def _held_to(rule: str, failures: dict[str, list[str]]) -> None:
    """Fails on a kernel that breaks ``rule`` and is not listed below target, and on a listed kernel that
    now passes (remove it from BELOW_TARGET_ISSUE_19)."""
    listed = BELOW_TARGET_ISSUE_19.get(rule, set())
    new = {label: lines for label, lines in failures.items() if label not in listed}
    fixed = sorted(label for label in listed if label not in failures)
    for label in sorted(listed & failures.keys()):
        print(f"below target (issue 19), {rule}: {failures[label][0]} ... ({len(failures[label])} in all)")
    message = "\n".join(line for lines in new.values() for line in lines)
    assert not new, f"{rule} ({THRESHOLDS[rule]}):\n{message}"
    assert not fixed, f"now meet {rule}: remove them from BELOW_TARGET_ISSUE_19: {fixed}"


# ---- the gate on today's tree ----

def test_cuda_kernels_do_not_spill(report):
    kernels = report["cuda"]["kernels"]
    for line in gate.spill_failures(kernels, ("fp64",)):
        print("allowed (fp64):", line)
    failures = {}
    for line in gate.spill_failures(kernels, THRESHOLDS["spill_free_dtypes"]):
        failures.setdefault(line.split(":")[0], []).append(line)
    _held_to("spill_free_dtypes", failures)


def test_triton_candidate_configs_do_not_spill_at_the_key_shapes(report):
    spilling = [f"{case} {launch['kernel']} {c['config']}: {c['spill_stores']} bytes spill stores"
                for case, entry in report["triton"]["cases"].items() for launch in entry["launches"]
                for c in launch["candidates"] if c.get("spill_stores")]
    errors = [f"{case} {launch['kernel']} {c['config']}: {c['error']}"
              for case, entry in report["triton"]["cases"].items() for launch in entry["launches"]
              for c in launch["candidates"] if "error" in c]
    assert not errors, "\n".join(errors)
    assert not spilling, "\n".join(spilling)


def test_cuda_hot_loops_keep_loads_in_flight(report):
    failures = {}
    for label, kernel in report["cuda"]["kernels"].items():
        lines = gate.in_flight_failures(label, kernel, THRESHOLDS["min_loads_in_flight"])
        if lines:
            failures[label] = lines
    _held_to("min_loads_in_flight", failures)


def test_modelled_fractions_hold_the_baseline(report):
    baseline = fractions(json.loads(BASELINE.read_text()))
    current = fractions(report)
    for case in sorted(current):
        print(f"{case}: modelled {current[case]:.1%} of the floor (baseline {baseline.get(case, float('nan')):.1%})")
    failures = gate.fraction_regressions(current, baseline, THRESHOLDS["max_fraction_drop"])
    assert not failures, "\n".join(failures)


# ---- planted regressions: each rule fails where it should ----

@requires_cuda_tools
def test_a_loader_that_waits_on_every_load_fails_the_gate():
    kernels = cuda_static.analyse_source(PLANTED / "loaders.cu")
    serial = gate.in_flight_failures("serial_loader", kernels["serial_loader"], THRESHOLDS["min_loads_in_flight"])
    assert serial and all("serial_loader load site 0x" in line for line in serial), serial
    assert not gate.in_flight_failures("batched_loader", kernels["batched_loader"], THRESHOLDS["min_loads_in_flight"])


@requires_cuda_tools
def test_a_kernel_forced_to_spill_fails_the_gate():
    kernels = {label: {"spill_stores": k.spill_stores, "spill_loads": k.spill_loads}
               for label, k in cuda_static.analyse_source(PLANTED / "spill.cu").items()}
    assert kernels["forced_spill"]["spill_stores"] > 0
    # Element types are read from the label; the planted kernel stands for an fp32 instantiation.
    failures = gate.spill_failures({"forced_spill<fp32>": kernels["forced_spill"]}, THRESHOLDS["spill_free_dtypes"])
    assert failures and failures[0].startswith("forced_spill<fp32>:"), failures


def test_a_lower_modelled_fraction_fails_the_gate():
    baseline = fractions(json.loads(BASELINE.read_text()))
    case = next(iter(baseline))
    slower = {**baseline, case: baseline[case] * (1 - 2 * THRESHOLDS["max_fraction_drop"])}
    failures = gate.fraction_regressions(slower, baseline, THRESHOLDS["max_fraction_drop"])
    assert len(failures) == 1 and failures[0].startswith(case), failures
    within = {**baseline, case: baseline[case] * (1 - THRESHOLDS["max_fraction_drop"] / 2)}
    assert not gate.fraction_regressions(within, baseline, THRESHOLDS["max_fraction_drop"])
    missing = {k: v for k, v in baseline.items() if k != case}
    assert gate.fraction_regressions(missing, baseline, THRESHOLDS["max_fraction_drop"])


# ---- the SASS reading itself, on hand-written code ----

_SASS = """
        Function : toy
        /*0000*/                   LDG.E R2, desc[UR4][R8.64] ;
        /*0010*/                   LDG.E R3, desc[UR4][R8.64+0x4] ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R8.64+0x10] ;
        /*0030*/                   STS [R10], R2 ;
        /*0040*/                   STS [R10+0x4], R3 ;
        /*0050*/                   STS.128 [R10+0x10], R4 ;
        /*0060*/                   LDG.E.U16 R12, desc[UR4][R8.64+0x40] ;
        /*0070*/               @P0 BRA 0x90 ;
        /*0080*/                   LDG.E R13, desc[UR4][R8.64+0x80] ;
        /*0090*/                   STS.U16 [R10+0x40], R12 ;
        /*00a0*/              @!P1 BRA 0x0 ;
        /*00b0*/                   EXIT ;
"""


def test_loads_in_flight_are_counted_along_the_worst_path():
    code = sass.parse(_SASS)["toy"]
    sites = {site.offset: site for site in sass.load_sites(code)}
    assert [sites[o].bits for o in (0x0, 0x10, 0x20, 0x60, 0x80)] == [32, 32, 128, 16, 32]
    # The first three issue together: each has the other two in flight.
    assert [sites[o].in_flight for o in (0x0, 0x10, 0x20)] == [2, 2, 2]
    assert sites[0x0].first_use == 0x30 and sites[0x20].first_use == 0x50
    # The U16 load is used with no other load on the branch that skips 0x80: none in flight at worst.
    assert sites[0x60].in_flight == 0 and sites[0x60].first_use == 0x90
    assert all(site.in_loop for site in sites.values())


# ---- the model's arithmetic ----

def test_occupancy_and_floors_match_hand_counts():
    # The bf16 attention forward: 128 registers x 128 threads allow 4 CTAs, its 63 KiB of shared memory 3.
    assert model.ctas_per_sm(128, 128, 64512) == (3, "shared memory")
    assert model.ctas_per_sm(255, 256, 0) == (1, "registers")
    assert model.ctas_per_sm(16, 1024, 0) == (2, "threads")
    # Floors of docs/performance.md section 6: Q read and O written at 4.3 TB/s; the backward adds dO and dQ.
    forward = model.Case("attention", "forward", "bf16", (2, 8192))
    assert forward.floor_s == pytest.approx(2 * 2 * 8192 * 256 * 2 / 4.3e12, rel=0.02)
    backward = model.Case("attention", "backward", "fp32", (1, 32768))
    assert backward.floor_s == pytest.approx(3 * 32768 * 256 * 4 / 4.3e12, rel=0.02)
    pool = model.Case("pool", "forward", "bf16", (2, 256, 64, 128))
    assert pool.floor_s == pytest.approx(2 * 256 * 64 * 128 * 2 / 4.3e12, rel=0.02)


_ASYNC_SASS = """
        Function : pipelined
        /*0000*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R8.64] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2+0x10], desc[UR4][R8.64+0x10] ;
        /*0020*/                   LDGDEPBAR ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R2+0x20], desc[UR4][R8.64+0x20] ;
        /*0040*/                   LDGDEPBAR ;
        /*0050*/                   LDGSTS.E 0x4 [R2+0x30], desc[UR4][R8.64+0x30] ;
        /*0060*/                   LDGDEPBAR ;
        /*0070*/                   DEPBAR.LE SB0, 0x1 ;
        /*0080*/                   DEPBAR.LE SB0, 0x0 ;
        /*0090*/                   EXIT ;
"""


def test_async_copies_share_each_wait_with_the_groups_still_outstanding():
    count, mean_bytes, in_flight = sass.async_copies(sass.parse(_ASYNC_SASS)["pipelined"])
    assert count == 4 and mean_bytes == (3 * 16 + 4) / 4
    # "at most 1 group outstanding" waits on the last two groups (2 copies), "0" on the last one (1 copy).
    assert in_flight == ((2 - 1) + (1 - 1)) / 2
    assert sass.async_copies(sass.parse(_SASS)["toy"]) == (0, 0.0, 0.0)
