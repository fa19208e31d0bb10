"""Pyramid pooling (scales 1, 3, 6, 8 -> S = 110) at ANN's real channel counts.

Providers: every annkernels backend usable on the device (the "reference" backend is mmsegmentation's
PPMConcat path), and the plain-PyTorch peer "torch_pool_cat": four F.adaptive_avg_pool2d + cat, written
here so it does not depend on annkernels at all. "<backend>_pair" pools the same channels as two maps of
C/2 with `pyramid_pool_pair`, as APNB/AFNB pool a key map and a value source: next to "<backend>" (one map
of C, the same bytes in one launch) it shows what taking two maps in one launch costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import OpBench, Provider, Shape, Unsupported, Workload, autograd_passes, registered_backends

SCALES = (1, 3, 6, 8)
POOLED = sum(s * s for s in SCALES)

SHAPES = (
    # A 256x512 crop (32x64 map): the small end of the time-vs-N plots.
    Shape("small_kv", dict(B=1, C=512, H=32, W=64)),
    # mmseg training (512x1024 crops, B=2): K or V after the 256-channel projection.
    Shape("train_k", dict(B=2, C=256, H=64, W=128)),
    # K and V pooled in one launch; the shape of the README's CPU table.
    Shape("train_kv", dict(B=2, C=512, H=64, W=128)),
    # mmseg training at B=4 with 512x512 crops (ADE20K), K and V together.
    Shape("train_b4_kv", dict(B=4, C=512, H=64, W=64)),
    # Odd map: 769x769 crops of the authors' Cityscapes recipe; every scale but 1 has uneven bins.
    Shape("crop769_kv", dict(B=2, C=512, H=97, W=97), cpu=False),
    # Cityscapes inference at 1024x2048, N = 32768.
    Shape("infer_kv", dict(B=1, C=512, H=128, W=256), passes=("fwd",), cpu=False),
)


def _bytes_model(dims: dict, dtype: torch.dtype) -> dict:
    """Minimal traffic: read the map once, write the pooled output (fwd); read pooled grad, write the map (bwd)."""
    size = torch.finfo(dtype).bits // 8
    full_map = dims["B"] * dims["C"] * dims["H"] * dims["W"] * size
    pooled = dims["B"] * dims["C"] * POOLED * size
    return {"fwd": full_map + pooled, "bwd": full_map + pooled, "full": 2 * (full_map + pooled)}


def _input(dims: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(dims["B"], dims["C"], dims["H"], dims["W"], dtype=dtype, device=device, requires_grad=True)


def torch_pool_cat(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.adaptive_avg_pool2d(x, scale).flatten(2) for scale in SCALES], dim=2)


def _backend_provider(name: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import annkernels

        x = _input(shape.dims, dtype, device)
        return Workload(
            autograd_passes(lambda: annkernels.pyramid_pool(x, SCALES, backend=name), [x]),
            bytes=_bytes_model(shape.dims, dtype),
        )

    return Provider(name, make)


def _pair_provider(name: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import annkernels

        channels = shape.dims["C"]
        first = _input(dict(shape.dims, C=channels - channels // 2), dtype, device)
        second = _input(dict(shape.dims, C=channels // 2), dtype, device)
        return Workload(
            autograd_passes(lambda: annkernels.pyramid_pool_pair(first, second, SCALES, backend=name),
                            [first, second]),
            bytes=_bytes_model(shape.dims, dtype),
        )

    return Provider(f"{name}_pair", make)


def _make_pool_cat(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    if device.type == "cpu" and dtype == torch.float16:
        raise Unsupported("adaptive_avg_pool2d float16 on CPU is not a meaningful baseline")
    x = _input(shape.dims, dtype, device)
    return Workload(autograd_passes(lambda: torch_pool_cat(x), [x]), bytes=_bytes_model(shape.dims, dtype))


def providers(device: str) -> list:
    from annkernels.ops.pyramid_pool import PAIR_BACKENDS

    backends = registered_backends(device)
    return [_backend_provider(name) for name in backends] + [
        _pair_provider(name) for name in backends if name in PAIR_BACKENDS] + [
        Provider("torch_pool_cat", _make_pool_cat, kind="peer")
    ]


BENCH = OpBench("pyramid_pool", SHAPES, dtypes=("float32", "bfloat16"), providers=providers)


def test_pyramid_pool(bench_case):
    bench_case()
