"""The segmentor is the package annkernels.models (the top-level models/ folder, mapped by setup.py), usable from
any directory. The plain, non-editable `pip install .` into a fresh environment is checked by .ci/run."""

import re
import subprocess
import sys
from pathlib import Path

import annkernels.models

REPO = Path(__file__).resolve().parents[1]
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\[|\.insert|\.append|\.extend|\+?=)")


def run_python(code_or_module: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", *code_or_module], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_models_folder_is_the_package_annkernels_models():
    assert Path(annkernels.models.__file__).parent.name == "models"
    assert annkernels.models.ann.__name__ == "annkernels.models.ann"
    for name in ("build_segmentor", "load_checkpoint", "optimize_for_inference", "export_onnx", "zoo"):
        assert hasattr(annkernels.models, name), name


def test_api_and_zoo_listing_work_from_another_directory(tmp_path):
    result = run_python(["-c", "from annkernels.models import build_segmentor, export_onnx, zoo; "
                               "print(build_segmentor.__module__, len(zoo.names()))"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["annkernels.models.ann", str(len(annkernels.models.zoo.names()))]
    # zoo runs as a script without being imported twice (runpy's RuntimeWarning, an error here).
    result = run_python(["-m", "annkernels.models.zoo"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ann_r50-d8_512x1024_40k_cityscapes" in result.stdout


def test_bare_models_import_is_refused_with_the_right_name():
    result = run_python(["-c", "import models"], REPO)  # the repository root, where the folder is visible
    assert result.returncode != 0
    assert "ImportError: import annkernels.models, not models" in result.stderr


def test_no_file_changes_sys_path():
    sources = [path for path in REPO.rglob("*.py")
               if not any(part.startswith(".") or part == "build" for part in path.relative_to(REPO).parts)]
    assert len(sources) > 50  # the tree was found (virtual environments and build output are left out)
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in sources
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if SYS_PATH_EDIT.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []
