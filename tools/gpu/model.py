"""The H200 constants, the key shapes, the floors, and the latency model behind every "modelled" time.

Nothing here is measured on a GPU. docs/performance.md (section 3, the static model) explains each constant
and what the model leaves out; change the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ---- the device (H200 SXM) ----
SM_COUNT = 132
CLOCK_GHZ = 1.9  # sustained SM clock under load, about
HBM_BYTES_PER_S = 4.3e12  # device copy bandwidth, reads plus writes
L2_BYTES_PER_S = 7.0e12  # L2 hits across the chip, about [unverified]
SHARED_BYTES_PER_CYCLE = 128  # per SM: one wavefront (32 banks x 4 bytes) per cycle
L2_LATENCY_CYCLES = 270  # global load that hits L2, issue to use
HBM_LATENCY_CYCLES = 600  # global load that misses L2
# Per-SM resources (sm_90): registers, shared memory (228 KiB, 1 KiB of it reserved per resident CTA),
# threads and CTAs.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers per warp are allocated in these steps
SHARED_BYTES_PER_SM = 228 * 1024
SHARED_RESERVED_PER_CTA = 1024
THREADS_PER_SM = 2048
CTAS_PER_SM = 32

# FLOP/s of each arithmetic unit (dense). Floors use the best unit for the dtype; modelled times use the
# unit the kernel's instructions show.
PEAK_FLOPS = {
    "wgmma-half": 790e12,  # bf16/fp16 warpgroup MMA (HGMMA)
    "wgmma-tf32": 395e12,
    "hmma-half": 0.6 * 790e12,  # mma.sync (HMMA) reaches about 60% of the wgmma peak on Hopper [unverified]
    "hmma-tf32": 0.6 * 395e12,
    "hmma-3xtf32": 0.6 * 395e12 / 3,  # three TF32 products per fp32 product
    "wgmma-3xtf32": 395e12 / 3,
    "ffma": 67e12,  # fp32 CUDA cores
    "dfma": 34e12,  # fp64
}
FLOOR_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12, "fp64": 67e12}

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}

# ---- the key shapes ----
ATTENTION_KEYS = 110  # S for ANN's pyramid (1, 3, 6, 8)
ATTENTION_DIM = 256  # Dk = Dv
ATTENTION_SHAPES = ((2, 8192), (1, 32768))  # (B, N)
POOL_SCALES = (1, 3, 6, 8)
POOL_SHAPES = ((2, 256, 64, 128), (1, 256, 128, 256))  # (B, C, H, W)
DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class Case:
    """One op at one key shape and dtype."""

    op: str  # attention or pool
    direction: str  # forward or backward
    dtype: str
    shape: tuple

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.op} {self.direction} {self.dtype} {dims}"

    @property
    def minimal_bytes(self) -> int:
        """Every input read once and every output written once (tests/simt/traffic.py uses the same rule)."""
        size = ELEMENT_BYTES[self.dtype]
        if self.op == "attention":
            batch, queries = self.shape
            s, d = ATTENTION_KEYS, ATTENTION_DIM
            inputs = batch * (queries * d + 2 * s * d)  # Q, K, V
            if self.direction == "forward":
                return size * (inputs + batch * queries * d) + 4 * batch * queries  # O and the fp32 logsumexp
            return size * (2 * inputs + batch * queries * d)  # dO, Q, K, V in; dQ, dK, dV out
        batch, channels, height, width = self.shape
        bins = sum(s * s for s in POOL_SCALES)
        return size * batch * channels * (height * width + bins)

    @property
    def flops(self) -> int:
        if self.op == "attention":
            batch, queries = self.shape
            s, d = ATTENTION_KEYS, ATTENTION_DIM
            products = 2 * d if self.direction == "forward" else 5 * d  # QK^T, PV; and S, dP, dQ, dK, dV
            return 2 * batch * queries * s * products
        batch, channels, height, width = self.shape
        return batch * channels * height * width * len(POOL_SCALES)  # one add per pixel and scale

    @property
    def floor_s(self) -> float:
        return max(self.minimal_bytes / HBM_BYTES_PER_S, self.flops / FLOOR_FLOPS[self.dtype])


def key_cases() -> list[Case]:
    cases = []
    for direction in ("forward", "backward"):
        for dtype in DTYPES:
            cases += [Case("attention", direction, dtype, shape) for shape in ATTENTION_SHAPES]
            cases += [Case("pool", direction, dtype, shape) for shape in POOL_SHAPES]
    return cases


def ctas_per_sm(registers: int, threads: int, shared_bytes: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": REGISTERS_PER_SM // (per_warp * warps),
        "shared memory": SHARED_BYTES_PER_SM // (shared_bytes + SHARED_RESERVED_PER_CTA),
        "threads": THREADS_PER_SM // (warps * 32),
        "CTA slots": CTAS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def unit_for(tensor_core: str, dtype: str, tf32: bool | None = None, split3: bool = True) -> str:
    """The arithmetic unit a kernel's products run on, from what its SASS (and PTX) show. ``tf32``: the
    tensor-core products take TF32 operands (default: when the data is fp32); ``split3``: the FLOP count
    is of fp32 products that each take three TF32 products (the 3xTF32 split of the CUDA kernels)."""
    tf32 = dtype == "fp32" if tf32 is None else tf32
    if tensor_core in ("wgmma", "hmma"):
        if not tf32:
            return f"{tensor_core}-half"
        return f"{tensor_core}-3xtf32" if split3 else f"{tensor_core}-tf32"
    return "dfma" if dtype == "fp64" else "ffma"


@dataclass
class LaunchCost:
    """What the latency term needs of one kernel launch."""

    kernel: str
    ctas: int
    ctas_per_sm: int
    loads_per_thread: float  # global loads (LDG) one thread of one CTA issues
    mean_in_flight: float  # other loads in flight with each (hot-loop sites)
    async_waits_per_thread: float = 0.0  # waits for asynchronous copies (cp.async) that land some: one trip each

    @property
    def waves(self) -> int:
        return math.ceil(self.ctas / max(1, self.ctas_per_sm * SM_COUNT))

    @property
    def round_trips(self) -> float:
        """Serialized global-memory round trips of one thread."""
        return self.loads_per_thread / (1.0 + self.mean_in_flight) + self.async_waits_per_thread

    def latency_s(self, hbm_fraction: float) -> float:
        cycles = hbm_fraction * HBM_LATENCY_CYCLES + (1 - hbm_fraction) * L2_LATENCY_CYCLES
        return self.waves * self.round_trips * cycles / (CLOCK_GHZ * 1e9)


def shared_time_s(ctas: int, block_wavefronts: float) -> float:
    """Shared-memory time of one launch: the busiest SM runs ceil(ctas / SM_COUNT) blocks, each taking
    block_wavefronts cycles of its SM's shared memory."""
    return math.ceil(ctas / SM_COUNT) * block_wavefronts / (CLOCK_GHZ * 1e9)


def modelled_time(case: Case, launches: list[LaunchCost], global_bytes: float, unit: str,
                  flops: float | None = None, shared_s: float | None = None) -> dict:
    """The modelled time of one op (all its launches) and its terms, in seconds.

    global_bytes: bytes all launches load and store (re-reads included). Loads of the minimal traffic go to
    HBM; the rest are taken as L2 hits. flops: the products the kernels issue on ``unit`` (default: the
    op's own FLOPs, Case.flops). shared_s: the launches' shared-memory time (shared_time_s), where known."""
    flops = case.flops if not flops else flops
    hbm_fraction = min(1.0, case.minimal_bytes / global_bytes) if global_bytes else 1.0
    terms = {
        "bytes_s": max(case.minimal_bytes / HBM_BYTES_PER_S, global_bytes / L2_BYTES_PER_S),
        "compute_s": flops / PEAK_FLOPS[unit],
        "latency_s": sum(launch.latency_s(hbm_fraction) for launch in launches),
    }
    if shared_s is not None:
        terms["shared_s"] = shared_s
    time_s = max(terms.values())
    return {
        **terms,
        "bound": max(terms, key=terms.get).removesuffix("_s"),
        "time_s": time_s,
        "floor_s": case.floor_s,
        "fraction_of_floor": case.floor_s / time_s,
        "unit": unit,
        "flops": flops,
        "hbm_fraction": hbm_fraction,
    }
