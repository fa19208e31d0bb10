"""The CUDA launchers of csrc/cuda, run on CPU tensors by the SIMT emulator (see runtime.cpp).

Emulator(...) builds (or takes from the cache) the kernels compiled for the emulator and calls the launchers
declared in pyramid_pool.h and short_attention.h on host memory, mirroring what the torch glue does on a GPU:
output layouts, fp32 log-sum-exp, the backward's plan and workspace. Outputs and the workspace start as NaN,
so an element a kernel forgets to write shows up. Any report of the checker (out-of-bounds access, load or
store not aligned to its size, shared-memory race or uninitialised read, bad launch, misaligned WMMA pointer
or ldm, misused asynchronous copy) raises EmulatorError. WMMA fragment elements sit on the lanes in a seeded
scrambled placement (fragment_seed; 0 keeps lane l on elements l, l + 32, ...), so a kernel that reads them by
position gives wrong results. probe.py runs the small kernels that show each check working.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from . import build

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}

_i64p = ctypes.POINTER(ctypes.c_int64)
_vp = ctypes.c_void_p

# ctypes types of capi.cpp's parameter codes. The library lists its entry points and each one's codes (derived
# from the C++ parameter types), so the argtypes below cannot drift from the launchers' signatures.
_PARAMETER_TYPES = {"i": ctypes.c_int, "f": ctypes.c_float, "l": _i64p, "n": ctypes.POINTER(ctypes.c_int),
                    "p": _vp, "P": ctypes.POINTER(_vp)}


class EmulatorError(AssertionError):
    """The emulator's checker found a problem in a kernel (the message lists every report)."""


@dataclass
class Launch:
    kernel: str
    grid: tuple
    block: tuple
    dynamic_smem: int
    read_bytes: int
    written_bytes: int
    # Shared memory, counted only after count_shared_wavefronts(True): the kernel's own warp requests, the
    # wavefronts (bank-conflict passes) they take and would take without conflicts, and the bytes of WMMA
    # fragment loads and stores.
    shared_requests: int = 0
    shared_wavefronts: int = 0
    shared_conflict_free_wavefronts: int = 0
    fragment_shared_bytes: int = 0
    # Asynchronous copies (cp.async): the global bytes they read (part of read_bytes) and the waits, summed over
    # threads, that landed at least one copy.
    async_read_bytes: int = 0
    async_landing_waits: int = 0


def set_fragment_seed(runtime, seed: int):
    """Seeds the placement of WMMA fragment elements across lanes (0: identity) in the emulator's runtime."""
    runtime.simt_set_fragment_seed.argtypes = [ctypes.c_uint64]
    runtime.simt_set_fragment_seed(seed)


def read_launches(runtime) -> list[Launch]:
    """The launches the runtime recorded since its last reset."""
    runtime.simt_launch.restype = ctypes.c_char_p
    runtime.simt_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
    numbers = (ctypes.c_uint64 * 15)()
    launches = []
    for i in range(runtime.simt_launch_count()):
        name = runtime.simt_launch(i, numbers).decode()
        n = list(numbers)
        launches.append(Launch(name, tuple(n[0:3]), tuple(n[3:6]), *n[6:15]))
    return launches


def _bind_signature(library, name: str):
    """Sets the argtypes of entry point `name` from the parameter codes the library reports for it."""
    codes = library.simt_signature(name.encode())
    function = getattr(library, name)
    function.argtypes = [_PARAMETER_TYPES[code] for code in codes.decode()]
    function.restype = ctypes.c_int
    return function


def _int64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def _span(tensor):
    """(address, bytes) of the memory a strided view reaches."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr(), (last + 1) * tensor.element_size()


def _guarded_nan(shape, dtype, transpose=False):
    """A NaN-filled tensor inside a larger allocation: a kernel that writes past its ends hits the margins
    (which belong to no registered buffer, so the checker reports it) instead of the process's heap."""
    numel = math.prod(shape)
    margin = max(1 << 14, numel // 4 // 64 * 64)  # keeps the tensor 256-byte aligned, as a GPU allocation is
    storage = torch.full((numel + 2 * margin,), float("nan"), dtype=dtype)
    tensor = storage[margin:margin + numel].view(shape)
    return tensor.transpose(1, 2) if transpose else tensor


def _nan_like_layout(like, rows, cols):
    """Output in the layout the glue gives it (empty_like_layout): channel-first if `like` is."""
    channel_first = like.shape[1] > 1 and like.shape[2] > 1 and like.stride(1) == 1
    if channel_first:
        return _guarded_nan((like.shape[0], cols, rows), like.dtype, transpose=True)
    return _guarded_nan((like.shape[0], rows, cols), like.dtype)


class Emulator:
    def __init__(self, overrides: dict[str, str] | None = None, device: str = "h100", order: str = "forward",
                 seed: int = 0, fragment_seed: int = 1):
        self._kernels = ctypes.CDLL(str(build.kernel_library(overrides)))
        self._runtime = ctypes.CDLL(str(build.runtime_library()))
        rt = self._runtime
        rt.simt_set_device.argtypes = [ctypes.c_char_p]
        rt.simt_set_order.argtypes = [ctypes.c_int, ctypes.c_uint64]
        rt.simt_set_blocks_to_run.argtypes = [ctypes.c_int64]
        rt.simt_count_shared_wavefronts.argtypes = [ctypes.c_int]
        rt.simt_register_buffer.argtypes = [_vp, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int]
        rt.simt_report.restype = ctypes.c_char_p
        k = self._kernels
        k.simt_entry_points.restype = k.simt_signature.restype = ctypes.c_char_p
        k.simt_signature.argtypes = [ctypes.c_char_p]
        for name in k.simt_entry_points().decode().rstrip(",").split(","):
            _bind_signature(k, name)
        k.simt_short_attention_backward_plan_fields.restype = ctypes.c_char_p
        # The plan's fields as the C++ header lists them (ANNK_ATTENTION_BACKWARD_PLAN_FIELDS), all int64.
        self.plan_fields = tuple(k.simt_short_attention_backward_plan_fields().decode().rstrip(",").split(","))
        self.launches: list[Launch] = []
        self.configure(device, order, seed, fragment_seed)

    def configure(self, device: str = "h100", order: str = "forward", seed: int = 0, fragment_seed: int = 1):
        """Device profile (h100, h200, a100; hopper-4sm for small tests of the plans large grids take), the fiber
        order between barriers, and the seed of the WMMA fragment placement (0: identity)."""
        if self._runtime.simt_set_device(device.encode()) != 0:
            raise ValueError(f"unknown device profile {device!r}")
        self._runtime.simt_set_order(ORDERS[order], seed)
        set_fragment_seed(self._runtime, fragment_seed)
        return self

    def run_blocks(self, blocks: int | None):
        """Runs only the first `blocks` blocks of each later launch (None: all of them). Launches are still
        checked and recorded, with the traffic of the blocks that ran; outputs stay NaN elsewhere."""
        self._runtime.simt_set_blocks_to_run(-1 if blocks is None else blocks)
        return self

    def count_shared_wavefronts(self, on: bool = True):
        """Counts each later launch's shared-memory warp requests and their wavefronts (runtime.cpp explains
        how); it slows the emulator, so it is off unless asked for."""
        self._runtime.simt_count_shared_wavefronts(int(on))
        return self

    def plant(self, bug: int):
        """Switches on planted bug `bug` (0: none) in a scratch copy of a kernel built with simt_planted_bug()."""
        self._runtime.simt_set_planted_bug(bug)
        return self

    # ---- one launcher call ----

    def _call(self, function, args, inputs, outputs):
        rt = self._runtime
        rt.simt_reset()
        for name, tensor in inputs:
            rt.simt_register_buffer(*_span(tensor), name.encode(), 0)
        for name, tensor in outputs:
            rt.simt_register_buffer(*_span(tensor), name.encode(), 1)
        status = function(*args)
        launches = read_launches(rt)
        self.launches.extend(launches)
        reports = [rt.simt_report(i).decode() for i in range(rt.simt_report_count())]
        suppressed = rt.simt_suppressed_reports()
        if reports:
            more = f"\n(and {suppressed} more)" if suppressed else ""
            raise EmulatorError("\n".join(reports) + more)
        if status != 0:
            raise RuntimeError(f"launcher returned cudaError_t {status}")
        return launches

    # ---- short attention ----

    def attention_forward(self, query, key, value, scale):
        batch, queries, key_dim = query.shape
        keys, value_dim = key.shape[1], value.shape[2]
        out = _nan_like_layout(query, queries, value_dim)
        lse = _guarded_nan((batch, queries), torch.float32)
        shape = _int64s([batch, queries, keys, key_dim, value_dim])
        args = [DTYPES[query.dtype], shape]
        for t in (query, key, value):
            args += [t.data_ptr(), _int64s(t.stride())]
        args += [scale, out.data_ptr(), _int64s(out.stride()), lse.data_ptr()]
        self._call(self._kernels.simt_short_attention_forward, args,
                   [("query", query), ("key", key), ("value", value)], [("out", out), ("logsumexp", lse)])
        return out, lse

    def attention_backward_plan(self, dtype, shape):
        plan = (ctypes.c_int64 * len(self.plan_fields))()
        status = self._kernels.simt_short_attention_backward_plan(DTYPES[dtype], _int64s(shape), plan)
        if status != 0:
            raise RuntimeError(f"short_attention_backward_plan returned cudaError_t {status}")
        return dict(zip(self.plan_fields, list(plan), strict=True))

    def attention_backward(self, grad_out, query, key, value, scale):
        batch, queries, key_dim = query.shape
        keys, value_dim = key.shape[1], value.shape[2]
        shape = [batch, queries, keys, key_dim, value_dim]
        plan = self.attention_backward_plan(query.dtype, shape)
        grads = (_nan_like_layout(query, queries, key_dim), _nan_like_layout(key, keys, key_dim),
                 _nan_like_layout(value, keys, value_dim))
        workspace = _guarded_nan((math.ceil(plan["workspace_bytes"] / 4),), torch.float32)
        args = [DTYPES[query.dtype], _int64s(shape)]
        for t in (grad_out, query, key, value):
            args += [t.data_ptr(), _int64s(t.stride())]
        args.append(scale)
        for t in grads:
            args += [t.data_ptr(), _int64s(t.stride())]
        args += [_int64s([plan[f] for f in self.plan_fields]), workspace.data_ptr()]
        self._call(self._kernels.simt_short_attention_backward, args,
                   [("grad_out", grad_out), ("query", query), ("key", key), ("value", value)],
                   [("grad_query", grads[0]), ("grad_key", grads[1]), ("grad_value", grads[2]),
                    ("workspace", workspace)])
        return grads

    def short_attention(self, query, key, value, scale=None):
        """Differentiable op on the emulated kernels."""
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        return _EmulatedAttention.apply(self, query, key, value, scale)

    # ---- pyramid pooling ----

    def pyramid_forward(self, x, scales):
        return self.pyramid_pair_forward(x, scales=scales)[0]

    def pyramid_pair_forward(self, *maps, scales):
        """Pools one or two maps [B, C_m, H, W] in one launch."""
        bins = sum(s * s for s in scales)
        outs = [_guarded_nan((x.shape[0], x.shape[1], bins), x.dtype) for x in maps]
        sizes = (ctypes.c_int * len(scales))(*scales)
        pointers = (_vp * len(maps))
        self._call(self._kernels.simt_pyramid_pool_forward,
                   [DTYPES[maps[0].dtype], len(maps), _int64s([n for x in maps for n in x.shape]),
                    _int64s([n for x in maps for n in x.stride()]), pointers(*(x.data_ptr() for x in maps)),
                    pointers(*(out.data_ptr() for out in outs)), len(scales), sizes],
                   [(f"input{m}", x) for m, x in enumerate(maps)], [(f"output{m}", out) for m, out in enumerate(outs)])
        return outs

    def pyramid_backward(self, grad, scales, height, width):
        return self.pyramid_pair_backward(grad, scales=scales, height=height, width=width)[0]

    def pyramid_pair_backward(self, *grads, scales, height, width):
        """The backward of one or two maps, gradients [B, C_m, S], in one launch."""
        grad_inputs = [_guarded_nan((grad.shape[0], grad.shape[1], height, width), grad.dtype) for grad in grads]
        sizes = (ctypes.c_int * len(scales))(*scales)
        pointers = (_vp * len(grads))
        self._call(self._kernels.simt_pyramid_pool_backward,
                   [DTYPES[grads[0].dtype], len(grads), _int64s([grads[0].shape[0], height, width]),
                    _int64s([grad.shape[1] for grad in grads]), _int64s([n for grad in grads for n in grad.stride()]),
                    pointers(*(grad.data_ptr() for grad in grads)),
                    pointers(*(grad_input.data_ptr() for grad_input in grad_inputs)), len(scales), sizes],
                   [(f"grad_output{m}", grad) for m, grad in enumerate(grads)],
                   [(f"grad_input{m}", grad_input) for m, grad_input in enumerate(grad_inputs)])
        return grad_inputs

    def pyramid_pool(self, x, scales):
        """Differentiable op on the emulated kernels."""
        return _EmulatedPyramidPool.apply(self, x, tuple(scales))


class _EmulatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emulator, query, key, value, scale):
        out, _ = emulator.attention_forward(query.detach(), key.detach(), value.detach(), scale)
        ctx.save_for_backward(query, key, value)
        ctx.emulator, ctx.scale = emulator, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        grads = ctx.emulator.attention_backward(grad_out.detach(), query.detach(), key.detach(), value.detach(),
                                                ctx.scale)
        return (None, *grads, None)


class _EmulatedPyramidPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emulator, x, scales):
        ctx.emulator, ctx.scales, ctx.size = emulator, scales, x.shape[2:]
        return emulator.pyramid_forward(x.detach(), scales)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.emulator.pyramid_backward(grad.detach(), ctx.scales, *ctx.size), None
