"""Ahead-of-time compilation of every Triton kernel for the H100 (sm_90), without a GPU.

The interpreter runs the kernels' math on CPU but accepts code the GPU compiler rejects (dot shapes,
layouts, shared-memory overflow). Here each kernel is lowered to PTX and a cubin for sm_90 with the
autotune configs it can run with, and the compiled shared memory is checked against the H100's
per-block limit; fp16/bf16 dots must lower to tensor-core instructions.

Compilation runs in a subprocess with TRITON_INTERPRET unset: the flag is read when ``@triton.jit``
runs, and the conftest sets it for the whole test session on machines without a GPU.
"""

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[1]
H100_MAX_SHARED_PER_BLOCK = 227 * 1024
# Half types first: the covering subset then compiles the wide S with tensor-core code (fastest).
DTYPES = ("bf16", "fp16", "fp32")
ANN_SCALES = (1, 3, 6, 8)  # S = 110
KEY_COUNTS = (110, 1024)  # ANN's S, and the widest score row the attention kernels support
# Kernel arguments that are fp32 whatever the input dtype (softmax statistics, dK/dV workspaces).
FP32_POINTERS = {"lse_ptr", "dk_partial_ptr", "dv_partial_ptr", "partial_ptr"}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _kernels():
    from annkernels.triton import pyramid_pool, short_attention

    return {
        "pyramid_pool_forward": pyramid_pool._pyramid_pool_forward_kernel,
        "pyramid_pool_backward": pyramid_pool._pyramid_pool_backward_kernel,
        "short_attention_forward": short_attention._short_attention_forward_kernel,
        "short_attention_backward": short_attention._short_attention_backward_kernel,
        "sum_chunks": short_attention._sum_chunks_kernel,
    }


def _key_block(num_keys: int) -> int:
    import triton

    return max(16, triton.next_power_of_2(num_keys))


def _launch_constexprs(name: str, num_keys: int) -> dict:
    """Constexprs the launchers pass, except the autotuned ones."""
    if name.startswith("pyramid_pool"):
        return {"SCALES": ANN_SCALES, "BLOCK_S": _key_block(sum(s * s for s in ANN_SCALES)), "INTERPRET": False}
    if name.startswith("short_attention"):
        return {"BLOCK_S": _key_block(num_keys), "INTERPRET": False}
    return {}


def _runnable_configs(kernel, name: str, dtype: str, num_keys: int) -> list:
    """The configs autotune would benchmark for these arguments (after its early prune)."""
    import torch

    query = torch.empty(0, dtype=getattr(torch, TORCH_DTYPES[dtype]))
    return kernel.early_config_prune(kernel.configs, {"q_ptr": query}, **_launch_constexprs(name, num_keys))


def _all_cases() -> list[tuple[str, str, int, int]]:
    """(kernel, dtype, num_keys, config index) for every runnable combination."""
    cases = []
    for name, kernel in _kernels().items():
        key_counts = KEY_COUNTS if name.startswith("short_attention") else KEY_COUNTS[:1]
        for dtype in DTYPES:
            for num_keys in key_counts:
                for config in _runnable_configs(kernel, name, dtype, num_keys):
                    cases.append((name, dtype, num_keys, kernel.configs.index(config)))
    return cases


def _covering_cases() -> list[tuple[str, str, int, int]]:
    """A subset of _all_cases compiling every (kernel, config), (kernel, dtype) and (kernel, S) once."""
    seen, chosen = set(), []
    for name, dtype, num_keys, config in _all_cases():
        facets = {(name, "config", config), (name, "dtype", dtype), (name, "keys", num_keys)}
        if not facets <= seen:
            seen |= facets
            chosen.append((name, dtype, num_keys, config))
    return chosen


def _compile(case: tuple[str, str, int, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    name, dtype, num_keys, config_index = case
    kernel = _kernels()[name]
    config = kernel.configs[config_index]
    fn = kernel.fn
    constexprs = {**_launch_constexprs(name, num_keys), **config.kwargs}
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            assert param.name in constexprs, f"{name}: no value for constexpr {param.name}"
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*fp32" if param.name in FP32_POINTERS else f"*{dtype}"
        elif param.name.startswith("scale"):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # reported per case by the test
        return {"case": case, "config": str(config), "error": f"{type(error).__name__}: {error}"}
    return {
        "case": case,
        "config": str(config),
        "shared": compiled.metadata.shared,
        "seconds": round(time.perf_counter() - start, 2),
        "tensor_cores": bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"])),
        "has_dot": "tl.dot" in fn.src or "_dot(" in fn.src,
    }


def _compile_in_subprocess(full: bool) -> tuple[list[dict], list[list]]:
    """(compile results, every runnable case), computed without the interpreter (which prunes configs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [sys.executable, __file__] + (["--full"] if full else [])
    result = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    return report["results"], report["all_cases"]


def _check(results: list[dict]) -> None:
    failures = [r for r in results if "error" in r]
    assert not failures, "\n".join(f"{r['case']} {r['config']}: {r['error']}" for r in failures)
    too_big = [r for r in results if r["shared"] > H100_MAX_SHARED_PER_BLOCK]
    assert not too_big, "\n".join(f"{r['case']} {r['config']}: {r['shared']} B shared" for r in too_big)
    # fp16/bf16 products must run on tensor cores (mma/wgmma); so do fp32 pooling products (tf32x3).
    scalar = [r for r in results if r["has_dot"] and not r["tensor_cores"]
              and (r["case"][1] != "fp32" or r["case"][0].startswith("pyramid_pool"))]
    assert not scalar, "\n".join(f"{r['case']} {r['config']}: no mma in PTX" for r in scalar)


def test_every_kernel_config_dtype_and_key_count_compiles_for_h100():
    results, all_cases = _compile_in_subprocess(full=False)
    compiled = {(r["case"][0], r["case"][3]) for r in results}
    assert compiled == {(name, c) for name, _, _, c in all_cases}, "a runnable config was not compiled"
    _check(results)


@pytest.mark.slow
def test_full_kernel_config_dtype_matrix_compiles_for_h100():
    results, all_cases = _compile_in_subprocess(full=True)
    assert len(results) == len(all_cases)
    _check(results)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"
    all_cases = _all_cases()
    cases = all_cases if "--full" in sys.argv else _covering_cases()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile, cases))
    for result in results:
        print(result["case"], result["config"], result.get("shared", result.get("error")), result.get("seconds"),
              file=sys.stderr)
    print(json.dumps({"results": results, "all_cases": all_cases}))


if __name__ == "__main__":
    main()
