"""Overlap schedulers for the decode loop: what `experiments.overlap` installs into generation.

A scheduler orders the decode steps that `engine.generate.Generator` issues (the engine knows
only the small `DecodeScheduler` interface: `run(gen, seq_ids, first, steps)`; `gen` offers
`launch`, `next_input`, `session.to_numpy` and `record`). This module never imports the engine.
Modes:

- `none` (engine.generate.SyncDecode): feed the host's tokens, run, read the tokens, repeat; the
  host waits every step.
- `pipeline`: one step ahead. Step t+1 is launched from step t's device-resident tokens (greedy
  sampling stays on the device) before the host reads step t's tokens, so the host's read-back and
  bookkeeping of step t overlap step t+1's execution. The read goes through a `TokenReader`: on
  a CUDA VM session with torch, a copy on a separate non-blocking stream, ordered by an event
  recorded after step t, into pinned host memory (so it does not wait for step t+1); on a CPU
  VM session a host thread; on a disco session (tp > 1) a read issued after the next launch on
  the same thread (disco's controller channel is not thread-safe). Stop conditions are seen one
  step late (the loop here generates a fixed count).

Not in this version: `prefetch`, `double_buffer`, `full_overlap` (`MODES` lists what exists;
`experiments.overlap` reports the others as not implemented rather than running `none`).
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np

MODES = ("none", "pipeline")
PLANNED = ("prefetch", "double_buffer", "full_overlap")


class DeferredReader:
    """Reads tokens on the calling thread when asked (disco sessions: their controller channel
    is not thread-safe, so the read is issued after the next launch, in order)."""

    kind = "deferred read (same thread)"

    def __init__(self, session):
        self.session = session

    def start(self, next_ids):
        return _Deferred(self.session, next_ids)

    def close(self) -> None:
        pass


class _Deferred:
    def __init__(self, session, next_ids):
        self.session, self.next_ids = session, next_ids

    def result(self) -> np.ndarray:
        return self.session.to_numpy(self.next_ids)


class HostThreadReader:
    """Reads tokens to the host on a helper thread (CPU VM sessions)."""

    kind = "host thread"

    def __init__(self, session):
        self.session = session
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="token-reader")

    def start(self, next_ids) -> concurrent.futures.Future:
        return self.pool.submit(self.session.to_numpy, next_ids)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class CudaStreamReader:
    """Reads tokens on a separate non-blocking CUDA stream after an event recorded behind the step
    that produced them, into pinned host memory: the read never waits for later steps."""

    kind = "cuda copy stream"

    def __init__(self, device_index: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)  # torch's pool streams are non-blocking

    def start(self, next_ids):
        torch = self.torch
        after_step = torch.cuda.Event()
        after_step.record(torch.cuda.default_stream(self.device))  # TVM launches on the default stream
        source = torch.from_dlpack(next_ids)
        host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after_step)
            host.copy_(source, non_blocking=True)
            done.record(self.stream)
        return _EventResult(done, host)

    def close(self) -> None:
        self.stream.synchronize()


class _EventResult:
    def __init__(self, event, host):
        self.event, self.host = event, host

    def result(self) -> np.ndarray:
        self.event.synchronize()
        return self.host.numpy()


def token_reader(session):
    """The fastest reader this session supports."""
    if getattr(session, "tp", 1) > 1:
        return DeferredReader(session)
    device = getattr(session, "device", None)
    if device is not None and device.dlpack_device_type() == 2:  # kDLCUDA, a VM session
        try:
            import torch

            if torch.cuda.is_available():
                return CudaStreamReader(device.index)
        except ImportError:
            pass
    return HostThreadReader(session)


class PipelineDecode:
    name = "pipeline"

    def __init__(self):
        self.reader_kind: str | None = None

    def run(self, gen, seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]:
        reader = token_reader(gen.session)
        self.reader_kind = reader.kind
        out: list[list[int]] = [[] for _ in seq_ids]
        b = len(seq_ids)
        try:
            t0 = time.perf_counter()
            pending, _ = gen.launch(seq_ids, np.asarray(first, dtype=np.int32).reshape(b, 1))
            gen.record("launch", 0, t0, time.perf_counter(), b)
            previous = t0
            for step in range(steps):
                ready = reader.start(pending)
                if step + 1 < steps:  # launch step+1 from step's device tokens before reading them
                    t0 = time.perf_counter()
                    following, _ = gen.launch(seq_ids, gen.next_input(pending))
                    gen.record("launch", step + 1, t0, time.perf_counter(), b)
                tokens = np.asarray(ready.result()).astype(np.int64).reshape(-1).tolist()
                now = time.perf_counter()
                gen.record("decode", step, previous, now, b)
                previous = now
                for o, t in zip(out, tokens):
                    o.append(t)
                if step + 1 < steps:
                    pending = following
        finally:
            reader.close()
        return out


def install(mode: str):
    """The scheduler for `mode`, to pass to `Generator.generate(..., scheduler=...)`; None for
    `none`, the engine's own synchronous loop."""
    if mode == "none":
        return None
    if mode == "pipeline":
        return PipelineDecode()
    if mode in PLANNED:
        raise NotImplementedError(f"overlap mode {mode!r} is not implemented in this version (have: {', '.join(MODES)})")
    raise ValueError(f"unknown overlap mode {mode!r}; choose one of: {', '.join(MODES + PLANNED)}")
