"""Builds annkernels._C: C++ CPU kernels always, CUDA kernels when torch and a toolkit allow it.

Environment switches:
  ANNKERNELS_FORCE_CUDA=1       build the CUDA sources even if the checks below say no (needs a CUDA torch)
  ANNKERNELS_SKIP_CUDA_BUILD=1  never build CUDA sources
  TORCH_CUDA_ARCH_LIST          target architectures (default "8.0;9.0a")
  MAX_JOBS                      parallel compile jobs (default: bounded by cores and free memory)
  DEBUG=1                       -O0 -g
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    if _env_flag("ANNKERNELS_SKIP_CUDA_BUILD"):
        return False
    if _env_flag("ANNKERNELS_FORCE_CUDA"):
        return True
    # Never torch.cuda.is_available(): build hosts without a GPU are normal.
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _default_max_jobs() -> None:
    # nvcc and torch headers take ~1-2 GB per job; stay inside cores and memory.
    if "MAX_JOBS" in os.environ:
        return
    jobs = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        jobs = max(1, min(jobs, int(free_gb // 2)))
    except (ValueError, OSError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


def get_extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _env_flag("DEBUG")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: BuildExtension passes the standard the installed torch's headers need (C++20 from 2.14).
    cxx_flags += ["-fopenmp"]
    extra_compile_args = {"cxx": cxx_flags}
    extension = CppExtension
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        extra_compile_args["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        extra_compile_args["nvcc"] += ["--expt-relaxed-constexpr"]
    return [
        extension(
            "annkernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    _default_max_jobs()
    # The segmentor lives in the top-level models/ folder (the repository's layout) and is installed as
    # annkernels.models; an editable install maps the same name onto the folder. train/ likewise becomes
    # annkernels.train: `python train/train.py` puts train/ first on sys.path, where the name `train` is the
    # script itself, so its modules import each other under a name the script cannot shadow.
    packages = find_packages(include=["annkernels", "annkernels.*"]) + ["annkernels.models", "annkernels.train"]
    setup(packages=packages, package_dir={"annkernels.models": "models", "annkernels.train": "train"},
          ext_modules=get_extensions(),
          cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    main()
