"""What this machine offers the build and the GPU checks, one "name: value" line each.

    python3 -m tools.gpu.preflight            # toolchain, GPU, test plugins, annkernels' native kernels
    python3 -m tools.gpu.preflight --native   # only whether annkernels' native kernels load

Each probe is guarded: one that fails prints its error and the rest still run. The native-kernel line
gives the import error when annkernels._C does not load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

PROBE_TIMEOUT_S = 5


def _command_output(argv: list, pick: str = "") -> str:
    """The last output line of ``argv`` that contains ``pick``."""
    path = shutil.which(argv[0])
    if path is None:
        return f"not found on PATH ({argv[0]})"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    lines = [line.strip() for line in (done.stdout or done.stderr).splitlines() if pick in line and line.strip()]
    return (lines[-1] if lines else f"exit {done.returncode}, no output") + f" ({path})"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _toolchain() -> list:
    include = sysconfig.get_paths()["include"]
    header = os.path.join(include, "Python.h")
    return [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("Python.h", header if os.path.exists(header) else f"missing (looked in {include})"),
        ("nvcc", lambda: _command_output(["nvcc", "--version"], pick="release")),
        ("ninja", lambda: _command_output(["ninja", "--version"])),
        ("nvidia-smi", lambda: _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                                "clocks.sm,clocks.max.sm", "--format=csv,noheader"])),
        ("packages", lambda: ", ".join(f"{name} {_version(name)}" for name in (
            "torch", "triton", "numpy", "pytest", "pytest-timeout", "pytest-xdist", "pytest-benchmark",
            "setuptools"))),
        ("environment", lambda: ", ".join(f"{key}={os.environ.get(key, '')}" for key in (
            "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TRITON_INTERPRET", "ANNKERNELS_TRITON_AUTOTUNE", "CUDA_HOME"))),
    ]


def _torch() -> list:
    def versions() -> str:
        import torch

        return f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"

    def cuda_home() -> str:
        from torch.utils import cpp_extension

        return str(cpp_extension.CUDA_HOME)

    def gpu() -> str:
        import torch

        if not torch.cuda.is_available():
            return "none visible to torch"
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", None)
        return (f"{props.name}, capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB" + (f", L2 {l2 / 2**20:.0f} MiB" if l2 else "")
                + f"; {torch.cuda.device_count()} device(s)")

    return [("torch", versions), ("torch CUDA_HOME", cuda_home), ("gpu", gpu)]


def _native() -> list:
    def native() -> str:
        from annkernels import _backend

        if _backend.NATIVE_IMPORT_ERROR is not None:
            return f"not loaded: {_backend.NATIVE_IMPORT_ERROR}"
        kinds = [kind for kind, present in (("CPU", _backend.NATIVE_CPU), ("CUDA", _backend.NATIVE_CUDA)) if present]
        return "loaded, kernels for " + (" and ".join(kinds) or "no device (annkernels._C registered none)")

    def backends() -> str:
        import torch

        import annkernels

        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        listed = "; ".join(f"{device}: {', '.join(annkernels.available_backends(device))}" for device in devices)
        return f"{listed}; GPU_VERIFIED: {annkernels.GPU_VERIFIED or 'none'}"

    return [("annkernels native kernels", native), ("annkernels backends", backends)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native", action="store_true", help="only report annkernels' native kernels")
    args = parser.parse_args(argv)
    probes = _native() if args.native else _toolchain() + _torch() + _native()
    for name, probe in probes:
        try:
            value = probe() if callable(probe) else probe
        except Exception as exc:  # a broken probe is a finding, not a reason to stop the others
            value = f"error: {type(exc).__name__}: {exc}"
        print(f"{name}: {value}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
