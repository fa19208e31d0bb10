"""models.export.export_onnx: fixed input size, dynamic batch, no annkernels custom op or adaptive pooling in the
graph, and ONNX Runtime output equal to PyTorch's (which pools with adaptive_avg_pool2d or the C++ kernel)."""

import pytest
import torch
from conftest import assert_close

import annkernels
from annkernels import models
from annkernels.models.export import export_onnx

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

HEIGHT, WIDTH = 41, 53  # a 6 x 7 map at 1/8: the 3x3, 6x6 and 8x8 bins do not divide it


def test_onnx_export_matches_pytorch(tmp_path):
    backend = "cpu" if "cpu" in annkernels.available_backends("cpu") else "reference"
    model = models.build_segmentor("ann_r18_d8", 6, backend=backend)
    with torch.no_grad():  # random weights and BN statistics; out_project starts at zero otherwise
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif not name.endswith("num_batches_tracked"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    model.train()  # export must switch to eval and back

    path = export_onnx(model, tmp_path / "ann_r18_d8.onnx", HEIGHT, WIDTH)

    assert model.training
    assert all(module.backend == backend for module in model.modules() if hasattr(module, "backend"))
    graph = onnx.load(path).graph
    operators = {(node.domain, node.op_type) for node in graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in operators), operators  # no annkernels:: op
    assert not any("Pool" in op and op != "MaxPool" for _, op in operators), operators
    assert ("", "MatMul") in operators or ("ai.onnx", "MatMul") in operators

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_shape = session.get_inputs()[0].shape
    assert isinstance(input_shape[0], str) and input_shape[1:] == [3, HEIGHT, WIDTH]
    model.eval()
    for batch in (1, 2):
        images = torch.randn(batch, 3, HEIGHT, WIDTH)
        (actual,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = model(images)
        assert expected.shape == (batch, 6, 6, 7)
        assert_close(torch.from_numpy(actual), expected, 1e-4 * expected.abs().max().item(), 1e-4,
                     f"ONNX Runtime logits, batch {batch}")


def test_export_rejects_bad_size(tmp_path):
    model = models.build_segmentor("ann_r18_d8", 3)
    with pytest.raises(ValueError, match="height"):
        export_onnx(model, tmp_path / "m.onnx", 0, 32)
