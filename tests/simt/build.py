"""Builds the CUDA kernels of csrc/cuda for the CPU SIMT emulator and loads them with ctypes.

g++ compiles each .cu file as C++ against include/ (stand-ins for <cuda_runtime.h> and <mma.h>) and the
toolkit's own headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime_api.h), with -fsanitize=kernel-address and
outline checks, so every load and store of kernel code calls the emulator's checker. probe_library builds
the small kernels of probes/ the same way (the tests that show each check catching its bug). The results
are cached by the hash of everything that goes into them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
PROBES = HERE / "probes"
CXX = os.environ.get("CXX", "g++")
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-g0", "-Wall", "-Wno-unused-function"]
# -fno-tree-sra keeps a vector load or store (uint4, float4) one access, as the GPU makes it, instead of the
# scalar pieces gcc would split it into, so its alignment is checked at the GPU's width.
KERNEL_FLAGS = ["-O1", "-fno-tree-sra", "-fno-extern-tls-init", "-fsanitize=kernel-address", "--param",
                "asan-instrumentation-with-call-threshold=0", "--param", "asan-stack=0", "--param", "asan-globals=0"]
HOST_FLAGS = ["-O2"]
# Largest dynamic shared memory a launch may ask for (the H100's opt-in limit).
DYNAMIC_SHARED_CAPACITY = 227 * 1024


def cuda_include_dir() -> Path:
    """The toolkit's include directory: CUDA_HOME, else next to nvcc, else /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_fp16.h").exists() and (candidate / "cuda_runtime_api.h").exists():
            return candidate
    raise FileNotFoundError("no CUDA toolkit headers (cuda_fp16.h) found; set CUDA_HOME")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "annkernels-simt"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def _run(cmd, cwd=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed: {' '.join(map(str, cmd))}\n{proc.stderr[-6000:]}")


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(jobs):
    errors = []
    for cmd, proc in jobs:
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{' '.join(map(str, cmd))}\n{stderr[-6000:]}")
    if errors:
        raise RuntimeError("emulator build failed:\n" + "\n".join(errors))


def _publish(scratch: Path, target: Path):
    """Moves a finished build into the cache in one step (another process may have raced us there)."""
    try:
        scratch.rename(target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


def runtime_library() -> Path:
    include = cuda_include_dir()
    sources = [HERE / "runtime.cpp", HERE / "include" / "simt_device.h"]
    key = _digest("runtime", _compiler_version(), include, *(p.read_bytes() for p in sources))
    target = cache_root() / f"runtime-{key}"
    library = target / "libsimt_runtime.so"
    if not library.exists():
        cache_root().mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=cache_root()))
        _run([CXX, *COMMON_FLAGS, *HOST_FLAGS, "-shared", f"-I{HERE / 'include'}", f"-isystem{include}",
              str(HERE / "runtime.cpp"), "-o", str(scratch / library.name)])
        _publish(scratch, target)
    return library


_UNDEFINED_TLS = re.compile(r"^\s*\d+:\s+[0-9a-f]+\s+\d+\s+TLS\s+GLOBAL\s+\w+\s+UND\s+(\S+)", re.MULTILINE)


def _dynamic_shared_source(objects) -> str:
    """One thread-local buffer per `extern __shared__` array the kernels name (undefined TLS symbols)."""
    names = set()
    for obj in objects:
        symbols = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True, check=True).stdout
        names.update(_UNDEFINED_TLS.findall(symbols))
    lines = ["#include <cstddef>"]
    for i, name in enumerate(sorted(names)):
        lines.append(f'alignas(1024) thread_local unsigned char dynamic_shared_{i}[{DYNAMIC_SHARED_CAPACITY}] '
                     f'__asm__("{name}");')
    lines.append('extern "C" int simt_dynamic_shared_buffers(void** bases, size_t* capacities, int max_count) {')
    lines.append("  int count = 0;")
    for i in range(len(names)):
        lines.append(f"  if (count < max_count) {{ bases[count] = dynamic_shared_{i}; "
                     f"capacities[count++] = sizeof(dynamic_shared_{i}); }}")
    lines.append("  return count;")
    lines.append("}")
    return "\n".join(lines) + "\n"


def kernel_library(overrides: dict[str, str] | None = None) -> Path:
    """Builds csrc/cuda for the emulator; `overrides` maps file names of csrc/cuda to replacement text
    (a scratch copy with a planted bug, for instance)."""
    overrides = dict(overrides or {})
    include = cuda_include_dir()
    runtime = runtime_library()
    files = {p.name: p.read_text() for p in sorted(CUDA_SOURCES.iterdir()) if p.suffix in (".cu", ".cuh", ".h")}
    unknown = set(overrides) - set(files)
    if unknown:
        raise KeyError(f"no such file in csrc/cuda: {sorted(unknown)}")
    files.update(overrides)
    emulator_files = [HERE / "capi.cpp", *sorted((HERE / "include").iterdir())]
    key = _digest("kernels", _compiler_version(), include, runtime, KERNEL_FLAGS,
                  *(f"{name}\0{text}" for name, text in sorted(files.items())),
                  *(p.read_bytes() for p in emulator_files))
    target = cache_root() / f"kernels-{key}"
    library = target / "libsimt_kernels.so"
    if library.exists():
        return library
    cache_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache_root()))
    try:
        _build_kernels(files, include, runtime, scratch, library.name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _publish(scratch, target)
    return library


def _build_kernels(files, include, runtime, scratch, library_name):
    source_dir = scratch / "src"
    source_dir.mkdir()
    for name, text in files.items():
        (source_dir / name).write_text(text)
    includes = [f"-I{HERE / 'include'}", f"-I{source_dir}", f"-isystem{include}"]
    headers = sorted((name, text) for name, text in files.items() if not name.endswith(".cu"))
    emulator_headers = [p.read_bytes() for p in sorted((HERE / "include").iterdir())]
    object_cache = cache_root() / "objects"
    object_cache.mkdir(exist_ok=True)
    objects, jobs, fresh = [], [], []
    for name in sorted(n for n in files if n.endswith(".cu")):
        # Each object is cached on its own, so a scratch copy of one kernel file recompiles only that file.
        key = _digest("object", _compiler_version(), include, KERNEL_FLAGS, name, files[name], *headers,
                      *emulator_headers)
        obj = object_cache / f"{Path(name).stem}-{key}.o"
        objects.append(obj)
        if not obj.exists():
            partial = scratch / f"{name}.o"
            cmd = [CXX, *COMMON_FLAGS, *KERNEL_FLAGS, *includes, "-x", "c++", "-c", str(source_dir / name), "-o",
                   str(partial)]
            jobs.append((cmd, _start(cmd)))
            fresh.append((partial, obj))
    capi = scratch / "capi.o"
    cmd = [CXX, *COMMON_FLAGS, *HOST_FLAGS, *includes, "-c", str(HERE / "capi.cpp"), "-o", str(capi)]
    jobs.append((cmd, _start(cmd)))
    _wait(jobs)
    for partial, obj in fresh:
        os.replace(partial, obj)
    _link(scratch, [*objects, capi], runtime, library_name)


def _link(scratch, objects, runtime, library_name):
    """Links kernel objects (and their host code) with one shared buffer per `extern __shared__` array."""
    shared = scratch / "dynamic_shared.cpp"
    shared.write_text(_dynamic_shared_source(objects))
    _run([CXX, *COMMON_FLAGS, *HOST_FLAGS, "-shared", str(shared), *map(str, objects),
          f"-L{runtime.parent}", "-lsimt_runtime", f"-Wl,-rpath,{runtime.parent}", "-Wl,--no-undefined",
          "-o", str(scratch / library_name)])


def probe_library(name: str) -> Path:
    """Builds probes/<name>.cu: small kernels with correct and buggy variants, and the C entry points that
    launch them (see probes/probe.h), to show that each emulator check catches its bug."""
    include = cuda_include_dir()
    runtime = runtime_library()
    source = PROBES / f"{name}.cu"
    inputs = [source, PROBES / "probe.h", *sorted((HERE / "include").iterdir())]
    key = _digest("probe", name, _compiler_version(), include, runtime, KERNEL_FLAGS, *(p.read_bytes() for p in inputs))
    target = cache_root() / f"probe-{name}-{key}"
    library = target / f"libsimt_probe_{name}.so"
    if library.exists():
        return library
    cache_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache_root()))
    try:
        obj = scratch / f"{name}.o"
        _run([CXX, *COMMON_FLAGS, *KERNEL_FLAGS, f"-I{HERE / 'include'}", f"-I{PROBES}", f"-isystem{include}",
              "-x", "c++", "-c", str(source), "-o", str(obj)])
        _link(scratch, [obj], runtime, library.name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _publish(scratch, target)
    return library
