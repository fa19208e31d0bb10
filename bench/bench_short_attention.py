"""Short-key attention, softmax(Q K^T / 16) V with ANN's Dk = Dv = 256 and S = 110 pooled keys.

Providers: every annkernels backend usable on the device, fed the channel-first views a conv output
gives (x.flatten(2).transpose(1, 2)), which is what APNB/AFNB pass; "reference" is mmsegmentation's
path (permute copies, matmul, separate scale, softmax, matmul). Peers: F.scaled_dot_product_attention
with contiguous [B, 1, N, D] inputs, i.e. as if the projections ran channels_last, so no layout copy is
charged to it. On GPU each SDPA backend (flash, efficient, cuDNN, math) is its own provider, forced with
torch.nn.attention.sdpa_kernel ("sdpa_flash", ...; skipped where it rejects the case); on CPU "sdpa" is the
default dispatch. "gemm_only" times the six matrix products alone, the bound on
any GEMM-based kernel (see below).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from harness import (
    OpBench,
    Provider,
    Shape,
    Unsupported,
    Workload,
    autograd_passes,
    channel_first_view,
    registered_backends,
)

KEYS, KEY_DIM, VALUE_DIM = 110, 256, 256
SCALE = KEY_DIM**-0.5
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")  # timed each on GPU

SHAPES = (
    # A 256x512 crop (32x64 map): the small end of the time-vs-N plots.
    Shape("small", dict(B=1, N=2048, S=KEYS, Dk=KEY_DIM, Dv=VALUE_DIM)),
    # mmseg training, 512x1024 crops, B=2: feature 64x128.
    Shape("train", dict(B=2, N=8192, S=KEYS, Dk=KEY_DIM, Dv=VALUE_DIM)),
    # mmseg training, 512x512 crops, B=4: feature 64x64.
    Shape("train_b4", dict(B=4, N=4096, S=KEYS, Dk=KEY_DIM, Dv=VALUE_DIM)),
    # The authors' 769x769 crops: N = 97*97, not a multiple of any tile size.
    Shape("crop769", dict(B=2, N=9409, S=KEYS, Dk=KEY_DIM, Dv=VALUE_DIM), cpu=False),
    # Cityscapes inference at 1024x2048: feature 128x256.
    Shape("infer", dict(B=1, N=32768, S=KEYS, Dk=KEY_DIM, Dv=VALUE_DIM), passes=("fwd",), cpu=False),
)


def cost_model(dims: dict, dtype: torch.dtype) -> tuple:
    """(FLOPs, minimal bytes) per pass, docs/performance.md section 4.

    Forward: QK^T and PV, 2*B*N*S*(Dk+Dv); traffic Q in, O out (+ K, V, fp32 logsumexp).
    Backward: recompute S, dP, dV, dQ, dK, 2*B*N*S*(3Dk+2Dv); traffic Q and dO in, dQ out (+ K, V, dK, dV).
    """
    b, n, s, dk, dv = dims["B"], dims["N"], dims["S"], dims["Dk"], dims["Dv"]
    size = torch.finfo(dtype).bits // 8
    keys = b * s * (dk + dv) * size
    flops = {"fwd": 2 * b * n * s * (dk + dv), "bwd": 2 * b * n * s * (3 * dk + 2 * dv)}
    nbytes = {"fwd": b * n * (dk + dv) * size + keys + b * n * 4, "bwd": b * n * (2 * dk + dv) * size + 2 * keys}
    flops["full"] = flops["fwd"] + flops["bwd"]
    nbytes["full"] = nbytes["fwd"] + nbytes["bwd"]
    return flops, nbytes


def _backend_provider(name: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import annkernels

        d = shape.dims
        query = channel_first_view(d["B"], d["Dk"], d["N"], dtype, device, requires_grad=True)
        key = channel_first_view(d["B"], d["Dk"], d["S"], dtype, device, requires_grad=True)
        value = channel_first_view(d["B"], d["Dv"], d["S"], dtype, device, requires_grad=True)
        flops, nbytes = cost_model(d, dtype)
        forward = lambda: annkernels.short_attention(query, key, value, SCALE, backend=name)  # noqa: E731
        return Workload(autograd_passes(forward, [query, key, value]), flops=flops, bytes=nbytes)

    return Provider(name, make)


def _sdpa_provider(backend: str | None) -> Provider:
    """F.scaled_dot_product_attention, on its default dispatch (``backend`` None) or forced onto one of its
    backends (torch.nn.attention.SDPBackend name); a forced backend that rejects the case is skipped."""

    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        d = shape.dims
        options = dict(dtype=dtype, device=device, requires_grad=True)
        query = torch.randn(d["B"], 1, d["N"], d["Dk"], **options)
        key = torch.randn(d["B"], 1, d["S"], d["Dk"], **options)
        value = torch.randn(d["B"], 1, d["S"], d["Dv"], **options)

        def forward():
            if backend is None:
                return F.scaled_dot_product_attention(query, key, value, scale=SCALE)
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(query, key, value, scale=SCALE)

        if backend is not None:
            try:  # a forced backend that does not accept the case raises (and warns why) on its first call
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    forward().sum().backward()
            except RuntimeError as exc:
                raise Unsupported(f"SDPA {backend.lower()} rejects this case") from exc
        flops, nbytes = cost_model(d, dtype)
        return Workload(autograd_passes(forward, [query, key, value]), flops=flops, bytes=nbytes)

    return Provider("sdpa" if backend is None else f"sdpa_{backend.lower().removesuffix('_attention')}", make,
                    kind="peer")


def _gemm_only_provider() -> Provider:
    """The attention's matrix products alone: torch.bmm into preallocated outputs, no softmax, no copies.

    Not an attention (the "probabilities" are random numbers): it is the time the six products take
    through the vendor GEMM (MKL on CPU, cuBLAS on GPU) on contiguous operands, 2 in the forward and 4 in
    the backward, which every implementation here computes. reference / gemm_only bounds the speed-up
    that a kernel built on GEMMs as fast as the vendor's can show over the reference.
    """

    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        d = shape.dims
        b, n, s, dk, dv = d["B"], d["N"], d["S"], d["Dk"], d["Dv"]
        options = dict(dtype=dtype, device=device)
        query, grad_out = torch.randn(b, n, dk, **options), torch.randn(b, n, dv, **options)
        key, value = torch.randn(b, s, dk, **options), torch.randn(b, s, dv, **options)
        probs, scores = torch.rand(b, n, s, **options), torch.empty(b, n, s, **options)
        out, grad_query = torch.empty_like(grad_out), torch.empty_like(query)
        grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)

        def forward():
            torch.bmm(query, key.transpose(1, 2), out=scores)  # Q K^T
            torch.bmm(probs, value, out=out)  # P V

        def backward():
            torch.bmm(grad_out, value.transpose(1, 2), out=scores)  # dP = dO V^T
            torch.bmm(probs.transpose(1, 2), grad_out, out=grad_value)  # dV = P^T dO
            torch.bmm(probs, key, out=grad_query)  # dQ = dS K
            torch.bmm(probs.transpose(1, 2), query, out=grad_key)  # dK = dS^T Q

        def full():
            forward()
            backward()

        flops, nbytes = cost_model(d, dtype)
        passes = {"fwd": lambda: forward, "bwd": lambda: backward, "full": lambda: full}
        return Workload(passes, flops=flops, bytes=nbytes)

    return Provider("gemm_only", make, kind="peer")


def providers(device: str) -> list:
    backends = [_backend_provider(name) for name in registered_backends(device)]
    sdpa = [_sdpa_provider(None)] if device == "cpu" else [_sdpa_provider(name) for name in SDPA_BACKENDS]
    return backends + sdpa + [_gemm_only_provider()]


BENCH = OpBench("short_attention", SHAPES, dtypes=("float32", "bfloat16"), providers=providers)


def test_short_attention(bench_case):
    bench_case()
