"""Every environment variable the lab reads, with its default and what it means: the one module
that reads (and sets) `os.environ`.

    from runtime_patch import settings
    settings.path("LAB_CACHE_DIR")            # a Path, the default where unset
    settings.flag("LAB_PRECOMPILE_CUBINS")    # "1"/"0"
    settings.child_environment(LAB_CUPTI_DIR="/tmp/x")   # a subprocess's environment

Asking for a name that is not in `VARIABLES` is a KeyError, so a typo cannot read an unset
variable silently. Values are read when asked for (tests and entry points set some at run time).
Anything that changes a model's numerics is a build option (engine.compile.BuildSpec), never an
environment variable. This module imports nothing heavy: the runtime-only bootstrap uses it before
`import tvm`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_HOME_CACHE = Path.home() / ".cache" / "tvm-tp-lab"


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    default: str | None
    doc: str


VARIABLES: dict[str, Variable] = {v.name: v for v in [
    # caches
    Variable("LAB_CACHE_DIR", str(_HOME_CACHE), "compiled artifacts (an experiment's `cache_dir=null`)"),
    Variable("LAB_KERNEL_CACHE", str(_HOME_CACHE / "kernels"),
             "cubins nvcc made from an artifact's CUDA source at load time (a GPU node without precompiled ones)"),
    Variable("LAB_PLUGIN_DIR", str(REPO_ROOT / "build" / "plugins"),
             "built native plugins (CCLs, cuBLAS GEMM, attention, allreduce): carry it to a GPU node"),
    Variable("LAB_PRECOMPILE_CUBINS", "1",
             "0: do not nvcc an artifact's kernels at build time even where nvcc exists (the GPU node compiles them)"),
    # disco workers
    Variable("LAB_CCL_PLUGINS", "", "plugins a disco worker loads before TVM (set by runtime_patch.disco.sessions)"),
    Variable("LAB_DISCO_WORKER_IMPORTS", "", "Python modules a disco worker imports before its loop, comma separated"),
    Variable("LAB_DISCO_WORKER_TORCH", "0", "1: let `import tvm_ffi` import torch in disco workers (slow start)"),
    Variable("LAB_CCL_SLOT_BYTES", str(4 << 20),
             "cpu_shm: bytes per worker per chunk of a collective (segment = 2 x workers x slot)"),
    Variable("LAB_CCL_TIMEOUT_S", "600", "cpu_shm: the longest a worker waits in one barrier, seconds"),
    # runtime-only TVM
    Variable("TVM_USE_RUNTIME_LIB", "0", "1: TVM without its compiler (a GPU node): load the runtime libraries first"),
    Variable("TVM_LOG_DEBUG", None, "TVM's own debug logging (the entry points default it to 0)"),
    # profiling
    Variable("LAB_CUPTI_DIR", "", "a folder: trace every process with CUPTI into cupti-<pid>.json (profile_gpu.sh -m timeline)"),
    Variable("LAB_CUPTI_LABEL", "", "the traced process's label in the timeline"),
    Variable("LAB_CUPTI_API", "launch", "CUPTI runtime/driver API records kept: launch, all or none"),
    Variable("LAB_CUPTI_FLUSH_S", "1.0", "seconds between CUPTI buffer flushes to <name>.partial.jsonl"),
    Variable("LAB_CUPTI_MAX_RECORDS", "5000000", "CUPTI records kept per process (later ones are counted only)"),
    Variable("LAB_PROFILER_RANGE", "0", "1: mark the timed repeats with cudaProfilerStart/Stop (set by -m nsight)"),
    Variable("LAB_PROFILE_TOP", "25", "rows of a profile's kernel table"),
    Variable("LAB_NCU_KERNELS", "2000", "ncu: profile at most this many kernel launches"),
    Variable("LAB_PROFILE_FROM_START", "0", "1: ncu profiles from the first kernel, not the profiler range"),
    # provenance
    Variable("LAB_GIT_SHA", "", "the git SHA a copied tree was made from (a GPU node's copy has no reliable .git)"),
    # toolchain
    Variable("CXX", "g++", "C++ compiler of the plugins"),
    Variable("CUDA_HOME", "", "CUDA toolkit (nvcc, headers, libcudart); else found from nvcc or /usr/local/cuda"),
    Variable("CUDA_PATH", "", "CUDA toolkit, as CUDA_HOME"),
    Variable("NCCL_HOME", "", "NCCL headers and library; else the nvidia-nccl-cu13 wheel or the system's"),
    Variable("CUBLAS_HOME", "", "cuBLAS headers and library; else the CUDA toolkit's or the nvidia-cublas wheel's"),
    Variable("CUDA_VISIBLE_DEVICES", None, "the GPUs a run may use (recorded in results.json)"),
    # NVLink multicast stays off: a program that uses it can take a host's shared GPUs out of service
    Variable("NCCL_NVLS_ENABLE", None, "0: NCCL without NVLink multicast (bench.allreduce sets it)"),
    Variable("TORCH_SYMM_MEM_DISABLE_MULTICAST", None, "1: PyTorch symmetric memory without multicast (bench.allreduce sets it)"),
    Variable("NVSHMEM_DISABLE_NVLS", None, "1: NVSHMEM without NVLink multicast (bench.allreduce sets it)"),
    # torchrun, for the benchmarks that run one process per GPU
    Variable("RANK", None, "torchrun: this process's rank"),
    Variable("WORLD_SIZE", None, "torchrun: the number of processes"),
    Variable("LOCAL_RANK", None, "torchrun: this process's rank on its host"),
    Variable("LOCAL_WORLD_SIZE", None, "torchrun: the processes on this host"),
    # tests
    Variable("LAB_TEST_CACHE", "", "the test suite's compile cache (reused across pytest sessions where set)"),
]}


def _variable(name: str) -> Variable:
    try:
        return VARIABLES[name]
    except KeyError:
        raise KeyError(f"{name} is not a documented environment variable: add it to runtime_patch.settings") from None


def raw(name: str) -> str | None:
    """The variable's value, its default where unset (None where it has none)."""
    var = _variable(name)
    value = os.environ.get(name)
    return var.default if value is None else value


def text(name: str) -> str:
    return raw(name) or ""


def is_set(name: str) -> bool:
    _variable(name)
    return bool(os.environ.get(name))


def flag(name: str) -> bool:
    return text(name).strip() == "1"


def _parsed(name: str, kind: type, what: str):
    value = text(name)
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not {what}") from None


def integer(name: str) -> int:
    return _parsed(name, int, "an integer")


def number(name: str) -> float:
    return _parsed(name, float, "a number")


def path(name: str) -> Path | None:
    """A path (user home expanded), None where the variable is empty."""
    value = text(name)
    return Path(value).expanduser() if value else None


def names(name: str) -> list[str]:
    """A comma-separated list."""
    return [s.strip() for s in text(name).split(",") if s.strip()]


def set_value(name: str, value: str) -> None:
    """Set a variable for this process and the processes it starts."""
    _variable(name)
    os.environ[name] = value


def set_default(name: str, value: str) -> None:
    _variable(name)
    os.environ.setdefault(name, value)


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment with `overrides` (documented variables only) and this repository
    on PYTHONPATH: what a subprocess of the lab (a disco worker, a profiled experiment) runs with."""
    for name in overrides:
        _variable(name)
    env = {**os.environ, **overrides}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    return env


# The ones read in several places
def cache_dir() -> Path:
    return path("LAB_CACHE_DIR")


def plugin_dir() -> Path:
    return path("LAB_PLUGIN_DIR")


def kernel_cache_dir() -> Path:
    return path("LAB_KERNEL_CACHE")


def markdown_table() -> str:
    """The variables as a Markdown table (README.md's "Environment variables"):
    `python -m runtime_patch.settings`."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for v in VARIABLES.values():
        default = "" if v.default in (None, "") else f"`{v.default.replace(str(REPO_ROOT), '<repo>').replace(str(Path.home()), '~')}`"
        rows.append(f"| `{v.name}` | {default} | {v.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
