"""Make TVM's runtime ready for an artifact: CUDA kernel compilation callback, target checks.

Importing `tvm` from a full apache-tvm wheel needs nothing here on the CPU. On a GPU node with a
runtime-only TVM (`TVM_USE_RUNTIME_LIB=1`), `runtime_only.py` loads the runtime libraries first.
"""

from __future__ import annotations


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


def kernel_cache_dir():
    import os
    from pathlib import Path

    return Path(os.environ.get("LAB_KERNEL_CACHE", Path.home() / ".cache" / "tvm-tp-lab" / "kernels"))


_compiler_arch: str | None = None


def ensure_cuda_compiler(arch: str) -> None:
    """Register `tvm_callback_cuda_compile`: nvcc to a cubin, cached on disk by source hash.

    An artifact built on a machine without a GPU carries CUDA source; TVM compiles it when the
    library is loaded, through this callback. A second load of the same artifact compiles nothing.
    """
    global _compiler_arch
    if _compiler_arch == arch:
        return
    import hashlib
    import os
    import shutil
    import subprocess
    import tempfile

    import tvm

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)

    def compile_cuda(code, _target=None):
        if nvcc is None:
            raise RuntimeMismatch("nvcc is not on PATH: it is needed to compile the artifact's CUDA kernels")
        key = hashlib.sha256(f"{arch}\n{code}".encode()).hexdigest()
        cache = kernel_cache_dir()
        cubin = cache / f"{key}.cubin"
        if not cubin.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.cubin")
                with open(src, "w") as f:
                    f.write(code)
                proc = subprocess.run([nvcc, "--cubin", "-O3", f"-arch={arch}", "-o", out, src],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
                part = cache / f".{key}.{os.getpid()}"
                shutil.copyfile(out, part)
                os.replace(part, cubin)
        return bytearray(cubin.read_bytes())

    tvm.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    _compiler_arch = arch
