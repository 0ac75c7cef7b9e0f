"""The global functions the compiled model (and the sessions) call by name: every `lab.*` name,
which native plugin provides it on CUDA, and its CPU version (runtime_patch.cpu_functions).

The model (engine/model) puts these names into the compiled graph (`call_dps_packed`, the paged KV
cache's kernel slots); an artifact lists the ones it calls in its metadata, and every process that
runs it (the controller and each disco worker) calls `register(target, names)` before the first
call: on cuda the plugins are built (on first use) and loaded, on llvm the NumPy versions are
registered under the same names, so the CPU test suite runs the same compiled graph as the GPU.

Matrix products (plugin cuda_gemm):
  GEMM_NT(x, w, out)                    out = x @ w^T, the prefill linears (cuBLAS on CUDA)
  GEMV_Q4(x, q_weight, q_scale, out)    the batch-1 decode GEMV of a q4f16_1 weight
Attention of TVM's paged KV cache, in the slots of its TIR kernels (plugin cuda_attention):
  PREFILL_RAGGED(...)                   a prefill's self-attention over the tokens it appends
  DECODE_PAGED(...)                     a decode step's attention over the pages, split over the keys
  DECODE_PAGED_INVARIANT(...)           the same, split as for a batch of 1 whatever the batch
                                        (build option batch_invariant: bit-identical sums per sequence)
Split allreduce of `batch_decode_pair` (full_overlap; plugin nccl: a second communicator on a
stream of its own, runtime_patch/native/nccl_overlap.cc):
  ALLREDUCE_BEGIN(partial, reduced)     start the sum of `partial` over the workers into `reduced`
  ALLREDUCE_WAIT(reduced, partial, token)  what takes the token runs after that sum
  OVERLAP_INIT()                        once per worker before the first begin (sessions call it)
  SET_OVERLAP(on)                       on=false: every begin waited for at once (serialized reference)
"""

from __future__ import annotations

from collections.abc import Iterable

GEMM_NT = "lab.gemm.nt"
GEMV_Q4 = "lab.gemv.q4"
PREFILL_RAGGED = "lab.attention.prefill_ragged"
DECODE_PAGED = "lab.attention.decode_paged"
DECODE_PAGED_INVARIANT = "lab.attention.decode_paged_invariant"
ALLREDUCE_BEGIN = "lab.ccl.allreduce_begin"
ALLREDUCE_WAIT = "lab.ccl.allreduce_wait"
OVERLAP_INIT = "lab.ccl.overlap_init"
SET_OVERLAP = "lab.ccl.set_overlap"

# The native plugin (runtime_patch.native.build) that provides each function on CUDA.
PLUGIN = {
    GEMM_NT: "cuda_gemm", GEMV_Q4: "cuda_gemm",
    PREFILL_RAGGED: "cuda_attention", DECODE_PAGED: "cuda_attention", DECODE_PAGED_INVARIANT: "cuda_attention",
    ALLREDUCE_BEGIN: "nccl", ALLREDUCE_WAIT: "nccl", OVERLAP_INIT: "nccl", SET_OVERLAP: "nccl",
}
PREFIX = "lab."
_registered: dict[str, set[str]] = {}


def register(target: str, names: Iterable[str]) -> None:
    """Make `names` callable in this process for `target` ("cuda" or "llvm"). Idempotent. Raises
    runtime_patch.native.toolchain.PluginBuildError (naming what is missing) where a CUDA plugin
    cannot be built, and KeyError for a name this module does not know."""
    done = _registered.setdefault(target, set())
    names = [n for n in dict.fromkeys(names) if n not in done]
    unknown = [n for n in names if n not in PLUGIN]
    if unknown:
        raise KeyError(f"unknown library functions {unknown}: declare them in runtime_patch.functions")
    if target == "cuda":
        from runtime_patch.native.build import load

        for plugin in dict.fromkeys(PLUGIN[n] for n in names):
            load(plugin)
    elif target == "llvm":
        import tvm_ffi

        from runtime_patch import cpu_functions

        for name in names:
            tvm_ffi.register_global_func(name, cpu_functions.IMPLEMENTATIONS[name], override=True)
    else:
        raise ValueError(f"no library functions for target {target!r}")
    done.update(names)
