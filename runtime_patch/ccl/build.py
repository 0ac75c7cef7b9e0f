"""Build and load the runtime plugins: the CCLs that TVM disco needs, `cpu_shm` (ours) and `nccl`
(TVM's shipped source, with our nccl_overlap.cc: allreduces on a communication stream),
`cuda_gemm` (runtime_patch/gemm: the prefill's cuBLAS GEMM, the q4 decode GEMV) and `cuda_attention`
(runtime_patch/attention: the KV cache's prefill and decode attention, cuBLAS and kernels of ours).

A plugin is a shared library whose static initialisers register its globals (the CCLs:
`runtime.disco.<ccl>.*`). `build(name)` compiles it with g++ (nvcc for CUDA kernels) into a
cache dir, keyed by a hash of its sources, flags and the TVM / tvm-ffi versions (not the machine,
so a `build/ccl` made here loads on a GPU box with the same TVM). `load(name)` builds it if
needed and loads it into this process with RTLD_GLOBAL, after the TVM runtime libraries it links
against.

    python -m runtime_patch.ccl.build cpu_shm nccl     # prebuild, prints the paths
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CCLS = ("cpu_shm", "nccl")
PLUGINS = (*CCLS, "cuda_gemm", "cuda_attention")
CUBLAS_PLUGINS = ("cuda_gemm", "cuda_attention")
_HERE = Path(__file__).resolve().parent
_REPO_ROOT = _HERE.parents[1]
_STUBS = _HERE / "nccl_stubs"
# Bump when the recipe changes in a way the hashed inputs do not show.
_RECIPE_VERSION = "1"


class CCLBuildError(RuntimeError):
    """A plugin cannot be built here; the message names what is missing and how to fix it."""


class CCLLoadError(CCLBuildError):
    """A built plugin (or a library it needs) cannot be loaded into this process."""


def cache_dir() -> Path:
    """Where built plugins live: $LAB_CCL_DIR, else <repo>/build/ccl (git-ignored)."""
    return Path(os.environ.get("LAB_CCL_DIR") or _REPO_ROOT / "build" / "ccl")


# ------------------------------------------------------------------------------------------------
# Locating TVM, tvm-ffi, NCCL and CUDA (without importing tvm: see load())


def _package_dir(name: str) -> Path | None:
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


def _tvm_dir() -> Path:
    d = _package_dir("tvm")
    if d is None or not (d / "include" / "tvm" / "runtime").is_dir():
        raise CCLBuildError("apache-tvm with its C++ headers is not installed: pip install 'apache-tvm==0.27.*'")
    return d


def _ffi_dir() -> Path:
    d = _package_dir("tvm_ffi")
    if d is None or not (d / "include" / "tvm" / "ffi").is_dir():
        raise CCLBuildError("apache-tvm-ffi with its C++ headers is not installed: pip install apache-tvm-ffi")
    return d


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"unknown-{dist}"


def _nccl_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of NCCL: the nvidia-nccl-cu13 wheel, $NCCL_HOME, or the system."""
    candidates = []
    pkg = _package_dir("nvidia.nccl")
    if pkg is not None:
        candidates.append((pkg / "include", pkg / "lib"))
    if os.environ.get("NCCL_HOME"):
        home = Path(os.environ["NCCL_HOME"])
        candidates.append((home / "include", home / "lib"))
    candidates.append((Path("/usr/include"), Path("/usr/lib/x86_64-linux-gnu")))
    for inc, lib in candidates:
        if (inc / "nccl.h").is_file() and (lib / "libnccl.so.2").exists():
            return inc, lib
    raise CCLBuildError("NCCL headers not found (nccl.h, libnccl.so.2): pip install nvidia-nccl-cu13, or set NCCL_HOME")


def _cuda_home() -> Path:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    raise CCLBuildError("CUDA toolkit not found (nvcc, cuda_runtime.h): install it, or set CUDA_HOME")


def _cublas_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of cuBLAS: $CUBLAS_HOME, the CUDA toolkit, or the nvidia-cublas wheel
    (cu13 layout nvidia/cu13, cu12 layout nvidia/cublas)."""
    candidates = []
    if os.environ.get("CUBLAS_HOME"):
        home = Path(os.environ["CUBLAS_HOME"])
        candidates += [(home / "include", home / sub) for sub in ("lib64", "lib")]
    try:
        home = _cuda_home()
        candidates += [(home / "include", home / sub) for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    except CCLBuildError:
        pass
    for pkg_name in ("nvidia.cu13", "nvidia.cublas"):
        pkg = _package_dir(pkg_name)
        if pkg is not None:
            candidates.append((pkg / "include", pkg / "lib"))
    for inc, lib in candidates:
        if (inc / "cublas_v2.h").is_file() and any(lib.glob("libcublas.so*")):
            return inc, lib
    raise CCLBuildError("cuBLAS not found (cublas_v2.h, libcublas.so): install the CUDA toolkit or "
                        "pip install nvidia-cublas, or set CUBLAS_HOME; or build with prefill_gemm=tir and "
                        "prefill_attention=tir")


def _cublas_lib_flag(lib: Path) -> str:
    return "-lcublas" if (lib / "libcublas.so").exists() else f"-l:{sorted(lib.glob('libcublas.so.*'))[0].name}"


def _cuda_lib_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (home / sub / "libcudart.so").exists():
            return home / sub
    raise CCLBuildError(f"libcudart.so not found under {home}: install the CUDA toolkit, or set CUDA_HOME")


def _nvcc() -> str:
    path = _cuda_home() / "bin" / "nvcc"
    if not path.is_file():
        raise CCLBuildError(f"nvcc not found under {path.parent}: install the CUDA toolkit, or set CUDA_HOME; "
                            "or build with prefill_attention=tir")
    return str(path)


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise CCLBuildError(f"C++ compiler '{cxx}' not found: apt-get install g++ (or set CXX), "
                            "or prebuild with `python -m runtime_patch.ccl.build` where one exists")
    return path


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
# CUDA kernels for the GPUs the lab targets (A100, H100/H200), plus PTX that newer GPUs JIT.
_NVCC_FLAGS = ["-std=c++17", "-O2", "-shared", "-Xcompiler=-fPIC,-fvisibility=hidden,-Wall,-Wno-unused-parameter",
               "-Xlinker=--no-undefined,--as-needed", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_90,code=[sm_90,compute_90]"]


def _stub_headers() -> list[Path]:
    return sorted(p for p in _STUBS.rglob("*.h"))


def _tvm_include_dirs() -> list[Path]:
    tvm, ffi = _tvm_dir(), _ffi_dir()
    return [_STUBS / "include", tvm / "include", ffi / "include", ffi / "3rdparty" / "dlpack" / "include"]


def _tvm_lib_dirs() -> list[Path]:
    return [_tvm_dir() / "lib", _ffi_dir() / "lib"]


def _recipe(name: str, for_build: bool) -> _Recipe:
    """The recipe of a plugin; paths of toolchains are resolved only when `for_build`."""
    if name == "cpu_shm":
        src = _HERE / "cpu_shm.cc"
        r = _Recipe(name, [src], [src, *_stub_headers()], list(_COMMON_FLAGS), libs=list(_TVM_LIBS))
        if for_build:
            r.include_dirs, r.lib_dirs = _tvm_include_dirs(), _tvm_lib_dirs()
        return r
    if name == "nccl":
        disco = _tvm_dir() / "src" / "runtime" / "extra" / "disco"
        src = disco / "nccl" / "nccl.cc"
        if not src.is_file():
            raise CCLBuildError(f"{src} is missing: this apache-tvm wheel does not ship the NCCL CCL source "
                                "(apache-tvm 0.27 does)")
        # nccl_overlap.cc (ours) reaches the shipped CCL's per-worker context: one library
        ours = _HERE / "nccl_overlap.cc"
        hashed = [src, ours, _HERE.parent / "cuda_check.h", disco / "nccl" / "nccl_context.h", disco / "utils.h",
                  *_stub_headers()]
        r = _Recipe(name, [src, ours], hashed, [*_COMMON_FLAGS, "-DTVM_NCCL_RCCL_SWITCH=0"],
                    libs=[*_TVM_LIBS, "-l:libnccl.so.2", "-lcudart"], needs_anchor=True)
        if for_build:
            nccl_inc, nccl_lib = _nccl_dirs()
            cuda = _cuda_home()
            r.include_dirs = [*_tvm_include_dirs(), disco / "nccl", nccl_inc, cuda / "include"]
            r.lib_dirs = [*_tvm_lib_dirs(), nccl_lib, _cuda_lib_dir(cuda)]
        return r
    if name in CUBLAS_PLUGINS:
        here = _HERE.parent
        srcs = [here / "gemm" / "cublas_gemm.cc", here / "gemm" / "q4_gemv.cu"] if name == "cuda_gemm" \
            else [here / "attention" / "cuda_attention.cu"]
        hashed = [*srcs, here / "cuda_common.h", here / "cuda_check.h"]
        r = _Recipe(name, srcs, hashed, list(_NVCC_FLAGS), libs=["-ltvm_ffi", "-lcudart"], nvcc=True)
        if for_build:
            cublas_inc, cublas_lib = _cublas_dirs()
            cuda = _cuda_home()
            ffi = _ffi_dir()
            r.include_dirs = [ffi / "include", ffi / "3rdparty" / "dlpack" / "include", cublas_inc, cuda / "include"]
            r.lib_dirs = [ffi / "lib", cublas_lib, _cuda_lib_dir(cuda)]
            r.libs = ["-ltvm_ffi", _cublas_lib_flag(cublas_lib), "-lcudart"]
        return r
    raise ValueError(f"unknown CCL plugin {name!r}; choose one of {PLUGINS}")


def _key(r: _Recipe) -> str:
    h = hashlib.sha256()
    for part in (_RECIPE_VERSION, r.name, *r.flags, *r.libs,
                 _version("apache-tvm"), _version("apache-tvm-ffi")):
        h.update(part.encode() + b"\0")
    for p in r.hashed:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def plugin_path(name: str) -> Path:
    """Where `build(name)` puts (or finds) the plugin for the installed TVM."""
    r = _recipe(name, for_build=False)
    return cache_dir() / f"{name}-{_key(r)}.so"


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
    cxx = _nvcc() if r.nvcc else _compiler()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        cmd = [cxx, *r.flags]
        if r.needs_anchor:
            cmd += ["-iquote", str(_relative_include_anchor(tmp))]
        cmd += [f"-I{d}" for d in r.include_dirs]
        cmd += [str(s) for s in r.sources]
        cmd += ["-o", str(tmp / out.name)]
        cmd += [f"-L{d}" for d in r.lib_dirs] + r.libs
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CCLBuildError(f"compiling the {name} CCL plugin failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        meta = {"name": name, "key": out.stem.rsplit("-", 1)[1], "command": cmd, "compiler": version,
                "apache-tvm": _version("apache-tvm"), "apache-tvm-ffi": _version("apache-tvm-ffi")}
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


def _cdll(path: Path, mode: int, what: str) -> ctypes.CDLL:
    try:
        handle = ctypes.CDLL(str(path), mode=mode)
    except OSError as e:
        raise CCLLoadError(f"cannot load {what} ({path}): {e}") from None
    _handles.append(handle)
    return handle


def load_runtime_libs(cuda: bool = False) -> None:
    """Load what the plugins link against, the way `import tvm` does, so that it works before
    `import tvm` too: libtvm_ffi, libtvm_runtime (global), the disco runtime libtvm_runtime_extra
    and, with `cuda`, NCCL and libtvm_runtime_cuda (local). Loading a library twice is a no-op."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi)

    lib = _tvm_dir() / "lib"
    _cdll(lib / "libtvm_runtime.so", ctypes.RTLD_GLOBAL, "TVM's runtime")
    if not (lib / "libtvm_runtime_extra.so").is_file():
        raise CCLLoadError(f"{lib} has no libtvm_runtime_extra.so: this TVM has no disco runtime")
    _cdll(lib / "libtvm_runtime_extra.so", ctypes.RTLD_LOCAL, "TVM's disco runtime")
    if cuda:
        pkg = _package_dir("nvidia.nccl")
        if pkg is not None and (pkg / "lib" / "libnccl.so.2").exists():
            _cdll(pkg / "lib" / "libnccl.so.2", ctypes.RTLD_GLOBAL, "NCCL")
        _cdll(lib / "libtvm_runtime_cuda.so", ctypes.RTLD_LOCAL,
              "TVM's CUDA runtime (the nccl plugin needs an NVIDIA driver and libcudart)")


def load(name: str) -> Path:
    """Build plugin `name` if needed and load it into this process (once); return its path.

    Call it in the controller and in every disco worker process (runtime_patch.disco_worker does)."""
    if name in _loaded:
        return _loaded[name]
    if name not in PLUGINS:
        raise ValueError(f"unknown CCL plugin {name!r}; choose one of {PLUGINS}")
    load_runtime_libs(cuda=name in ("nccl", *CUBLAS_PLUGINS))
    path = build(name)
    if name in CUBLAS_PLUGINS:  # no rpath (see _TVM_LIBS): load cuBLAS from where it was found
        lib = _cublas_dirs()[1]
        for pattern in ("libcublasLt.so*", "libcublas.so*"):
            found = sorted(lib.glob(pattern))
            if found:
                _cdll(found[0], ctypes.RTLD_GLOBAL, "cuBLAS")
    _cdll(path, ctypes.RTLD_GLOBAL, f"the {name} CCL plugin")
    _loaded[name] = path
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runtime_patch.ccl.build", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["cpu_shm"], help=f"plugins to build, of {PLUGINS}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            print(f"{name}: {build(name, force=args.force)}")
        except CCLBuildError as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
