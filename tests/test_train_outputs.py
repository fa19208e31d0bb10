"""Outputs that cannot be written, and eval.py / infer.py with our own checkpoints: one `error:` line naming the
path, no lost checkpoint; the architecture and class count come from the checkpoint; unreadable images are
reported and skipped. Read-only folders are real read-only bind mounts (root ignores file permissions)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from annkernels.train.synthetic import SyntheticScenes

REPO = Path(__file__).resolve().parents[1]

TINY = ["--synthetic-size", "32", "--crop-size", "32", "32", "--scale", "32", "32", "--batch-size", "2",
        "--workers", "0", "--cpu-threads", "1", "--log-interval", "1", "--no-progress", "--num-preview", "1",
        "--no-eval-at-start", "--synthetic-val-length", "2"]


def run(script, *arguments, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "train" / script), *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


class ReadOnlyMount:
    """A folder seen through a bind mount that can be remounted read-only (`source` stays writable)."""

    def __init__(self, root: Path):
        self.source, self.path = root / "source", root / "mounted"
        self.source.mkdir()
        self.path.mkdir()
        self.mounted = False

    def mount(self):
        self._call("mount", "--bind", str(self.source), str(self.path))
        self.mounted = True

    def make_read_only(self):
        self._call("mount", "-o", "remount,ro,bind", str(self.path))

    def unmount(self):
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)
            self.mounted = False

    @staticmethod
    def _call(*command):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PermissionError(result.stderr.strip())


@pytest.fixture
def read_only(tmp_path):
    """A ReadOnlyMount, mounted; skipped where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    folder = ReadOnlyMount(tmp_path)
    try:
        folder.mount()
    except (PermissionError, FileNotFoundError) as error:
        pytest.skip(f"a read-only folder needs a bind mount, which is not permitted here: {error}")
    yield folder
    folder.unmount()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-iteration synthetic run's work dir."""
    work_dir = tmp_path_factory.mktemp("trained") / "work"
    result = run("train.py", *TINY, "--iterations", "2", "--eval-interval", "2", "--work-dir", str(work_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir


def test_read_only_work_dir_is_one_line_before_anything_runs(read_only):
    read_only.make_read_only()
    work_dir = read_only.path / "work"
    line = one_error_line(run("train.py", *TINY, "--iterations", "2", "--work-dir", str(work_dir)))
    assert line == f"error: cannot write {work_dir}: Read-only file system. No checkpoint had been written yet."


def test_work_dir_turning_read_only_mid_run_keeps_the_last_checkpoint(read_only):
    work_dir = read_only.path / "work"
    process = subprocess.Popen([sys.executable, "train/train.py", *TINY, "--iterations", "400", "--ckpt-interval",
                                "2", "--eval-interval", "400", "--work-dir", str(work_dir)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (work_dir / "iter_2.pth").exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        read_only.make_read_only()
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and ": Read-only file system" in line, line
    assert line.endswith(f"The last checkpoint, {work_dir / 'latest.pth'}, is intact."), line
    assert torch.load(work_dir / "latest.pth", weights_only=True)["iteration"] >= 2


def test_eval_prints_its_results_before_failing_to_write_them(trained, read_only):
    read_only.make_read_only()
    out = read_only.path / "result.json"
    result = run("eval.py", "--checkpoint", str(trained / "latest.pth"), "--workers", "0", "--no-progress",
                 "--out", str(out))
    assert one_error_line(result) == f"error: cannot write {out}: Read-only file system"
    assert "mIoU" in result.stdout


def test_infer_into_a_read_only_folder_is_one_line(trained, read_only, tmp_path):
    read_only.make_read_only()
    image = tmp_path / "scene.png"
    Image.fromarray(SyntheticScenes("val", length=1, size=32, seed=0)[0][0]).save(image)
    line = one_error_line(run("infer.py", str(image), "--checkpoint", str(trained / "latest.pth"), "--out-dir",
                              str(read_only.path / "predictions")))
    assert line == f"error: cannot write {read_only.path / 'predictions'}: Read-only file system"


def test_infer_skips_unreadable_images_and_uses_the_checkpoints_architecture(trained, tmp_path):
    good = tmp_path / "scene.png"
    Image.fromarray(SyntheticScenes("val", length=1, size=32, seed=0)[0][0]).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    missing = tmp_path / "missing.png"
    # --dataset voc12aug has 21 classes, the checkpoint 6: refused in one line, naming both.
    refused = run("infer.py", str(good), "--checkpoint", str(trained / "latest.pth"), "--dataset", "voc12aug")
    assert one_error_line(refused) == (f"error: --dataset voc12aug has 21 classes: {trained / 'latest.pth'} holds "
                                       "ann_r18_d8 with 6 classes, trained on synthetic")
    contradicted = run("infer.py", str(good), "--checkpoint", str(trained / "latest.pth"), "--model", "ann_r50_d8")
    assert one_error_line(contradicted).startswith("error: --model ann_r50_d8 contradicts the checkpoint: ")

    result = run("infer.py", str(broken), str(good), str(missing), "--checkpoint", str(trained / "latest.pth"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert errors[0].startswith(f"error: cannot read image {broken}: ")
    assert errors[1].startswith(f"error: cannot read image {missing}: ")
    assert errors[2] == "error: 2 of 3 images could not be read"
    # The default output folder is the checkpoint's work dir, not the current folder.
    assert (trained / "predictions" / "scene_mask.png").is_file()
    assert f"{good}: 32x32 -> {trained / 'predictions' / 'scene_mask.png'}" in result.stdout


def test_eval_of_our_checkpoint_on_another_dataset_names_the_cause(trained):
    line = one_error_line(run("eval.py", "--checkpoint", str(trained / "latest.pth"), "--dataset", "cityscapes"))
    assert line == (f"error: --dataset cityscapes has 19 classes: {trained / 'latest.pth'} holds ann_r18_d8 with 6 "
                    "classes, trained on synthetic")
    result = run("eval.py", "--checkpoint", str(trained / "latest.pth"), "--workers", "0", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((trained / "latest.pth.eval.json").read_text())["dataset"] == "synthetic"
