"""Runtime-only TVM (a GPU node with no compiler): load the runtime libraries before `import tvm`.

With `TVM_USE_RUNTIME_LIB=1` (or a wheel without libtvm_compiler.so) TVM loads only
libtvm_runtime.so: neither the CUDA runtime library nor disco's (libtvm_runtime_extra.so). They
are loaded here, globally, before `tvm` is imported, since `tvm.runtime` binds disco's functions
at import time. Call `prepare()` first thing in every process that imports tvm (entry points and
disco workers do).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so")
_done = False


def runtime_only() -> bool:
    return os.environ.get("TVM_USE_RUNTIME_LIB") == "1"


def tvm_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("apache-tvm is not installed (pip install apache-tvm, or source .devkit/env.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def prepare() -> None:
    """Idempotent; a no-op unless TVM_USE_RUNTIME_LIB=1."""
    global _done
    if _done or not runtime_only():
        return
    if "tvm" in sys.modules:
        raise RuntimeError("runtime_patch.runtime_only.prepare() must run before the first `import tvm`")
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime libraries link against)

    lib_dir = tvm_lib_dir()
    for name in _LIBS:
        path = lib_dir / name
        if path.is_file():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError as err:  # e.g. libtvm_runtime_cuda.so on a machine without the CUDA driver
                if name != "libtvm_runtime_cuda.so":
                    raise
                print(f"runtime_patch: CUDA runtime not loaded ({err})", file=sys.stderr)
    _done = True
