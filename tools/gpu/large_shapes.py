"""Correctness and determinism of the kernels at the sizes real runs use, against a float64 oracle.

    python3 -m tools.gpu.large_shapes                                   # cuda and triton on the GPU
    python3 -m tools.gpu.large_shapes --device cpu --backends cpu --sizes 577

short_attention at B = 1 and 2, N = 8192 (512x1024 crops), 9409 (769x769 crops) and 32768 (1024x2048
inference), S = 110, Dk = Dv = 256, with channel-first query, key and value as the APNB block passes them;
then pyramid_pool on the 512-channel K+V maps of the same runs. For every backend, dtype and size:
  * the output and every gradient are compared with the reference backend run in float64, by the tests'
    own rule (tools/oracle.py): the largest error at most twice that of the reference backend run in the
    same dtype, plus one ulp of the output's scale;
  * the kernel runs with torch.use_deterministic_algorithms(True), which fills fresh memory with NaN,
    so an output element it does not write fails the check;
  * the forward twice and the backward twice must give bitwise equal results.
One line per case is printed as it finishes. Cases not started by the Unix time in
ANNKERNELS_STEP_DEADLINE (set by tools/gpu/run_gpu.py) are counted as not run. Exit status: 1 if any case
failed, else 2 if some were not run, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

import annkernels
from tools import oracle

DEADLINE_ENV = "ANNKERNELS_STEP_DEADLINE"
KEYS, KEY_DIM, VALUE_DIM = 110, 256, 256
SCALES = (1, 3, 6, 8)
# (H, W) of the maps behind the attention sizes, N = H * W; 391 is an odd map for CPU runs.
MAPS = {8192: (64, 128), 9409: (97, 97), 32768: (128, 256), 391: (17, 23)}
POOL_CHANNELS = 512  # K and V pooled in one launch


@dataclasses.dataclass
class Result:
    name: str
    errors: dict  # tensor name -> (kernel error, limit)
    deterministic: bool
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.deterministic and all(e <= limit for e, limit in self.errors.values())

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.problem is not None:
            return f"{verdict} {self.name}: {self.problem}"
        parts = [f"{key} {error:.2e}{'<=' if error <= limit else '>'}{limit:.2e}"
                 for key, (error, limit) in self.errors.items()]
        deterministic = "yes" if self.deterministic else "NO"
        return f"{verdict} {self.name}: " + "  ".join(parts) + f"  deterministic={deterministic}"


def _forward_and_grads(fn, inputs: list) -> list:
    """[output, d input_0, d input_1, ...] of ``fn(*inputs)``, with one output gradient for every dtype:
    a seeded float64 draw, rounded to the output's dtype."""
    leaves = [tensor.detach().requires_grad_() for tensor in inputs]
    out = fn(*leaves)
    generator = torch.Generator(out.device).manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64, device=out.device)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def check(name: str, fn, reference_fn, inputs: list, names: list) -> Result:
    """Kernel ``fn`` against ``reference_fn`` in float64 and in the inputs' dtype, and against itself."""
    exact = _forward_and_grads(reference_fn, [tensor.double() for tensor in inputs])
    same_dtype = _forward_and_grads(reference_fn, inputs)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # fresh memory comes back NaN-filled: unwritten outputs show
    try:
        first = _forward_and_grads(fn, inputs)
        second = _forward_and_grads(fn, inputs)
    finally:
        torch.use_deterministic_algorithms(previous)
    errors = {}
    for key, kernel, low, wanted in zip(names, first, same_dtype, exact, strict=True):
        if torch.isnan(kernel).any():
            return Result(name, errors, False, f"{key} has {int(torch.isnan(kernel).sum())} NaN elements (unwritten?)")
        errors[key] = oracle.error_and_limit(kernel, low, wanted)
    deterministic = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    return Result(name, errors, deterministic)


def attention_case(backend: str, dtype: torch.dtype, batch: int, n: int, device: torch.device) -> Result:
    generator = torch.Generator(device).manual_seed(batch * 100003 + n)

    def channel_first(channels, length):
        return torch.randn(batch, channels, length, generator=generator, dtype=dtype, device=device).transpose(1, 2)

    inputs = [channel_first(KEY_DIM, n), channel_first(KEY_DIM, KEYS), channel_first(VALUE_DIM, KEYS)]
    scale = KEY_DIM**-0.5

    def kernel(q, k, v):
        return annkernels.short_attention(q, k, v, scale, backend=backend)

    def reference(q, k, v):
        return annkernels.short_attention(q, k, v, scale, backend="reference")

    name = f"short_attention {backend:<7} {str(dtype).removeprefix('torch.'):<8} B={batch} N={n}"
    return check(name, kernel, reference, inputs, ["out", "dQ", "dK", "dV"])


def pool_case(backend: str, dtype: torch.dtype, batch: int, n: int, device: torch.device) -> Result:
    height, width = MAPS[n]
    generator = torch.Generator(device).manual_seed(batch * 100003 + n)
    inputs = [torch.randn(batch, POOL_CHANNELS, height, width, generator=generator, dtype=dtype, device=device)]

    def kernel(x):
        return annkernels.pyramid_pool(x, SCALES, backend=backend)

    def reference(x):
        return annkernels.pyramid_pool(x, SCALES, backend="reference")

    name = f"pyramid_pool    {backend:<7} {str(dtype).removeprefix('torch.'):<8} B={batch} C={POOL_CHANNELS} " \
           f"{height}x{width}"
    return check(name, kernel, reference, inputs, ["out", "dx"])


def plan(args) -> list:
    """Cases in the order they run: every attention size first, largest-first within a size class."""
    sizes = [(batch, n) for n in args.sizes for batch in args.batches]
    cases = []
    for run in (attention_case, pool_case):
        for batch, n in sizes:
            if run is pool_case and n not in MAPS:
                continue
            for dtype in args.dtypes:
                for backend in args.backends:
                    cases.append((run, backend, getattr(torch, dtype), batch, n))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--batches", default="2,1")
    parser.add_argument("--sizes", default="8192,9409,32768", help="query counts N")
    parser.add_argument("--dtypes", default="bfloat16,float32,float16")
    args = parser.parse_args(argv)
    args.backends = args.backends.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sizes = [int(n) for n in args.sizes.split(",")]
    args.dtypes = args.dtypes.split(",")
    device = torch.device(args.device)
    # Deterministic mode makes cuBLAS insist on this, read at its first use: a matmul in the kernel's
    # deterministic section (torch glue around a kernel) would raise without it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Full fp32 matmuls in the reference, the yardstick of the fp32 rows.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    deadline = float(os.environ[DEADLINE_ENV]) if os.environ.get(DEADLINE_ENV) else None
    cases = plan(args)
    print(f"{len(cases)} cases on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})",
          flush=True)
    failed = not_run = 0
    for run, backend, dtype, batch, n in cases:
        if deadline is not None and time.time() > deadline:
            not_run += 1
            continue
        start = time.perf_counter()
        try:
            result = run(backend, dtype, batch, n, device)
        except Exception as exc:  # one broken case must not hide the others
            result = Result(f"{run.__name__} {backend} {dtype} B={batch} N={n}", {}, False,
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        failed += not result.passed
        print(f"{result.line()}  ({time.perf_counter() - start:.2f} s)", flush=True)
    ran = len(cases) - not_run
    print(f"large shapes: {ran - failed} passed, {failed} failed, {not_run} not run (time limit) of {len(cases)}",
          flush=True)
    return 1 if failed else 2 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
