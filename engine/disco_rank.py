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


@tvm.register_global_func("lab.engine.time_allreduce", override=True)
def time_allreduce(numel: int, dtype: str, iters: int) -> float:
    """Seconds per allreduce (sum) of `numel` elements, timed inside the worker: `iters` calls
    back to back after a warm-up, with the device synchronised before and after."""
    import time

    from tvm.runtime import ShapeTuple

    device = tvm.get_global_func("runtime.disco.device")()
    allreduce = tvm.get_global_func("runtime.disco.allreduce")
    send = tvm.runtime.empty((numel,), dtype, device)
    recv = tvm.runtime.empty((numel,), dtype, device)
    for _ in range(3):
        allreduce(send, ShapeTuple([0]), False, recv)
    device.sync()
    start = time.perf_counter()
    for _ in range(iters):
        allreduce(send, ShapeTuple([0]), False, recv)
    device.sync()
    return (time.perf_counter() - start) / iters
