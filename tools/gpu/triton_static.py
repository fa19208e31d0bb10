"""The Triton kernels of annkernels/triton read without a GPU, at the key shapes.

1. The launchers themselves run on meta tensors with the kernels replaced by recorders and the device
   taken as an H200 (132 programs to fill): that gives every launch's grid and arguments.
2. Each launch's candidate configs are the ones its autotune policy keeps (annkernels/triton/common.py:
   the early prune, every survivor timed on a GPU). Each is compiled ahead of time for sm_90
   (triton.compile + ASTSource + GPUTarget("cuda", 90, 32)) with the specialisations the JIT would make
   (integers equal to 1 as constants, 16-divisible integers and pointers marked so): ptxas's registers and
   spills, shared memory, PTX async copies (cp.async, cp.async.bulk/TMA) and tensor-core instructions
   (wgmma, mma), and the SASS loads in flight per load site (tools/gpu/sass.py).
3. One program per launch and config runs in the Triton interpreter on CPU tensors of the full size, with
   its loads and stores counted (bytes of unmasked elements): the traffic of one program.

Steps 1-2 run in a subprocess without TRITON_INTERPRET, step 3 in one with it (the flag is read when the
kernels are defined). Autotune picks the fastest config on a GPU, so the modelled time of a launch is that
of its best candidate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.gpu import cuda_static, model, sass

ROOT = cuda_static.ROOT
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
TRITON_POINTER = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILL_STORES = re.compile(r"(\d+) bytes spill stores")
# What the launchers' module-level names are replaced with while recording.
_KERNELS = {
    "annkernels.triton.short_attention": ("_pack_keys_values_kernel", "_short_attention_forward_kernel",
                                          "_short_attention_backward_rows_kernel",
                                          "_short_attention_backward_keys_kernel"),
    "annkernels.triton.pyramid_pool": ("_pyramid_pool_forward_kernel", "_pyramid_pool_backward_kernel"),
    "annkernels.triton.common": ("_sum_chunks_kernel",),
}


# ---- step 1: the launches ----

class _Recorder:
    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, self.kernel, grid, args, kwargs))


def _call_launcher(case: model.Case):
    import torch

    from annkernels.triton import pyramid_pool, short_attention

    dtype = getattr(torch, TORCH_DTYPES[case.dtype])
    meta = {"dtype": dtype, "device": "meta"}
    if case.op == "attention":
        batch, queries = case.shape
        keys, dim = model.ATTENTION_KEYS, model.ATTENTION_DIM

        def view(rows):  # channel-first [B, N, D] with stride (D*N, 1, N), as the ANN blocks pass them
            return torch.empty(batch, dim, rows, **meta).transpose(1, 2)

        q, k, v = view(queries), view(keys), view(keys)
        if case.direction == "forward":
            short_attention.short_attention_forward(q, k, v, dim ** -0.5)
        else:
            lse = torch.empty(batch, queries, dtype=torch.float32, device="meta")
            short_attention.short_attention_backward(view(queries), q, k, v, view(queries), lse, dim ** -0.5)
        return
    batch, channels, height, width = case.shape
    if case.direction == "forward":
        pyramid_pool.pyramid_pool_forward(torch.empty(case.shape, **meta), list(model.POOL_SCALES))
    else:
        bins = sum(s * s for s in model.POOL_SCALES)
        pyramid_pool.pyramid_pool_backward(torch.empty(batch, channels, bins, **meta), list(model.POOL_SCALES),
                                           height, width)


def record_launches(case: model.Case) -> list[tuple]:
    """(kernel name, autotuner, grid, args, kwargs) of every launch the launcher makes at this case."""
    import importlib

    calls, saved = [], []
    try:
        for module_name, names in _KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, _Recorder(getattr(module, name), name, calls))
            if hasattr(module, "target_programs"):
                saved.append((module, "target_programs", module.target_programs))
                module.target_programs = lambda device: model.SM_COUNT
        _call_launcher(case)
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
    return calls


# ---- step 2: compile the candidates ----

def _specialise(fn, args, kwargs, config) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, named arguments) the JIT would compile for these arguments."""
    import torch

    named = dict(zip(fn.arg_names, args, strict=False))  # constexprs come as keywords
    named.update(kwargs)
    constexprs = {**{k: v for k, v in kwargs.items()}, **config.kwargs}
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        value = named.get(param.name, constexprs.get(param.name))
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_POINTER[str(value.dtype).removeprefix("torch.")]
            attrs[(index,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif isinstance(value, int) and not param.do_not_specialize and value == 1:
            signature[param.name] = "constexpr"
            constexprs[param.name] = 1
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {param.name}={value!r}")
    return signature, constexprs, attrs, named


def _grid(grid, named, config) -> list[int]:
    size = grid({**named, **config.kwargs}) if callable(grid) else grid
    return list(size) + [1] * (3 - len(size))


def _kernel(name: str):
    """The autotuned kernel object a launcher calls ``name``."""
    import importlib

    module = next(importlib.import_module(m) for m, names in _KERNELS.items() if name in names)
    return getattr(module, name)


def _compile_job(job: tuple) -> dict:
    name, signature, constexprs, attrs, num_warps, num_stages = job
    try:
        return _compile(_kernel(name).fn, signature, constexprs, attrs, num_warps, num_stages)
    except Exception as error:  # reported in the table
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def _compile(fn, signature, constexprs, attrs, num_warps, num_stages) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas's -v report goes to stdout (only when ptxas runs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    if not _REGISTERS.search(log.getvalue()):
        raise RuntimeError("no ptxas report (a Triton cache hit?): " + log.getvalue()[-500:])
    ptx = compiled.asm["ptx"]
    registers = _REGISTERS.findall(log.getvalue())
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([cuda_static.cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    functions = sass.parse(dump)
    code = max(functions.values(), key=len)
    static = cuda_static.summarize(fn.__name__, "triton", {
        "registers": int(registers[-1]) if registers else 0,
        "spill_stores": sum(int(n) for n in _SPILL_STORES.findall(log.getvalue())),
        "spill_loads": 0, "stack_bytes": 0, "static_smem": compiled.metadata.shared}, code)
    record = cuda_static_record(static)
    del record["load_sites"]  # the histogram is kept; the per-site list only matters for the CUDA gate
    copies, copy_bytes, copies_in_flight = sass.async_copies(code)
    record.update(
        async_copies=copies, async_copy_bytes=copy_bytes, async_copies_in_flight=round(copies_in_flight, 3),
        tf32=bool(re.search(r"\b(?:wgmma\.mma_async|mma\.sync)\S*\.tf32", ptx)),
        threads=32 * num_warps,
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
        cp_async_bulk=len(re.findall(r"\bcp\.async\.bulk\b", ptx)),
        wgmma_ptx=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        mma_ptx=len(re.findall(r"\bmma\.sync\b", ptx)),
    )
    return record


def cuda_static_record(kernel) -> dict:
    from tools.gpu.perf_report import kernel_record

    return kernel_record(kernel)


def compile_cases(cases: list[model.Case]) -> dict:
    """{case name: [launch: {kernel, candidates: [{config, grid, static facts, interpreter spec}]}]}."""
    from concurrent.futures import ProcessPoolExecutor

    import triton

    result, jobs = {}, {}
    for case in cases:
        launches = []
        for name, kernel, grid, args, kwargs in record_launches(case):
            named_args = dict(zip(kernel.fn.arg_names, args, strict=False))
            entries = []
            for config in kernel.early_config_prune(kernel.configs, named_args, **kwargs):
                signature, constexprs, attrs, named = _specialise(kernel.fn, args, kwargs, config)
                job = (name, signature, constexprs, attrs, config.num_warps, config.num_stages)
                key = repr(job)
                jobs.setdefault(key, job)
                entries.append({
                    "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
                    "grid": _grid(grid, named, config), "compile": key,
                    "spec": _interpreter_spec(args, kwargs, config),
                })
            launches.append({"kernel": name, "candidates": entries})
        result[case.name] = launches
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        compiled = dict(zip(jobs, pool.map(_compile_job, jobs.values()), strict=True))
    for launches in result.values():
        for launch in launches:
            for entry in launch["candidates"]:
                entry.update(compiled[entry.pop("compile")])
    return {"triton_version": triton.__version__, "cases": result}


def _interpreter_spec(args, kwargs, config) -> dict:
    """The launch's arguments as plain data, for the interpreter subprocess."""
    import torch

    described = []
    for value in args:
        if isinstance(value, torch.Tensor):
            span = 1 + sum((n - 1) * s for n, s in zip(value.shape, value.stride(), strict=True))
            described.append({"dtype": str(value.dtype).removeprefix("torch."), "span": span,
                              "shape": list(value.shape), "stride": list(value.stride())})
        else:
            described.append(value)
    return {"args": described, "kwargs": {**kwargs, **config.kwargs}, "num_warps": config.num_warps}


# ---- step 3: one program's traffic, in the interpreter ----

class _FirstProgramDone(Exception):
    pass


def count_program_bytes(kernel_name: str, spec: dict, grid: list[int]) -> dict:
    """Bytes one program (0, 0, 0) loads and stores, run in the interpreter at the full grid size."""
    import numpy as np
    import torch
    from triton.runtime import interpreter

    fn = _kernel(kernel_name).fn  # the JITFunction under the autotuner
    args = []
    for value in spec["args"]:
        if isinstance(value, dict):
            storage = torch.zeros(value["span"], dtype=getattr(torch, value["dtype"]))
            args.append(storage.as_strided(value["shape"], value["stride"]))
        else:
            args.append(value)
    counts = {"read": 0, "written": 0, "flops": 0}
    builder = interpreter.InterpreterBuilder
    original_load, original_store, original_index = (builder.create_masked_load, builder.create_masked_store,
                                                     builder.set_grid_idx)
    original_dot = builder.create_dot

    def load(self, ptrs, mask, *rest):
        counts["read"] += int(np.count_nonzero(mask.data)) * ptrs.get_element_ty().primitive_bitwidth // 8
        return original_load(self, ptrs, mask, *rest)

    def store(self, ptrs, value, mask, *rest):
        counts["written"] += int(np.count_nonzero(mask.data)) * ptrs.get_element_ty().primitive_bitwidth // 8
        return original_store(self, ptrs, value, mask, *rest)

    def dot(self, a, b, d, input_precision, *rest):
        # Products issued: a tf32x3 dot is three TF32 products.
        rows, depth = a.data.shape[-2:]
        split = re.search(r"x(\d+)$", str(input_precision).lower())
        split = int(split.group(1)) if split else 1
        counts["flops"] += 2 * rows * depth * b.data.shape[-1] * split
        return original_dot(self, a, b, d, input_precision, *rest)

    def set_index(self, x, y, z):
        if (x, y, z) != (0, 0, 0):
            raise _FirstProgramDone
        return original_index(self, x, y, z)

    kwargs = dict(spec["kwargs"])
    if "INTERPRET" in kwargs:
        kwargs["INTERPRET"] = True
    builder.create_masked_load, builder.create_masked_store, builder.set_grid_idx = load, store, set_index
    builder.create_dot = dot
    try:
        fn[tuple(grid)](*args, **kwargs)
    except Exception as error:  # the interpreter wraps our stop signal
        if not isinstance(error, _FirstProgramDone) and not isinstance(error.__cause__, _FirstProgramDone):
            raise
    finally:
        builder.create_masked_load, builder.create_masked_store, builder.set_grid_idx = (original_load,
                                                                                        original_store,
                                                                                        original_index)
        builder.create_dot = original_dot
    return counts


# ---- driver ----

def _subprocess(mode: str, payload: dict, interpret: bool) -> dict:
    from annkernels.triton.common import AUTOTUNE_SWITCH

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", AUTOTUNE_SWITCH)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # An empty Triton cache, so that ptxas runs (and reports) for every kernel.
    with tempfile.TemporaryDirectory(prefix="annkernels-perf-triton-") as triton_cache:
        env["TRITON_CACHE_DIR"] = triton_cache
        proc = subprocess.run([sys.executable, "-m", "tools.gpu.triton_static", mode], input=json.dumps(payload),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"tools.gpu.triton_static {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _cache_key(cases) -> str:
    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    for path in sorted((ROOT / "annkernels" / "triton").glob("*.py")) + [Path(__file__), Path(sass.__file__)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr(sorted(c.name for c in cases)).encode())
    return digest.hexdigest()[:20]


def analyse(cases: list[model.Case]) -> dict:
    """Steps 1-3 for every case, cached by the content of annkernels/triton, this tool and Triton's version."""
    entry = cuda_static.cache_root() / "triton" / f"{_cache_key(cases)}.json"
    if entry.exists():
        return json.loads(entry.read_text())
    compiled = _subprocess("compile", {"cases": [[c.op, c.direction, c.dtype, list(c.shape)] for c in cases]},
                           interpret=False)
    jobs = [{"kernel": launch["kernel"], "spec": cand["spec"], "grid": cand["grid"]}
            for launches in compiled["cases"].values() for launch in launches for cand in launch["candidates"]]
    counts = _subprocess("count", {"jobs": jobs}, interpret=True)["counts"]
    for launches in compiled["cases"].values():
        for launch in launches:
            for candidate in launch["candidates"]:
                candidate.update(counts.pop(0))
                del candidate["spec"]
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps(compiled))
    return compiled


def _candidate_cost(candidate: dict) -> model.LaunchCost:
    resident, _ = model.ctas_per_sm(candidate["registers"], candidate["threads"], candidate["static_smem"])
    if candidate.get("async_copies") and not candidate["global_loads"]:
        # Every global read is an asynchronous copy (LDGSTS): their width, and the copies sharing each wait.
        load_bytes, in_flight = candidate["async_copy_bytes"], candidate["async_copies_in_flight"]
    else:
        load_bytes, in_flight = candidate["mean_load_bytes"], candidate["mean_in_flight"]
    return model.LaunchCost(
        kernel=candidate["name"], ctas=math.prod(candidate["grid"]), ctas_per_sm=resident,
        loads_per_thread=candidate["read"] / candidate["threads"] / load_bytes, mean_in_flight=in_flight)


def _unit(candidate: dict, case: model.Case) -> str:
    # The interpreter counted tf32x3 products three times, so their unit is the plain TF32 rate.
    return model.unit_for(candidate["tensor_core"], case.dtype, tf32=candidate["tf32"], split3=False)


def _flops(candidate: dict) -> float:
    return math.prod(candidate["grid"]) * candidate["flops"]


def _time_alone(candidate: dict, case: model.Case) -> float:
    """Modelled time of one launch at one candidate config, as autotune would rank it."""
    global_bytes = math.prod(candidate["grid"]) * (candidate["read"] + candidate["written"])
    return model.modelled_time(case, [_candidate_cost(candidate)], global_bytes, _unit(candidate, case),
                               _flops(candidate))["time_s"]


def triton_report(cases: list[model.Case]) -> dict:
    """Per case: each launch's candidates with their static facts, and the modelled time of the op with each
    launch at its best candidate."""
    analysed = analyse(cases)
    report = {"triton_version": analysed["triton_version"], "cases": {}}
    for case in cases:
        launches = analysed["cases"][case.name]
        chosen, costs, global_bytes = [], [], 0.0
        for launch in launches:
            usable = [c for c in launch["candidates"] if "error" not in c]
            if not usable:
                report["cases"][case.name] = {"error": launch["candidates"][0]["error"], "launches": launches}
                break
            best = min(usable, key=lambda candidate, case=case: _time_alone(candidate, case))
            chosen.append(best)
            costs.append(_candidate_cost(best))
            global_bytes += math.prod(best["grid"]) * (best["read"] + best["written"])
        else:
            # The op's products run on the unit of its launch with the most of them (not a packing launch).
            unit = _unit(max(chosen, key=_flops), case)
            result = model.modelled_time(case, costs, global_bytes, unit, sum(_flops(c) for c in chosen))
            report["cases"][case.name] = {**result, "global_bytes": global_bytes, "minimal_bytes": case.minimal_bytes,
                                          "chosen": [c["config"] for c in chosen], "launches": launches}
    return report


def markdown(triton: dict) -> list[str]:
    lines = ["", f"## Triton kernels (sm_90, Triton {triton['triton_version']}), every candidate config", "",
             "The modelled time takes each launch at its best candidate (autotune times them all on a GPU).", "",
             "| case | kernel | config | grid | regs | spill B | smem | cp.async | TMA | wgmma | mma | "
             "loads in flight (hot sites) | global loads | one program read/written KB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in triton["cases"].items():
        for launch in case["launches"]:
            for c in launch["candidates"]:
                config = " ".join(f"{k}={v}" for k, v in c["config"].items())
                if "error" in c:
                    lines.append(f"| {name} | `{launch['kernel']}` | {config} | - | compile error: "
                                 f"{c['error'][:80]} |||||||||")
                    continue
                histogram = " ".join(f"{n}:{k}" for n, k in c["in_flight_histogram"].items()) or "-"
                widths = " ".join(f"{b}b:{n}" for b, n in c["global_loads"].items()) or "-"
                lines.append(f"| {name} | `{launch['kernel']}` | {config} | {'x'.join(map(str, c['grid']))} | "
                             f"{c['registers']} | {c['spill_stores']} | {c['static_smem']} | {c['cp_async']} | "
                             f"{c['cp_async_bulk']} | {c['wgmma_ptx']} | {c['mma_ptx']} | {histogram} | {widths} | "
                             f"{c['read'] / 1024:.0f} / {c['written'] / 1024:.0f} |")
    lines += ["", "## Triton model terms (µs, modelled)", "",
              "| case | bytes | compute (unit) | latency | chosen configs |", "|---|---|---|---|---|"]
    for name, case in triton["cases"].items():
        if "error" in case:
            lines.append(f"| {name} | compile error | | | |")
            continue
        chosen = "; ".join(" ".join(f"{k}={v}" for k, v in c.items()) for c in case["chosen"])
        lines.append(f"| {name} | {case['bytes_s'] * 1e6:.1f} | {case['compute_s'] * 1e6:.1f} ({case['unit']}) | "
                     f"{case['latency_s'] * 1e6:.1f} | {chosen} |")
    return lines


def _main() -> None:
    mode = sys.argv[1]
    payload = json.loads(sys.stdin.read())
    if mode == "compile":
        assert os.environ.get("TRITON_INTERPRET") != "1", "compile without the interpreter"
        cases = [model.Case(op, direction, dtype, tuple(shape)) for op, direction, dtype, shape in payload["cases"]]
        print(json.dumps(compile_cases(cases)))
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1", "count in the interpreter"
        print(json.dumps({"counts": [count_program_bytes(j["kernel"], j["spec"], j["grid"]) for j in payload["jobs"]]}))


if __name__ == "__main__":
    _main()
