"""Mark the measured region for a profiler: cudaProfilerStart/Stop around the timed runs.

    with profiler_range():          # harness.measure.timed_runs wraps its timed repeats
        ...

Active only when the environment has LAB_PROFILER_RANGE=1 (profile_gpu.sh -m nsight sets it, so
`nsys --capture-range=cudaProfilerApi` and `ncu --profile-from-start off` capture just this
region); otherwise, or where no CUDA library can be loaded, it does nothing. Nested ranges start
and stop the profiler once, at the outermost level. Calls go through ctypes: the CUDA runtime
(libcudart) when one is found, else the driver (libcuda's cuProfilerStart/Stop, which act on the
current context).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import threading
from contextlib import contextmanager

from runtime_patch import settings

log = logging.getLogger("runtime_patch.profiler_range")

ENV = "LAB_PROFILER_RANGE"
_lock = threading.Lock()
_depth = 0
_api: tuple | None = None  # (start, stop, description), found once
_searched = False


def _candidates() -> list[str]:
    names = [ctypes.util.find_library("cudart")] if ctypes.util.find_library("cudart") else []
    names += [f"libcudart.so.{v}" for v in ("13", "12", "11.0")] + ["libcudart.so"]
    roots = [settings.text("CUDA_HOME"), "/usr/local/cuda"]
    for root in filter(None, roots):
        names += sorted(glob.glob(os.path.join(root, "lib64", "libcudart.so*")))
    for entry in sys.path:  # pip-installed runtimes (nvidia-cuda-runtime-cu12, the cu13 wheels)
        names += sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
        names += sorted(glob.glob(os.path.join(entry, "nvidia", "cu1*", "lib", "libcudart.so*")))
    return list(dict.fromkeys(names))


def _find_api() -> tuple | None:
    global _api, _searched
    if _searched:
        return _api
    _searched = True
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            _api = (lib.cudaProfilerStart, lib.cudaProfilerStop, f"cudart ({name})")
            return _api
        except (OSError, AttributeError):
            continue
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        _api = (lib.cuProfilerStart, lib.cuProfilerStop, "driver (libcuda.so.1)")
    except (OSError, AttributeError):
        _api = None
    return _api


def enabled() -> bool:
    return settings.flag(ENV)


@contextmanager
def profiler_range(active: bool | None = None):
    """Yield True while the profiler's capture is on, False where this is a no-op.
    `active` overrides the LAB_PROFILER_RANGE check."""
    global _depth
    active = enabled() if active is None else active
    api = _find_api() if active else None
    if api is None:
        if active:
            log.warning("LAB_PROFILER_RANGE=1 but no CUDA runtime or driver library was found: "
                        "the profiler's capture range is not marked")
        yield False
        return
    start, stop, where = api
    with _lock:
        _depth += 1
        outermost = _depth == 1
    if outermost:
        status = start()
        if status:
            log.warning("cudaProfilerStart via %s returned %s", where, status)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            last = _depth == 0
        if last:
            status = stop()
            if status:
                log.warning("cudaProfilerStop via %s returned %s", where, status)
