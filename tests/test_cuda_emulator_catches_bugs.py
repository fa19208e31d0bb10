"""The emulator must catch real kernel bugs: each is planted in a scratch copy of short_attention.cu and
the emulated checks must fail on it, by a checker report or by a wrong result. A bug may be harmless on
some shapes (an overrun that lands in a row's padding): the suite fails if any run fails. Launch mistakes
(no shared-memory opt-in, too many threads, grid y too large) must be reported as bad launches.

All bugs go into one scratch copy behind a run-time switch (simt_planted_bug()), so a single extra
build serves every case; with the switch at 0 the copy is the real kernel and must pass.
"""

from pathlib import Path

import pytest
import torch
from test_cuda_emulated import SKIP, _check_attention_fp32

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"emulator unavailable: {SKIP}")

# (bug id, what is planted, text of short_attention.cu, replacement)
PLANTS = [
    (1, "removed __syncthreads before the operand tiles are overwritten",
     "      __syncthreads();  // the previous tiles are no longer read\n",
     "      if (simt_planted_bug() != 1) __syncthreads();  // the previous tiles are no longer read\n"),
    (2, "key mask off by one in the softmax row sum",
     "      if (lane + i * kWarpSize < keys) {\n        e[i] = exp2f(",
     "      if (lane + i * kWarpSize < keys + (simt_planted_bug() == 2)) {\n        e[i] = exp2f("),
    (3, "query mask off by one when storing an output tile",
     "    if (r < rows && c < cols) {\n      dst[r * row_stride",
     "    if (r < rows + (simt_planted_bug() == 3) && c < cols) {\n      dst[r * row_stride"),
    # Shifted right, not past the tile: the last entry lands in the row padding, so the bug cannot scribble
    # outside shared memory (the emulator reports such writes but cannot stop them).
    (4, "row-major operand tile stores shifted one vector to the right",
     "        *reinterpret_cast<Vector*>(dst + at.y * ld + at.x) = values[i];",
     "        *reinterpret_cast<Vector*>(dst + at.y * ld + at.x + (simt_planted_bug() == 4) * kEntries) = values[i];"),
    (5, "score accumulator fragment stored with the wrong layout",
     "acc[m][f], ld_out, wmma::mem_row_major);\n      }\n    }\n  }\n}",
     "acc[m][f], ld_out,\n                                simt_planted_bug() == 5 ? wmma::mem_col_major : "
     "wmma::mem_row_major);\n      }\n    }\n  }\n}"),
    (9, "scalar operand tile stores shifted one entry along the row",
     "      dst[at.x * ld + at.y] = values[i];",
     "      dst[at.x * ld + at.y + (simt_planted_bug() == 9)] = values[i];"),
    (10, "removed __syncthreads before the key/value kernel's next query step overwrites its tiles",
     "    __syncthreads();  // the previous step's tiles are no longer read\n",
     "    if (simt_planted_bug() != 10) __syncthreads();  // the previous step's tiles are no longer read\n"),
    (11, "the reduce drops the last chunk's partial",
     "        values[i] = c0 + i < chunks ? src[(c0 + i) * slot_elems] : 0.0f;",
     "        values[i] = c0 + i < chunks - (simt_planted_bug() == 11) ? src[(c0 + i) * slot_elems] : 0.0f;"),
    (12, "P and dS copied to the workspace with one row too few",
     "  for (int v = threadIdx.x; v < rows_valid * vectors_per_row; v += kThreads) {",
     "  for (int v = threadIdx.x; v < (rows_valid - (simt_planted_bug() == 12)) * vectors_per_row; v += kThreads) {"),
    (13, "the persistent forward waits for one query chunk too few",
     "    __pipeline_wait_prior(g + 1 < stream ? 1 : 0);",
     "    __pipeline_wait_prior(g + 1 < stream ? 1 + (simt_planted_bug() == 13) : 0);"),
    (14, "removed __syncthreads before the persistent forward refills a query chunk buffer",
     "    __syncthreads();  // chunk g's buffer has been read: chunk g + 2 may take it\n",
     "    if (simt_planted_bug() != 14) __syncthreads();  // chunk g's buffer has been read\n"),
    (15, "the persistent forward's blocks skip their last tile",
     "  const int tiles_here = static_cast<int>(ceil_div(tiles - static_cast<int>(blockIdx.x), gridDim.x));",
     "  const int tiles_here =\n      static_cast<int>(ceil_div(tiles - static_cast<int>(blockIdx.x), gridDim.x)) - "
     "(simt_planted_bug() == 15);"),
]
# Launch mistakes, each with a case that reaches it: (bug id, what, original, planted, case).
LAUNCH_PLANTS = [
    (6, "no shared-memory opt-in before a launch above 48 KiB",
     "  cudaError_t status = allow_dynamic_smem(short_attention_forward_kernel<T, BM>, smem);",
     "  cudaError_t status =\n      simt_planted_bug() == 6 ? cudaSuccess "
     ": allow_dynamic_smem(short_attention_forward_kernel<T, BM>, smem);",
     (1, 20, 1000, 16, 16)),
    (7, "a block of 2048 threads",
     "  return launch_kernel<reduce_chunks_kernel<T>>(blocks, kReduceThreads, 0, stream,",
     "  return launch_kernel<reduce_chunks_kernel<T>>(blocks, simt_planted_bug() == 7 ? 2048 : kReduceThreads, 0, "
     "stream,",
     (1, 20, 17, 16, 16)),
    (8, "batch above the grid's y limit let through",
     "  return shape.batch > 0 && shape.batch <= kMaxGridY &&",
     "  return shape.batch > 0 && (shape.batch <= kMaxGridY || simt_planted_bug() == 8) &&",
     (65536, 1, 1, 1, 1)),
]
# (case, layout, device profile): the last reaches the persistent forward (several tiles per block).
CASES = [((2, 91, 110, 32, 24), "contiguous", "h100"), ((1, 97, 17, 72, 72), "channel_first", "h100"),
         ((2, 300, 110, 64, 40), "channel_first", "hopper-4sm")]


def _scratch_copy():
    source = (ROOT / "csrc" / "cuda" / "short_attention.cu").read_text()
    anchor = '#include "short_attention.h"\n'
    assert source.count(anchor) == 1
    source = source.replace(anchor, anchor + '\nextern "C" int simt_planted_bug();\n')
    for _, what, original, planted, *_ in PLANTS + LAUNCH_PLANTS:
        assert source.count(original) == 1, f"cannot plant {what!r}: the kernel text changed"
        source = source.replace(original, planted)
    return source


@pytest.fixture(scope="module")
def planted():
    from simt import Emulator

    emulator = Emulator({"short_attention.cu": _scratch_copy()})
    yield emulator
    emulator.plant(0)


def test_scratch_copy_without_a_bug_passes(planted):
    planted.plant(0)
    for case, layout, device in CASES:
        _check_attention_fp32(planted.configure(device=device, order="forward"), case, layout)


@pytest.mark.parametrize("bug, what", [(bug, what) for bug, what, _, _ in PLANTS], ids=[p[1] for p in PLANTS])
def test_planted_bug_is_caught(planted, bug, what):
    planted.plant(bug)
    failures = []
    for order in ("forward", "shuffle"):
        for case, layout, device in CASES:
            torch.manual_seed(0)
            try:
                _check_attention_fp32(planted.configure(device=device, order=order, seed=1), case, layout)
            except AssertionError as error:  # EmulatorError is one too
                failures.append(f"{order} {case} {layout}: {str(error).splitlines()[0]}")
    print(f"{what}:\n  " + "\n  ".join(failures))
    assert failures, f"{what}: the emulated checks pass on the planted bug"


@pytest.mark.parametrize("bug, what, case", [(bug, what, case) for bug, what, _, _, case in LAUNCH_PLANTS],
                         ids=[p[1] for p in LAUNCH_PLANTS])
def test_planted_launch_bug_is_reported(planted, bug, what, case):
    from simt import EmulatorError

    planted.plant(bug)
    with pytest.raises(EmulatorError, match="bad launch") as caught:
        _check_attention_fp32(planted.configure(device="h100", order="forward"), case, "contiguous")
    print(f"{what}: {caught.value}")
