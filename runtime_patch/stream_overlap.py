"""Overlap schedulers for the decode loop: what `experiments.overlap` installs into generation.

A scheduler orders the decode steps that `engine.generate.Generator` issues (the engine knows
only the small `DecodeScheduler` interface: `run(gen, seq_ids, first, steps)`; `gen` offers
`begin_decode`, `launch`, `next_input`, `session.to_numpy` and `record`). This module never
imports the engine. Modes:

- `none` (engine.generate.SyncDecode): feed the host's tokens, run, read the tokens, repeat; the
  host waits every step, and everything else the host does sits between two steps.
- `prefetch`: what the next step needs from the host and does not depend on this step's token
  is prepared while this step computes: the KV cache's host-side bookkeeping for step t+1
  (positions, page tables: `begin_decode`) is done right after launching step t, and on a CUDA
  VM session the token ids go through a pinned host buffer and a copy on a separate stream into a
  pre-allocated device buffer, with an event ordering the copy before the step. (The KV cache's
  per-step metadata already travels that way: TVM's paged KV cache stages it in pinned memory and
  copies it on its own copy stream.)
- `pipeline`: step t+1 is launched from step t's device-resident tokens (greedy sampling stays on
  the device): no host-to-device copy of ids, and the host's bookkeeping of step t (appending
  tokens, timing hooks, stop checks) runs while step t+1 computes, with the next step's KV
  bookkeeping done ahead as in `prefetch`.

On the static KV cache (`kv_cache=static`, the default on CUDA) a step's inputs never leave the
device: each step's last kernel (`lab.kv.advance`) writes its tokens into the next step's input,
advances the positions and copies the tokens into a pinned host mailbox. So `pipeline` launches
step t+1 before reading step t's tokens (`gen.can_launch_ahead`), reading them from the mailbox
while step t+1 runs; `prefetch` has nothing to stage and runs as `pipeline`; `double_buffer`
keeps a VM instance per request group; `full_overlap` (paged only) runs as `pipeline`.
Each says so in `note` where it ran another mode.

Why `pipeline` on the paged cache waits for step t before launching step t+1 on a GPU: TVM 0.27's paged KV cache
keeps one device buffer (and one pinned staging buffer) for a step's attention metadata and
refreshes it on its own non-blocking copy stream when the next step's first attention launches,
with no ordering against the previous step's kernels. Launching step t+1 while step t still runs
would let that copy overwrite metadata step t's later layers read (see docs/ARCHITECTURE.md).
On CPU sessions the step runs synchronously in the call, and a host thread reads step t's tokens
while step t+1 runs.

- `double_buffer`: the batch is split into two request groups (micro-batches), each in a KV cache
  of its own, so each group has its own metadata buffers (the ping-pong set): while group B's step
  t runs, the host reads group A's step t and launches A's step t+1 behind it, then the same for
  B. The device always has the other group's step queued. At batch 1 there is one group: the mode
  runs as `pipeline` and says so (`note`). `DoubleBufferDecode(groups=n)` splits the batch into n
  groups the same way: with pipeline stages (engine: pp > 1) that is the micro-batching that
  keeps every stage busy (experiments.pipeline_parallel `microbatches`), a group's results coming
  back from the last stage only when read.

- `full_overlap`: `double_buffer`'s two request groups become the two micro-batches of one
  `batch_decode_pair` call per step (artifacts built with `microbatch_decode`; engine/model/llama.py),
  which interleaves them half-layer by half-layer and begins each allreduce on a communication
  stream (the `nccl` plugin: a second NCCL communicator on a stream of its own), waiting
  for it only where the sum is needed, so one micro-batch's allreduce runs while the other
  computes; the steps are issued as in `pipeline`. Where that cannot apply it says so in `note`
  and runs another mode: batch 1 (`pipeline`), an odd batch (micro-batches of equal size only:
  `double_buffer`), tp=1 (nothing to overlap: `double_buffer`). On CPU the allreduces run to
  completion when begun (the CPU CCL has no streams): the same tokens, no overlap.
  The cost: each micro-batch reads the weights, so a memory-bound decode step reads them twice.
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np

MODES = ("none", "prefetch", "pipeline", "double_buffer", "full_overlap")


def _on_gpu(session) -> bool:
    return session.spec.target == "cuda"


class _Reader:
    """Reads a step's tokens (`gen.read`): now (GPU sessions, and disco), or on a host thread (CPU VM)."""

    def __init__(self, gen):
        self.gen = gen
        threaded = not _on_gpu(gen.session) and getattr(gen.session, "tp", 1) == 1
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="token-reader") if threaded else None
        self.kind = "host thread" if threaded else "same thread, before the next launch"
        if gen.can_launch_ahead and not threaded:
            self.kind = "same thread, after the next launch (static KV cache)"

    def start(self, next_ids):
        if self.pool is not None:
            return self.pool.submit(self.gen.read, next_ids)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(self.gen.read(next_ids))
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _as_list(tokens) -> list[int]:
    return np.asarray(tokens).astype(np.int64).reshape(-1).tolist()


class _Scheduler:
    """What `experiments.overlap` reads from a scheduler after a run: how tokens were read or
    staged (`reader_kind`), and a note where the mode could not apply as such."""

    name = ""

    def __init__(self):
        self.reader_kind: str | None = None
        self.note: str | None = None

    def kv_groups(self, gen) -> int:
        """Over how many KV caches (request groups) the generator splits the batch: one, unless
        the mode runs micro-batches."""
        return 1

    def _run_instead(self, other: "_Scheduler", gen, seq_ids: list[int], first: list[int], steps: int):
        """Run `other` where this mode cannot apply (the caller has set `note`)."""
        out = other.run(gen, seq_ids, first, steps)
        self.reader_kind = other.reader_kind
        return out


class PipelineDecode(_Scheduler):
    name = "pipeline"

    def _launch(self, gen, groups: list[list[int]], ids, begun: bool):
        """Issue a step of `groups` fed `ids` (host tokens in group order, or the device tokens of
        the previous step); returns the device tokens."""
        if isinstance(ids, list):
            ids = np.asarray(ids, dtype=np.int32).reshape(len(ids), 1)
        return gen.launch(groups[0], ids, begun=begun)[0]

    def _groups(self, gen, seq_ids: list[int]) -> list[list[int]]:
        return [list(seq_ids)]

    def run(self, gen, seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]:
        groups = self._groups(gen, seq_ids)
        order = [sid for g in groups for sid in g]  # how a step's tokens come back
        first_of = dict(zip(seq_ids, first))
        reader = _Reader(gen)
        self.reader_kind = reader.kind
        ahead = gen.can_launch_ahead  # the static cache: launch step+1, then read step
        out: dict[int, list[int]] = {sid: [] for sid in seq_ids}
        b = len(seq_ids)
        try:
            t0 = time.perf_counter()
            pending = self._launch(gen, groups, [first_of[sid] for sid in order], begun=False)
            gen.record("launch", 0, t0, time.perf_counter(), b)
            previous = t0
            for step in range(steps):
                more = step + 1 < steps
                if more:
                    for g in groups:
                        gen.begin_decode(g)  # host-side KV bookkeeping while the step computes
                if not ahead:
                    ready = reader.start(pending)  # paged cache on a GPU: waits for step `step` (module doc)
                if more:  # step+1 is fed step's device tokens: no host round trip of the ids
                    t0 = time.perf_counter()
                    following = self._launch(gen, groups, gen.next_input(pending), begun=True)
                    gen.record("launch", step + 1, t0, time.perf_counter(), b)
                if ahead:
                    ready = reader.start(pending)  # while step+1 runs
                tokens = _as_list(ready.result())
                now = time.perf_counter()
                gen.record("decode", step, previous, now, b)
                previous = now
                for sid, t in zip(order, tokens):
                    out[sid].append(t)
                if more:
                    pending = following
        finally:
            reader.close()
        return [out[sid] for sid in seq_ids]


class DoubleBufferDecode(_Scheduler):
    """Two request groups in two KV caches, their steps interleaved (see the module doc)."""

    name = "double_buffer"

    def __init__(self, groups: int = 2):
        super().__init__()
        if groups < 2:
            raise ValueError(f"double_buffer interleaves 2 or more request groups, got {groups}")
        self.groups = groups

    def kv_groups(self, gen) -> int:
        return self.groups

    def run(self, gen, seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]:
        groups = gen.groups_of(seq_ids)
        self.reader_kind = "same thread, one group while the others run"
        if len(groups) < 2:
            self.note = "batch 1: a single request group, so double_buffer ran as pipeline"
            return self._run_instead(PipelineDecode(), gen, seq_ids, first, steps)
        first_of = dict(zip(seq_ids, first))
        out: dict[int, list[int]] = {sid: [] for sid in seq_ids}
        b = len(seq_ids)
        t0 = time.perf_counter()
        pending = [gen.launch(g, np.asarray([first_of[s] for s in g], dtype=np.int32).reshape(len(g), 1))[0]
                   for g in groups]
        gen.record("launch", 0, t0, time.perf_counter(), b)
        previous = t0
        for step in range(steps):
            more = step + 1 < steps
            for i, group in enumerate(groups):
                tokens = _as_list(gen.read(pending[i]))  # this group's step; the other's runs
                if more:  # this group's cache is free again: its next step goes behind the other's
                    t0 = time.perf_counter()
                    gen.begin_decode(group)
                    pending[i] = gen.launch(group, gen.next_input(pending[i]), begun=True)[0]
                    gen.record("launch", step + 1, t0, time.perf_counter(), len(group))
                for sid, t in zip(group, tokens):
                    out[sid].append(t)
            now = time.perf_counter()
            gen.record("decode", step, previous, now, b)
            previous = now
        return [out[sid] for sid in seq_ids]


class FullOverlapDecode(PipelineDecode):
    """Two micro-batches (request groups in KV caches of their own) in one `batch_decode_pair`
    call per step, run as `pipeline` (see the module doc)."""

    name = "full_overlap"

    def kv_groups(self, gen) -> int:
        return 1 if gen.caches.kind == "static" else 2  # the static cache runs it as pipeline (_fallback)

    def _groups(self, gen, seq_ids: list[int]) -> list[list[int]]:
        return gen.groups_of(seq_ids)

    def _launch(self, gen, groups: list[list[int]], ids, begun: bool):
        if isinstance(ids, list):
            ids = np.asarray(ids, dtype=np.int32).reshape(2, len(groups[0]), 1)
        return gen.launch_pair(groups, ids, begun=begun)[0]

    def _fallback(self, gen, seq_ids: list[int]) -> _Scheduler | None:
        """The mode that runs instead where micro-batches cannot apply (saying why in `note`)."""
        if gen.caches.kind == "static":
            self.note = ("static KV cache: no two-micro-batch decode (batch_decode_pair, paged only); its one-graph "
                         "step with the next step launched ahead already keeps the GPU busy, and micro-batches would "
                         "read the weights twice, so full_overlap ran as pipeline")
            return PipelineDecode()
        groups = gen.groups_of(seq_ids)
        if len(groups) < 2:
            self.note = "batch 1: no second micro-batch, so full_overlap ran as pipeline"
            return PipelineDecode()
        if len(groups[0]) != len(groups[1]):
            self.note = (f"batch {len(seq_ids)} is odd: batch_decode_pair takes micro-batches of equal size, so "
                         "full_overlap ran as double_buffer")
            return DoubleBufferDecode()
        if getattr(gen.session, "tp", 1) == 1:
            self.note = "tp=1: no allreduce to overlap, so full_overlap ran as double_buffer"
            return DoubleBufferDecode()
        if not gen.session.spec.microbatch_decode:
            raise ValueError("full_overlap needs an artifact built with microbatch_decode=true (it has no "
                             "batch_decode_pair); experiments.overlap builds one when the mode is asked for")
        return None

    def run(self, gen, seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]:
        instead = self._fallback(gen, seq_ids)
        if instead is None:
            return super().run(gen, seq_ids, first, steps)
        return self._run_instead(instead, gen, seq_ids, first, steps)


class _PinnedStaging:
    """Token ids to the device through a pinned host buffer and a copy on a side stream, into a
    pre-allocated device buffer; the compute stream waits on an event behind the copy."""

    kind = "pinned buffer + copy stream"

    def __init__(self, session, batch: int):
        import torch
        import tvm

        device = torch.device("cuda", session.device.index)
        self.torch = torch
        self.stream = torch.cuda.Stream(device)
        self.compute = torch.cuda.default_stream(device)  # TVM launches on the legacy default stream
        self.host = torch.empty((batch, 1), dtype=torch.int32, pin_memory=True)
        self.host_view = self.host.numpy()
        self.device_ids = torch.empty((batch, 1), dtype=torch.int32, device=device)
        self.tvm_ids = tvm.runtime.from_dlpack(self.device_ids)
        self.copied = torch.cuda.Event()

    def stage(self, tokens: list[int]):
        self.host_view[:, 0] = tokens
        with self.torch.cuda.stream(self.stream):
            self.device_ids.copy_(self.host, non_blocking=True)
            self.copied.record(self.stream)
        self.compute.wait_event(self.copied)
        return self.tvm_ids


class _HostStaging:
    """Token ids into a pre-allocated host array (CPU and disco sessions: the session uploads it)."""

    kind = "pre-allocated host buffer"

    def __init__(self, batch: int):
        self.ids = np.zeros((batch, 1), dtype=np.int32)

    def stage(self, tokens: list[int]):
        self.ids[:, 0] = tokens
        return self.ids


def _staging(session, batch: int):
    if _on_gpu(session) and getattr(session, "tp", 1) == 1:
        try:
            import torch

            if torch.cuda.is_available():
                return _PinnedStaging(session, batch)
        except ImportError:
            pass
    return _HostStaging(batch)


class PrefetchDecode(_Scheduler):
    name = "prefetch"

    def run(self, gen, seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]:
        if gen.caches.kind == "static":
            self.note = ("static KV cache: a step's tokens and positions are already on the device (the step "
                         "before wrote them), so there is nothing to prefetch; prefetch ran as pipeline")
            return self._run_instead(PipelineDecode(), gen, seq_ids, first, steps)
        staging = _staging(gen.session, len(seq_ids))
        self.reader_kind = staging.kind
        out: list[list[int]] = [[] for _ in seq_ids]
        b, last = len(seq_ids), list(first)
        begun = False
        for step in range(steps):
            start = time.perf_counter()
            next_ids, _ = gen.launch(seq_ids, staging.stage(last), begun=begun)
            begun = step + 1 < steps
            if begun:
                gen.begin_decode(seq_ids)  # overlaps the step on a GPU
            last = _as_list(gen.read(next_ids))
            gen.record("decode", step, start, time.perf_counter(), b)
            for o, t in zip(out, last):
                o.append(t)
        return out


def install(mode: str):
    """The scheduler for `mode`, to pass to `Generator.generate(..., scheduler=...)`; None for
    `none`, the engine's own synchronous loop."""
    if mode == "none":
        return None
    if mode == "pipeline":
        return PipelineDecode()
    if mode == "prefetch":
        return PrefetchDecode()
    if mode == "double_buffer":
        return DoubleBufferDecode()
    if mode == "full_overlap":
        return FullOverlapDecode()
    raise ValueError(f"unknown overlap mode {mode!r}; choose one of: {', '.join(MODES)}")
