"""APNB and AFNB blocks with mmsegmentation's channel counts, and the full non-local baseline.

op "apnb": APNB on each annkernels backend, plus the peers "nonlocal_matmul" (N x N scores materialised,
the paper's baseline) and "nonlocal_sdpa" (the same block through F.scaled_dot_product_attention). The
"paper" shapes are the authors' efficiency setting: APNB(2048 -> 2048, key 256, value 256) against non-local,
eval mode, fp32, forward only, at [1, 2048, 128, 256] and at two smaller maps of the same block (N = 2048,
8192) that show how the ratio grows with N. The peer "fuse_only" is the authors' baseline: a block that only
concatenates and fuses (the 1x1 conv + BN + ReLU both blocks end with); report.py gives the ratios raw and
with it subtracted, next to the paper's ~6x / ~28x. op "afnb": AFNB(low 1024, high 2048 -> 2048) as in
mmseg's ann_r50_d8.

Training shapes run in train mode (BatchNorm batch statistics); "eval" shapes in eval mode.
Gradients are taken with respect to the input maps and every parameter.
"""

from __future__ import annotations

import torch
from harness import OpBench, Provider, Shape, Unsupported, Workload, autograd_passes, registered_backends

INFERENCE = ("fwd",)

APNB_SHAPES = (
    # mmseg ann_r50_d8 training, 512x1024, B=2: APNB(512 -> 512) on the 64x128 map.
    Shape("train", dict(B=2, C=512, H=64, W=128, mode="train"), cpu=False),
    Shape("train_b4", dict(B=4, C=512, H=64, W=64, mode="train"), cpu=False),
    # The authors' 769x769 Cityscapes crops, B=2: a 97x97 map.
    Shape("crop769", dict(B=2, C=512, H=97, W=97, mode="train"), cpu=False),
    # Cityscapes inference at 1024x2048 (N = 32768).
    Shape("infer", dict(B=1, C=512, H=128, W=256, mode="eval"), passes=INFERENCE, cpu=False),
    # The ANN paper's efficiency setting, fp32 forward only: the 128x256 map (N = 32768; its non-local scores
    # take 4 GiB, 8 GiB at the softmax) and the same block at N = 2048 and 8192. `--suite paper` runs them.
    *(Shape(name, dict(B=1, C=2048, H=h, W=w, mode="eval"), passes=INFERENCE, cpu=False, dtypes=("float32",))
      for name, h, w in (("paper_n2048", 32, 64), ("paper_n8192", 64, 128), ("paper", 128, 256))),
    # CPU-sized stand-in: training on a 16x32 map (128x256 crop).
    Shape("cpu_train", dict(B=1, C=512, H=16, W=32, mode="train"), gpu=False, dtypes=("float32",)),
)
PAPER_SHAPES = ("paper_n2048", "paper_n8192", "paper")

AFNB_SHAPES = (
    Shape("train", dict(B=2, low=1024, high=2048, H=64, W=128, mode="train"), cpu=False),
    Shape("infer", dict(B=1, low=1024, high=2048, H=128, W=256, mode="eval"), passes=INFERENCE, cpu=False),
    Shape("cpu_train", dict(B=1, low=1024, high=2048, H=8, W=16, mode="train"), gpu=False, dtypes=("float32",)),
)


def _prepare(module: torch.nn.Module, mode: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    module = module.to(device=device, dtype=dtype)
    return module.train() if mode == "train" else module.eval()


def _block_workload(module: torch.nn.Module, inputs: list) -> Workload:
    params = [p for p in module.parameters() if p.requires_grad]
    return Workload(autograd_passes(lambda: module(*inputs), inputs + params))


def _map(batch, channels, dims, dtype, device):
    return torch.randn(batch, channels, dims["H"], dims["W"], dtype=dtype, device=device, requires_grad=True)


def _apnb_provider(name: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import annkernels

        d = shape.dims
        block = annkernels.APNB(d["C"], d["C"], key_channels=256, value_channels=256, backend=name)
        return _block_workload(_prepare(block, d["mode"], dtype, device), [_map(d["B"], d["C"], d, dtype, device)])

    return Provider(name, make)


def _nonlocal_provider(attention: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import annkernels

        d = shape.dims
        n = d["H"] * d["W"]
        if attention == "matmul" and device.type == "cuda":
            # N x N scores, scaled scores and probabilities (plus their grads in training) must fit.
            copies = 3 if d["mode"] == "eval" else 6
            need = copies * d["B"] * n * n * torch.finfo(dtype).bits // 8
            if need > 0.8 * torch.cuda.mem_get_info(device)[0]:
                raise Unsupported(f"N x N scores need ~{need / 2**30:.0f} GiB")
        block = annkernels.NonLocal2d(d["C"], key_channels=256, value_channels=256, attention=attention)
        return _block_workload(_prepare(block, d["mode"], dtype, device), [_map(d["B"], d["C"], d, dtype, device)])

    return Provider(f"nonlocal_{attention}", make, kind="peer")


class FuseOnly(torch.nn.Module):
    """The authors' baseline: only the concatenation and the fuse that APNB and non-local both end with
    (cat[context, x] -> 1x1 conv + BN + ReLU); x stands in for the context. Subtracting its time and memory
    leaves what the attention costs."""

    def __init__(self, channels: int):
        super().__init__()
        from annkernels.nn.blocks import ConvModule

        self.bottleneck = ConvModule(2 * channels, channels)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([feats, feats], dim=1))


def _fuse_only(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    d = shape.dims
    block = _prepare(FuseOnly(d["C"]), d["mode"], dtype, device)
    return _block_workload(block, [_map(d["B"], d["C"], d, dtype, device)])


def _afnb_provider(name: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        import annkernels

        d = shape.dims
        block = annkernels.AFNB(d["low"], d["high"], d["high"], key_channels=256, value_channels=256, backend=name)
        inputs = [_map(d["B"], d["low"], d, dtype, device), _map(d["B"], d["high"], d, dtype, device)]
        return _block_workload(_prepare(block, d["mode"], dtype, device), inputs)

    return Provider(name, make)


def apnb_providers(device: str) -> list:
    peers = [_nonlocal_provider("matmul"), _nonlocal_provider("sdpa"), Provider("fuse_only", _fuse_only, kind="peer")]
    return [_apnb_provider(name) for name in registered_backends(device)] + peers


def afnb_providers(device: str) -> list:
    return [_afnb_provider(name) for name in registered_backends(device)]


BENCH = OpBench("apnb", APNB_SHAPES, dtypes=("float32", "bfloat16"), providers=apnb_providers)
AFNB_BENCH = OpBench("afnb", AFNB_SHAPES, dtypes=("float32", "bfloat16"), providers=afnb_providers)
BENCHES = (BENCH, AFNB_BENCH)


def test_apnb(bench_case):
    bench_case()


def test_afnb(bench_case):
    bench_case()
