"""What the harness measures about the device itself: copy bandwidth and memory in use."""

from __future__ import annotations

import resource
import time

import numpy as np

from .nvml import Nvml


def copy_bandwidth(target: str, device_index: int = 0, nbytes: int = 1 << 28, repeats: int = 10) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second), median of `repeats`
    after one warm-up. On the CPU, a numpy copy of the same size."""
    samples = []
    if target == "llvm":
        src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        for i in range(repeats + 1):
            start = time.perf_counter()
            np.copyto(dst, src)
            if i:
                samples.append(time.perf_counter() - start)
    else:
        import tvm

        dev = tvm.cuda(device_index)
        src = tvm.runtime.empty((nbytes,), "uint8", dev)
        dst = tvm.runtime.empty((nbytes,), "uint8", dev)
        for i in range(repeats + 1):
            dev.sync()
            start = time.perf_counter()
            src.copyto(dst)
            dev.sync()
            if i:
                samples.append(time.perf_counter() - start)
    seconds = float(np.median(samples))
    return {"bytes_per_s": 2 * nbytes / seconds, "bytes": nbytes, "samples_s": samples,
            "method": "numpy copy" if target == "llvm" else f"TVM device copy on cuda:{device_index}"}


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_memory_used_bytes() -> list[int] | None:
    """Memory in use on every visible GPU (NVML), or None without NVML."""
    nv = Nvml.open()
    if nv is None:
        return None
    with nv:
        return [int(nv.module.nvmlDeviceGetMemoryInfo(h).used) for h in nv.handles]
