"""Runs inside every disco worker process (imported there by `engine.disco.DiscoSession`).

Each worker loads or generates only its own shard of the weights, directly on its device.
"""

from __future__ import annotations

import json

import tvm

from .compile import Artifact
from .weights import rank_params, source_from_spec, to_tvm


@tvm.register_global_func("lab.engine.prepare_target", override=True)
def prepare_target(artifact_dir: str) -> None:
    """In each worker: the CUDA kernel compile callback and the architecture check."""
    from . import runtime_loader

    runtime_loader.prepare(Artifact.load(artifact_dir))


@tvm.register_global_func("lab.engine.load_rank_params", override=True)
def load_rank_params(artifact_dir: str, source_json: str):
    rank = int(tvm.get_global_func("runtime.disco.worker_rank")())
    device = tvm.get_global_func("runtime.disco.device")()
    artifact = Artifact.load(artifact_dir)
    spec = artifact.spec
    torch_device = f"cuda:{device.index}" if spec.target == "cuda" else "cpu"
    source = source_from_spec(spec.config, json.loads(source_json), torch_device)
    host = rank_params(source, spec.quant_spec, spec.plan, rank, artifact.param_names)
    params = [to_tvm(value, device) for value in host.values()]
    del host
    getattr(source, "release", lambda: None)()
    return params


@tvm.register_global_func("lab.engine.register_cupti_window", override=True)
def register_cupti_window() -> None:
    """lab.cupti.window_start/stop in this worker (harness.tracing's traced repeat)."""
    from runtime_patch import cupti_tracer

    cupti_tracer.register_window_functions()


@tvm.register_global_func("lab.engine.ipc_create", override=True)
def ipc_create(world: int, max_bytes: int) -> str:
    """This worker's one-shot allreduce region (runtime_patch.functions.IPC_CREATE), for its rank."""
    from runtime_patch import functions

    rank = int(tvm.get_global_func("runtime.disco.worker_rank")())
    return str(tvm.get_global_func(functions.IPC_CREATE)(rank, world, max_bytes))


@tvm.register_global_func("lab.engine.time_allreduce", override=True)
def time_allreduce(numel: int, dtype: str, iters: int, library: bool) -> float:
    """Seconds per allreduce (sum) of `numel` elements, timed inside the worker: `iters` calls
    back to back after a warm-up, with the device synchronised before and after; the model's
    allreduce: the library one (lab.ccl.allreduce) where `library`, else TVM's CCL. Launched one
    by one from the host (not in a CUDA graph as in the decode step): an upper bound."""
    import time

    from tvm.runtime import ShapeTuple

    from runtime_patch import functions

    device = tvm.get_global_func("runtime.disco.device")()
    send = tvm.runtime.empty((numel,), dtype, device)
    recv = tvm.runtime.empty((numel,), dtype, device)
    if library:
        library_allreduce = tvm.get_global_func(functions.ALLREDUCE)
        call = lambda: library_allreduce(send, recv)  # noqa: E731
    else:
        ccl_allreduce = tvm.get_global_func("runtime.disco.allreduce")
        call = lambda: ccl_allreduce(send, ShapeTuple([0]), False, recv)  # noqa: E731
    for _ in range(3):
        call()
    device.sync()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    device.sync()
    return (time.perf_counter() - start) / iters
