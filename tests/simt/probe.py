"""Runs the emulator's probes (probes/*.cu): small kernels with correct and buggy variants, built by
build.probe_library, launched through their C entry points on host tensors, with the checker's reports
raised as EmulatorError like the real kernels' (see Emulator._call)."""

from __future__ import annotations

import ctypes

from . import EmulatorError, Launch, build, read_launches, set_fragment_seed


class Probe:
    def __init__(self, name: str):
        self._library = ctypes.CDLL(str(build.probe_library(name)))
        self._runtime = ctypes.CDLL(str(build.runtime_library()))
        self._runtime.simt_register_buffer.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                                       ctypes.c_int]
        self._runtime.simt_report.restype = ctypes.c_char_p
        self._runtime.simt_count_shared_wavefronts.argtypes = [ctypes.c_int]

    def scramble_fragments(self, seed: int):
        """Seeds the WMMA fragment placement (0: identity; the runtime starts at 1)."""
        set_fragment_seed(self._runtime, seed)
        return self

    def count_shared_wavefronts(self, on: bool = True):
        """Counts the shared-memory wavefronts of later launches (see Emulator.count_shared_wavefronts)."""
        self._runtime.simt_count_shared_wavefronts(int(on))
        return self

    def run(self, entry: str, *args, inputs=(), outputs=()) -> list[Launch]:
        """Calls entry(*args) (tensors pass as pointers) with `inputs` and `outputs` ((name, tensor) pairs)
        as the launch's only buffers; returns the launches it made."""
        rt = self._runtime
        rt.simt_reset()
        for writable, buffers in ((0, inputs), (1, outputs)):
            for name, tensor in buffers:
                rt.simt_register_buffer(tensor.data_ptr(), tensor.numel() * tensor.element_size(), name.encode(),
                                        writable)
        status = getattr(self._library, entry)(*(ctypes.c_void_p(a.data_ptr()) if hasattr(a, "data_ptr") else a
                                                 for a in args))
        reports = [rt.simt_report(i).decode() for i in range(rt.simt_report_count())]
        if reports:
            raise EmulatorError("\n".join(reports))
        if status != 0:
            raise RuntimeError(f"{entry} returned cudaError_t {status}")
        return read_launches(rt)
