"""Checkpoint sources that are URLs, zoo names and open-mmlab:// names, downloaded through torch.hub into its
cache. Files come from an http.server on 127.0.0.1: synthetic checkpoints in mmseg's file layout; no test
touches the internet."""

import hashlib
import http.server
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from annkernels import models
from annkernels.models import zoo
from annkernels.models.checkpoint import CheckpointError, checkpoint_file
from annkernels.train.config import RECIPES

REPO = Path(__file__).resolve().parents[1]


def mmseg_file(state_dict: dict) -> bytes:
    """A checkpoint laid out as mmseg 0.x saves them: meta plus state_dict."""
    buffer = io.BytesIO()
    torch.save({"meta": {"mmseg_version": "0.5.0+unknown", "iter": 40000, "CLASSES": ("a", "b")},
                "state_dict": state_dict}, buffer)
    return buffer.getvalue()


def named_with_hash(stem: str, data: bytes) -> str:
    """mmseg's and torchvision's naming: <stem>-<first 8 hex digits of the sha256>.pth."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def segmentor_weights(seed=1, num_classes=5) -> dict:
    torch.manual_seed(seed)
    model = models.build_segmentor("ann_r18_d8", num_classes)
    for parameter in model.parameters():
        parameter.data.normal_()
    return model.state_dict()


def imagenet_weights(seed=2) -> dict:
    """An ImageNet ResNet-18-V1c file's keys: the backbone's without prefix, plus the classifier fc.*."""
    weights = {key[len("backbone."):]: value.clone() for key, value in segmentor_weights(seed).items()
               if key.startswith("backbone.")}
    weights["fc.weight"], weights["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return weights


class Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` (path -> bytes); paths under /cut/ announce the whole length but stop halfway."""

    files: dict = {}
    requests: list = []

    def do_GET(self):
        self.requests.append(self.path)
        data = self.files.get(self.path.removeprefix("/cut"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.path.startswith("/cut/") else data)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, files dict to fill, list of requested paths)."""
    handler = type("Handler", (Files,), {"files": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.files, handler.requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch.hub's checkpoint cache, in a fresh TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(cache).startswith(str(tmp_path))
    return cache


def cache_listing(cache: Path):
    return sorted(path.name for path in cache.iterdir()) if cache.is_dir() else []


def test_first_call_downloads_second_uses_the_cache(server, hub_cache):
    base, files, requests = server
    weights = segmentor_weights()
    data = mmseg_file(weights)
    name = named_with_hash("ann_r18-d8_32x32_2k_synthetic_20200101_000000", data)
    files[f"/ann/{name}"] = data

    for _ in range(2):
        model = models.build_segmentor("ann_r18_d8", 5)
        models.load_checkpoint(model, f"{base}/ann/{name}")
        for key, value in model.state_dict().items():
            assert torch.equal(value, weights[key]), key
    assert requests == [f"/ann/{name}"]  # one download
    assert cache_listing(hub_cache) == [name]
    assert (hub_cache / name).read_bytes() == data


def test_hash_mismatch_raises_and_leaves_nothing(server, hub_cache):
    base, files, _ = server
    data = mmseg_file(segmentor_weights())
    files["/ann/model-0123abcd.pth"] = data  # the name's hash is not the content's
    with pytest.raises(CheckpointError, match="invalid hash value") as error:
        checkpoint_file(f"{base}/ann/model-0123abcd.pth")
    assert f"{base}/ann/model-0123abcd.pth" in str(error.value)
    assert str(hub_cache / "model-0123abcd.pth") in str(error.value)
    assert cache_listing(hub_cache) == []


def test_a_download_cut_off_midway_leaves_nothing(server, hub_cache):
    base, files, _ = server
    files["/ann/model.pth"] = mmseg_file(segmentor_weights())  # no hash in the name: the content is checked
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as error:
        models.load_checkpoint(models.build_segmentor("ann_r18_d8", 5), f"{base}/cut/ann/model.pth")
    assert f"{base}/cut/ann/model.pth" in str(error.value) and str(hub_cache / "model.pth") in str(error.value)
    assert cache_listing(hub_cache) == []


def test_a_cut_off_download_with_a_hash_in_its_name_fails_the_hash(server, hub_cache):
    base, files, _ = server
    data = mmseg_file(segmentor_weights())
    name = named_with_hash("ann_model", data)
    files[f"/{name}"] = data
    with pytest.raises(CheckpointError, match="invalid hash value"):
        checkpoint_file(f"{base}/cut/{name}")
    assert cache_listing(hub_cache) == []


def test_404_names_the_url_and_says_how_to_do_without_network(server, hub_cache):
    base, _, _ = server
    with pytest.raises(CheckpointError, match="HTTP Error 404") as error:
        checkpoint_file(f"{base}/missing.pth")
    message = str(error.value)
    assert f"{base}/missing.pth" in message and str(hub_cache / "missing.pth") in message
    assert "pass its local path" in message
    assert cache_listing(hub_cache) == []


def test_no_server_at_all_says_how_to_pass_a_downloaded_file(hub_cache):
    with pytest.raises(CheckpointError, match="Connection refused.*pass its local path"):
        checkpoint_file("http://127.0.0.1:9/ann_r50-d8_512x1024_40k_cityscapes_20200605_095211-049fc292.pth")


def test_zoo_names_resolve_to_mmseg_urls():
    assert len(zoo.RELEASED) == 16
    entry = zoo.RELEASED["ann_r50-d8_512x1024_40k_cityscapes"]
    assert entry.url == ("https://download.openmmlab.com/mmsegmentation/v0.5/ann/ann_r50-d8_512x1024_40k_cityscapes/"
                         "ann_r50-d8_512x1024_40k_cityscapes_20200605_095211-049fc292.pth")
    assert (entry.dataset, entry.architecture, entry.crop_size, entry.iterations) == (
        "cityscapes", "ann_r50_d8", (512, 1024), 40000)
    assert (entry.miou, entry.miou_ms_flip) == (77.40, 78.57)
    assert zoo.RELEASED["ann_r50-d8_512x512_80k_ade20k"].miou == 41.01
    assert zoo.RELEASED["ann_r50-d8_512x512_20k_voc12aug"].miou == 74.86
    assert zoo.url_of("open-mmlab://resnet50_v1c") == zoo.url_of("resnet50_v1c") == (
        "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth")
    assert zoo.imagenet_backbone("ann_r101_d8") == "open-mmlab://resnet101_v1c"
    # Every URL's file name carries the hash prefix that torch.hub checks.
    assert all(re.search(r"-[0-9a-f]{8}\.pth$", zoo.url_of(name)) for name in zoo.names())
    slide = zoo.RELEASED["ann_r101-d8_769x769_80k_cityscapes"].test_settings()
    assert slide == dict(model="ann_r101_d8", crop_size=(769, 769), scale=(2049, 1025), align_corners=True,
                         eval_mode="slide", eval_crop_size=(769, 769), eval_stride=(513, 513))


def test_zoo_name_downloads_its_url(server, hub_cache, monkeypatch):
    base, files, requests = server
    weights = segmentor_weights(seed=3)
    data = mmseg_file(weights)
    name = named_with_hash("ann_r18-d8_32x32_1k_synthetic_20200101_000000", data)
    files[f"/v0.5/ann/{name}"] = data
    entry = zoo.Released("ann_r18-d8_32x32_1k_synthetic", "synthetic", "ann_r18_d8", (32, 32), 1000,
                         f"{base}/v0.5/ann/{name}", 12.34, 23.45)
    monkeypatch.setitem(zoo.RELEASED, entry.name, entry)
    model = models.build_segmentor("ann_r18_d8", 5)
    models.load_checkpoint(model, entry.name)
    assert requests == [f"/v0.5/ann/{name}"]
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())


def safetensors_file(state_dict: dict, tmp_path) -> bytes:
    from annkernels.models.convert import to_safetensors

    return Path(to_safetensors(state_dict, tmp_path / "weights.safetensors")).read_bytes()


def test_safetensors_urls_and_zoo_entries_download_and_load(server, hub_cache, monkeypatch, tmp_path):
    pytest.importorskip("safetensors")
    base, files, requests = server
    weights = segmentor_weights(seed=4)
    data = safetensors_file(weights, tmp_path)
    name = f"ann_r18-d8_synthetic-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"
    files[f"/{name}"] = data
    entry = zoo.Released("ann_r18-d8_32x32_1k_synthetic", "synthetic", "ann_r18_d8", (32, 32), 1000,
                         f"{base}/{name}", 12.34, 23.45)
    monkeypatch.setitem(zoo.RELEASED, entry.name, entry)

    for source in (f"{base}/{name}", entry.name):  # the second finds the file in the cache
        model = models.build_segmentor("ann_r18_d8", 5)
        models.load_checkpoint(model, source)
        assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    assert requests == [f"/{name}"] and cache_listing(hub_cache) == [name]

    # A zoo name is a source of the converter too, and torch.hub.load takes it as `pretrained`.
    from annkernels.models.convert import to_safetensors

    copy = to_safetensors(entry.name, tmp_path / "copy.safetensors")
    assert Path(copy).read_bytes() == data
    hub_model = torch.hub.load(str(REPO), "ann_r18_d8", source="local", pretrained=entry.name)
    assert hub_model.num_classes == 5 and not hub_model.training
    assert all(torch.equal(value, weights[key]) for key, value in hub_model.state_dict().items())


def test_a_safetensors_download_cut_off_midway_leaves_nothing(server, hub_cache, tmp_path):
    pytest.importorskip("safetensors")
    base, files, _ = server
    files["/model.safetensors"] = safetensors_file(segmentor_weights(), tmp_path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*cannot read safetensors file"):
        checkpoint_file(f"{base}/cut/model.safetensors")
    assert cache_listing(hub_cache) == []


def test_open_mmlab_names_load_the_imagenet_backbone(server, hub_cache, monkeypatch):
    base, files, requests = server
    weights = imagenet_weights()
    buffer = io.BytesIO()
    torch.save({"state_dict": weights}, buffer)
    name = named_with_hash("resnet18_v1c", buffer.getvalue())
    files[f"/pretrain/third_party/{name}"] = buffer.getvalue()
    monkeypatch.setitem(zoo.BACKBONES, "resnet18_v1c", f"{base}/pretrain/third_party/{name}")

    model = models.build_segmentor("ann_r18_d8", 5)
    result = models.load_pretrained_backbone(model, "open-mmlab://resnet18_v1c")
    assert result.unexpected_keys == ["fc.weight", "fc.bias"]
    assert all(torch.equal(value, weights[key]) for key, value in model.backbone.state_dict().items())
    models.load_pretrained_backbone(model, "resnet18_v1c")  # the bare name is the same file, from the cache
    assert requests == [f"/pretrain/third_party/{name}"]
    with pytest.raises(CheckpointError, match="open-mmlab://resnet18_v1c, open-mmlab://resnet50_v1c"):
        models.load_pretrained_backbone(model, "open-mmlab://resnet34_v1c")


def test_train_from_a_pretrained_url_for_two_iterations(server, hub_cache, tmp_path):
    base, files, requests = server
    buffer = io.BytesIO()
    torch.save({"state_dict": imagenet_weights()}, buffer)
    name = named_with_hash("resnet18_v1c", buffer.getvalue())
    files[f"/{name}"] = buffer.getvalue()
    work_dir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "train/train.py", "--pretrained", f"{base}/{name}", "--iterations", "2",
         "--synthetic-size", "32", "--crop-size", "32", "32", "--scale", "32", "32", "--batch-size", "2",
         "--workers", "0", "--cpu-threads", "1", "--no-progress", "--num-preview", "1", "--no-eval-at-start",
         "--synthetic-val-length", "2", "--work-dir", str(work_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded ImageNet backbone from {base}/{name}" in result.stdout
    assert requests == [f"/{name}"] and cache_listing(hub_cache) == [name]
    assert torch.load(work_dir / "latest.pth", weights_only=True)["iteration"] == 2
    assert json.loads((work_dir / "eval.json").read_text())["pixels"] > 0


def test_evaluating_a_released_model_prints_the_published_figure(server, hub_cache, monkeypatch, tmp_path, capsys):
    from annkernels.train.eval import get_args_parser, main

    base, files, _ = server
    data = mmseg_file(segmentor_weights(num_classes=6))  # the synthetic scenes' 6 classes
    name = named_with_hash("ann_r18-d8_64x64_1k_synthetic_20200101_000000", data)
    files[f"/{name}"] = data
    entry = zoo.Released("ann_r18-d8_64x64_1k_synthetic", "synthetic", "ann_r18_d8", (64, 64), 1000,
                         f"{base}/{name}", 12.34, 23.45)
    monkeypatch.setitem(zoo.RELEASED, entry.name, entry)
    monkeypatch.setitem(RECIPES["synthetic"], "synthetic_val_length", 4)  # 4 validation scenes: quick
    monkeypatch.chdir(tmp_path)
    args = get_args_parser().parse_args(["--checkpoint", entry.name, "--workers", "0", "--no-progress"])
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "work_dirs" / f"{Path(name).stem}.eval.json").read_text())
    assert f"{entry.name}: mIoU {result['mIoU']} here, 12.34 published by mmsegmentation (single scale" in out
    assert result["published_mIoU"] == 12.34 and result["dataset"] == "synthetic"
