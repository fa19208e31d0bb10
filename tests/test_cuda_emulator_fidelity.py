"""The emulator fails where a GPU would, on the things compute-sanitizer-style checks of plain loads and
stores miss: asynchronous copies (<cuda_pipeline_primitives.h>) that are never waited for, committed or
aligned; WMMA pointers and leading dimensions without the 256-bit alignment load/store_matrix_sync need;
and code that reads fragment elements by position, whose placement CUDA leaves unspecified. Each check
has a probe kernel (tests/simt/probes) with a correct variant that must pass and buggy variants that must
fail, by a checker report or a wrong result.
"""

import pytest
import torch
from test_cuda_emulated import SKIP

pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"emulator unavailable: {SKIP}")

TILE = 256


@pytest.fixture(scope="module")
def async_copy():
    from simt.probe import Probe

    return Probe("async_copy")


def _staged_sum(probe, variant):
    """Runs the async-copy probe; returns (its output, the expected output)."""
    torch.manual_seed(0)
    source = torch.randn(2 * TILE + 1)
    out = torch.full((TILE,), float("nan"))
    probe.run("probe_async_copy", variant, source, out, inputs=[("in", source)], outputs=[("out", out)])
    first, second = source[:TILE], source[TILE:2 * TILE].clone()
    if variant == 7:  # the second batch zero-fills the last 8 bytes of every 16-byte copy
        second.view(-1, 4)[:, 2:] = 0
    return out, (first + second).flip(0)


@pytest.mark.parametrize("variant", [0, 7], ids=["two batches", "zero fill"])
def test_async_copy_correct_use_passes(async_copy, variant):
    out, expected = _staged_sum(async_copy, variant)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


ASYNC_BUGS = [
    (1, "no __pipeline_wait_prior for the second batch", "async copy in flight"),
    (2, "no __pipeline_commit for the second batch", "async copy in flight"),
    (3, "wait_prior(2) where wait_prior(1) lands the first batch", "async copy in flight"),
    (4, "16-byte copies from a source 4 bytes off", "must both be 16-byte aligned"),
    (5, "no __syncthreads between the wait and reading other threads' copies", "async copy in flight|shared race"),
    (6, "a 12-byte copy", "the size must be 4, 8 or 16"),
]


@pytest.mark.parametrize("variant, what, report", [b for b in ASYNC_BUGS], ids=[b[1] for b in ASYNC_BUGS])
def test_async_copy_bug_is_reported(async_copy, variant, what, report):
    from simt import EmulatorError

    with pytest.raises(EmulatorError, match=report) as caught:
        _staged_sum(async_copy, variant)
    print(f"{what}: {caught.value}")
