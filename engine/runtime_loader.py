"""The engine's one door into `runtime_patch`: prepare TVM's runtime for an artifact, start disco
sessions, and compile an artifact's CUDA kernels at build time."""

from __future__ import annotations

from pathlib import Path

from runtime_patch import functions, settings

from .config import ConfigError


def prepare(artifact) -> None:
    """Before loading `artifact` in this process (the controller, or a disco worker): register the
    library functions it calls (runtime_patch.functions; on cuda the plugins are built or loaded),
    and for cuda the kernel compile callback (using the artifact's precompiled cubins when it has
    them) and the GPU architecture check."""
    from runtime_patch.native.toolchain import PluginBuildError

    spec = artifact.spec
    names = list(artifact.functions)  # a pipeline stage's transfers among them (lab.pp.*)
    # called by the sessions, not by the model
    if spec.microbatch_decode and spec.tp > 1:
        names += [functions.OVERLAP_INIT, functions.SET_OVERLAP]
    if functions.KV_ADVANCE in names:
        names.append(functions.KV_MAILBOX)
    if set(functions.ONE_SHOT_CALLS) & set(names):  # the sessions open the regions; the probe times ALLREDUCE
        names += [functions.ALLREDUCE, functions.IPC_CREATE, functions.IPC_OPEN, functions.IPC_STATUS,
                  functions.IPC_DISABLE]
    try:
        functions.register(spec.target, names)
    except PluginBuildError as err:
        raise ConfigError(str(err)) from None
    if spec.target != "cuda":
        return
    from runtime_patch import cuda_compile

    cuda_compile.ensure_cuda_compiler(spec.cuda_arch, [Path(artifact.path) / "kernels"])
    try:
        cuda_compile.check_cuda_arch(spec.cuda_arch)
    except cuda_compile.RuntimeMismatch as err:
        raise ConfigError(str(err)) from None


def start_disco(num_workers: int, ccl: str, device_ids: list[int], num_groups: int = 1, cluster=None):
    """A disco ProcessSession with `ccl` initialised in the controller and every worker, the
    workers in `num_groups` groups (pipeline stages); with a `cluster` of more than one host
    (runtime_patch.disco.Cluster) a SocketSession over its hosts."""
    from runtime_patch import disco
    from runtime_patch.native.toolchain import PluginBuildError

    try:
        return disco.start_session(num_workers, ccl, device_ids, num_groups=num_groups, cluster=cluster)
    except (PluginBuildError, disco.ClusterError) as err:
        raise ConfigError(str(err)) from None


def record_cuda_sources():
    """A context manager collecting the CUDA source of a build (see `precompile_cubins`)."""
    from runtime_patch.cuda_compile import CudaSourceRecorder

    return CudaSourceRecorder()


def precompile_cubins(sources: list[str], arch: str, folder: Path) -> int:
    """nvcc each source into `folder` where this machine has nvcc; returns how many (0 without,
    or with LAB_PRECOMPILE_CUBINS=0: the GPU node then compiles them at its first load)."""
    from runtime_patch import cuda_compile
    from runtime_patch.native.toolchain import nvcc_or_none

    if nvcc_or_none() is None or not settings.flag("LAB_PRECOMPILE_CUBINS"):
        return 0
    for code in sources:
        cuda_compile.compile_cubin(code, arch, folder / cuda_compile.cubin_name(code, arch))
    return len(sources)
