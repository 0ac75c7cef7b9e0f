"""Build and load the native plugins, the one builder for every one of them:

- `cpu_shm` (cpu_shm.cc, ours): a CCL for TVM disco over shared memory, so TP runs on any CPU;
- `nccl`: TVM's shipped `disco/nccl/nccl.cc` with our nccl_overlap.cc (allreduces on a
  communication stream, `full_overlap`);
- `cuda_gemm` (cublas_gemm.cc, quant_gemv.cu, quant_gemm.cu, rms_norm.cu, swiglu.cu):
  the prefill's cuBLAS GEMM, the q4 and q8 decode GEMVs, the prefill's q4 and q8 GEMMs, the
  RMSNorms (and the prefill's residual adds with them), the prefill's SiLU;
- `cuda_attention` (cuda_attention.cu, flash_prefill.cu): the paged KV cache's prefill and decode attention, and
  the static KV cache's functions (`lab.kv.*`: attention, append, the step's advance and mailbox);
- `cuda_allreduce` (oneshot_allreduce.cu): the one-shot allreduce over CUDA IPC (`lab.ccl.*`).

Which `lab.*` function each provides is in runtime_patch.functions. A plugin is a shared library
whose static initialisers register its global functions. `build(name)` compiles it with g++ (nvcc
for CUDA kernels) into $LAB_PLUGIN_DIR (default <repo>/build/plugins), keyed by a hash of its
sources, flags and the TVM / tvm-ffi versions (not the machine, so a folder built here loads on a
GPU node with the same TVM). `load(name)` builds it if needed and loads it into this process with
RTLD_GLOBAL, after the TVM runtime libraries it links against.

    python -m runtime_patch.native.build cpu_shm nccl     # prebuild, prints the paths
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime_patch import runtime_only, settings

from . import toolchain
from .toolchain import PluginBuildError, PluginLoadError

CCLS = ("cpu_shm", "nccl")
@dataclass(frozen=True)
class CudaPlugin:
    """A plugin of CUDA kernels: its sources (in this folder), compiled by nvcc, and whether it
    links against cuBLAS."""

    sources: tuple[str, ...]
    cublas: bool = True


CUDA_PLUGINS = {"cuda_gemm": CudaPlugin(("cublas_gemm.cc", "quant_gemv.cu", "quant_gemm.cu",
                                         "rms_norm.cu", "swiglu.cu")),
                "cuda_attention": CudaPlugin(("cuda_attention.cu", "flash_prefill.cu")),
                "cuda_allreduce": CudaPlugin(("oneshot_allreduce.cu",), cublas=False)}
PLUGINS = (*CCLS, *CUDA_PLUGINS)
_HERE = Path(__file__).resolve().parent
_STUBS = _HERE / "nccl_stubs"
# Bump when the recipe changes in a way the hashed inputs do not show.
_RECIPE_VERSION = "1"

__all__ = ["CCLS", "PLUGINS", "PluginBuildError", "PluginLoadError", "build", "load", "plugin_path"]


# ------------------------------------------------------------------------------------------------
# Recipes


@dataclass
class _Recipe:
    name: str
    sources: list[Path]        # compiled
    hashed: list[Path]         # whose contents key the cache (sources + headers)
    flags: list[str]           # machine-independent flags (hashed)
    include_dirs: list[Path] = field(default_factory=list)
    lib_dirs: list[Path] = field(default_factory=list)
    libs: list[str] = field(default_factory=list)
    needs_anchor: bool = False  # see _relative_include_anchor
    nvcc: bool = False          # compiled by nvcc (CUDA kernels) instead of the C++ compiler


_COMMON_FLAGS = ["-std=c++17", "-O2", "-g0", "-fPIC", "-shared", "-fvisibility=hidden",
                 "-fvisibility-inlines-hidden", "-Wall", "-Wno-unused-parameter",
                 "-Wl,--no-undefined", "-Wl,--as-needed"]
# No rpath: the TVM libraries are found already loaded in the process (by soname), so the .so
# stays relocatable. load() loads them first.
_TVM_LIBS = ["-l:libtvm_runtime_extra.so", "-ltvm_runtime", "-ltvm_ffi"]
# CUDA kernels for the GPUs the lab targets (A100, H100/H200), plus PTX that newer GPUs JIT. The
# H100/H200 code is sm_90a's (the warpgroup MMA of the prefill's quantized GEMM, wgmma.h); the PTX,
# plain compute_90, has no wgmma (the host launches that kernel only on compute capability 9.0).
_NVCC_FLAGS = ["-std=c++17", "-O2", "-shared", "-Xcompiler=-fPIC,-fvisibility=hidden,-Wall,-Wno-unused-parameter",
               "-Xlinker=--no-undefined,--as-needed", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]


def _stub_headers() -> list[Path]:
    return sorted(p for p in _STUBS.rglob("*.h"))


def _tvm_include_dirs() -> list[Path]:
    tvm, ffi = toolchain.tvm_dir(), toolchain.ffi_dir()
    return [_STUBS / "include", tvm / "include", ffi / "include", ffi / "3rdparty" / "dlpack" / "include"]


def _tvm_lib_dirs() -> list[Path]:
    return [toolchain.tvm_dir() / "lib", toolchain.ffi_dir() / "lib"]


def _recipe(name: str, for_build: bool) -> _Recipe:
    """The recipe of a plugin; paths of toolchains are resolved only when `for_build`."""
    if name == "cpu_shm":
        src = _HERE / "cpu_shm.cc"
        r = _Recipe(name, [src], [src, *_stub_headers()], list(_COMMON_FLAGS), libs=list(_TVM_LIBS))
        if for_build:
            r.include_dirs, r.lib_dirs = _tvm_include_dirs(), _tvm_lib_dirs()
        return r
    if name == "nccl":
        disco = toolchain.tvm_dir() / "src" / "runtime" / "extra" / "disco"
        src = disco / "nccl" / "nccl.cc"
        if not src.is_file():
            raise PluginBuildError(f"{src} is missing: this apache-tvm wheel does not ship the NCCL CCL source "
                                   "(apache-tvm 0.27 does)")
        # nccl_overlap.cc (ours) reaches the shipped CCL's per-worker context: one library
        ours = _HERE / "nccl_overlap.cc"
        hashed = [src, ours, _HERE / "cuda_check.h", disco / "nccl" / "nccl_context.h", disco / "utils.h",
                  *_stub_headers()]
        r = _Recipe(name, [src, ours], hashed, [*_COMMON_FLAGS, "-DTVM_NCCL_RCCL_SWITCH=0"],
                    libs=[*_TVM_LIBS, "-l:libnccl.so.2", "-lcudart"], needs_anchor=True)
        if for_build:
            nccl_inc, nccl_lib = toolchain.nccl_dirs()
            cuda = toolchain.cuda_home()
            r.include_dirs = [*_tvm_include_dirs(), disco / "nccl", nccl_inc, cuda / "include"]
            r.lib_dirs = [*_tvm_lib_dirs(), nccl_lib, toolchain.cuda_lib_dir(cuda)]
        return r
    if name in CUDA_PLUGINS:
        plugin = CUDA_PLUGINS[name]
        srcs = [_HERE / f for f in plugin.sources]
        hashed = [*srcs, *sorted(_HERE.glob("*.h"))]
        r = _Recipe(name, srcs, hashed, [*_NVCC_FLAGS, *([] if plugin.cublas else ["-DLAB_NO_CUBLAS"])],
                    libs=["-ltvm_ffi", "-lcudart"], nvcc=True)
        if for_build:
            cuda = toolchain.cuda_home()
            ffi = toolchain.ffi_dir()
            r.include_dirs = [ffi / "include", ffi / "3rdparty" / "dlpack" / "include", cuda / "include"]
            r.lib_dirs = [ffi / "lib", toolchain.cuda_lib_dir(cuda)]
            if plugin.cublas:
                cublas_inc, cublas_lib = toolchain.cublas_dirs()
                r.include_dirs.insert(2, cublas_inc)
                r.lib_dirs.insert(1, cublas_lib)
                r.libs = ["-ltvm_ffi", toolchain.cublas_lib_flag(cublas_lib), "-lcudart"]
        return r
    raise ValueError(f"unknown plugin {name!r}; choose one of {PLUGINS}")


def _key(r: _Recipe) -> str:
    h = hashlib.sha256()
    for part in (_RECIPE_VERSION, r.name, *r.flags, *r.libs,
                 toolchain.version("apache-tvm"), toolchain.version("apache-tvm-ffi")):
        h.update(part.encode() + b"\0")
    for p in r.hashed:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def plugin_path(name: str) -> Path:
    """Where `build(name)` puts (or finds) the plugin for the installed TVM."""
    r = _recipe(name, for_build=False)
    return settings.plugin_dir() / f"{name}-{_key(r)}.so"


def _relative_include_anchor(tmp: Path) -> Path:
    """nccl_context.h includes "../../../../support/process_id.h". GCC also resolves a quoted
    include against each -iquote dir, so a dir four levels below a copy of our stubs makes that
    path land on nccl_stubs/support/process_id.h."""
    root = tmp / "stubs"
    shutil.copytree(_STUBS / "support", root / "support")
    anchor = root / "a" / "b" / "c" / "d"
    anchor.mkdir(parents=True)
    return anchor


def build(name: str, force: bool = False) -> Path:
    """Compile plugin `name` (one of PLUGINS) unless cached; return the .so path."""
    out = plugin_path(name)
    if out.is_file() and not force:
        return out
    r = _recipe(name, for_build=True)
    compiler = toolchain.nvcc() if r.nvcc else toolchain.cxx()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        cmd = [compiler, *r.flags]
        if r.needs_anchor:
            cmd += ["-iquote", str(_relative_include_anchor(tmp))]
        cmd += [f"-I{d}" for d in r.include_dirs]
        cmd += [str(s) for s in r.sources]
        cmd += ["-o", str(tmp / out.name)]
        cmd += [f"-L{d}" for d in r.lib_dirs] + r.libs
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PluginBuildError(f"compiling the {name} plugin failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        meta = {"name": name, "key": out.stem.rsplit("-", 1)[1], "command": cmd, "compiler": version,
                "apache-tvm": toolchain.version("apache-tvm"), "apache-tvm-ffi": toolchain.version("apache-tvm-ffi")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp / "meta.json", out.with_suffix(".json"))
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# Loading

_loaded: dict[str, Path] = {}
_handles: list[ctypes.CDLL] = []  # keep the libraries loaded for the life of the process


def _cdll(path: Path, what: str) -> None:
    try:
        _handles.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
    except OSError as e:
        raise PluginLoadError(f"cannot load {what} ({path}): {e}") from None


def load(name: str) -> Path:
    """Build plugin `name` if needed and load it into this process (once); return its path.

    Call it in the controller and in every disco worker process (runtime_patch.disco.worker does)."""
    if name in _loaded:
        return _loaded[name]
    if name not in PLUGINS:
        raise ValueError(f"unknown plugin {name!r}; choose one of {PLUGINS}")
    try:
        runtime_only.load_runtime_libraries(cuda=name != "cpu_shm")
    except OSError as err:
        raise PluginLoadError(f"cannot load TVM's runtime libraries for the {name} plugin: {err}") from None
    path = build(name)
    if name in CUDA_PLUGINS and CUDA_PLUGINS[name].cublas:  # no rpath (see _TVM_LIBS): load cuBLAS from where it was found
        lib = toolchain.cublas_dirs()[1]
        for pattern in ("libcublasLt.so*", "libcublas.so*"):
            found = sorted(lib.glob(pattern))
            if found:
                _cdll(found[0], "cuBLAS")
    _cdll(path, f"the {name} plugin")
    _loaded[name] = path
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runtime_patch.native.build", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["cpu_shm"], help=f"plugins to build, of {PLUGINS}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            print(f"{name}: {build(name, force=args.force)}")
        except PluginBuildError as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
