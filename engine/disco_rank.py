"""Runs inside every disco worker process (imported there by `engine.disco.DiscoSession`).

Each worker loads or generates only its own shard of the weights, directly on its device.
"""

from __future__ import annotations

import json

import tvm

from .compile import Artifact
from .weights import rank_params, source_from_spec, to_tvm


def _worker() -> int:
    """This worker's id in the session (runtime.disco.worker_rank answers it, whatever the groups)."""
    return int(tvm.get_global_func("runtime.disco.worker_rank")())


def _stage_of(items: list, tp: int):
    """This worker's entry of a per-stage list (stage = worker // tp)."""
    return items[_worker() // tp]


@tvm.register_global_func("lab.engine.prepare_target", override=True)
def prepare_target(artifact_dirs_json: str) -> None:
    """In each worker: the library functions, the CUDA kernel compile callback and the
    architecture check, for every stage's artifact (a JSON list of folders)."""
    from . import runtime_loader

    for folder in json.loads(artifact_dirs_json):
        runtime_loader.prepare(Artifact.load(folder))


@tvm.register_global_func("lab.engine.load_stage_module", override=True)
def load_stage_module(libraries_json: str, tp: int):
    """The VM of this worker's pipeline stage (a JSON list of model.so paths, one per stage), on
    the worker's default device."""
    return tvm.get_global_func("runtime.disco.load_vm_module")(_stage_of(json.loads(libraries_json), tp), None)


@tvm.register_global_func("lab.engine.load_rank_params", override=True)
def load_rank_params(artifact_dirs_json: str, tp: int, source_json: str):
    """This worker's weights: its stage's parameters (a JSON list of artifact folders, one per
    stage), its tensor-parallel rank's shard of them."""
    rank = _worker() % tp
    device = tvm.get_global_func("runtime.disco.device")()
    artifact = Artifact.load(_stage_of(json.loads(artifact_dirs_json), tp))
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

    return str(tvm.get_global_func(functions.IPC_CREATE)(_worker(), world, max_bytes))


@tvm.register_global_func("lab.engine.time_allreduce", override=True)
def time_allreduce(numel: int, dtype: str, iters: int, library: bool) -> float:
    """Seconds per allreduce (sum) of `numel` elements, timed inside the worker: `iters` calls
    back to back after a warm-up, with the device synchronised before and after; the model's
    allreduce: the library one (lab.ccl.allreduce) where `library`, else TVM's CCL. Launched one
    by one from the host (not in a CUDA graph as in the decode step): an upper bound."""
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
    return _seconds_per_call(call, device, iters)


def _seconds_per_call(call, device, iters: int, warmup: int = 3) -> float:
    """Seconds per `call()`: `iters` calls back to back after `warmup`, the device synchronised
    before and after."""
    import time

    for _ in range(warmup):
        call()
    device.sync()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    device.sync()
    return (time.perf_counter() - start) / iters


@tvm.register_global_func("lab.engine.time_stage_transfer", override=True)
def time_stage_transfer(numel: int, dtype: str, iters: int, tp: int) -> float:
    """Seconds to pass `numel` elements from a pipeline stage to the next (what a decode step does
    with its activations), timed inside the workers as half a round trip between the first two
    stages' workers of each tp rank (send_to_worker / recv_from_worker, the session's CCL); the
    other stages' workers answer 0."""
    worker = _worker()
    stage = worker // tp
    if stage > 1:
        return 0.0
    device = tvm.get_global_func("runtime.disco.device")()
    buffer = tvm.runtime.empty((numel,), dtype, device)
    send, recv = tvm.get_global_func("runtime.disco.send_to_worker"), tvm.get_global_func("runtime.disco.recv_from_worker")
    partner = worker + tp if stage == 0 else worker - tp

    def round_trip() -> None:
        if stage == 0:
            send(buffer, partner)
            recv(buffer, partner)
        else:
            recv(buffer, partner)
            send(buffer, partner)

    return _seconds_per_call(round_trip, device, iters) / 2
