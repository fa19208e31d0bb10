"""Benchmark harness shared by the pytest-benchmark suite (bench/conftest.py) and compare.py.

A benchmark module describes an op with an ``OpBench``: named shapes, dtypes and providers. A provider
turns (shape, dtype, device) into a ``Workload``: one zero-argument callable per pass. ``time_case`` is
the one timing path: both front ends call it, so a pytest-benchmark table and a compare.py file of the
same run measure the same thing, and ``WorkloadCache`` is the one workload cache.

Timing:
  * GPU: CUDA events around each call, L2 flushed before each call by zeroing a 256 MiB buffer
    (larger than the 50 MB H100 and 60 MB H200 L2), so rows are "cold" even when every operand fits
    in L2. Beside it, ``b2b_ms``: the pass captured once in a CUDA graph and replayed back to back
    (L2 hot, no per-call dispatch), which shows microsecond kernels that launch costs would hide.
  * CPU: time.perf_counter around each call; inputs stay in cache between calls ("hot"). The median
    process CPU time per call is recorded too (cpu_time_ms): on a shared machine it shows how much
    of the wall time went to other jobs.
  * warm-up calls first (builds autotune caches, lazy inits), then repetitions until a time budget
    is spent (bounded by min/max counts); we report the median and the 20th/80th percentiles.

Peak memory (one extra call, outside the timed loop), in both cases the increase over what was
already allocated when the call started, so inputs and (for "bwd") the saved autograd graph are not
counted:
  * GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated()
    before the call. This is mmsegmentation's and the ANN authors' measure.
  * CPU: torch.profiler with profile_memory=True records every allocation and free of the CPU
    allocator with a timestamp; the peak of their running sum is the peak of live tensor bytes.
    (tracemalloc cannot see torch allocations, and process RSS is blurred by the allocator's caching.)

Rows compare to the reference backend measured in the same run (same process, same session), never
to stored numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
import uuid
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

SCHEMA_VERSION = 2  # 2: b2b_ms, b2b_method and note columns
REFERENCE = "reference"
PASSES = ("fwd", "bwd", "full")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_TAGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}

# Measured-copy HBM bandwidth (bytes read plus written) and dense peaks, docs/performance.md sections 4 and 6.
# H100 SXM: 3.0 TB/s copy, datasheet rates. H200: the same chip with faster memory; 4.3 TB/s device copy and
# 790 TFLOP/s bf16 GEMM on random data were measured on one, its fp32 and TF32 rates are the H100 datasheet's.
# Floors are only reported on devices listed here (matched by substring of the device name); elsewhere rows
# still carry achieved GB/s and TFLOP/s.
DEVICE_PEAKS = {
    "H100": {"hbm_bytes_per_s": 3.0e12, "fp32_flops": 67e12, "tf32_flops": 495e12, "half_flops": 990e12},
    "H200": {"hbm_bytes_per_s": 4.3e12, "fp32_flops": 67e12, "tf32_flops": 495e12, "half_flops": 790e12},
}

ROW_FIELDS = (
    "op", "shape", "dims", "dtype", "backend", "kind", "pass", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "cpu_time_ms", "b2b_ms", "b2b_method",
    "peak_mem_mb", "peak_mem_total_mb", "items_per_s",
    "reference_median_ms", "speedup_vs_reference", "reference_peak_mem_mb",
    "gflop", "min_mb", "achieved_gbps", "achieved_tflops", "floor_us", "floor_bound", "fraction_of_floor",
    "cache", "note",
)  # fmt: skip


class Unsupported(Exception):
    """Raised by a provider that cannot run a case (dtype, device, shape); the row is recorded as skipped."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One named problem size. ``dims`` feed the providers; ``cpu`` says whether it runs on CPU by default."""

    name: str
    dims: dict
    passes: tuple = PASSES
    cpu: bool = True
    gpu: bool = True
    dtypes: tuple | None = None  # restricts the op's dtypes for this shape (e.g. the paper's fp32-only setting)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())

    def tag(self, dims: Sequence[str] | None = None) -> str:
        """Compact, stable form of (some of) the dims for case ids: "B2-N8192"; text values stand alone."""
        keys = self.dims if dims is None else dims
        return "-".join(str(self.dims[k]) if isinstance(self.dims[k], str) else f"{k}{self.dims[k]}" for k in keys)


@dataclasses.dataclass
class Workload:
    """Callables for each pass plus the traffic/FLOP model used for roofline numbers.

    ``passes`` maps a pass name to a factory returning the zero-argument callable to time; factories let
    "bwd" build its autograd graph once, outside the timed region.
    """

    passes: dict
    flops: dict = dataclasses.field(default_factory=dict)  # pass -> FLOP count (None: not meaningful)
    bytes: dict = dataclasses.field(default_factory=dict)  # pass -> minimal bytes moved
    items: int | None = None  # images per call, for throughput rows (items_per_s)
    note: str | None = None  # what the provider chose for this case (e.g. which SDPA backend)


@dataclasses.dataclass
class Provider:
    name: str
    make: Callable[[Shape, torch.dtype, torch.device], Workload]
    kind: str = "backend"  # "backend" (annkernels backend) or "peer" (plain PyTorch competitor)


class Case(NamedTuple):
    """One timed unit: an op's pass for one shape, dtype and provider."""

    op: str
    shape: Shape
    dtype: str
    provider: Provider
    pass_: str


@dataclasses.dataclass
class OpBench:
    """Everything needed to enumerate one op's benchmark cases."""

    op: str
    shapes: Sequence[Shape]
    dtypes: Sequence[str]
    providers: Callable[[str], list]  # device type -> [Provider]
    cpu_dtypes: Sequence[str] = ("float32",)  # default dtypes on CPU
    id_dims: Sequence[str] | None = None  # dims named in case ids (default: all)

    def cases(self, device: str, include_large: bool = False, dtypes: Sequence[str] | None = None):
        """Yields (Case, skip_reason) for one device type.

        ``dtypes`` overrides the defaults (on CPU, float32 only unless asked: low-precision CPU timings are
        not what the kernels are for, and they double a CPU run).
        """
        if dtypes is None:
            dtypes = self.cpu_dtypes if device == "cpu" else self.dtypes
        for shape in self.shapes:
            if device == "cuda" and not shape.gpu:
                continue
            skip = None
            if device == "cpu" and not shape.cpu and not include_large:
                skip = "GPU-sized case; run with --bench-large (pytest) or --large (compare.py) to time it on CPU"
            for dtype in dtypes:
                if shape.dtypes is not None and dtype not in shape.dtypes:
                    continue
                for provider in self.providers(device):
                    for pass_ in shape.passes:
                        yield Case(self.op, shape, dtype, provider, pass_), skip

    def group_name(self, shape: Shape, dtype: str, device: str, pass_: str) -> str:
        """Stable, readable name of the cases that compete: "short_attention[train-B2-N8192-fp32-cpu-fwd]"."""
        return f"{self.op}[{shape.name}-{shape.tag(self.id_dims)}-{DTYPE_TAGS[dtype]}-{device}-{pass_}]"


# ----------------------------------------------------------------------------------------------------------------
# Workload helpers


def autograd_passes(forward: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor]) -> dict:
    """fwd/bwd/full pass factories for a differentiable ``forward``.

    fwd: forward under torch.no_grad (no graph is recorded).
    bwd: backward only; the graph is built once and replayed with retain_graph=True.
    full: forward with graph + backward.
    Gradients go through torch.autograd.grad so nothing accumulates into .grad between repetitions.
    """
    wrt = list(wrt)

    def fwd_factory():
        def fwd():
            with torch.no_grad():
                forward()

        return fwd

    def bwd_factory():
        out = forward()
        grad_out = torch.randn_like(out)

        def bwd():
            torch.autograd.grad(out, wrt, grad_out, retain_graph=True)

        return bwd

    def full_factory():
        with torch.no_grad():
            grad_out = torch.randn_like(forward())

        def full():
            torch.autograd.grad(forward(), wrt, grad_out)

        return full

    return {"fwd": fwd_factory, "bwd": bwd_factory, "full": full_factory}


def channel_first_view(batch: int, channels: int, length: int, dtype, device, requires_grad=False) -> torch.Tensor:
    """[B, L, C] view of a contiguous [B, C, L] tensor, as a conv output gives after flatten(2).transpose(1, 2)."""
    base = torch.randn(batch, channels, length, dtype=dtype, device=device)
    return base.transpose(1, 2).requires_grad_(requires_grad)


def registered_backends(device: str) -> list:
    """annkernels backends to time on ``device``, reference first; [] when annkernels does not import.

    Triton on CPU only runs under its interpreter, whose timings say nothing about the kernel: left out.
    """
    try:
        import annkernels
    except ImportError:
        return []
    names = [name for name in annkernels.available_backends(device) if not (device == "cpu" and name == "triton")]
    if device == "cuda" and not torch.cuda.is_available():
        # Enumerate what a GPU build would offer so the skipped cases are listed on a CPU machine too.
        names = [name for name in ("cuda", "triton") if name not in names] + names
    return sorted(names, key=lambda name: name != REFERENCE)


class WorkloadCache:
    """Keeps the one live workload, reused across the passes of a provider; a new key frees the old one
    first, since the big GPU cases need the room."""

    def __init__(self) -> None:
        self._key = None
        self._workload = None

    def get(self, case: Case, device: torch.device) -> Workload:
        key = (case.op, case.shape.name, case.dtype, case.provider.name, device.type)
        if key != self._key:
            self.clear()
            self._workload = case.provider.make(case.shape, DTYPES[case.dtype], device)
            self._key = key
        return self._workload

    def clear(self) -> None:
        self._key = self._workload = None


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory


@dataclasses.dataclass
class Budget:
    """How long to time one pass. Repetitions = budget / estimated time, clamped to [min_reps, max_reps]."""

    warmup_s: float
    measure_s: float
    min_reps: int
    max_reps: int

    @classmethod
    def for_device(cls, device: torch.device, quick: bool = False) -> "Budget":
        if device.type == "cuda":
            return cls(0.02, 0.1, 10, 50) if quick else cls(0.05, 0.25, 10, 100)
        return cls(0.0, 0.05, 2, 3) if quick else cls(0.3, 2.0, 5, 50)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH = {}


def flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 by writing a buffer much larger than it (the buffer is allocated once)."""
    buffer = _L2_FLUSH.get(device)
    if buffer is None:
        buffer = _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    buffer.zero_()


def time_callable(fn: Callable[[], Any], device: torch.device, budget: Budget, cpu_times: list | None = None) -> list:
    """Per-call times in milliseconds after warm-up (see module docstring for the method).

    On CPU, ``cpu_times`` (if given) receives the process CPU time of each call: unlike wall time it
    excludes time the OS gave to other jobs, but it sums all threads (~threads x wall when parallel).
    """
    # On GPU the first call pays one-time costs (Triton compile and autotune, cuBLAS handles) and the
    # second one estimates the steady state; on CPU one call does both (its one-time costs are small,
    # and a CPU call can take seconds). These calls count as warm-up.
    if device.type == "cuda":
        fn()
        _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    for _ in range(max(0, int(budget.warmup_s / estimate) - 1)):
        fn()
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.measure_s / estimate)))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for begin, end in zip(starts, ends, strict=True):
            flush_l2(device)
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) for begin, end in zip(starts, ends, strict=True)]
    times = []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if cpu_times is not None:
            cpu_times.append((time.process_time() - start_cpu) * 1e3)
    return times


def back_to_back_ms(make_pass: Callable[[], Callable[[], Any]], device: torch.device, replays: int = 20,
                    batches: int = 5) -> tuple:
    """(median ms per call over ``batches`` batches of ``replays`` calls issued back to back, method).

    The pass is captured once in a CUDA graph and the graph replayed, so neither Python nor the per-call
    dispatch sits between kernels; operands stay in L2. ``make_pass`` (a Workload pass factory) is called
    on the capture stream: autograd runs a backward op on the stream of its forward op, so a "bwd" pass
    whose forward ran elsewhere would launch outside the capture. A pass that cannot be captured (a host
    sync, an uncapturable launch) is timed as plain consecutive calls instead, and the method says why.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn = make_pass()
        fn()  # capture needs its warm-up on the capture stream
    side.synchronize()
    method = "cuda-graph"
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            fn()
        run = graph.replay
    except Exception as exc:  # whatever stops the capture, the cold timing of the case stands
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        method = f"calls (graph capture failed: {reason})"
        run = fn
    torch.cuda.synchronize(device)  # a sticky device error from the capture surfaces here, not later
    run()
    per_call = []
    for _ in range(batches):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(replays):
            run()
        end.record()
        torch.cuda.synchronize(device)
        per_call.append(begin.elapsed_time(end) / replays)
    del graph, fn, run
    return statistics.median(per_call), method


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocation events carry +bytes, frees -bytes; the public FunctionEvent view folds allocations into
    # their op, so read the raw (timestamped) event list instead.
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and "CPU" in str(event.device_type())
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> tuple:
    """(peak bytes allocated by one call of ``fn`` above what was allocated before it, absolute peak or None).

    The absolute peak (GPU only) includes parameters, optimizer state and inputs: it is what mmsegmentation's
    "Mem (GB)" column reports for a training step.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        flush_buffer = _L2_FLUSH.get(device)  # the harness's own allocation, not the workload's
        return peak - before, peak - (flush_buffer.numel() if flush_buffer is not None else 0)
    return _cpu_peak_bytes(fn), None


def quantiles(times: Sequence[float]) -> dict:
    ordered = sorted(times)
    if len(ordered) == 1:
        return {"median_ms": ordered[0], "p20_ms": ordered[0], "p80_ms": ordered[0]}
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return {"median_ms": statistics.median(ordered), "p20_ms": cuts[1], "p80_ms": cuts[7]}


# ----------------------------------------------------------------------------------------------------------------
# Roofline


def device_peaks(device_name: str) -> dict | None:
    for key, peaks in DEVICE_PEAKS.items():
        if key in device_name:
            return peaks
    return None


def tf32_enabled() -> bool:
    precision = getattr(getattr(torch.backends.cuda.matmul, "fp32_precision", None), "lower", lambda: "")()
    return precision == "tf32" or bool(torch.backends.cuda.matmul.allow_tf32)


def floor_seconds(flops: float | None, nbytes: float | None, dtype: str, peaks: dict) -> tuple:
    """(floor in seconds, "memory"|"compute") from the device's bandwidth and the dtype's dense peak."""
    memory = nbytes / peaks["hbm_bytes_per_s"] if nbytes else 0.0
    if dtype in ("float16", "bfloat16"):
        rate = peaks["half_flops"]
    elif dtype == "float32":
        # Strict floor unless TF32 is switched on: a TF32 kernel beating it shows as fraction > 1.
        rate = peaks["tf32_flops"] if tf32_enabled() else peaks["fp32_flops"]
    else:
        rate = None
    compute = flops / rate if (flops and rate) else 0.0
    if memory == compute == 0.0:
        return None, None
    return (memory, "memory") if memory >= compute else (compute, "compute")


def add_roofline(row: dict, flops: float | None, nbytes: float | None, device_name: str) -> None:
    seconds = row["median_ms"] * 1e-3
    row["gflop"] = flops / 1e9 if flops else None
    row["min_mb"] = nbytes / 1e6 if nbytes else None
    row["achieved_tflops"] = flops / seconds / 1e12 if flops else None
    row["achieved_gbps"] = nbytes / seconds / 1e9 if nbytes else None
    peaks = device_peaks(device_name)
    if peaks is not None:
        floor, bound = floor_seconds(flops, nbytes, row["dtype"], peaks)
        if floor is not None:
            row["floor_us"] = floor * 1e6
            row["floor_bound"] = bound
            row["fraction_of_floor"] = floor / seconds


# ----------------------------------------------------------------------------------------------------------------
# Running cases


def empty_row(case: Case) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(op=case.op, shape=case.shape.name, dims=dict(case.shape.dims), dtype=case.dtype,
               backend=case.provider.name, kind=case.provider.kind)
    row["pass"] = case.pass_
    return row


def time_case(case: Case, device: torch.device, budget: Budget, workloads: WorkloadCache,
              memory: bool = True) -> tuple:
    """Times one case: (result row with status "ok", per-call times in ms).

    Raises Unsupported when the provider cannot run the case, and whatever the provider raises.
    """
    row = empty_row(case)
    row["cache"] = "cold-L2" if device.type == "cuda" else "hot"
    workload = workloads.get(case, device)
    if case.pass_ not in workload.passes:
        raise Unsupported(f"no {case.pass_} pass")
    fn = workload.passes[case.pass_]()
    cpu_times: list = []
    times = time_callable(fn, device, budget, cpu_times)
    row.update(quantiles(times))
    row.update(reps=len(times), status="ok", note=workload.note)
    row["cpu_time_ms"] = statistics.median(cpu_times) if cpu_times else None
    if device.type == "cuda":
        row["b2b_ms"], row["b2b_method"] = back_to_back_ms(workload.passes[case.pass_], device)
    if workload.items:
        row["items_per_s"] = workload.items / (row["median_ms"] * 1e-3)
    if memory:
        try:
            delta, total = peak_memory_bytes(fn, device)
        except AttributeError:  # the CPU method reads profiler internals; a torch change loses memory only
            delta, total = None, None
        row["peak_mem_mb"] = delta / 2**20 if delta is not None else None
        row["peak_mem_total_mb"] = total / 2**20 if total is not None else None
    add_roofline(row, workload.flops.get(case.pass_), workload.bytes.get(case.pass_), device_name(device))
    return row, times


def measure_case(case: Case, device: torch.device, budget: Budget, workloads: WorkloadCache,
                 memory: bool = True) -> dict:
    """``time_case`` that never raises: the row's status says ok, skipped or error (and why)."""
    try:
        return time_case(case, device, budget, workloads, memory)[0]
    except Unsupported as exc:
        status = f"skipped: {exc}"
    except Exception as exc:  # a broken provider must not take the whole matrix down; the row says why
        if device.type == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
            workloads.clear()
            torch.cuda.empty_cache()
        status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    row = empty_row(case)
    row["status"] = status
    return row


def run_cases(cases: Iterable[Case], device: torch.device, budget: Budget, memory: bool = True,
              deadline: float | None = None, on_row: Callable[[dict], None] | None = None) -> list:
    """Measures ``cases`` in order and returns their rows; cases left when time.monotonic() passes
    ``deadline`` are recorded as skipped. ``on_row`` sees each row as it is made (progress, saving)."""
    rows = []
    workloads = WorkloadCache()
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            row = empty_row(case)
            row["status"] = "skipped: time budget spent"
        else:
            torch.manual_seed(0)
            row = measure_case(case, device, budget, workloads, memory)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    workloads.clear()
    return rows


def attach_reference_ratios(rows: list) -> None:
    """speedup_vs_reference = reference median / row median, both from ``rows`` (one run)."""
    reference = {
        (r["op"], r["shape"], r["dtype"], r["pass"]): r
        for r in rows
        if r["backend"] == REFERENCE and r["status"] == "ok"
    }
    for row in rows:
        ref = reference.get((row["op"], row["shape"], row["dtype"], row["pass"]))
        if ref is None or row["status"] != "ok":
            continue
        row["reference_median_ms"] = ref["median_ms"]
        row["reference_peak_mem_mb"] = ref["peak_mem_mb"]
        row["speedup_vs_reference"] = ref["median_ms"] / row["median_ms"]


# ----------------------------------------------------------------------------------------------------------------
# Environment and result files


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Everything a reader needs to reproduce or discount a number."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD") or "none",
        "git_dirty_files": len((_git("status", "--porcelain") or "").splitlines()),
        "tf32_matmul": tf32_enabled(),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "timing": (
            "CUDA events per call, L2 flushed (cold); b2b: CUDA-graph replays back to back (hot)"
            if device.type == "cuda"
            else "perf_counter (hot)"
        ),
        "peak_memory_method": (
            "torch.cuda.max_memory_allocated delta"
            if device.type == "cuda"
            else "torch.profiler profile_memory: peak of live CPU tensor bytes"
        ),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import annkernels

        env["annkernels_backends"] = list(annkernels.available_backends(device.type))
    except Exception as exc:  # recorded, not fatal: peers still run
        env["annkernels_backends"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return env


def device_slug(env: dict) -> str:
    text = env["device"].lower()
    for junk in ("(r)", "(tm)", "nvidia", "cpu @", "processor", "graphics"):
        text = text.replace(junk, " ")
    slug = "-".join(part for part in "".join(c if c.isalnum() or c == "." else " " for c in text).split())
    return slug[:48] or env["device_type"]


def result_document(rows: list, env: dict, config: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex,
        "env": env,
        "config": config,
        "fields": list(ROW_FIELDS),
        "rows": rows,
    }


def write_json(document: dict, path: str) -> None:
    def clean(value):  # JSON has no NaN/inf
        return None if isinstance(value, float) and not math.isfinite(value) else value

    document = dict(document, rows=[{k: clean(v) for k, v in row.items()} for row in document["rows"]])
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")


def format_row(row: dict) -> str:
    """One line for stdout while a run is in progress."""
    head = f"{row['op']:<16} {row['shape']:<12} {row['dtype']:<9} {row['backend']:<16} {row['pass']:<5} "
    if row["status"] != "ok":
        return head + row["status"]
    return (
        head + f"{row['median_ms']:10.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]"
        + (f"  b2b {row['b2b_ms']:.4f} ms" if row["b2b_ms"] is not None else "")
        + (f"  mem {row['peak_mem_mb']:.1f} MiB" if row["peak_mem_mb"] is not None else "")
    )
