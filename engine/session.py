"""Load a compiled artifact with its weights and call its functions.

`VMSession` (tp == 1) runs the Relax VM in this process. `DiscoSession` (tp > 1, in
`engine.disco`) runs one VM per worker process. Both expose the same small interface, which is
all `engine.generate` uses: create a KV cache, drive it (add sequence, begin/end forward), call
`prefill` / `prefill_logits` / `decode` / `batch_decode`, and read results back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from .compile import Artifact
from .config import ConfigError
from .weights import TensorSource, nbytes, rank_params, to_tvm

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StaticState:
    """The tensors of a static KV cache (engine/model/static_kv.py) on the session's device(s)."""

    cache: Any       # [layers, 2, slots, kv_heads, max_len, head_dim]
    positions: Any   # [slots] int32: each slot's length
    ids: Any         # [slots, 1] int32: each slot's next input token
    slots: int
    max_len: int

    def tensors(self) -> tuple:
        return self.cache, self.positions, self.ids


def device_of(target: str, index: int = 0):
    import tvm

    if target == "llvm":
        return tvm.cpu(index)
    dev = tvm.cuda(index)
    if not dev.exist:
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return dev


def open_session(artifact: "Artifact | list[Artifact]", source: TensorSource, cluster=None):
    """A VMSession for an artifact built for tp == 1 and pp == 1, else a DiscoSession (one worker
    per device). `artifact`: the artifact, or every pipeline stage's (engine.compile.compile_pipeline).
    `cluster` (runtime_patch.disco.Cluster): with more than one host, the DiscoSession's workers
    run on its hosts, and tp x pp must fill them."""
    stages = [artifact] if isinstance(artifact, Artifact) else list(artifact)
    spec = stages[0].spec
    if cluster is not None and cluster.multi_host:
        check_cluster(cluster, spec.tp * spec.pp)
    elif spec.tp == 1 and spec.pp == 1:
        return VMSession(stages[0], source)
    from .disco import DiscoSession

    return DiscoSession(stages, source, cluster=cluster)


def check_cluster(cluster, workers: int) -> int:
    """The workers each of the cluster's hosts runs for tp x pp = `workers`; ConfigError (one line)
    where they do not fill its hosts."""
    from runtime_patch.disco import ClusterError

    try:
        return cluster.workers_on_each_host(workers)
    except ClusterError as err:
        raise ConfigError(str(err)) from None


def visible_cuda_devices() -> int:
    import tvm

    count = 0
    while count < 64 and tvm.cuda(count).exist:
        count += 1
    return count


class VMSession:
    """tp == 1: one Relax VM in this process."""

    tp = 1
    allreduce = "none (tp=1)"  # what the model's allreduces run on (DiscoSession: NCCL, one-shot, cpu_shm)

    def __init__(self, artifact: Artifact, source: TensorSource, device_index: int = 0):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler

        from . import runtime_loader

        self.artifact = artifact
        spec = self.spec = artifact.spec
        if spec.tp != 1:
            raise ConfigError(f"artifact {artifact.path} is built for tp={spec.tp}; use a DiscoSession")
        runtime_loader.prepare(artifact)
        self.device = device_of(spec.target, device_index)
        t0 = time.perf_counter()
        self._executable = tvm.runtime.load_module(str(artifact.library))
        self.vm = VirtualMachine(self._executable, self.device)
        self._vms = [self.vm]
        self.load_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        host = rank_params(source, spec.quant_spec, spec.plan, 0, artifact.param_names)
        self.params = [to_tvm(v, self.device) for v in host.values()]
        self.weight_bytes = sum(nbytes(v) for v in host.values())
        del host
        getattr(source, "release", lambda: None)()
        self.weights_seconds = time.perf_counter() - t0
        self._fns: dict[str, Any] = {}
        self._staging: dict[str, Any] = {}  # dtype -> the device buffer of a call's host input (_staged)
        g = tvm.get_global_func
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._remove_seq = g("vm.builtin.kv_state_remove_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")

    def _fn(self, name: str, instance: int = 0):
        """Function `name` of VM `instance`: each VM has its own CUDA graphs, captured for the
        tensors it was first called with, so two static caches of one shape need two VMs."""
        from tvm.runtime.vm import VirtualMachine

        while len(self._vms) <= instance:
            self._vms.append(VirtualMachine(self._executable, self.device))
        if (name, instance) not in self._fns:
            self._fns[(name, instance)] = self._vms[instance][name]
        return self._fns[(name, instance)]

    # KV cache
    def create_kv_cache(self, max_batch: int, max_total_len: int, prefill_chunk: int, page_size: int = 16):
        from tvm.runtime import ShapeTuple

        return self._fn("create_kv_cache")(ShapeTuple([max_batch]), ShapeTuple([max_total_len]),
                                           ShapeTuple([prefill_chunk]), ShapeTuple([page_size]), ShapeTuple([0]))

    def add_sequence(self, kv, seq_id: int) -> None:
        self._add_seq(kv, seq_id)

    def remove_sequence(self, kv, seq_id: int) -> None:
        self._remove_seq(kv, seq_id)

    def begin_forward(self, kv, seq_ids: list[int], lengths: list[int]) -> None:
        from tvm.runtime import ShapeTuple

        self._begin(kv, ShapeTuple(seq_ids), ShapeTuple(lengths))

    def end_forward(self, kv) -> None:
        self._end(kv)

    # The static KV cache (kv_cache="static", engine/model/static_kv.py)
    def create_static_state(self, slots: int, max_len: int) -> StaticState:
        """The tensors of a static KV cache for `slots` sequences of up to `max_len` tokens."""
        import tvm

        c, plan = self.spec.config, self.spec.plan
        shape = (plan.cache_layers, 2, slots, plan.kv_heads, max_len, c.head_dim)
        empty = lambda shape, dtype: tvm.runtime.empty(shape, dtype, self.device)  # noqa: E731
        return StaticState(empty(shape, self.spec.quant_spec.model_dtype), empty((slots,), "int32"),
                           empty((slots, 1), "int32"), slots, max_len)

    def mailbox(self) -> int:
        """The host address of this device's token mailbox (runtime_patch.functions.KV_MAILBOX)."""
        import tvm

        from runtime_patch import functions

        return int(tvm.get_global_func(functions.KV_MAILBOX)())

    def check(self) -> None:
        """Nothing to check: the VM runs in this process (DiscoSession checks its workers)."""

    def call_static(self, name: str, *args, outputs: list[tuple[tuple[int, ...], str]], instance: int = 0):
        """`name`(*args, params) of the static-cache functions on VM `instance` (one per static
        cache, see `_fn`): host int32 arrays are copied to the device first; returns the
        function's results as a tuple (`outputs`: their shapes and dtypes, which a DiscoSession
        needs)."""
        hosted = sum(isinstance(a, np.ndarray) for a in args)
        to_device = self._staged if hosted == 1 else self.to_device
        args = [to_device(a) if isinstance(a, np.ndarray) else a for a in args]
        out = self._fn(name, instance)(*args, self.params)
        return tuple(out) if len(outputs) > 1 else (out,)

    # model functions; inputs are host int32 arrays or device tensors
    def to_device(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(array, self.device)

    def _staged(self, array: np.ndarray):
        """A call's one host input (a prompt chunk's tokens, a step's ids) as a view of a device
        buffer this session keeps (one per dtype, grown to the largest input): no allocation per
        call, and no free after it, which waits for the GPU (a 4096-token prefill's input allocated
        and freed each time cost ~0.5 ms of its TTFT: the free returned only once the prefill had
        run, and the token's read-back started after it). The copy is queued behind the work
        already on the device's stream (TVM's copies and kernels both go to the default stream),
        so a call still running reads the buffer's old contents before it is overwritten. One
        input per call: two would share the buffer."""
        import tvm

        key = str(array.dtype)
        buffer = self._staging.get(key)
        if buffer is None or buffer.shape[0] < array.size:
            buffer = self._staging[key] = tvm.runtime.empty((max(array.size, 1),), key, self.device)
        view = buffer._create_view(array.shape)
        view.copyfrom(np.ascontiguousarray(array))
        return view

    def call(self, name: str, input_ids, kv, *more_kv):
        """`name`(input_ids, kv[, kv_b], params) -> its result tuple (tokens, logits, kv...)."""
        if isinstance(input_ids, np.ndarray):
            input_ids = self._staged(input_ids)
        return self._fn(name)(input_ids, kv, *more_kv, self.params)

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return value.numpy()

    @staticmethod
    def decode_input(next_ids):
        """Tokens [b] (or [2, m]) on the device as a decode input [b, 1] ([2, m, 1]): a view, no
        copy, no sync."""
        return next_ids._create_view((*next_ids.shape, 1))

    def sync(self) -> None:
        self.device.sync()

    def close(self) -> None:
        self.params = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
