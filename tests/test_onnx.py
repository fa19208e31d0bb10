"""annkernels.models.export: the fixed-size export (dynamic batch) and the dynamic-size one, run by ONNX Runtime
against PyTorch eager (which pools with adaptive_avg_pool2d or the C++ kernel): no annkernels custom op and no
adaptive pooling in either graph, exact pyramid pooling at every size."""

import pytest
import torch
import torch.nn.functional as F

import annkernels
from annkernels import models
from annkernels.models.export import OnnxSegmentor, export_onnx
from annkernels.ops.reference import pyramid_pool_in_graph

from conftest import assert_close

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

HEIGHT, WIDTH = 41, 53  # a 6 x 7 map at 1/8: the 3x3, 6x6 and 8x8 bins do not divide it
NUM_CLASSES = 6
# (H, W) for the dynamic graph, traced at 64 x 96. The maps at 1/8 are ceil(H/8) x ceil(W/8).
DYNAMIC_SIZES = [
    (64, 128),  # 8 x 16: mmdeploy's floor-stride AvgPool misplaces the 6-bins (height) and 3-, 6-bins (width)
    (97, 97),  # 13 x 13, odd
    (65, 129),  # 9 x 17: one pixel past a multiple of 8
    (257, 129),  # 33 x 17, taller than the traced size
    (33, 47),  # 5 x 6: smaller than the 6- and 8-bins, which then overlap
    (9, 63),  # 2 x 8
    (17, 17),  # 3 x 3
    (1, 1),  # 1 x 1: every bin is the one pixel
]


def random_segmentor(backend: str):
    """ann_r18_d8 with random weights and BatchNorm statistics (out_project starts at zero otherwise)."""
    model = models.build_segmentor("ann_r18_d8", NUM_CLASSES, backend=backend)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif not name.endswith("num_batches_tracked"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


def fastest_backend() -> str:
    return "cpu" if "cpu" in annkernels.available_backends("cpu") else "reference"


def operators(path) -> set[str]:
    """The graph's op types; all must be standard ONNX (no annkernels:: op)."""
    nodes = onnx.load(path).graph.node
    custom = [f"{node.domain}::{node.op_type}" for node in nodes if node.domain not in ("", "ai.onnx")]
    assert not custom, custom
    return {node.op_type for node in nodes}


def test_onnx_export_matches_pytorch(tmp_path):
    backend = fastest_backend()
    model = random_segmentor(backend)
    model.train()  # export must switch to eval and back

    path = export_onnx(model, tmp_path / "ann_r18_d8.onnx", HEIGHT, WIDTH)

    assert model.training
    assert all(module.backend == backend for module in model.modules() if hasattr(module, "backend"))
    ops = operators(path)
    assert not any("Pool" in op and op != "MaxPool" for op in ops), ops
    assert "MatMul" in ops

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_shape = session.get_inputs()[0].shape
    assert isinstance(input_shape[0], str) and input_shape[1:] == [3, HEIGHT, WIDTH]
    model.eval()
    runner = OnnxSegmentor(path)
    assert runner.input_size == (HEIGHT, WIDTH) and not runner.resized_to_input
    for batch in (1, 2):
        images = torch.randn(batch, 3, HEIGHT, WIDTH)
        (actual,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = model(images)
            expected_full = model.predict(images)
        assert expected.shape == (batch, NUM_CLASSES, 6, 7)
        scale = expected.abs().max().item()
        assert_close(torch.from_numpy(actual), expected, 1e-4 * scale, 1e-4, f"ONNX Runtime logits, batch {batch}")
        # The runner resizes the 1/8 logits as model.predict does.
        assert_close(runner.predict(images), expected_full, 1e-4 * scale, 1e-4, f"runner.predict, batch {batch}")

    with pytest.raises(ValueError, match=f"exported for {HEIGHT}x{WIDTH} images, got 40x53"):
        runner(torch.randn(1, 3, 40, WIDTH))


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """One dynamic-size export shared by the tests below: (eval model, runner)."""
    torch.manual_seed(0)
    model = random_segmentor(fastest_backend()).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "dynamic.onnx", 64, 96, dynamic_size=True,
                       resize_to_input=True)
    return model, OnnxSegmentor(path)


@pytest.mark.parametrize("height, width", DYNAMIC_SIZES, ids=[f"{h}x{w}" for h, w in DYNAMIC_SIZES])
def test_dynamic_export_is_exact_at_any_size(dynamic_export, height, width):
    model, runner = dynamic_export
    batch = 3 if (height, width) in ((97, 97), (33, 47)) else 1
    images = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        expected = model.predict(images)

    actual = runner(images)

    assert actual.shape == (batch, NUM_CLASSES, height, width)
    scale = expected.abs().max().item()
    assert_close(actual, expected, 1e-4 * scale, 0.0, f"ONNX Runtime logits at {height}x{width}")
    agreement = (actual.argmax(1) == expected.argmax(1)).double().mean().item()
    assert agreement >= 0.999, f"argmax agrees on {agreement:.2%} of pixels at {height}x{width}"


def test_dynamic_graph_has_free_sizes_and_no_constant_pooling(dynamic_export):
    _, runner = dynamic_export
    batch, channels, height, width = runner.session.get_inputs()[0].shape
    assert all(isinstance(name, str) for name in (batch, height, width)) and channels == 3
    assert runner.input_size is None and runner.resized_to_input
    ops = operators(runner.path)
    assert {"Range", "Shape", "Resize"} <= ops, ops  # bins and the final size come from the runtime shape
    assert not any("Pool" in op and op != "MaxPool" for op in ops), ops


def test_empty_input_is_refused_at_export_and_run_time(dynamic_export, tmp_path):
    _, runner = dynamic_export
    with pytest.raises(ValueError, match="must not be empty"):
        runner(torch.zeros(1, 3, 0, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        runner(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="height"):
        export_onnx(models.build_segmentor("ann_r18_d8", 3), tmp_path / "m.onnx", 0, 32, dynamic_size=True)


@pytest.mark.parametrize("height, width", [(1, 1), (3, 5), (8, 8), (13, 7), (64, 17)])
def test_in_graph_pooling_equals_adaptive_pooling(height, width):
    x = torch.randn(2, 4, height, width, dtype=torch.float64)
    expected = torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in (1, 3, 6, 8)], dim=2)
    assert_close(pyramid_pool_in_graph(x, (1, 3, 6, 8)), expected, 1e-12, 1e-12, f"pooling of {height}x{width}")


def test_export_rejects_bad_size(tmp_path):
    model = models.build_segmentor("ann_r18_d8", 3)
    with pytest.raises(ValueError, match="height"):
        export_onnx(model, tmp_path / "m.onnx", 0, 32)


def test_infer_script_runs_an_exported_model_on_images_of_any_size(dynamic_export, tmp_path):
    """`python train/infer.py --onnx` against the same script with the PyTorch model: same masks."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    model, runner = dynamic_export
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((37, 53), (70, 45)):
        images.append(str(tmp_path / f"photo_{height}x{width}.png"))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images[-1])
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    sources = {"onnx": ["--onnx", runner.path],
               "eager": ["--checkpoint", str(tmp_path / "weights.pth"), "--model", "ann_r18_d8",
                         "--num-classes", str(NUM_CLASSES)]}
    for name, source in sources.items():
        result = subprocess.run([sys.executable, "train/infer.py", *source, "--device", "cpu", "--out-dir",
                                 str(tmp_path / name), *images], cwd=Path(__file__).resolve().parents[1],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr

    for image in images:
        stem = Path(image).stem
        onnx_mask, eager_mask = (np.array(Image.open(tmp_path / name / f"{stem}_mask.png")) for name in sources)
        assert onnx_mask.shape == np.array(Image.open(image)).shape[:2]
        assert (tmp_path / "onnx" / f"{stem}_overlay.png").is_file()
        agreement = (onnx_mask == eager_mask).mean()
        assert agreement >= 0.999, f"{stem}: the ONNX mask agrees with PyTorch's on {agreement:.2%} of pixels"


def test_convert_command_exports_a_checkpoint(tmp_path, capsys):
    from annkernels.models.convert import main as convert_main

    model = random_segmentor(fastest_backend()).eval()
    source = tmp_path / "iter_10.pth"
    torch.save({"model": model.state_dict(), "config": {"model": "ann_r18_d8", "dataset": "synthetic"}}, source)
    destination = tmp_path / "ann.onnx"

    assert convert_main([str(source), str(destination), "--size", str(HEIGHT), str(WIDTH)]) == 0

    runner = OnnxSegmentor(destination)
    assert runner.input_size == (HEIGHT, WIDTH) and runner.num_classes == NUM_CLASSES
    images = torch.randn(1, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        expected = model(images)
    assert_close(runner(images), expected, 1e-4 * expected.abs().max().item(), 1e-4, "converted graph")
    torch.save(model.state_dict(), tmp_path / "bare.pth")  # no config, no zoo entry: the architecture is unknown
    assert convert_main([str(tmp_path / "bare.pth"), str(destination)]) == 1
    assert "does not say its architecture: pass it (--model" in capsys.readouterr().err
