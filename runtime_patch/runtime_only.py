"""TVM's runtime libraries, loaded by the lab itself: before `import tvm` on a GPU node with a
runtime-only TVM, and before a native plugin that links against them.

With `TVM_USE_RUNTIME_LIB=1` (or a wheel without libtvm_compiler.so) TVM loads only
libtvm_runtime.so: neither the CUDA runtime library nor disco's (libtvm_runtime_extra.so).
`prepare()` loads all three globally before `tvm` is imported, since `tvm.runtime` binds disco's
functions at import time: call it first thing in every process that imports tvm (the entry points
and disco workers do). `load_runtime_libraries` is the one loader of these libraries.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

from runtime_patch import settings

_done = False
_handles: list[ctypes.CDLL] = []  # loaded for the life of the process


def runtime_only() -> bool:
    return settings.flag("TVM_USE_RUNTIME_LIB")


def tvm_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("apache-tvm is not installed (pip install apache-tvm, or source .devkit/env.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _open(path: Path, global_symbols: bool) -> None:
    _handles.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL if global_symbols else ctypes.RTLD_LOCAL))


def load_runtime_libraries(cuda: bool, global_symbols: bool = False, nccl: bool = True) -> None:
    """libtvm_ffi, libtvm_runtime (global), the disco runtime libtvm_runtime_extra and, with `cuda`,
    NCCL (from the nvidia-nccl wheel, where installed and `nccl`) and libtvm_runtime_cuda; those two TVM
    sidecars with local symbols as `import tvm` loads them, or global with `global_symbols` (a
    runtime-only TVM, which does not load them itself). Loading a library twice is a no-op.
    Raises OSError naming the library that did not load."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which the runtime libraries link against)

    lib = tvm_lib_dir()
    _open(lib / "libtvm_runtime.so", True)
    if not (lib / "libtvm_runtime_extra.so").is_file():
        raise OSError(f"{lib} has no libtvm_runtime_extra.so: this TVM has no disco runtime")
    _open(lib / "libtvm_runtime_extra.so", global_symbols)
    if cuda and nccl:
        wheel = importlib.util.find_spec("nvidia.nccl")
        for location in (wheel.submodule_search_locations or []) if wheel else []:
            if (Path(location) / "lib" / "libnccl.so.2").exists():
                _open(Path(location) / "lib" / "libnccl.so.2", True)
                break
    if cuda:
        _open(lib / "libtvm_runtime_cuda.so", global_symbols)


def prepare() -> None:
    """Idempotent; a no-op unless TVM_USE_RUNTIME_LIB=1."""
    global _done
    if _done or not runtime_only():
        return
    if "tvm" in sys.modules:
        raise RuntimeError("runtime_patch.runtime_only.prepare() must run before the first `import tvm`")
    try:
        load_runtime_libraries(cuda=True, global_symbols=True, nccl=False)
    except OSError as err:  # e.g. libtvm_runtime_cuda.so on a machine without the CUDA driver
        if "libtvm_runtime_cuda" not in str(err):
            raise
        print(f"runtime_patch: CUDA runtime not loaded ({err})", file=sys.stderr)
    _done = True
