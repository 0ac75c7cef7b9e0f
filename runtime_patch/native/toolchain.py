"""Where the native toolchain and libraries are: TVM's and tvm-ffi's headers, the CUDA toolkit
(nvcc), NCCL and cuBLAS. Found without importing tvm (the plugins load before it). Every finder
raises PluginBuildError naming the fix; `nvcc_or_none` is the one that may find nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from pathlib import Path

from runtime_patch import settings


class PluginBuildError(RuntimeError):
    """A plugin cannot be built here; the message names what is missing and how to fix it."""


class PluginLoadError(PluginBuildError):
    """A built plugin (or a library it needs) cannot be loaded into this process."""


def package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    return None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"unknown-{dist}"


def tvm_dir() -> Path:
    d = package_dir("tvm")
    if d is None or not (d / "include" / "tvm" / "runtime").is_dir():
        raise PluginBuildError("apache-tvm with its C++ headers is not installed: pip install 'apache-tvm==0.27.*'")
    return d


def ffi_dir() -> Path:
    d = package_dir("tvm_ffi")
    if d is None or not (d / "include" / "tvm" / "ffi").is_dir():
        raise PluginBuildError("apache-tvm-ffi with its C++ headers is not installed: pip install apache-tvm-ffi")
    return d


def nccl_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of NCCL: the nvidia-nccl-cu13 wheel, $NCCL_HOME, or the system."""
    candidates = []
    pkg = package_dir("nvidia.nccl")
    if pkg is not None:
        candidates.append((pkg / "include", pkg / "lib"))
    home = settings.path("NCCL_HOME")
    if home is not None:
        candidates.append((home / "include", home / "lib"))
    candidates.append((Path("/usr/include"), Path("/usr/lib/x86_64-linux-gnu")))
    for inc, lib in candidates:
        if (inc / "nccl.h").is_file() and (lib / "libnccl.so.2").exists():
            return inc, lib
    raise PluginBuildError("NCCL headers not found (nccl.h, libnccl.so.2): pip install nvidia-nccl-cu13, or set NCCL_HOME")


def _cuda_home_or_none() -> Path | None:
    candidates = [settings.path("CUDA_HOME"), settings.path("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1])
    candidates.append(Path("/usr/local/cuda"))
    for c in candidates:
        if c is not None and (c / "include" / "cuda_runtime.h").is_file():
            return c
    return None


def cuda_home() -> Path:
    home = _cuda_home_or_none()
    if home is None:
        raise PluginBuildError("CUDA toolkit not found (nvcc, cuda_runtime.h): install it, or set CUDA_HOME")
    return home


def cuda_lib_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (home / sub / "libcudart.so").exists():
            return home / sub
    raise PluginBuildError(f"libcudart.so not found under {home}: install the CUDA toolkit, or set CUDA_HOME")


def nvcc_or_none() -> str | None:
    """nvcc of the CUDA toolkit (CUDA_HOME, PATH or /usr/local/cuda), or None."""
    home = _cuda_home_or_none()
    if home is not None and (home / "bin" / "nvcc").is_file():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc() -> str:
    found = nvcc_or_none()
    if found is None:
        raise PluginBuildError("nvcc not found: install the CUDA toolkit, or set CUDA_HOME")
    return found


def cublas_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of cuBLAS: $CUBLAS_HOME, the CUDA toolkit, or the nvidia-cublas wheel
    (cu13 layout nvidia/cu13, cu12 layout nvidia/cublas)."""
    candidates = []
    home = settings.path("CUBLAS_HOME")
    if home is not None:
        candidates += [(home / "include", home / sub) for sub in ("lib64", "lib")]
    toolkit = _cuda_home_or_none()
    if toolkit is not None:
        candidates += [(toolkit / "include", toolkit / sub) for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    for pkg_name in ("nvidia.cu13", "nvidia.cublas"):
        pkg = package_dir(pkg_name)
        if pkg is not None:
            candidates.append((pkg / "include", pkg / "lib"))
    for inc, lib in candidates:
        if (inc / "cublas_v2.h").is_file() and any(lib.glob("libcublas.so*")):
            return inc, lib
    raise PluginBuildError("cuBLAS not found (cublas_v2.h, libcublas.so): install the CUDA toolkit or "
                           "pip install nvidia-cublas, or set CUBLAS_HOME; or build with prefill_gemm=tir and "
                           "prefill_attention=tir")


def cublas_lib_flag(lib: Path) -> str:
    return "-lcublas" if (lib / "libcublas.so").exists() else f"-l:{sorted(lib.glob('libcublas.so.*'))[0].name}"


def cxx() -> str:
    name = settings.text("CXX")
    found = shutil.which(name)
    if found is None:
        raise PluginBuildError(f"C++ compiler '{name}' not found: apt-get install g++ (or set CXX), "
                               "or prebuild with `python -m runtime_patch.native.build` where one exists")
    return found
