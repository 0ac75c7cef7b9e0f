"""The engine's one door into `runtime_patch`: prepare TVM's runtime for an artifact's target."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError

# Called on every disco worker of an artifact with `microbatch_decode` (runtime_patch.collectives).
SPLIT_ALLREDUCE_INIT = "lab.ccl.overlap_init"


def check_target(spec, artifact_dir=None) -> None:
    """Before loading an artifact: the library GEMM, attention and split allreduce it calls (if any); for
    cuda, the kernel compile callback (using the artifact's precompiled cubins when it has them)
    and the GPU architecture check."""
    from runtime_patch import attention, collectives, gemm
    from runtime_patch.ccl import CCLBuildError

    uses = {gemm: "library" in (spec.prefill_gemm, spec.decode_gemv),
            attention: "library" in (spec.prefill_attention, spec.decode_attention),
            collectives: spec.microbatch_decode and spec.tp > 1}
    for library, used in uses.items():
        if used:
            try:
                library.register(spec.target)
            except CCLBuildError as err:
                raise ConfigError(str(err)) from None
    if spec.target != "cuda":
        return
    from runtime_patch import bootstrap

    bootstrap.ensure_cuda_compiler(spec.cuda_arch, [Path(artifact_dir) / "kernels"] if artifact_dir else [])
    try:
        bootstrap.check_cuda_arch(spec.cuda_arch)
    except bootstrap.RuntimeMismatch as err:
        raise ConfigError(str(err)) from None


def start_disco(num_workers: int, ccl: str, device_ids: list[int], spec):
    """A disco ProcessSession with `ccl` initialised in the controller and every worker."""
    from runtime_patch import ccl as ccl_plugins

    try:
        return ccl_plugins.start_session(num_workers, ccl, device_ids)
    except ccl_plugins.CCLBuildError as err:
        raise ConfigError(str(err)) from None


def record_cuda_sources():
    """A context manager collecting the CUDA source of a build (see `precompile_cubins`)."""
    from runtime_patch.bootstrap import CudaSourceRecorder

    return CudaSourceRecorder()


def precompile_cubins(sources: list[str], arch: str, folder: Path) -> int:
    """nvcc each source into `folder` where this machine has nvcc; returns how many (0 without,
    or with LAB_PRECOMPILE_CUBINS=0: the GPU node then compiles them at its first load)."""
    import os

    from runtime_patch import bootstrap

    if bootstrap._nvcc() is None or os.environ.get("LAB_PRECOMPILE_CUBINS") == "0":
        return 0
    for code in sources:
        bootstrap.compile_cubin(code, arch, folder / bootstrap.cubin_name(code, arch))
    return len(sources)
