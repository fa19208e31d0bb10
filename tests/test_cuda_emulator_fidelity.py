"""The emulator fails where a GPU would, on the things compute-sanitizer-style checks of plain loads and stores
miss: asynchronous copies (<cuda_pipeline_primitives.h>) that are never waited for, committed or aligned;
vector loads and stores not aligned to their size, which the host runs (or crashes on) where a GPU faults;
WMMA pointers and leading dimensions without the 256-bit alignment load/store_matrix_sync need; and code that
reads fragment elements by position, whose placement CUDA leaves unspecified. It also counts the shared-memory
wavefronts (bank conflicts) that the static report's shared term reads. Each check has a probe kernel
(tests/simt/probes) with a correct variant that must pass and buggy variants that must fail, by a checker
report or a wrong result. nvcc compiles the same probes, so the emulator's headers keep the toolkit's
signatures.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cuda_emulated import SKIP

pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"emulator unavailable: {SKIP}")

TILE = 256
PROBES = sorted((Path(__file__).resolve().parent / "simt" / "probes").glob("*.cu"))


def test_nvcc_compiles_the_probes(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    proc = subprocess.run([nvcc, "-c", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Werror",
                           "all-warnings", "-odir", str(tmp_path), *map(str, PROBES)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on the probes:\n{proc.stderr}"


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
    (8, "a copy past the launch's dynamic shared memory", "shared out of bounds: .* write of 16 bytes"),
]


@pytest.mark.parametrize("variant, what, report", [b for b in ASYNC_BUGS], ids=[b[1] for b in ASYNC_BUGS])
def test_async_copy_bug_is_reported(async_copy, variant, what, report):
    from simt import EmulatorError

    with pytest.raises(EmulatorError, match=report) as caught:
        _staged_sum(async_copy, variant)
    print(f"{what}: {caught.value}")


# Pattern of probes/bank_conflicts.cu -> wavefronts of its store (and of its load, the same), and what they
# would be without bank conflicts (one per phase: 128 bytes of lanes).
BANK_PATTERNS = [
    (0, "consecutive words", 1, 1),
    (1, "words 32 apart, one bank", 32, 1),
    (2, "a column of a 33-word padded tile", 1, 1),
    (3, "consecutive 16-byte vectors", 4, 4),
    (4, "consecutive halves, two per word", 1, 1),
    (5, "a column of halves in 36-word rows", 4, 1),
]


@pytest.mark.parametrize("pattern, what, wavefronts, conflict_free", BANK_PATTERNS, ids=[p[1] for p in BANK_PATTERNS])
def test_shared_wavefronts_count_bank_conflicts(pattern, what, wavefronts, conflict_free):
    from simt.probe import Probe

    probe = Probe("bank_conflicts").count_shared_wavefronts()
    try:
        out = torch.full((32,), float("nan"))
        (launch,) = probe.run("probe_bank_conflicts", pattern, out, outputs=[("out", out)])
    finally:
        probe.count_shared_wavefronts(False)
    torch.testing.assert_close(out, torch.arange(32.0), rtol=0, atol=0)
    assert (launch.shared_requests, launch.shared_wavefronts, launch.shared_conflict_free_wavefronts) == (
        2, 2 * wavefronts, 2 * conflict_free), (what, launch)


@pytest.fixture(scope="module")
def vector_access():
    from simt.probe import Probe

    return Probe("vector_access")


def _vector_copy(probe, variant):
    values = torch.arange(4 * 32 + 4, dtype=torch.float32)
    out = torch.full_like(values, float("nan"))
    probe.run("probe_vector_access", variant, values, out, inputs=[("in", values)], outputs=[("out", out)])
    return values, out


def test_aligned_vector_accesses_pass(vector_access):
    values, out = _vector_copy(vector_access, 0)
    torch.testing.assert_close(out[:128], values[:128], rtol=0, atol=0)


VECTOR_BUGS = [
    (1, "a 16-byte global load one float off", "misaligned access: .*global read of 16 bytes"),
    (2, "a 16-byte shared store two floats off", "misaligned access: .*shared write of 16 bytes"),
    (3, "a 16-byte global store three floats off", "misaligned access: .*global write of 16 bytes"),
]


@pytest.mark.parametrize("variant, what, report", VECTOR_BUGS, ids=[b[1] for b in VECTOR_BUGS])
def test_misaligned_vector_access_is_reported(vector_access, variant, what, report):
    from simt import EmulatorError

    with pytest.raises(EmulatorError, match=report) as caught:
        _vector_copy(vector_access, variant)
    print(f"{what}: {caught.value}")


@pytest.fixture()
def wmma():
    from simt.probe import Probe

    probe = Probe("wmma")
    yield probe
    probe.scramble_fragments(1)  # the runtime's default, for the tests that follow


def _aligned(tensor):
    assert tensor.data_ptr() % 32 == 0, "the probe needs 32-byte aligned buffers"
    return tensor


def _tile_product(probe, variant):
    """Runs the WMMA probe; returns (its output, the expected output)."""
    torch.manual_seed(0)
    a, b = (_aligned(torch.randn(16, 16).half()) for _ in range(2))
    c = _aligned(torch.randn(16, 16))
    out = _aligned(torch.full((16 * 16 + 8,), float("nan")))
    probe.run("probe_wmma", variant, a, b, c, out, inputs=[("a", a), ("b", b), ("c", c)], outputs=[("out", out)])
    expected = 2 * (a.double() @ b.double()) + c.double()
    if variant == 5:  # the product, rounded to half, times B again
        expected = expected.float().half().double() @ b.double()
    return out[:256].view(16, 16).double(), expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wmma_correct_use_passes_in_every_placement(wmma, seed):
    out, expected = _tile_product(wmma.scramble_fragments(seed), 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


PLACEMENT_BUGS = [(3, "C added to x[e] by assumed position"),
                  (5, "accumulator reused elementwise as a matrix_a fragment")]


@pytest.mark.parametrize("variant, what", PLACEMENT_BUGS, ids=[b[1] for b in PLACEMENT_BUGS])
def test_wmma_placement_bug_passes_in_identity_placement_only(wmma, variant, what):
    out, expected = _tile_product(wmma.scramble_fragments(0), variant)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    for seed in (1, 2):
        out, expected = _tile_product(wmma.scramble_fragments(seed), variant)
        error = (out - expected).abs().max().item()
        print(f"{what}, placement seed {seed}: max error {error:.3g}")
        assert error > 1.0, f"{what}: a scrambled fragment placement does not change the result"


WMMA_BUGS = [
    (1, "matrix_a loaded from 16 bytes into its tile", r"load_matrix_sync: pointer 0x[0-9a-f]+ is not 256-bit"),
    (2, "ldm of 20 halves", "load_matrix_sync: ldm 20 is not a multiple of 16 bytes"),
    (4, "accumulator stored from 16 bytes past the start of out", "store_matrix_sync: pointer .* is not 256-bit"),
]


@pytest.mark.parametrize("variant, what, report", WMMA_BUGS, ids=[b[1] for b in WMMA_BUGS])
def test_wmma_alignment_bug_is_reported(wmma, variant, what, report):
    from simt import EmulatorError

    with pytest.raises(EmulatorError, match=report) as caught:
        _tile_product(wmma, variant)
    print(f"{what}: {caught.value}")


@pytest.mark.parametrize("fragment_seed", [0, 2])
def test_attention_kernels_hold_in_other_fragment_placements(fragment_seed):
    """The emulated suite runs in placement 1; the real kernels must not depend on that one either."""
    from simt import Emulator
    from test_cuda_emulated import _check_attention_fp32

    torch.manual_seed(0)
    emulator = Emulator(fragment_seed=fragment_seed)
    try:
        _check_attention_fp32(emulator, (2, 91, 110, 32, 24), "channel_first")
    finally:
        emulator.configure()  # the runtime is shared: back to the default placement for the tests that follow
