"""The CUDA kernels of an artifact: compiled by nvcc at build time (where nvcc exists) or when the
artifact is loaded (TVM's `tvm_callback_cuda_compile`, cached on disk), and the GPU architecture
check before loading.

Importing `tvm` from a full apache-tvm wheel needs nothing here on the CPU. On a GPU node with a
runtime-only TVM (`TVM_USE_RUNTIME_LIB=1`), `runtime_only.py` loads the runtime libraries first.
"""

from __future__ import annotations

from runtime_patch import settings


class RuntimeMismatch(RuntimeError):
    """The artifact cannot run on this machine; the message says why and what to do."""


def check_cuda_arch(artifact_arch: str, device_index: int = 0) -> None:
    import tvm

    dev = tvm.cuda(device_index)
    if not dev.exist:
        raise RuntimeMismatch("the artifact targets CUDA but no CUDA GPU is visible; use device=cpu")
    have = "sm_" + dev.compute_version.replace(".", "")
    if have != artifact_arch:
        raise RuntimeMismatch(
            f"the artifact was built for {artifact_arch} but GPU {device_index} ({dev.device_name}) is {have}; "
            f"rebuild with cuda_arch={have}")


_compiler_arch: str | None = None
_search_dirs: list = []


def cubin_name(code: str, arch: str) -> str:
    import hashlib

    return hashlib.sha256(f"{arch}\n{code}".encode()).hexdigest() + ".cubin"


def compile_cubin(code: str, arch: str, dest) -> None:
    """nvcc `code` for `arch` into the file `dest` (atomically)."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from runtime_patch.native.toolchain import nvcc_or_none

    nvcc = nvcc_or_none()
    if nvcc is None:
        raise RuntimeMismatch("nvcc is not on PATH: it is needed to compile the artifact's CUDA kernels")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.cubin")
        with open(src, "w") as f:
            f.write(code)
        proc = subprocess.run([nvcc, "--cubin", "-O3", f"-arch={arch}", "-o", out, src], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
        part = dest.with_name(f".{dest.name}.{os.getpid()}")
        part.write_bytes(Path(out).read_bytes())
        os.replace(part, dest)


def ensure_cuda_compiler(arch: str, search_dirs=()) -> None:
    """Register `tvm_callback_cuda_compile`: nvcc to a cubin, cached on disk by source hash.

    An artifact built on a machine without a GPU carries CUDA source; TVM compiles it when the
    library is loaded, through this callback. Cubins are looked up first in `search_dirs` (an
    artifact's `kernels/`, precompiled where it was built), then in the kernel cache, where new
    ones are written: a second load of the same artifact compiles nothing.
    """
    global _compiler_arch
    from pathlib import Path

    for d in search_dirs:
        if Path(d) not in _search_dirs:
            _search_dirs.append(Path(d))
    if _compiler_arch == arch:
        return
    import tvm

    def compile_cuda(code, _target=None):
        name = cubin_name(str(code), arch)
        for d in _search_dirs:
            if (d / name).is_file():
                return bytearray((d / name).read_bytes())
        cubin = settings.kernel_cache_dir() / name
        if not cubin.is_file():
            compile_cubin(str(code), arch, cubin)
        return bytearray(cubin.read_bytes())

    tvm.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    _compiler_arch = arch


class CudaSourceRecorder:
    """While active, records the CUDA source TVM's codegen emits (`tvm_callback_cuda_postproc`),
    so that a build machine with nvcc can precompile the cubins an artifact will ask for."""

    def __init__(self):
        self.sources: list[str] = []

    def __enter__(self):
        import tvm

        def postproc(code, _target=None):
            self.sources.append(str(code))
            return code

        tvm.register_global_func("tvm_callback_cuda_postproc", postproc, override=True)
        return self

    def __exit__(self, *exc):
        import tvm_ffi

        tvm_ffi.registry.remove_global_func("tvm_callback_cuda_postproc")
