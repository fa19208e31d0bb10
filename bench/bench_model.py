"""Whole ANN segmentor, next to mmsegmentation's published Cityscapes numbers for ann_r50_d8 512x1024.

"train_step": forward + loss + backward + SGD step (mmseg's optimizer settings), train mode, B=2
512x1024 crops; peak_mem_total_mb is the absolute torch.cuda.max_memory_allocated of a step, the number
mmseg publishes (6.0 GB per GPU at 2 images per GPU, SyncBN over 4 V100s; here BatchNorm on one GPU).
"infer": model.predict + argmax on one 1024x2048 image (mmseg's tools/benchmark.py: batch 1, no_grad,
post-processing included); items_per_s is images/s, published 3.71 fps on a V100 in fp32.
CPU: ann_r18_d8 at 128x256 so a CPU run stays short (a smoke number, not comparable to mmseg's).
Providers are the annkernels backends.
"""

from __future__ import annotations

import torch

from bench.utils import OpBench, Provider, Shape, Unsupported, Workload, registered_backends

NUM_CLASSES = 19  # Cityscapes
IGNORE_INDEX = 255

# mmseg configs/ann/README.md, Cityscapes R-50-D8 512x1024 (docs/performance.md section 2).
PUBLISHED = {"train_mem_gb": 6.0, "infer_fps": 3.71, "infer_gpu": "V100", "source": "mmsegmentation configs/ann"}

SHAPES = (
    Shape("r50_train", dict(model="ann_r50_d8", B=2, H=512, W=1024), passes=("train_step",), cpu=False),
    Shape("r50_infer", dict(model="ann_r50_d8", B=1, H=1024, W=2048), passes=("infer",), cpu=False),
    Shape("r18_train_cpu", dict(model="ann_r18_d8", B=1, H=128, W=256), passes=("train_step",), gpu=False),
    Shape("r18_infer_cpu", dict(model="ann_r18_d8", B=1, H=128, W=256), passes=("infer",), gpu=False),
)


def _build(name: str, backend: str, device: torch.device, dtype: torch.dtype):
    try:
        import models
    except ImportError as exc:
        raise Unsupported(f"models package not importable: {exc}") from None
    return models, models.build_segmentor(name, NUM_CLASSES, backend=backend).to(device=device, dtype=dtype)


def _provider(backend: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        d = shape.dims
        models, model = _build(d["model"], backend, device, dtype)
        images = torch.randn(d["B"], 3, d["H"], d["W"], dtype=dtype, device=device)
        target = torch.randint(0, NUM_CLASSES, (d["B"], d["H"], d["W"]), device=device)
        target[:, :8] = IGNORE_INDEX  # a band of unlabelled pixels, as Cityscapes has
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def train_step_factory():
            model.train()

            def train_step():
                optimizer.zero_grad(set_to_none=True)
                loss, _ = models.segmentation_loss(model(images), target, align_corners=model.align_corners)
                loss.backward()
                optimizer.step()

            return train_step

        def infer_factory():
            model.eval()

            def infer():
                with torch.no_grad():
                    model.predict(images).argmax(1)

            return infer

        return Workload({"train_step": train_step_factory, "infer": infer_factory}, items=d["B"])

    return Provider(backend, make)


def providers(device: str) -> list:
    return [_provider(name) for name in registered_backends(device)]


BENCH = OpBench("model", SHAPES, dtypes=("float32",), providers=providers)


def test_model(bench_case):
    bench_case()
