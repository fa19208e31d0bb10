"""Ahead-of-time compilation of every Triton kernel for the H100/H200 (sm_90), without a GPU.

The interpreter runs the kernels' math on CPU but accepts code the GPU compiler rejects (dot shapes,
layouts, shared-memory overflow, dtype rules that differ between Triton versions), and says nothing
about speed. Here the launchers run at ANN's key shapes on the meta device with every kernel launch
recorded instead of run; each recorded launch is then lowered to PTX and a cubin for sm_90 with the
argument specialization Triton would give it at run time (16-byte aligned pointers, integers that are
1 or multiples of 16) and the autotune config it would use untimed (the first that fits), in every
dtype. The checks, on ptxas's report and the PTX:
  - shared memory within the per-block limit, and no register spills at ANN's S in fp16/bf16/fp32
    (fp64, which exists for gradcheck, and S = 1024, the widest supported score row, are printed);
  - every product on tensor cores (mma/wgmma) except fp64's;
  - at their default configs, the attention kernels load every global operand (Q, K, V, dO and the
    backward workspaces) through asynchronous copies (cp.async or TMA), none synchronously;
  - every address offset is 64-bit where a tensor may hold 2^31 elements or more (see
    test_offsets_are_64_bit).

Compilation runs in a subprocess with TRITON_INTERPRET and the autotune switch unset (the interpreter
flag is read when ``@triton.jit`` runs, and the conftest sets both for the whole test session), and
with an empty Triton cache, so that ptxas runs for every case.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[1]
SM90_MAX_SHARED_PER_BLOCK = 227 * 1024
SM90_SMS = 132  # H100 SXM and H200: the launchers size their grids by this
DTYPES = ("bf16", "fp16", "fp32", "fp64")
TORCH_DTYPES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TRITON_DTYPES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
                 "int32": "i32"}
ANN_KEYS = 110
# (name, op, arguments): B=2, N=8192 (a 64 x 128 map), Dk = Dv = 256, channel-first as ANN's blocks pass them;
# the widest score row the attention kernels support; and the pool at [2, 256, 64, 128].
SHAPES = (
    ("attention", "short_attention", dict(batch=2, queries=8192, keys=ANN_KEYS, key_dim=256, value_dim=256)),
    ("attention-widest-keys", "short_attention", dict(batch=1, queries=2048, keys=1024, key_dim=64, value_dim=64)),
    ("pool", "pyramid_pool", dict(batch=2, channels=256, height=64, width=128, scales=(1, 3, 6, 8))),
)
ATTENTION_KERNELS = ("_short_attention_forward_kernel", "_short_attention_backward_rows_kernel",
                     "_short_attention_backward_keys_kernel")
PRODUCT_KERNELS = ATTENTION_KERNELS + ("_pyramid_pool_forward_kernel", "_pyramid_pool_backward_kernel")
SPILL_STORES = re.compile(r"(\d+) bytes spill stores")
# A synchronous global load in PTX (cp.async and TMA are separate instructions).
SYNC_GLOBAL_LOAD = re.compile(r"^\s*(@%p\d+\s+)?ld\.global\b", re.MULTILINE)
ASYNC_COPY = re.compile(r"\bcp\.async\b")


def _channel_first(torch, batch, rows, dim, dtype):
    return torch.empty((batch, dim, rows), dtype=dtype, device="meta").transpose(1, 2)


def _record_launches(op: str, dtype: str, shape: dict) -> list[dict]:
    """Run ``op``'s forward and backward launchers on meta tensors, recording each kernel launch (kernel
    name, its arguments as Triton would specialize them, and the configs autotune would consider)."""
    import torch

    from annkernels.triton import common, pyramid_pool, short_attention

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            fn = _jit_function(kernel)
            named = dict(zip(fn.arg_names, args, strict=False)) | kwargs
            if hasattr(kernel, "configs"):
                configs = kernel.early_config_prune(kernel.configs, named)
                # The launcher's arguments plus the untimed default config are the real launch.
            else:
                configs = [None]
            launches.append({"kernel": fn.__name__, "args": _describe(named), "configs": [
                None if c is None else kernel.configs.index(c) for c in configs]})

        return run

    kernels = [getattr(module, name) for module in (common, pyramid_pool, short_attention)
               for name in dir(module) if name.endswith("_kernel")]
    with contextlib.ExitStack() as stack:
        for kernel in kernels:
            stack.enter_context(_patched(kernel, "run", recorder(kernel)))
        for module in (common, pyramid_pool, short_attention):
            stack.enter_context(_patched(module, "target_programs", lambda device: SM90_SMS))
        if op == "short_attention":
            query = _channel_first(torch, shape["batch"], shape["queries"], shape["key_dim"], torch_dtype)
            key = _channel_first(torch, shape["batch"], shape["keys"], shape["key_dim"], torch_dtype)
            value = _channel_first(torch, shape["batch"], shape["keys"], shape["value_dim"], torch_dtype)
            out, lse = short_attention.short_attention_forward(query, key, value, shape["key_dim"] ** -0.5)
            short_attention.short_attention_backward(torch.empty_like(out), query, key, value, out, lse, 0.0625)
        else:
            x = torch.empty((shape["batch"], shape["channels"], shape["height"], shape["width"]), dtype=torch_dtype,
                            device="meta")
            out = pyramid_pool.pyramid_pool_forward(x, list(shape["scales"]))
            pyramid_pool.pyramid_pool_backward(torch.empty_like(out), list(shape["scales"]), shape["height"],
                                               shape["width"])
    return launches


@contextlib.contextmanager
def _patched(owner, name, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def _describe(named: dict) -> dict:
    """Launch arguments as JSON: tensors as their Triton pointer type, the rest as values."""
    import torch

    described = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            described[name] = {"pointer": TRITON_DTYPES[str(value.dtype).removeprefix("torch.")]}
        elif isinstance(value, (bool, int, float, tuple, str)) or value is None:
            described[name] = value
        else:
            raise TypeError(f"{name}: cannot describe {type(value).__name__}")
    return described


def _cases(default_only: bool) -> list[dict]:
    """One compile case per distinct recorded launch and config: the default config at the key shapes in
    every dtype (the widest score row in bf16 and fp32 only, fp16 compiles as bf16 there), or every
    runnable config everywhere (fp64 up to its 512 keys)."""
    cases = {}
    for shape_name, op, shape in SHAPES:
        dtypes = DTYPES
        if shape_name == "attention-widest-keys":
            # fp64 takes at most 512 keys on a GPU (the launcher refuses more: shared memory).
            dtypes = ("bf16", "fp32") if default_only else ("bf16", "fp16", "fp32")
        for dtype in dtypes:
            for launch in _record_launches(op, dtype, shape):
                configs = launch["configs"][:1] if default_only else launch["configs"]
                for config in configs:
                    case = {"shape": shape_name, "dtype": dtype, "kernel": launch["kernel"], "args": launch["args"],
                            "config": config, "default": config == launch["configs"][0]}
                    cases.setdefault(json.dumps([case["kernel"], dtype, launch["args"], config]), case)
    return list(cases.values())


def _jit_function(kernel):
    """The JITFunction under an autotuner, or ``kernel`` itself."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def _kernel(name: str):
    from annkernels.triton import common, pyramid_pool, short_attention

    for module in (common, pyramid_pool, short_attention):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def _compile(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = _kernel(case["kernel"])
    fn = _jit_function(kernel)
    config = None if case["config"] is None else kernel.configs[case["config"]]
    options = {"num_warps": 4, "num_stages": 3} if config is None else {"num_warps": config.num_warps,
                                                                      "num_stages": config.num_stages}
    constexprs = dict(config.kwargs) if config is not None else {}
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        value = case["args"].get(param.name, constexprs.get(param.name))
        if param.is_constexpr:
            constexprs[param.name] = tuple(value) if isinstance(value, list) else value
            signature[param.name] = "constexpr"
        elif isinstance(value, dict):
            # torch allocations are 16-byte aligned, as Triton's specialization assumes at run time.
            signature[param.name] = "*" + value["pointer"]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value == 1:
            constexprs[param.name] = 1
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    # Triton prints ptxas's -v report (registers, spill stores) to stdout when asked to.
    triton.knobs.nvidia.dump_ptxas_log = True
    ptxas_log = io.StringIO()
    label = {k: case[k] for k in ("shape", "dtype", "kernel", "default")} | {"config": str(config)}
    try:
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                                attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as error:  # reported per case by the test
        return label | {"error": f"{type(error).__name__}: {error}"}
    spills = SPILL_STORES.findall(ptxas_log.getvalue())
    if not spills:
        return label | {"error": "no ptxas report:\n" + ptxas_log.getvalue()[-1000:]}
    ptx = compiled.asm["ptx"]
    return label | {
        "shared": compiled.metadata.shared,
        "registers": int(re.findall(r"Used (\d+) registers", ptxas_log.getvalue())[-1]),
        "spill_bytes": sum(int(n) for n in spills),
        "seconds": round(time.perf_counter() - start, 2),
        "tensor_cores": bool(re.search(r"\b(wgmma|mma)\.", ptx)),
        "async_copies": len(ASYNC_COPY.findall(ptx)),
        "sync_global_loads": len(SYNC_GLOBAL_LOAD.findall(ptx)),
        "has_dot": case["kernel"] in PRODUCT_KERNELS,
        "narrow_offsets": _narrow_offsets(compiled.asm["ttir"]),
    }


NARROW_ADDPTR = re.compile(r"tt\.addptr [^:]*: (tensor<\S*>|!tt\.ptr<\S*>), (tensor<[0-9x]*)?i32\b")


def _narrow_offsets(ttir: str) -> int:
    """Pointer additions with 32-bit offsets (scalar or tensor) in the TTIR."""
    return len(NARROW_ADDPTR.findall(ttir))


def _compile_in_subprocess(full: bool) -> list[dict]:
    from annkernels.triton.common import AUTOTUNE_SWITCH

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", AUTOTUNE_SWITCH)}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="annkernels-aot-")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [sys.executable, __file__] + (["--full"] if full else [])
    result = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['shape']} {r['dtype']} {r['config']}"


def _check(results: list[dict]) -> None:
    failures = [r for r in results if "error" in r]
    assert not failures, "\n".join(f"{_name(r)}: {r['error']}" for r in failures)
    too_big = [r for r in results if r["shared"] > SM90_MAX_SHARED_PER_BLOCK]
    assert not too_big, "\n".join(f"{_name(r)}: {r['shared']} B shared" for r in too_big)
    spilling = [r for r in results if r["spill_bytes"]]
    for r in spilling:
        print(f"{_name(r)}: {r['spill_bytes']} B spilled")
    not_allowed = [r for r in spilling if r["shape"] != "attention-widest-keys" and r["dtype"] != "fp64"]
    assert not not_allowed, "\n".join(f"{_name(r)}: {r['spill_bytes']} B spilled" for r in not_allowed)
    scalar = [r for r in results if r["has_dot"] and not r["tensor_cores"] and r["dtype"] != "fp64"]
    assert not scalar, "\n".join(f"{_name(r)}: no mma/wgmma in PTX" for r in scalar)
    synchronous = [r for r in results if r["kernel"] in ATTENTION_KERNELS and r["shape"] == "attention"
                   and r["default"] and r["dtype"] != "fp64" and (r["sync_global_loads"] or not r["async_copies"])]
    assert not synchronous, "\n".join(f"{_name(r)}: {r['sync_global_loads']} synchronous global loads, "
                                      f"{r['async_copies']} async copies" for r in synchronous)


@pytest.fixture(scope="module")
def default_results():
    return _compile_in_subprocess(full=False)


def test_default_configs_compile_for_sm90_on_tensor_cores_with_async_copies(default_results):
    results = default_results
    kernels = {r["kernel"] for r in results}
    assert set(ATTENTION_KERNELS) <= kernels and "_pyramid_pool_backward_kernel" in kernels
    _check(results)


def test_offsets_are_64_bit(default_results):
    # Query-sized tensors (N * D) and feature maps (C * H * W) can pass 2^31 elements; every pointer
    # addition in every kernel takes a 64-bit offset, so none can wrap. (An interpreter run at that size
    # needs more than 4 GiB; tests/test_short_attention.py runs a strided view past 2^31 instead.)
    narrow = [r for r in default_results if r.get("narrow_offsets")]
    assert not narrow, "\n".join(f"{_name(r)}: {r['narrow_offsets']} 32-bit pointer offsets" for r in narrow)


@pytest.mark.slow
def test_every_runnable_config_compiles_for_sm90():
    _check(_compile_in_subprocess(full=True))


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"
    cases = _cases(default_only="--full" not in sys.argv)
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile, cases))
    import triton

    for r in results:
        outcome = r.get("error") or (f"{r['registers']} regs, {r['shared']} B shared, {r['spill_bytes']} B spilled, "
                                     f"mma {r['tensor_cores']}, {r['async_copies']} cp.async, "
                                     f"{r['sync_global_loads']} ld.global, {r['narrow_offsets']} i32 offsets")
        print(f"triton {triton.__version__}", _name(r), outcome, r.get("seconds"), file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
