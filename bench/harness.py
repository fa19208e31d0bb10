"""The benchmark harness: case matrix, the one timing loop, the result row and the result file.

A bench module describes an op with an ``OpBench``: named shapes, dtypes and providers. A provider turns
(shape, dtype, device) into a ``Workload``: a zero-argument callable per pass. The providers of one shape,
dtype and pass form a group, and a group is timed by ``time_group``, the one timing loop:

  * every provider runs once to warm up (compiles, autotune, lazy initialisation, first-touch pages);
  * then rounds: each round calls every provider once, in an order rotated by the round, so a burst of load
    on a shared machine hits every provider alike. The per-round ratio reference time / provider time is
    the stable measure; each row keeps its per-round times, so any two rows of a group can be paired.
  * CPU: time.perf_counter and the process CPU time around each call (operands stay in cache: "hot").
  * GPU: CUDA events around each call, with the L2 evicted before each call ("cold").

Peak memory is one extra call per provider, outside the timed rounds (on CPU it is also the warm-up call):
the peak above what was allocated before the call (GPU: torch.cuda.max_memory_allocated; CPU: the torch
profiler's allocation events, whose running sum peaks at the live tensor bytes; tracemalloc cannot see torch
allocations).
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
from typing import Any, Callable, NamedTuple, Sequence

import torch

SCHEMA_VERSION = 3  # 3: typed rows with per-round times and paired ratios, one file per suite
REFERENCE = "reference"
PASSES = ("fwd", "bwd", "full")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_TAGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


class Unsupported(Exception):
    """Raised by a provider that cannot run a case (dtype, device, pass); its row is recorded as skipped."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One named problem size; ``dims`` feed the providers. ``cpu``/``gpu`` say where it runs by default."""

    name: str
    dims: dict
    passes: tuple = PASSES
    cpu: bool = True
    gpu: bool = True
    dtypes: tuple | None = None  # restricts the op's dtypes for this shape (the paper's setting is fp32 only)

    def tag(self, keys: Sequence[str] | None = None) -> str:
        """Compact, stable form of (some of) the dims for case ids: "B2-N8192"; text values stand alone."""
        keys = self.dims if keys is None else keys
        return "-".join(str(self.dims[k]) if isinstance(self.dims[k], str) else f"{k}{self.dims[k]}" for k in keys)


@dataclasses.dataclass
class Workload:
    """``passes`` maps a pass name to a factory returning the callable to time (so "bwd" builds its graph
    once, outside the timed calls); ``flops``/``bytes`` per pass give achieved TFLOP/s and GB/s."""

    passes: dict
    flops: dict = dataclasses.field(default_factory=dict)
    bytes: dict = dataclasses.field(default_factory=dict)
    items: int | None = None  # images per call, for images/s
    note: str | None = None  # what the provider chose for this case (e.g. which SDPA backend)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[Shape, torch.dtype, torch.device], Workload]
    kind: str = "backend"  # "backend": an annkernels backend; "peer": a competitor or a baseline


class Case(NamedTuple):
    """One timed unit: an op's pass for one shape, dtype and provider."""

    op: str
    shape: Shape
    dtype: str
    provider: Provider
    pass_: str

    def group(self, device: str) -> str:
        """The name of the cases that compete: "short_attention[train-B2-N8192-fp32-cpu-fwd]"."""
        return f"{self.op}[{self.shape.name}-{self.shape.tag()}-{DTYPE_TAGS[self.dtype]}-{device}-{self.pass_}]"


@dataclasses.dataclass
class OpBench:
    op: str
    shapes: Sequence[Shape]
    dtypes: Sequence[str]
    providers: Callable[[str], list]  # device type -> [Provider], the reference first
    cpu_dtypes: Sequence[str] = ("float32",)

    def cases(self, device: str, dtypes: Sequence[str] | None = None, large: bool = False) -> list:
        """Cases for one device type, grouped (a group's providers are adjacent). Shapes not meant for the
        device are left out unless ``large`` (GPU-sized shapes timed on a CPU)."""
        dtypes = dtypes or (self.cpu_dtypes if device == "cpu" else self.dtypes)
        providers = self.providers(device)
        cases = []
        for shape in self.shapes:
            if not (shape.cpu if device == "cpu" else shape.gpu) and not large:
                continue
            for dtype in dtypes:
                if shape.dtypes is None or dtype in shape.dtypes:
                    cases += [Case(self.op, shape, dtype, p, pass_) for pass_ in shape.passes for p in providers]
        return cases


@dataclasses.dataclass
class Row:
    """One provider's result in one group. Times in ms, memory in MiB; None where not measured."""

    op: str
    shape: str
    dims: dict
    dtype: str
    provider: str
    kind: str
    pass_: str
    status: str = "ok"  # ok | skipped: why | error: what
    times_ms: list = dataclasses.field(default_factory=list)  # one per round, in round order
    cpu_ms: list = dataclasses.field(default_factory=list)  # process CPU time per round (CPU runs)
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mib: float | None = None
    vs_reference: float | None = None  # median over rounds of reference time / this time
    vs_reference_p20: float | None = None
    vs_reference_p80: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    items_per_s: float | None = None
    note: str | None = None

    @classmethod
    def of(cls, case: Case, status: str = "ok") -> "Row":
        return cls(case.op, case.shape.name, dict(case.shape.dims), case.dtype, case.provider.name,
                   case.provider.kind, case.pass_, status)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------------------------------------------
# Workload helpers


def _random_like(out):
    """A random gradient for an output: a tensor, or a tuple of them (an op with several outputs)."""
    return tuple(torch.randn_like(t) for t in out) if isinstance(out, tuple) else torch.randn_like(out)


def autograd_passes(forward: Callable[[], Any], wrt: Sequence[torch.Tensor]) -> dict:
    """fwd (no_grad), bwd (the graph built once, replayed with retain_graph) and full (forward + backward)
    pass factories for a forward returning a tensor or a tuple of tensors. Gradients go through
    torch.autograd.grad, so nothing accumulates between calls."""
    wrt = list(wrt)

    def fwd():
        def run():
            with torch.no_grad():
                forward()

        return run

    def bwd():
        out = forward()
        grad_out = _random_like(out)
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)

    def full():
        with torch.no_grad():
            grad_out = _random_like(forward())
        return lambda: torch.autograd.grad(forward(), wrt, grad_out)

    return {"fwd": fwd, "bwd": bwd, "full": full}


def channel_first_view(batch: int, channels: int, length: int, dtype, device, requires_grad=False) -> torch.Tensor:
    """[B, L, C] view of a contiguous [B, C, L] tensor, as a conv output gives after flatten(2).transpose(1, 2)."""
    return torch.randn(batch, channels, length, dtype=dtype, device=device).transpose(1, 2).requires_grad_(
        requires_grad)


def registered_backends(device: str) -> list:
    """annkernels backends to time on ``device``, reference first. Triton on CPU runs only in its interpreter,
    whose timings say nothing about the kernel: left out. Without a GPU the CUDA list names the GPU backends
    anyway, so a CPU machine lists (and skips) the cases a GPU run would time."""
    import annkernels

    names = [name for name in annkernels.available_backends(device) if not (device == "cpu" and name == "triton")]
    if device == "cuda" and not torch.cuda.is_available():
        names += [name for name in ("cuda", "triton") if name not in names]
    return sorted(names, key=lambda name: name != REFERENCE)


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory


@dataclasses.dataclass
class Budget:
    """Rounds = measure_s / (estimated time of one round), clamped to [min_rounds, max_rounds]."""

    measure_s: float
    min_rounds: int
    max_rounds: int

    @classmethod
    def for_device(cls, device: torch.device, quick: bool = False) -> "Budget":
        if device.type == "cuda":
            return cls(0.1, 10, 30) if quick else cls(0.5, 20, 200)
        return cls(0.05, 2, 3) if quick else cls(3.0, 5, 30)


_L2_FLUSH: dict = {}


def _flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 by zeroing a buffer larger than any current L2 (50 MB H100, 60 MB H200)."""
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    _L2_FLUSH[device].zero_()


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple:
    """(wall ms, process CPU ms or None) of one call."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _flush_l2(device)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end), None
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def time_group(fns: dict, device: torch.device, budget: Budget, estimate_ms: float | None = None) -> dict:
    """Interleaved rounds over ``fns`` (name -> callable): name -> ([wall ms per round], [CPU ms per round]).

    Unless the caller has warmed every callable up and passes the time of one round (``estimate_ms``), one
    warm-up call each, whose times estimate a round. In round r the order is rotated by r.
    """
    names = list(fns)
    estimate = estimate_ms
    if estimate is None:
        estimate = sum(_timed_call(fns[name], device)[0] for name in names)
    rounds = int(min(budget.max_rounds, max(budget.min_rounds, budget.measure_s * 1e3 / max(estimate, 1e-3))))
    times: dict = {name: ([], []) for name in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            wall, cpu = _timed_call(fns[name], device)
            times[name][0].append(wall)
            if cpu is not None:
                times[name][1].append(cpu)
    return times


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Private touch point: the public FunctionEvent view folds allocations into their op, so the peak of live
    # bytes is read from the raw, timestamped allocation (+bytes) and free (-bytes) events.
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]" and "CPU" in str(event.device_type()))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def quantiles(values: Sequence[float]) -> tuple:
    """(median, 20th percentile, 80th percentile)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), cuts[1], cuts[7]


def paired_ratios(baseline: Row, row: Row) -> list:
    """baseline time / row time, round by round (both rows from one group, so the rounds pair up)."""
    return [b / t for b, t in zip(baseline.times_ms, row.times_ms, strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Measuring a group


def _error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _peak_memory_rows(fns: dict, rows: dict, device: torch.device) -> None:
    """Each row's peak memory; a callable that fails here gets an error row and leaves ``fns``."""
    for name in list(fns):
        try:
            rows[name].peak_mib = peak_memory_bytes(fns[name], device) / 2**20
        except AttributeError:  # the CPU method reads profiler internals: a torch change loses memory only
            rows[name].peak_mib = None
        except Exception as exc:
            rows[name].status = _error(exc)
            del fns[name]


def measure_group(cases: Sequence[Case], device: torch.device, budget: Budget, memory: bool = True) -> list:
    """Rows for the cases of one group (same op, shape, dtype and pass): built, timed together, compared with
    the group's reference. A provider that cannot run the case gets a skipped or error row; the others run."""
    rows, fns, workloads = {}, {}, {}
    for case in cases:
        row = rows[case.provider.name] = Row.of(case)
        torch.manual_seed(0)
        try:
            workload = case.provider.make(case.shape, DTYPES[case.dtype], device)
            if case.pass_ not in workload.passes:
                raise Unsupported(f"no {case.pass_} pass")
            fns[row.provider] = workload.passes[case.pass_]()
            workloads[row.provider] = workload
        except Unsupported as exc:
            row.status = f"skipped: {exc}"
        except Exception as exc:  # a broken provider must not take the group down; its row says why
            row.status = _error(exc)
    estimate_ms = None
    if memory and device.type == "cpu":
        # On CPU the memory call is also the warm-up call (at the paper's shape one call takes minutes). On GPU it
        # comes after the timing, so that autotuning's buffers are not counted.
        start = time.perf_counter()
        _peak_memory_rows(fns, rows, device)
        estimate_ms = (time.perf_counter() - start) * 1e3
    try:
        timed = time_group(fns, device, budget, estimate_ms) if fns else {}
    except Exception as exc:
        for name in fns:
            rows[name].status = _error(exc)
        timed = {}
    if memory and device.type == "cuda":
        _peak_memory_rows({name: fns[name] for name in timed}, rows, device)
        timed = {name: timed[name] for name in timed if rows[name].ok}
    for name, (wall, cpu) in timed.items():
        row, workload = rows[name], workloads[name]
        row.times_ms, row.cpu_ms = wall, cpu
        row.median_ms, row.p20_ms, row.p80_ms = quantiles(wall)
        row.note = workload.note
        seconds = row.median_ms * 1e-3
        flops, nbytes = workload.flops.get(row.pass_), workload.bytes.get(row.pass_)
        row.tflops = flops / seconds / 1e12 if flops else None
        row.gbps = nbytes / seconds / 1e9 if nbytes else None
        row.items_per_s = workload.items / seconds if workload.items else None
    reference = rows.get(REFERENCE)
    if reference is not None and reference.ok and reference.times_ms:
        for row in rows.values():
            if row.ok and row.times_ms:
                row.vs_reference, row.vs_reference_p20, row.vs_reference_p80 = quantiles(paired_ratios(reference, row))
    fns.clear()
    workloads.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def grouped(cases: Sequence[Case]) -> list:
    """Cases split into their groups, in order."""
    groups: dict = {}
    for case in cases:
        groups.setdefault((case.op, case.shape.name, case.dtype, case.pass_), []).append(case)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------------
# Environment and the result file


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


def _git(*args: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce or discount a number."""
    import annkernels

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "host": platform.node(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "git_commit": _git("rev-parse", "HEAD") or "none",
        "git_dirty_files": len(_git("status", "--porcelain").splitlines()),
        "annkernels_backends": list(annkernels.available_backends(device.type)),
        "timing": ("CUDA events per call, L2 evicted before each call (cold)" if device.type == "cuda"
                   else "perf_counter per call, operands in cache (hot)") + "; interleaved rounds",
        "peak_memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                        else "torch.profiler allocation events: peak of live CPU tensor bytes") + ", above the start",
    }
    if device.type == "cuda":
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def device_slug(device: str) -> str:
    text = device.lower()
    for junk in ("(r)", "(tm)", "nvidia", "cpu @", "processor", "graphics"):
        text = text.replace(junk, " ")
    words = "".join(c if c.isalnum() or c == "." else " " for c in text).split()
    return "-".join(words[:3]) or "cpu"


def finite(value):
    """JSON has no NaN or infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_results(path: str, env: dict, config: dict, rows: Sequence[Row]) -> None:
    document = {"schema_version": SCHEMA_VERSION, "env": env, "config": config,
                "rows": [{key: finite(value) for key, value in dataclasses.asdict(row).items()} for row in rows]}
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")


def read_results(path: str) -> tuple:
    """(env, config, [Row]) of a result file."""
    with open(path) as handle:
        document = json.load(handle)
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema {document.get('schema_version')}, this harness reads {SCHEMA_VERSION}")
    return document["env"], document["config"], [Row(**row) for row in document["rows"]]
