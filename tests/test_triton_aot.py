"""Ahead-of-time compilation of every Triton kernel for the H100/H200 (sm_90), without a GPU.

The interpreter runs the kernels' math on CPU but accepts code the GPU compiler rejects (dot shapes,
layouts, shared-memory overflow, dtype rules that differ between Triton versions). Here each kernel is
lowered to PTX and a cubin for sm_90 with the autotune configs it can run with, in every dtype; the
compiled shared memory is checked against the per-block limit, fp16/bf16 dots must lower to
tensor-core instructions, and no config may spill registers at ANN's S in the dtypes that run for speed
(ptxas's report; the compiled kernel's metadata does not carry it). Two cases keep only the narrowest
tile and may spill, which the test prints: S = 1024, the widest supported score row, and fp64, which
exists for gradcheck (its backward spills under Triton 3.6 even at 16 x 16).

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
# Half types first: the covering subset then compiles the wide S with tensor-core code (fastest).
DTYPES = ("bf16", "fp16", "fp32", "fp64")
ANN_SCALES = (1, 3, 6, 8)  # S = 110
ANN_KEYS = 110
KEY_COUNTS = (ANN_KEYS, 1024)  # ANN's S, and the widest score row the attention kernels support
# Kernel arguments that are fp32 whatever the input dtype (softmax statistics), and workspaces that are
# fp32 for fp32 and half inputs, fp64 for fp64.
FP32_POINTERS = {"lse_ptr"}
WORKSPACE_POINTERS = {"dk_partial_ptr", "dv_partial_ptr", "partial_ptr"}
TORCH_DTYPES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SPILL_STORES = re.compile(r"(\d+) bytes spill stores")


def _kernels():
    from annkernels.triton import common, pyramid_pool, short_attention

    return {
        "pyramid_pool_forward": pyramid_pool._pyramid_pool_forward_kernel,
        "pyramid_pool_backward": pyramid_pool._pyramid_pool_backward_kernel,
        "short_attention_forward": short_attention._short_attention_forward_kernel,
        "short_attention_backward": short_attention._short_attention_backward_kernel,
        "sum_chunks": common._sum_chunks_kernel,
    }


def _launch_constexprs(name: str, num_keys: int) -> dict:
    """Constexprs the launchers pass, except the autotuned ones."""
    from annkernels.triton.common import padded_block

    if name.startswith("pyramid_pool"):
        return {"SCALES": ANN_SCALES, "BLOCK_S": padded_block(sum(s * s for s in ANN_SCALES)), "INTERPRET": False}
    if name.startswith("short_attention"):
        return {"BLOCK_S": padded_block(num_keys), "INTERPRET": False}
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
    """A subset of _all_cases: every (kernel, config, dtype) at ANN's S, where spills are checked, and
    every (kernel, S) once."""
    seen, chosen = set(), []
    for name, dtype, num_keys, config in _all_cases():
        facets = {(name, "keys", num_keys)}
        if num_keys == ANN_KEYS:
            facets.add((name, "config", config, dtype))
        if not facets <= seen:
            seen |= facets
            chosen.append((name, dtype, num_keys, config))
    return chosen


def _compile(case: tuple[str, str, int, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    name, dtype, num_keys, config_index = case
    workspace = "fp64" if dtype == "fp64" else "fp32"
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
            if param.name in FP32_POINTERS:
                signature[param.name] = "*fp32"
            elif param.name in WORKSPACE_POINTERS:
                signature[param.name] = f"*{workspace}"
            else:
                signature[param.name] = f"*{dtype}"
        elif param.name.startswith("scale"):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    start = time.perf_counter()
    # Triton prints ptxas's -v report (registers, spill stores) to stdout when asked to.
    triton.knobs.nvidia.dump_ptxas_log = True
    ptxas_log = io.StringIO()
    try:
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(
                triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
    except Exception as error:  # reported per case by the test
        return {"case": case, "config": str(config), "error": f"{type(error).__name__}: {error}"}
    spills = SPILL_STORES.findall(ptxas_log.getvalue())
    if not spills:
        return {"case": case, "config": str(config), "error": "no ptxas report:\n" + ptxas_log.getvalue()[-1000:]}
    return {
        "case": case,
        "config": str(config),
        "shared": compiled.metadata.shared,
        "spill_bytes": sum(int(n) for n in spills),
        "seconds": round(time.perf_counter() - start, 2),
        "tensor_cores": bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"])),
        "has_dot": "dot(" in fn.src,
    }


def _compile_in_subprocess(full: bool) -> tuple[list[dict], list[list]]:
    """(compile results, every runnable case), computed without the interpreter (which prunes configs)."""
    from annkernels.triton.common import AUTOTUNE_SWITCH

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", AUTOTUNE_SWITCH)}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="annkernels-aot-")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [sys.executable, __file__] + (["--full"] if full else [])
    result = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    return report["results"], report["all_cases"]


def _check(results: list[dict]) -> None:
    failures = [r for r in results if "error" in r]
    assert not failures, "\n".join(f"{r['case']} {r['config']}: {r['error']}" for r in failures)
    too_big = [r for r in results if r["shared"] > SM90_MAX_SHARED_PER_BLOCK]
    assert not too_big, "\n".join(f"{r['case']} {r['config']}: {r['shared']} B shared" for r in too_big)
    spilling = [r for r in results if r["spill_bytes"]]
    for r in spilling:
        print(f"{r['case']} {r['config']}: {r['spill_bytes']} B spilled")
    not_allowed = [r for r in spilling if r["case"][2] == ANN_KEYS and r["case"][1] != "fp64"]
    assert not not_allowed, "\n".join(f"{r['case']} {r['config']}: {r['spill_bytes']} B spilled" for r in not_allowed)
    # fp16/bf16 products must run on tensor cores (mma/wgmma); so do fp32 pooling products (tf32x3).
    # fp64 products, and fp32 attention products ("ieee"), are plain FMA.
    scalar = [r for r in results if r["has_dot"] and not r["tensor_cores"] and r["case"][1] != "fp64"
              and (r["case"][1] != "fp32" or r["case"][0].startswith("pyramid_pool"))]
    assert not scalar, "\n".join(f"{r['case']} {r['config']}: no mma in PTX" for r in scalar)


def test_every_kernel_config_dtype_and_key_count_compiles_for_sm90():
    results, all_cases = _compile_in_subprocess(full=False)
    compiled = {(r["case"][0], r["case"][3]) for r in results}
    assert compiled == {(name, c) for name, _, _, c in all_cases}, "a runnable config was not compiled"
    _check(results)


@pytest.mark.slow
def test_full_kernel_config_dtype_matrix_compiles_for_sm90():
    results, all_cases = _compile_in_subprocess(full=True)
    assert len(results) == len(all_cases)
    _check(results)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"
    all_cases = _all_cases()
    cases = all_cases if "--full" in sys.argv else _covering_cases()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile, cases))
    import triton

    for result in results:
        outcome = result.get("error") or f"{result['shared']} B shared, {result['spill_bytes']} B spilled"
        print(f"triton {triton.__version__}", result["case"], result["config"], outcome, result.get("seconds"),
              file=sys.stderr)
    print(json.dumps({"results": results, "all_cases": all_cases}))


if __name__ == "__main__":
    main()
