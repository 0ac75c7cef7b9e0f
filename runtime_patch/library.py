"""Make a runtime_patch library's functions callable in this process (runtime_patch.gemm and
runtime_patch.attention): on cuda its CUDA plugin (built on first use), on llvm its NumPy
versions registered under the same names."""

from __future__ import annotations

from typing import Callable


def register(target: str, plugin: str, numpy: dict[str, Callable], registered: set[str], what: str) -> None:
    """Idempotent per target (`registered` holds the targets done). Raises
    runtime_patch.ccl.CCLBuildError (naming what is missing) if the plugin cannot be built."""
    if target in registered:
        return
    if target == "cuda":
        from runtime_patch.ccl.build import load

        load(plugin)
    elif target == "llvm":
        import tvm_ffi

        for name, impl in numpy.items():
            tvm_ffi.register_global_func(name, impl, override=True)
    else:
        raise ValueError(f"no library {what} for target {target!r}")
    registered.add(target)
