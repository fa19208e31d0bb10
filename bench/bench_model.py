"""The whole ANN segmentor: an inference call and a training step, each model configuration a provider.

"infer": predict + argmax on one image (mmseg's tools/benchmark.py: batch 1, no_grad, post-processing
included); images/s. mmseg publishes 3.71 images/s for ann_r50_d8 at 1024x2048 on a V100 in fp32.
"train_step": forward + loss + backward + SGD step (mmseg's optimizer settings) on B=2 crops; mmseg
publishes 6.0 GB per GPU at 512x1024 (SyncBN on 4 V100s; here BatchNorm on one device).
CPU shapes use ann_r18_d8 at 128x256 and ann_r50_d8 at 512x512 (eval), small enough for two cores.

Providers, all built from the same weights:
  reference     eager model on the reference backend (computes as mmsegmentation does: the baseline)
  <backend>     eager model on each other annkernels backend
  folded        BatchNorm and output projections folded (optimize_for_inference without compile), infer only
  fast          optimize_for_inference: folded, channels_last, inductor with freezing; infer only
  onnxruntime   export_onnx run by ONNX Runtime's CPU provider; CPU fp32 infer only
  compiled      the default backend under model.compile(), as train.py --compile; train_step only
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
from harness import OpBench, Provider, Shape, Unsupported, Workload, registered_backends

NUM_CLASSES = 19  # Cityscapes
IGNORE_INDEX = 255
INFER, TRAIN = ("infer",), ("train_step",)

SHAPES = (
    Shape("r50_train", dict(model="ann_r50_d8", B=2, H=512, W=1024), passes=TRAIN, cpu=False),
    Shape("r50_infer", dict(model="ann_r50_d8", B=1, H=1024, W=2048), passes=INFER, cpu=False),
    Shape("r50_infer_cpu", dict(model="ann_r50_d8", B=1, H=512, W=512), passes=INFER, gpu=False),
    Shape("r18_train_cpu", dict(model="ann_r18_d8", B=1, H=128, W=256), passes=TRAIN, gpu=False),
    Shape("r18_infer_cpu", dict(model="ann_r18_d8", B=1, H=128, W=256), passes=INFER, gpu=False),
)


def _models():
    try:
        from annkernels import models
    except ImportError as exc:
        raise Unsupported(f"annkernels.models is not importable: {exc}") from None
    return models


def _build(dims: dict, backend: str | None, dtype: torch.dtype, device: torch.device):
    """The segmentor on ``backend`` with the weights every provider shares (seeded), and its batch."""
    models = _models()
    torch.manual_seed(0)
    model = models.build_segmentor(dims["model"], NUM_CLASSES, backend=backend).to(device=device, dtype=dtype)
    images = torch.randn(dims["B"], 3, dims["H"], dims["W"], dtype=dtype, device=device)
    target = torch.randint(0, NUM_CLASSES, (dims["B"], dims["H"], dims["W"]), device=device)
    target[:, :8] = IGNORE_INDEX  # a band of unlabelled pixels, as Cityscapes has
    return model, images, target


def training_step(model, images: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One SGD step of ``model`` (switched to train mode) on a fixed batch, as the training loop runs it."""
    models = _models()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = models.segmentation_loss(model(images), target, align_corners=model.align_corners)
        loss.backward()
        optimizer.step()

    return step


def _inference(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> Callable[[], None]:
    def infer():
        with torch.no_grad():
            predict(images).argmax(1)

    return infer


def _eager(backend: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        model, images, target = _build(shape.dims, backend, dtype, device)

        def infer():
            return _inference(model.eval().predict, images)

        return Workload({"train_step": lambda: training_step(model, images, target), "infer": infer},
                        items=shape.dims["B"])

    return Provider(backend, make)


def _optimized(name: str, **options) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        model, images, _ = _build(shape.dims, None, dtype, device)
        fast = _models().optimize_for_inference(model.eval(), log=None, **options)
        return Workload({"infer": lambda: _inference(fast.predict, images)}, items=shape.dims["B"])

    return Provider(name, make, kind="peer")


def onnxruntime_predict(model, height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` exported to ONNX at height x width, run by ONNX Runtime's CPU provider with torch's thread
    count: images [B, 3, H, W] -> logits resized to [B, K, H, W]."""
    try:
        import onnxruntime
    except ImportError:
        raise Unsupported("onnxruntime is not installed (pip install -e '.[onnx]')") from None
    models = _models()
    with tempfile.TemporaryDirectory() as folder:
        path = models.export_onnx(model, os.path.join(folder, "model.onnx"), height, width)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predict(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(None, {input_name: images.numpy()})
        return torch.nn.functional.interpolate(torch.from_numpy(logits), size=images.shape[-2:], mode="bilinear",
                                               align_corners=model.align_corners)

    return predict


def _onnxruntime(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    if device.type != "cpu" or dtype != torch.float32:
        raise Unsupported("ONNX Runtime is timed on CPU in float32")
    model, images, _ = _build(shape.dims, None, dtype, device)
    predict = onnxruntime_predict(model.eval(), shape.dims["H"], shape.dims["W"])
    return Workload({"infer": lambda: _inference(predict, images)}, items=shape.dims["B"])


def _compiled(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
    model, images, target = _build(shape.dims, None, dtype, device)
    model.compile()  # what train.py --compile does
    return Workload({"train_step": lambda: training_step(model, images, target)}, items=shape.dims["B"])


def providers(device: str) -> list:
    peers = [_optimized("folded", channels_last=False, compile=False), _optimized("fast"),
             Provider("onnxruntime", _onnxruntime, kind="peer"), Provider("compiled", _compiled, kind="peer")]
    return [_eager(name) for name in registered_backends(device)] + peers


BENCH = OpBench("model", SHAPES, dtypes=("float32",), providers=providers)


def test_model(bench_case):
    bench_case()
