"""tp > 1 or pp > 1: one Relax VM per disco worker process, one worker per device, collectives
via a CCL.

Same interface as `engine.session.VMSession`. Token ids go to worker 0 only (the model
broadcasts them); results are read back from worker 0. With pipeline stages the session has pp
groups of tp workers (worker w: tp rank w % tp of stage w // tp), each group running its stage's
module; the stages' `collect_tokens` / `collect_logits` bring the last stage's results to worker 0
when they are read.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections.abc import Sequence

import numpy as np

from runtime_patch import functions

from .compile import Artifact
from .config import ConfigError
from .weights import TensorSource, source_spec

log = logging.getLogger(__name__)

MAX_CPU_WORKERS = 16  # on the CPU, tp is bounded by a sane number of worker processes
# The one-shot allreduce takes messages up to this size (a decode step's [batch, hidden]: batch 128
# of Llama-3-8B, 64 of 70B); larger ones (prefill) go to TVM's CCL.
ONE_SHOT_MAX_BYTES = 1 << 20


class RemoteTensor:
    """A tensor on every worker; `shape`/`dtype` describe worker 0's copy. `pending`: how to get
    it, called on first use (a pipeline step's results, brought to worker 0 only when read)."""

    def __init__(self, dref, shape: tuple[int, ...], dtype: str, pending=None):
        self._dref, self.shape, self.dtype, self._pending = dref, tuple(shape), dtype, pending

    @property
    def dref(self):
        if self._pending is not None:
            self._dref, self._pending = self._pending(), None
        return self._dref


def _collected(session: "DiscoSession", name: str, value):
    """How to bring a pipeline step's result `value` from the last stage to the first (the stages'
    `collect_tokens` or `collect_logits`, engine/model/llama.py), called when the result is first
    read: what is never read never travels, and a stage can run the next micro-batch's step before
    the previous one's results are fetched."""
    return lambda: session._fn(name)(value)


def ccl_for(target: str) -> str:
    return "nccl" if target == "cuda" else "cpu_shm"


def stages_of(artifact: "Artifact | Sequence[Artifact]") -> list[Artifact]:
    """The artifacts of every pipeline stage, checked to be the stages of one build in order."""
    stages = [artifact] if isinstance(artifact, Artifact) else list(artifact)
    first = stages[0].spec
    if len(stages) != first.pp or any(a.spec != dataclasses.replace(first, stage=i) for i, a in enumerate(stages)):
        raise ConfigError(f"a pp={first.pp} model needs the artifacts of its {first.pp} stages in order "
                          "(engine.compile.compile_pipeline), got "
                          f"{[(a.spec.pp, a.spec.stage) for a in stages]}")
    return stages


class DiscoSession:
    def __init__(self, artifact: "Artifact | Sequence[Artifact]", source: TensorSource,
                 device_ids: list[int] | None = None, cluster=None):
        from tvm.runtime import ShapeTuple

        from . import runtime_loader

        self.stages = stages_of(artifact)
        artifact = self.stages[0]
        spec = self.spec = artifact.spec
        self.artifact, self.tp, self.pp = artifact, spec.tp, spec.pp
        self.workers = self.tp * self.pp
        # Worker 0 is a thread of this process; where a step calls Python there (the CPU's library
        # functions, runtime_patch.cpu_functions; the stages' transfers, runtime_patch.pipeline_p2p),
        # this process must not hold the GIL while it waits for the step (engine.caches.TokenMailbox).
        self.python_in_step = spec.target == "llvm" or self.pp > 1
        if spec.target == "llvm" and self.workers > MAX_CPU_WORKERS:
            raise ConfigError(f"tp x pp = {self.workers} on the CPU would start {self.workers} worker processes; "
                              f"at most {MAX_CPU_WORKERS}")
        for stage in self.stages:
            runtime_loader.prepare(stage)
        if spec.target == "cuda":
            from .session import visible_cuda_devices

            found = visible_cuda_devices()
            here = cluster.workers_on_each_host(self.workers) if cluster is not None and cluster.multi_host \
                else self.workers  # the GPUs one host needs
            if here > found:
                raise ConfigError(f"tp x pp = {self.workers} needs {here} GPUs on this host but {found} are visible; "
                                  f"choose tp x pp <= {found} per host")
        self.device_ids = list(device_ids or range(self.workers))
        self.vocab = spec.config.vocab_size
        t0 = time.perf_counter()
        self.sess = runtime_loader.start_disco(self.workers, ccl_for(spec.target), self.device_ids, self.pp, cluster=cluster)
        try:
            self.sess.import_python_module("engine.disco_rank")
            folders = json.dumps([str(a.path) for a in self.stages])
            self.sess.get_global_func("lab.engine.prepare_target")(folders)
            self.mod = self._load_module()
            self._mods = [self.mod]
            self.load_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            loader = self.sess.get_global_func("lab.engine.load_rank_params")
            self.params = loader(folders, self.tp, json.dumps(source_spec(source)))
            self.sess._sync_all()  # surfaces a worker's loading error here, not at the first call
            if spec.microbatch_decode:  # batch_decode_pair's split allreduce (a collective setup)
                self.call_workers(functions.OVERLAP_INIT)
            self.allreduce = self._open_one_shot() if set(functions.ONE_SHOT_CALLS) & set(artifact.functions) \
                else f"TVM's CCL ({ccl_for(spec.target)})"
            self.weights_seconds = time.perf_counter() - t0
        except Exception:
            self.sess.shutdown()
            raise
        # One device per stage: what each holds, and (their sum) what a step reads along the pipeline
        self.stage_weight_bytes = [sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                                       for p in a.metadata["params"]) for a in self.stages]
        self.weight_bytes = sum(self.stage_weight_bytes)
        g = self.sess.get_global_func
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._remove_seq = g("vm.builtin.kv_state_remove_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        self._getitem = g("vm.builtin.tuple_getitem")
        self._reshape = g("vm.builtin.reshape")
        self._fns: dict[str, object] = {}
        self._inputs: dict[tuple[int, ...], object] = {}
        self._shape = ShapeTuple

    def _open_one_shot(self) -> str:
        """Map every worker's one-shot allreduce buffers into the others (CUDA IPC); returns what
        `lab.ccl.allreduce` does in this session, in a line. Where a worker cannot (no peer
        access), every worker is told to use TVM's CCL, so that no two disagree."""
        texts = [str(t) for t in self.from_workers("lab.engine.ipc_create", self.tp, ONE_SHOT_MAX_BYTES)]
        if not all(bool(ok) for ok in self.from_workers(functions.IPC_OPEN, ";".join(texts))):
            reasons = {str(r) for r in self.from_workers(functions.IPC_STATUS)}
            self.call_workers(functions.IPC_DISABLE, "; ".join(sorted(reasons)))
        return str(self.from_workers(functions.IPC_STATUS)[0])

    def _load_module(self):
        """A VM of the model on every worker (of its stage's module with pipeline stages), on each
        worker's own default device (the CCL set it to device_ids[worker])."""
        if self.pp == 1:
            return self.sess.load_vm_module(str(self.artifact.library), device=None)
        from tvm.runtime.disco import DModule

        load = self.sess.get_global_func("lab.engine.load_stage_module")
        return DModule(load(json.dumps([str(a.library) for a in self.stages]), self.tp), self.sess)

    def _fn(self, name: str, instance: int = 0):
        """Function `name` of VM `instance` on every worker (see VMSession._fn)."""
        while len(self._mods) <= instance:
            self._mods.append(self._load_module())
        if (name, instance) not in self._fns:
            self._fns[(name, instance)] = self._mods[instance][name]
        return self._fns[(name, instance)]

    def create_kv_cache(self, max_batch: int, max_total_len: int, prefill_chunk: int, page_size: int = 16):
        s = self._shape
        return self._fn("create_kv_cache")(s([max_batch]), s([max_total_len]), s([prefill_chunk]), s([page_size]), s([0]))

    def add_sequence(self, kv, seq_id: int) -> None:
        self._add_seq(kv, seq_id)

    def remove_sequence(self, kv, seq_id: int) -> None:
        self._remove_seq(kv, seq_id)

    def begin_forward(self, kv, seq_ids: list[int], lengths: list[int]) -> None:
        self._begin(kv, self._shape(seq_ids), self._shape(lengths))

    def end_forward(self, kv) -> None:
        self._end(kv)

    # The static KV cache (kv_cache="static"): its tensors on every worker
    def create_static_state(self, slots: int, max_len: int):
        from .session import StaticState

        c, plan = self.spec.config, self.spec.plan
        shape = (plan.cache_layers, 2, slots, plan.kv_heads, max_len, c.head_dim)  # one shape on every stage
        empty = lambda shape, dtype: RemoteTensor(self.sess.empty(shape, dtype), shape, dtype)  # noqa: E731
        return StaticState(empty(shape, self.spec.quant_spec.model_dtype), empty((slots,), "int32"),
                           empty((slots, 1), "int32"), slots, max_len)

    def mailbox(self) -> int:
        """The host address of worker 0's token mailbox (runtime_patch.functions.KV_MAILBOX): worker
        0 runs in this process, so the address is valid here."""
        return int(self.from_workers(functions.KV_MAILBOX)[0])

    def check(self) -> None:
        """Raise CCLError if a worker died or the collective group failed (never blocks)."""
        from runtime_patch import disco

        disco.check(self.sess)

    def call_static(self, name: str, *args, outputs: list[tuple[tuple[int, ...], str]], instance: int = 0):
        """`name`(*args, params) on every worker: host int32 arrays go to worker 0 (the model
        broadcasts what it needs), RemoteTensors by reference; returns the results as
        RemoteTensors of the given (shape, dtype) `outputs` (worker 0's copies)."""
        out = self._fn(name, instance)(*[self._upload(a) if isinstance(a, np.ndarray) else getattr(a, "dref", a)
                                         for a in args], self.params)
        if len(outputs) == 1:
            return (RemoteTensor(out, *outputs[0]),)
        # logits (float32) are the last stage's; the tokens, the first stage received in the step
        return tuple(self._result(self._getitem(out, i), shape, dtype, "collect_logits" if dtype == "float32" else None)
                     for i, (shape, dtype) in enumerate(outputs))

    def _result(self, dref, shape: tuple[int, ...], dtype: str, collect: str | None) -> RemoteTensor:
        """A step's result `dref` as worker 0's tensor. With pipeline stages, a result the last
        stage computed is brought to worker 0 by the stages' function `collect` when first read."""
        if self.pp > 1 and collect is not None:
            return RemoteTensor(None, shape, dtype, _collected(self, collect, dref))
        return RemoteTensor(dref, shape, dtype)

    def _upload(self, array: np.ndarray):
        """Token ids to worker 0, into a buffer allocated on every worker (reused per shape)."""
        import tvm

        key = array.shape
        if key not in self._inputs:
            self._inputs[key] = self.sess.empty(array.shape, "int32")
        self.sess.copy_to_worker_0(tvm.runtime.tensor(array), self._inputs[key])
        return self._inputs[key]

    def call(self, name: str, input_ids, kv, *more_kv):
        """`input_ids`: host int32 (copied to worker 0), or a RemoteTensor already on the workers.
        Returns what VMSession.call does, as RemoteTensors (with `more_kv`, batch_decode_pair:
        tokens [2, m] and logits [2, m, vocab])."""
        ids = self._upload(input_ids) if isinstance(input_ids, np.ndarray) else input_ids.dref
        out = self._fn(name)(ids, kv, *more_kv, self.params)
        rows = (input_ids.shape[1],) if name == "prefill_logits" else tuple(input_ids.shape[:-1])
        item = lambda i: self._getitem(out, i)  # noqa: E731
        logits = self._result(item(0 if name == "prefill_logits" else 1), (*rows, self.vocab), "float32",
                              "collect_logits")
        if name == "prefill_logits":
            return logits, kv
        return self._result(item(0), rows, "int32", "collect_tokens"), logits, kv, *more_kv

    def decode_input(self, next_ids: RemoteTensor):
        """Each worker's tokens [b] ([2, m]) as its decode input [b, 1] ([2, m, 1]): a view on every
        worker."""
        shape = (*next_ids.shape, 1)
        return RemoteTensor(self._reshape(next_ids.dref, self._shape(list(shape))), shape, "int32")

    def call_workers(self, name: str, *args) -> None:
        """Call global function `name` on every worker and wait for all of them."""
        self.sess.get_global_func(name)(*args)
        self.sess._sync_all()

    def from_workers(self, name: str, *args) -> list:
        """Call global function `name` on every worker, wait for all of them, and return each
        worker's result (strings, numbers, booleans), in worker order."""
        result = self.sess.get_global_func(name)(*args)
        self.sess._sync_all()
        return [result.debug_get_from_remote(i) for i in range(self.workers)]

    def to_numpy(self, value: RemoteTensor) -> np.ndarray:
        import tvm

        host = tvm.runtime.empty(value.shape, value.dtype, tvm.cpu())
        self.sess.copy_from_worker_0(host, value.dref)
        self.sess._sync_worker(0)
        return host.numpy()

    def sync(self) -> None:
        self.sess._sync_all()

    def close(self) -> None:
        if self.sess is None:
            return
        sess, self.sess = self.sess, None
        try:
            # Free what the workers hold for this session while they still answer, and let the
            # collector run now: on the GPU box, processes that went on after closing a session
            # were seen to stall later inside a garbage collection (cause not established; a
            # worker-side reference finalised after shutdown is the suspect).
            self.params = self.mod = self._mods = None
            self._fns.clear()
            self._inputs.clear()
            self._add_seq = self._remove_seq = self._begin = self._end = self._getitem = self._reshape = None
            gc.collect()
            sess._sync_all()
        except Exception:  # noqa: BLE001  (a dead worker: shutting down is all that is left)
            pass
        finally:
            sess.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def allreduce_seconds(session: DiscoSession, numel: int, dtype: str, iters: int = 50) -> list[float]:
    """Per-worker seconds per allreduce of `numel` elements with the model's allreduce (the
    library one where the artifact calls it, else TVM's CCL), timed inside the workers. With the
    norms in the allreduce (lab.ccl.allreduce_add_rms_norm) this times the plain one-shot, whose
    kernel it extends."""
    library = bool(set(functions.ONE_SHOT_CALLS) & set(session.artifact.functions))
    return [float(t) for t in session.from_workers("lab.engine.time_allreduce", numel, dtype, iters, library)]


def stage_transfer_seconds(session: DiscoSession, numel: int, dtype: str, iters: int = 50) -> list[float]:
    """Seconds to pass `numel` elements from one pipeline stage to the next, per tp rank (half a
    round trip between the first two stages, timed inside their workers)."""
    times = [float(t) for t in session.from_workers("lab.engine.time_stage_transfer", numel, dtype, iters, session.tp)]
    return times[:session.tp]
