"""The CUDA kernels of csrc/cuda read without a GPU: nvcc for sm_90a, ptxas's resource report, the SASS, and
the launch plans the launchers themselves choose (run through the CPU emulator of tests/simt, one block
per launch).

Compiles are cached under ~/.cache/annkernels-perf by the hash of the compiler, its flags and every file
the kernel may include, so a second run over an unchanged tree only reads files.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tools.gpu import sass

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC_FLAGS = ["-c", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v"]
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_TYPE_NAMES = (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("double", "fp64"), ("float", "fp32"))


def nvcc() -> str | None:
    return shutil.which("nvcc")


def cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the copy inside the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    if nvcc():
        beside = Path(nvcc()).resolve().parent / "cuobjdump"
        if beside.exists():
            return str(beside)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        wheel_copy = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if wheel_copy.exists():
            return str(wheel_copy)
    return None


def missing_tools() -> str | None:
    """Why the CUDA analysis cannot run here, or None."""
    if nvcc() is None:
        return "nvcc is not on PATH"
    if cuobjdump() is None:
        return "no cuobjdump (CUDA toolkit or the triton wheel)"
    return None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "annkernels-perf"


@functools.lru_cache(maxsize=None)
def _tool_version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout


def type_label(name: str) -> str:
    """A demangled kernel name with namespaces dropped and element types shortened:
    short_attention_forward_kernel<bf16, 64>."""
    name = re.sub(r"\(.*$", "", name.replace("(anonymous namespace)::", ""))
    name = name.split(" ")[-1] if "<" not in name else name[name.rfind(" ", 0, name.find("<")) + 1:]
    head, angle, args = name.partition("<")
    head = head.split("::")[-1]
    for long, short in _TYPE_NAMES:
        args = re.sub(rf"\b{re.escape(long)}\b", short, args)
    return head + angle + args


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


@dataclass
class KernelStatic:
    """What ptxas and the SASS say about one compiled kernel."""

    name: str
    source: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    static_smem: int
    global_loads: dict = field(default_factory=dict)  # bits -> instruction count
    global_stores: dict = field(default_factory=dict)
    in_flight_histogram: dict = field(default_factory=dict)  # other loads in flight -> sites (hot loops)
    load_sites: list = field(default_factory=list)
    shared_fragment_loads: int = 0  # LDSM + LDS
    ldsm: int = 0
    generic_loads: int = 0  # LD: generic addressing (WMMA fragments of bf16/tf32 from shared memory)
    hmma: int = 0
    wgmma: int = 0
    ffma: int = 0
    async_copies: int = 0  # LDGSTS (cp.async)
    tma: int = 0  # UTMALDG / UBLKCP (cp.async.bulk)

    @property
    def tensor_core(self) -> str:
        return "wgmma" if self.wgmma else "hmma" if self.hmma else "none"

    @property
    def hot_sites(self) -> list:
        return [s for s in self.load_sites if s["in_loop"]]

    @property
    def mean_in_flight(self) -> float:
        hot = self.hot_sites or self.load_sites
        return sum(s["in_flight"] for s in hot) / len(hot) if hot else 0.0

    @property
    def mean_load_bytes(self) -> float:
        hot = self.hot_sites or self.load_sites
        return sum(s["bits"] for s in hot) / 8 / len(hot) if hot else 4.0


def summarize(name: str, source: str, report: dict, code: list[sass.Instruction]) -> KernelStatic:
    kernel = KernelStatic(name=name, source=source, **report)
    loads, stores = collections.Counter(), collections.Counter()
    for ins in code:
        base = ins.base
        if base == "LDG":
            loads[sass.load_bits(ins)] += 1
        elif base == "STG":
            stores[sass.load_bits(ins)] += 1
        elif base == "LDSM":
            kernel.ldsm += 1
        elif base == "LDS":
            kernel.shared_fragment_loads += 1
        elif base == "LD":
            kernel.generic_loads += 1
        elif base == "HMMA":
            kernel.hmma += 1
        elif base == "HGMMA":
            kernel.wgmma += 1
        elif base == "FFMA":
            kernel.ffma += 1
        elif base == "LDGSTS":
            kernel.async_copies += 1
        elif base in ("UTMALDG", "UBLKCP", "UTMAPF"):
            kernel.tma += 1
    kernel.shared_fragment_loads += kernel.ldsm
    kernel.global_loads = dict(sorted(loads.items()))
    kernel.global_stores = dict(sorted(stores.items()))
    kernel.load_sites = [
        {"offset": f"0x{s.offset:04x}", "sass": s.text, "bits": s.bits, "in_loop": s.in_loop,
         "in_flight": s.in_flight, "issued_before_use": s.issued_before_use,
         "first_use": None if s.first_use is None else f"0x{s.first_use:04x}"}
        for s in sass.load_sites(code)
    ]
    histogram = collections.Counter(s["in_flight"] for s in kernel.hot_sites)
    kernel.in_flight_histogram = dict(sorted(histogram.items()))
    return kernel


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled name: registers, spills, stack, static shared memory} from ``-Xptxas -v`` output."""
    reports, current = {}, None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = reports.setdefault(entry.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                                          "stack_bytes": 0, "static_smem": 0})
            continue
        if current is None:
            continue
        spills = _SPILLS.search(line)
        if spills:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, spills.groups())
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            current["static_smem"] = int(used.group(2) or 0)
    return reports


def compile_source(source: Path, include_dirs: tuple[Path, ...] = (), defines: tuple[str, ...] = ()) -> dict:
    """nvcc for sm_90a and cuobjdump of one .cu file: {"ptxas": log, "sass": text}, cached by content."""
    source = source.resolve()
    include_dirs = (source.parent, *include_dirs)
    headers = sorted({p for d in include_dirs for p in d.iterdir() if p.suffix in (".h", ".cuh")})
    digest = hashlib.sha256()
    for part in (_tool_version(nvcc()), " ".join(NVCC_FLAGS), " ".join(defines), source.name, source.read_bytes(),
                 *(p.name.encode() + b"\0" + p.read_bytes() for p in headers)):
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    entry = cache_root() / "cuda" / f"{source.stem}-{digest.hexdigest()[:20]}"
    if not (entry / "sass.txt").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=entry.parent))
        obj = scratch / "kernel.o"
        cmd = [nvcc(), *NVCC_FLAGS, *(f"-I{d}" for d in include_dirs), *(f"-D{d}" for d in defines), "-o", str(obj),
               str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=source.parent)
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
        (scratch / "ptxas.txt").write_text(proc.stderr)
        dump = subprocess.run([cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        (scratch / "sass.txt").write_text(dump)
        obj.unlink()
        try:
            scratch.rename(entry)
        except OSError:  # another process published the same entry first
            shutil.rmtree(scratch, ignore_errors=True)
    return {"ptxas": (entry / "ptxas.txt").read_text(), "sass": (entry / "sass.txt").read_text()}


def analyse_source(source: Path, **compile_args) -> dict[str, KernelStatic]:
    """{kernel label: KernelStatic} for every kernel instantiation in one .cu file."""
    compiled = compile_source(source, **compile_args)
    reports = parse_ptxas(compiled["ptxas"])
    functions = sass.parse(compiled["sass"])
    labels = _demangle(sorted(functions))
    kernels = {}
    for mangled, code in functions.items():
        label = type_label(labels[mangled])
        kernels[label] = summarize(label, source.name, reports.get(mangled, _empty_report()), code)
    return kernels


def _empty_report() -> dict:
    return {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "static_smem": 0}


def analyse_tree(cuda_dir: Path = CUDA_DIR) -> dict[str, KernelStatic]:
    """Every kernel of every csrc/cuda/*.cu file, compiled in parallel (two at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    sources = sorted(cuda_dir.glob("*.cu"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(analyse_source, sources))
    return {label: kernel for kernels in results for label, kernel in kernels.items()}
