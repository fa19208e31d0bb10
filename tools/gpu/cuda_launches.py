"""The launches the CUDA launchers make at a key shape, read by running them under the CPU emulator
(tests/simt) with an H200 profile and only the first block of each grid: the plan (grid, block, shared
memory) is the launcher's own choice, and the block's global traffic and shared-memory wavefronts (bank
conflicts included) are counted as it runs. One block of the
largest launch takes a few seconds, so full-size shapes are affordable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tools.gpu import cuda_static
from tools.gpu.cuda_static import type_label
from tools.gpu.model import ATTENTION_DIM, ATTENTION_KEYS, POOL_SCALES, Case

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _emulator():
    from tests.simt import Emulator  # built (or taken from its cache) on first use

    return Emulator(device="h200").run_blocks(1).count_shared_wavefronts()


def _run(emulator, case: Case) -> list:
    import torch

    dtype = getattr(torch, TORCH_DTYPES[case.dtype])
    if case.op == "attention":
        batch, queries = case.shape
        # Channel-first views [B, N, D] with stride (D*N, 1, N), as the ANN blocks pass them.
        def view(rows, dim):
            return torch.empty(batch, dim, rows, dtype=dtype).transpose(1, 2)

        q, k, v = view(queries, ATTENTION_DIM), view(ATTENTION_KEYS, ATTENTION_DIM), view(ATTENTION_KEYS, ATTENTION_DIM)
        start = len(emulator.launches)
        if case.direction == "forward":
            emulator.attention_forward(q, k, v, ATTENTION_DIM ** -0.5)
        else:
            emulator.attention_backward(view(queries, ATTENTION_DIM), q, k, v, ATTENTION_DIM ** -0.5)
        return emulator.launches[start:]
    batch, channels, height, width = case.shape
    start = len(emulator.launches)
    if case.direction == "forward":
        emulator.pyramid_forward(torch.empty(case.shape, dtype=dtype), POOL_SCALES)
    else:
        bins = sum(s * s for s in POOL_SCALES)
        emulator.pyramid_backward(torch.empty(batch, channels, bins, dtype=dtype), POOL_SCALES, height, width)
    return emulator.launches[start:]


def _cache_key(cases) -> str:
    from tests.simt import build

    digest = hashlib.sha256()
    for path in sorted(cuda_static.CUDA_DIR.iterdir()) + sorted((build.HERE).rglob("*")) + [Path(__file__)]:
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".cpp", ".py"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr(sorted(c.name for c in cases)).encode())
    return digest.hexdigest()[:20]


def launches(cases: list[Case]) -> dict[str, list[dict]]:
    """{case name: one dict per launch (kernel label, grid, threads, dynamic shared memory, one block's
    bytes read and written, its shared-memory wavefronts and WMMA fragment bytes, the bytes its asynchronous
    copies read and the waits that landed them, over its threads)}, cached by the content of csrc/cuda and the
    emulator."""
    entry = cuda_static.cache_root() / "launches" / f"{_cache_key(cases)}.json"
    if entry.exists():
        return json.loads(entry.read_text())
    emulator = _emulator()
    result = {}
    try:
        for case in cases:
            result[case.name] = [
                {"kernel": type_label(launch.kernel), "grid": list(launch.grid), "threads": launch.block[0] *
                 launch.block[1] * launch.block[2], "dynamic_smem": launch.dynamic_smem,
                 "block_read_bytes": launch.read_bytes, "block_written_bytes": launch.written_bytes,
                 "block_shared_wavefronts": launch.shared_wavefronts,
                 "block_fragment_shared_bytes": launch.fragment_shared_bytes,
                 "block_async_read_bytes": launch.async_read_bytes,
                 "block_async_landing_waits": launch.async_landing_waits}
                for launch in _run(emulator, case)
            ]
    finally:
        # The runtime library is shared with every other Emulator in this process.
        emulator.run_blocks(None).count_shared_wavefronts(False)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps(result, indent=1))
    return result
