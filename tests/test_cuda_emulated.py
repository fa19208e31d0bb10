"""The CUDA kernels of csrc/cuda, run by the CPU SIMT emulator (tests/simt) against the float64 reference.

The emulator runs every launch the launchers make, on the paths the planning code picks for a device
profile (H100 and H200: 132 SMs, 227 KiB of opt-in shared memory; A100: 108 SMs, 163 KiB; hopper-4sm, Hopper's
shared memory on 4 SMs, so that small tests reach the persistent forward), and fails a test on
any checker report: global access outside the launch's tensors, shared-memory race or read of
never-written shared memory, bad launch configuration. Fiber order between barriers varies over the
tests (forward, reverse, seeded shuffle). Tolerances are the GPU tests' (tests/test_short_attention.py,
tests/test_pyramid_pool.py). Skipped without a C++ compiler or the CUDA toolkit's headers.
"""

import math
import shutil

import pytest
import torch
from test_pyramid_pool import FLOAT32_TOLERANCE as POOL_TOLERANCE
from test_pyramid_pool import SCALES, SHAPES
from test_short_attention import CASES
from test_short_attention import FLOAT32_TOLERANCE as ATTENTION_TOLERANCE

from annkernels.ops import reference

from conftest import assert_close, assert_within_reference_error

try:
    from simt import Emulator, build

    build.cuda_include_dir()
    SKIP = None if shutil.which(build.CXX) and shutil.which("readelf") else "no g++ or readelf"
except FileNotFoundError as error:
    SKIP = str(error)

pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"emulator unavailable: {SKIP}")
ORDERS = ["forward", "reverse", "shuffle"]


@pytest.fixture(scope="module")
def emulator():
    return Emulator()


def _make(shape, layout, dtype):
    batch, rows, dim = shape
    if layout == "channel_first":
        return torch.randn(batch, dim, rows, dtype=dtype).transpose(1, 2)
    return torch.randn(batch, rows, dim, dtype=dtype)


def _attention_inputs(case, layout, dtype=torch.float32):
    batch, n, s, dk, dv = case
    shapes = ((batch, n, dk), (batch, s, dk), (batch, s, dv))
    return [_make(shape, layout, dtype).requires_grad_(True) for shape in shapes]


def _attention_oracle(leaves, grad, scale):
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    out = reference.short_attention(*leaves64, scale)
    return (out, *torch.autograd.grad(out, leaves64, grad.double()))


def _attention_run(emulator, leaves, scale=None):
    scale = leaves[0].shape[-1] ** -0.5 if scale is None else scale
    out = emulator.short_attention(*leaves, scale)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    return scale, grad, (out, *grads)


NAMES = ("out", "grad_query", "grad_key", "grad_value")


def _check_attention_fp32(emulator, case, layout, scale=None, **tolerance):
    leaves = _attention_inputs(case, layout)
    scale, grad, actual = _attention_run(emulator, leaves, scale)
    for name, got, wanted in zip(NAMES, actual, _attention_oracle(leaves, grad, scale), strict=True):
        assert_close(got, wanted, name=f"{name} {case} {layout}", **(tolerance or ATTENTION_TOLERANCE))


@pytest.mark.parametrize("layout", ["channel_first", "contiguous"])
@pytest.mark.parametrize("index, case", [pytest.param(i, *param.values, id=param.id) for i, param in enumerate(CASES)])
def test_attention_fp32_matches_reference(emulator, index, case, layout):
    emulator.configure(order=ORDERS[index % 3], seed=index)
    _check_attention_fp32(emulator, case, layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
# Channel-first 16-bit operands load three ways: 16-byte vectors (N = 128), 2-entry words (S = 110, Dv = 40)
# and scalars (N = 91, S = 17); contiguous ones in vectors or scalars.
@pytest.mark.parametrize("case, layout", [((2, 91, 110, 32, 24), "channel_first"),
                                          ((2, 128, 110, 64, 40), "channel_first"),
                                          ((1, 64, 17, 24, 16), "channel_first"), ((1, 97, 17, 72, 72), "contiguous")])
def test_attention_half_precision_within_twice_reference_error(emulator, case, layout, dtype):
    emulator.configure(order="shuffle", seed=7)
    leaves = _attention_inputs(case, layout, dtype)
    scale, grad, actual = _attention_run(emulator, leaves)
    lowp_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    lowp_out = reference.short_attention(*lowp_leaves, scale)
    lowp = (lowp_out, *torch.autograd.grad(lowp_out, lowp_leaves, grad))
    for name, got, lowp_ref, wanted in zip(NAMES, actual, lowp, _attention_oracle(leaves, grad, scale), strict=True):
        assert got.dtype == dtype
        assert_within_reference_error(got, lowp_ref, wanted, f"{name} {dtype}")


def test_attention_explicit_scale_and_mixed_layouts(emulator):
    emulator.configure(order="reverse")
    leaves = [_make((2, 33, 16), "contiguous", torch.float32), _make((2, 50, 16), "channel_first", torch.float32),
              _make((2, 50, 8), "contiguous", torch.float32)]
    leaves = [t.requires_grad_(True) for t in leaves]
    scale, grad, actual = _attention_run(emulator, leaves, 0.7)
    for name, got, wanted in zip(NAMES, actual, _attention_oracle(leaves, grad, scale), strict=True):
        assert_close(got, wanted, name=name, **ATTENTION_TOLERANCE)


@pytest.mark.parametrize("seed", range(24))
def test_large_scores_do_not_overflow(emulator, seed):
    # tests/test_short_attention.py's case over many draws: scaled scores of several hundred, where a P
    # rebuilt from the fp32 log-sum-exp misses 1 for the dominant key and the gradients drift (the kernel
    # did that once and failed 24 of 40 draws). At these scores fp32 rounding of the scores alone moves
    # `out` by up to ~6e-4 (the CPU kernel misses the shared test's 2e-5 on 4 of 40 draws too), so `out`
    # gets the gradients' tolerance here.
    torch.manual_seed(seed)
    emulator.configure(order=ORDERS[seed % 3], seed=seed)
    leaves = _attention_inputs((1, 40, 110, 16, 16), "contiguous")
    with torch.no_grad():
        leaves[0].mul_(30)
        leaves[1].mul_(30)
    scale, grad, actual = _attention_run(emulator, leaves)
    for name, got, wanted in zip(NAMES, actual, _attention_oracle(leaves, grad, scale), strict=True):
        assert torch.isfinite(got).all(), name
        assert_close(got, wanted, name=name, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_backward_is_bitwise_deterministic_across_fiber_orders(emulator, dtype):
    # The key/value kernel's chunk partials are summed in a fixed order, so the fiber order must not change a bit.
    leaves = _attention_inputs((2, 600, 110, 32, 32), "channel_first", dtype)
    out = emulator.configure(order="forward").short_attention(*leaves)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    emulator.configure(order="shuffle", seed=3)
    second = torch.autograd.grad(out, leaves, grad)
    for name, a, b in zip(NAMES[1:], first, second, strict=True):
        assert torch.equal(a, b), name


# ---- the plan paths real shapes take ----


def _kernels(emulator, start):
    return [launch.kernel for launch in emulator.launches[start:]]


_CUDA_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


@pytest.mark.parametrize("device, block_m", [("a100", 64), ("h100", 16)])
def test_forward_query_tile_follows_the_sm_count(emulator, device, block_m):
    # ceil(3451 / 64) * 2 = 108 tiles: enough for every SM of an A100 (BM=64), not of an H100 (BM=16).
    # 3451 is not a multiple of either tile.
    emulator.configure(device=device, order="reverse")
    start = len(emulator.launches)
    _check_attention_fp32(emulator, (2, 3451, 50, 16, 8), "channel_first")
    forward = [k for k in _kernels(emulator, start) if k.startswith("short_attention_forward_kernel")]
    assert forward == [f"short_attention_forward_kernel<float, {block_m}>"]


# The persistent forward (K and V resident in shared memory, query chunks streamed by asynchronous copies) against
# the tiled one on the same inputs: same arithmetic in the same order, so the same bits. hopper-4sm gives each block
# several tiles at test sizes. Query chunks arrive as 16-byte vectors (N = 320), 4-byte words (N = 300) or scalar
# loads (N = 301, odd); K and V as words (S = 110) or scalar loads (S = 17); Dk = 72 leaves an 8-deep last chunk,
# Dv = 136 a second output pass 8 columns wide (in 16-bit types: fp32 K and V that wide overflow shared memory).
@pytest.mark.parametrize("case, dtype", [
    (case, dtype)
    for case in [(2, 320, 110, 72, 136), (2, 300, 110, 64, 40), (1, 301, 17, 40, 24), (3, 200, 128, 16, 8)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16) if case[4] <= 128 or dtype != torch.float32], ids=str)
def test_persistent_forward_gives_the_tiled_forward_bits(emulator, case, dtype):
    torch.manual_seed(sum(case))
    q, k, v = (t.detach() for t in _attention_inputs(case, "channel_first", dtype))
    scale = case[3] ** -0.5
    results = {}
    for device in ("hopper-4sm", "h200"):
        start = len(emulator.launches)
        results[device] = emulator.configure(device=device, order="shuffle", seed=2).attention_forward(q, k, v, scale)
        results[device + " kernels"] = _kernels(emulator, start)
    assert results["hopper-4sm kernels"] == [f"short_attention_forward_resident_kernel<{_CUDA_TYPES[dtype]}>"]
    assert results["h200 kernels"] == [f"short_attention_forward_kernel<{_CUDA_TYPES[dtype]}, 16>"]
    for name, resident, tiled in zip(("out", "logsumexp"), results["hopper-4sm"], results["h200"], strict=True):
        assert torch.equal(resident, tiled), name
    assert_close(results["h200"][0].double(), reference.short_attention(q.double(), k.double(), v.double(), scale),
                 name="out", atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)


def test_persistent_forward_with_gradients_matches_reference(emulator):
    emulator.configure(device="hopper-4sm", order="reverse")
    start = len(emulator.launches)
    _check_attention_fp32(emulator, (2, 300, 110, 64, 40), "channel_first")
    assert "short_attention_forward_resident_kernel<float>" in _kernels(emulator, start)


def test_real_shape_bf16_through_the_persistent_forward(emulator):
    # The 769 x 769 crop's 9409 queries in bf16 on an H200: 132 persistent blocks, 16 of them with two tiles, query
    # chunks in scalar batches (N is odd), K and V in 4-byte asynchronous copies; then the backward.
    emulator.configure(device="h200", order="shuffle", seed=11)
    torch.manual_seed(9409)
    leaves = _attention_inputs((1, 9409, 110, 256, 256), "channel_first", torch.bfloat16)
    start = len(emulator.launches)
    scale, grad, actual = _attention_run(emulator, leaves)
    assert _kernels(emulator, start)[0] == "short_attention_forward_resident_kernel<__nv_bfloat16>"
    lowp_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    lowp_out = reference.short_attention(*lowp_leaves, scale)
    lowp = (lowp_out, *torch.autograd.grad(lowp_out, lowp_leaves, grad))
    for name, got, lowp_ref, wanted in zip(NAMES, actual, lowp, _attention_oracle(leaves, grad, scale), strict=True):
        assert_within_reference_error(got, lowp_ref, wanted, f"{name} bf16 real shape")


# Which forward each key shape gets: the persistent one for channel-first 16-bit operands on Hopper, one block per
# SM (132 CTAs); the tiled one where its shared memory does not fit (fp32, an A100) or the operands are not all
# channel-first. No block runs: the plans only.
@pytest.mark.parametrize("device, dtype, layout, shape, kernel, grid", [
    ("h200", torch.bfloat16, "channel_first", (2, 8192), "short_attention_forward_resident_kernel<__nv_bfloat16>",
     (66, 2, 1)),
    ("h200", torch.float16, "channel_first", (1, 32768), "short_attention_forward_resident_kernel<__half>",
     (132, 1, 1)),
    ("h200", torch.bfloat16, "channel_first", (1, 9409), "short_attention_forward_resident_kernel<__nv_bfloat16>",
     (132, 1, 1)),
    ("h200", torch.bfloat16, "contiguous", (2, 8192), "short_attention_forward_kernel<__nv_bfloat16, 64>", (128, 2, 1)),
    ("h200", torch.float32, "channel_first", (2, 8192), "short_attention_forward_kernel<float, 64>", (128, 2, 1)),
    ("a100", torch.bfloat16, "channel_first", (2, 8192), "short_attention_forward_kernel<__nv_bfloat16, 64>",
     (128, 2, 1)),
], ids=str)
def test_forward_plan_at_the_key_shapes(emulator, device, dtype, layout, shape, kernel, grid):
    batch, queries = shape
    q, k, v = (_make(dims, layout, dtype) for dims in ((batch, queries, 256), (batch, 110, 256), (batch, 110, 256)))
    emulator.configure(device=device).run_blocks(0)
    try:
        start = len(emulator.launches)
        emulator.attention_forward(q, k, v, 256 ** -0.5)
    finally:
        emulator.run_blocks(None)
    (launch,) = emulator.launches[start:]
    assert (launch.kernel, tuple(launch.grid)) == (kernel, grid)


# The key/value GEMM over several 64-query steps per chunk, with a part-filled last step and last chunk.
@pytest.mark.parametrize("case", [(4, 300, 130, 8, 8), (3, 1100, 100, 40, 24)], ids=str)
def test_backward_with_several_query_steps_per_chunk(emulator, case):
    emulator.configure(device="h100", order="shuffle", seed=5)
    plan = emulator.attention_backward_plan(torch.float32, case)
    assert plan["rows_per_chunk"] > 64 and plan["chunks"] > 1 and plan["rows_per_chunk"] % 64 == 0, plan
    _check_attention_fp32(emulator, case, "contiguous")


def test_backward_key_value_grid_fills_an_h200_at_the_key_shapes(emulator):
    # Kernel B's grid (key tiles x column tiles x chunks x B) must fill the 132 SMs with one block each, no SM
    # taking two (which would double the launch's time), and its fp32 partials must stay L2-sized: the 60 MB
    # dK/dV workspace of the one-kernel backward is gone.
    emulator.configure(device="h200")
    for shape in [(2, 8192, 110, 256, 256), (1, 32768, 110, 256, 256), (1, 9409, 110, 256, 256)]:
        plan = emulator.attention_backward_plan(torch.bfloat16, shape)
        columns = 128  # [dK | dV] columns per block in 16-bit types
        blocks = math.ceil(plan["keys_padded"] / 64) * (math.ceil(plan["key_dim_padded"] / columns) +
                                                        math.ceil(plan["value_dim_padded"] / columns))
        assert 0.9 * 132 <= blocks * plan["chunks"] * shape[0] <= 132, (shape, plan)
        partial_bytes = plan["workspace_bytes"] - plan["partial_offset"]
        assert partial_bytes <= 8 << 20, (shape, plan)


def test_fp32_with_s_near_1024_uses_the_shared_memory_opt_in(emulator):
    emulator.configure(device="h100", order="forward")
    start = len(emulator.launches)
    _check_attention_fp32(emulator, (1, 40, 1000, 24, 16), "channel_first")
    big = [launch for launch in emulator.launches[start:] if launch.dynamic_smem > 48 * 1024]
    assert {launch.kernel.split("<")[0] for launch in big} == {"short_attention_forward_kernel",
                                                                "short_attention_backward_scores_kernel"}


def test_fp32_backward_with_s_near_1024_does_not_fit_an_a100(emulator):
    # Two fp32 score buffers of 16 x 1012 plus the staging area need 165 KiB; the A100 offers 163.
    emulator.configure(device="a100")
    with pytest.raises(RuntimeError, match="cudaError_t 1"):
        emulator.attention_backward_plan(torch.float32, (1, 40, 1000, 24, 16))
    assert emulator.attention_backward_plan(torch.bfloat16, (1, 40, 1000, 24, 16))["block_m"] == 16


# Shared memory of the attention kernels, one block per launch at B=2 (64-row query tiles) with S = 110: N = 8192
# takes the vector loaders, N = 9409 the scalar ones. Every layout's stores must be free of bank conflicts: a
# channel-first operand whose partner is not is stored column by column, one entry per lane per store, and
# unless lanes are spread over rows and banks (TileVectors, load_tile_scalars) each store takes 2-16 wavefronts
# (the loader before: 3-4x the conflict-free count; without the rotation of TileVectors: 1.2x here, 1.8x in the
# key/value kernel). What is left (under 10%) is the output and workspace staging. And when both operands are
# channel-first and aligned, their tiles keep that orientation, so they cost what channels-last ones cost.
_LAYOUTS = [("channel_first", "channel_first"), ("contiguous", "contiguous"), ("channel_first", "contiguous"),
            ("contiguous", "channel_first")]


def _shared_counts(emulator, dtype, queries, query_layout, key_layout):
    q = _make((2, queries, 256), query_layout, dtype)
    k, v = (_make((2, 110, 256), key_layout, dtype) for _ in range(2))
    start = len(emulator.launches)
    emulator.attention_forward(q, k, v, 256 ** -0.5)
    emulator.attention_backward(_make((2, queries, 256), query_layout, dtype), q, k, v, 256 ** -0.5)
    return {launch.kernel.split("_kernel")[0].replace("_resident", ""): launch for launch in emulator.launches[start:]
            if not launch.kernel.startswith("reduce")}


def _wavefronts_per_tile(launch, queries):
    # The persistent forward's first block runs ceil(tiles / blocks) 64-row query tiles; the other kernels' one.
    if "resident" not in launch.kernel:
        return launch.shared_wavefronts
    return launch.shared_wavefronts / math.ceil(math.ceil(queries / 64) / launch.grid[0])


@pytest.mark.parametrize("queries", [8192, 9409])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_attention_shared_memory_is_free_of_bank_conflicts(emulator, dtype, queries):
    emulator.configure(device="h200").run_blocks(1).count_shared_wavefronts()
    try:
        counts = {layouts: _shared_counts(emulator, dtype, queries, *layouts) for layouts in _LAYOUTS}
    finally:
        emulator.run_blocks(None).count_shared_wavefronts(False)
    for layouts, launches in counts.items():
        for kernel, launch in launches.items():
            assert launch.shared_wavefronts <= 1.1 * launch.shared_conflict_free_wavefronts, (layouts, kernel, launch)
    if queries == 8192:
        for kernel, launch in counts[_LAYOUTS[0]].items():
            if kernel != "short_attention_backward_key_value":  # its own loader, column stores whatever the layout
                channels_last = counts[_LAYOUTS[1]][kernel]
                assert _wavefronts_per_tile(launch, queries) <= _wavefronts_per_tile(channels_last, queries), (
                    kernel, launch, channels_last)


@pytest.mark.slow
def test_real_shape_end_to_end(emulator):
    # A 769 x 769 crop at stride 8 (97 x 97 = 9409 queries), ANN's S = 110 and channel counts; ~1.5 min.
    emulator.configure(device="h100", order="forward")
    _check_attention_fp32(emulator, (1, 9409, 110, 256, 256), "channel_first")


# ---- pyramid pooling ----


def _pool_check(emulator, x, scales):
    """((out, expected), (grad_x, expected_grad), grad) for one input."""
    x = x.requires_grad_(True)
    out = emulator.pyramid_pool(x, scales)
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    expected = reference.pyramid_pool(x64, list(scales))
    (expected_grad,) = torch.autograd.grad(expected, x64, grad.double())
    return (out, expected), (grad_x, expected_grad), grad


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("scales", SCALES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_pyramid_pool_matches_reference(emulator, shape, scales, channels_last):
    emulator.configure(order=ORDERS[SCALES.index(scales) % 3], seed=11)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for name, (got, wanted) in zip(("out", "grad_x"), _pool_check(emulator, x, scales)[:2], strict=True):
        assert_close(got, wanted, name=f"{name} {shape}", **POOL_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_pyramid_pool_other_dtypes(emulator, dtype):
    emulator.configure(order="shuffle", seed=2)
    scales = (1, 3, 6, 8)
    x = torch.randn(2, 8, 31, 37, dtype=dtype)
    out_pair, grad_pair, grad = _pool_check(emulator, x, scales)
    if dtype == torch.float64:
        for name, (got, wanted) in (("out", out_pair), ("grad_x", grad_pair)):
            assert_close(got, wanted, name=name, atol=1e-12, rtol=1e-12)
        return
    lowp_x = x.detach().clone().requires_grad_(True)
    lowp_out = reference.pyramid_pool(lowp_x, list(scales))
    (lowp_grad,) = torch.autograd.grad(lowp_out, lowp_x, grad)
    assert_within_reference_error(out_pair[0], lowp_out, out_pair[1], "out")
    assert_within_reference_error(grad_pair[0], lowp_grad, grad_pair[1], "grad_x")


# The backward's column groups: rows wider than one warp's 128 pixels, a width that leaves a part-filled last
# group (scalar stores), one that does not (vector stores), and the largest scale (bin indices up to 63).
@pytest.mark.parametrize("shape, scales", [((1, 2, 3, 261), (1, 3, 6, 8)), ((2, 1, 5, 132), (1, 3, 6, 8)),
                                           ((1, 1, 64, 130), (64,))], ids=str)
def test_pyramid_pool_backward_column_groups(emulator, shape, scales):
    emulator.configure(order="shuffle", seed=3)
    (_, _), (grad_x, expected_grad), _ = _pool_check(emulator, torch.randn(shape), scales)
    assert_close(grad_x, expected_grad, name=f"grad_x {shape}", **POOL_TOLERANCE)


def test_pyramid_pool_strided_grad_output_and_determinism(emulator):
    x = torch.randn(2, 5, 9, 11)
    grad = torch.randn(2, 110, 5).transpose(1, 2)
    first = emulator.configure(order="forward").pyramid_backward(grad, (1, 3, 6, 8), 9, 11)
    second = emulator.configure(order="reverse").pyramid_backward(grad, (1, 3, 6, 8), 9, 11)
    x64 = x.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.pyramid_pool(x64, [1, 3, 6, 8]), x64, grad.double())
    assert_close(first, expected, name="grad_x", **POOL_TOLERANCE)
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 2, 9, 11), (2, 20, 5, 13, 7)], ids=["B1-9x11", "B2-13x7"])
def test_pyramid_pool_pair_is_one_launch_per_direction_equal_to_each_map(emulator, shape, dtype):
    # The key map (NCHW) and the value source (channels_last, an offset view: its own tiling) in one grid.
    batch, first_channels, second_channels, height, width = shape
    emulator.configure(order="shuffle", seed=5)
    first = torch.randn(batch, first_channels, height, width, dtype=dtype)
    wide = torch.randn(batch, second_channels + 1, height, width, dtype=dtype).to(memory_format=torch.channels_last)
    second = wide[:, 1:]
    emulator.launches.clear()
    outs = emulator.pyramid_pair_forward(first, second, scales=(1, 3, 6, 8))
    assert [launch.kernel.split("<")[0].split()[-1] for launch in emulator.launches] == ["pyramid_pool_forward_kernel"]
    # Gradients as autograd hands them: one transposed, one expanded from a scalar (stride 0).
    grads = (torch.randn(batch, 110, first_channels, dtype=dtype).transpose(1, 2),
             torch.randn((), dtype=dtype).expand(batch, second_channels, 110))
    emulator.launches.clear()
    grad_inputs = emulator.pyramid_pair_backward(*grads, scales=(1, 3, 6, 8), height=height, width=width)
    assert [launch.kernel.split("<")[0].split()[-1] for launch in emulator.launches] == ["pyramid_pool_backward_kernel"]
    tolerance = POOL_TOLERANCE if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for x, out, grad, grad_input in zip((first, second), outs, grads, grad_inputs, strict=True):
        assert torch.equal(out, emulator.pyramid_forward(x, (1, 3, 6, 8)))
        assert torch.equal(grad_input, emulator.pyramid_backward(grad, (1, 3, 6, 8), height, width))
        x64 = x.double().requires_grad_(True)
        expected = reference.pyramid_pool(x64, [1, 3, 6, 8])
        (expected_grad,) = torch.autograd.grad(expected, x64, grad.double())
        assert_close(out, expected, name="out", **tolerance)
        assert_close(grad_input, expected_grad, name="grad_input", **tolerance)


def test_c_api_argtypes_come_from_the_launchers_signatures(emulator):
    """The ctypes side takes every entry point's parameter list from the library (capi.cpp derives it from the
    C++ types), so a Python call that misses a launcher's new parameter fails loudly instead of passing a stray
    value in its place."""
    forward = emulator._kernels.simt_short_attention_forward
    assert [t.__name__ for t in forward.argtypes] == [
        "c_int", "LP_c_long", *["c_void_p", "LP_c_long"] * 3, "c_float", "c_void_p", "LP_c_long", "c_void_p"]
    with pytest.raises(TypeError, match="arguments"):
        forward(0, None, None, None, None, None, None, None, 1.0, None, None)  # one argument short
