"""Prefill and decode over TVM's paged KV cache, with greedy sampling on the device.

Every prefill chunk and decode step is reported to the `on_step` hooks as a `StepTiming`
(host clock, taken after the step's result is on the host, so it includes device time).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from .caches import PagedCaches, StaticCaches
from .config import ConfigError


@dataclasses.dataclass
class StepTiming:
    kind: str  # "prefill" | "decode"
    index: int  # decode step number, or prefill chunk number
    start: float  # time.perf_counter() seconds
    end: float
    tokens: int  # tokens processed in this step (prompt tokens, or batch size)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class GenerationResult:
    prompts: list[list[int]]
    tokens: list[list[int]]  # generated tokens per sequence (the first comes from prefill)
    steps: list[StepTiming]

    @property
    def prefill_steps(self) -> list[StepTiming]:
        return [s for s in self.steps if s.kind == "prefill"]

    @property
    def decode_steps(self) -> list[StepTiming]:
        return [s for s in self.steps if s.kind == "decode"]


StepHook = Callable[[StepTiming], None]


class DecodeScheduler(Protocol):
    """Orders the decode steps of `Generator.generate` (runtime_patch.stream_overlap has others).

    `run` performs `steps` decode steps for `seq_ids`, the first fed `first` (one token per
    sequence), using `gen.launch`, `gen.next_input` and `gen.session.to_numpy`, reports a
    "decode" timing per step through `gen.record` (consecutive: from the previous step's tokens
    on the host to this step's; "launch" spans may overlap them), and returns the tokens per
    sequence."""

    name: str

    def kv_groups(self, gen: "Generator") -> int:
        """Over how many KV caches (request groups) `gen` should split the batch for this mode."""
        ...

    def run(self, gen: "Generator", seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]: ...


class SyncDecode:
    """Mode `none`: feed the host's tokens, run the step, read its tokens back, decide, repeat."""

    name = "none"

    def kv_groups(self, gen: "Generator") -> int:
        return 1

    def run(self, gen: "Generator", seq_ids: list[int], first: list[int], steps: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in seq_ids]
        last = first
        for step in range(steps):
            last, _ = gen.decode(seq_ids, last, step)
            for o, t in zip(out, last):
                o.append(t)
        return out


class Generator:
    """Drives one session's model: a KV cache for `max_batch` sequences of up to `max_total_len`
    tokens each (paged: sized in whole pages for all of them; static: one slot each), of the kind
    the artifact was built with (engine.caches)."""

    def __init__(self, session, max_batch: int = 1, max_total_len: int = 2048, prefill_chunk: int = 2048,
                 page_size: int = 16, on_step: Sequence[StepHook] = ()):
        spec = session.spec
        context = spec.config.max_position_embeddings
        if max_total_len > context:
            raise ConfigError(f"max_total_len {max_total_len} exceeds the model's context {context}")
        self.session = session
        self.max_batch, self.max_total_len = max_batch, max_total_len
        self.prefill_chunk, self.page_size = prefill_chunk, page_size
        self.hooks = list(on_step)
        self.caches = StaticCaches(session, spec.config.vocab_size) if spec.kv_cache == "static" \
            else PagedCaches(session, prefill_chunk, page_size)
        self._groups = 0
        self._group_of: dict[int, int] = {}
        self._lengths: dict[int, int] = {}

    def reset(self, groups: int = 1, batch: int | None = None) -> None:
        """Empty KV cache(s) for `batch` sequences (default max_batch), created on first use (so
        that a generation's TTFT does not include allocating them) and kept while their shape stays.
        With `groups` > 1 the sequences are split over that many caches, each with its own per-step
        state, so one group's step can be launched while another's runs."""
        per_group = -(-(batch or self.max_batch) // groups) if self.caches.sized_by_batch else self._per_group(groups)
        self.caches.reset(groups, per_group, self.max_total_len, self._group_of)
        self._groups = groups
        self._group_of, self._lengths = {}, {}

    def _per_group(self, groups: int) -> int:
        return -(-self.max_batch // groups)

    def _group(self, seq_ids: Sequence[int]) -> int:
        groups = {self._group_of[s] for s in seq_ids}
        if len(groups) != 1:
            raise ValueError(f"one forward pass takes sequences of one KV-cache group, got groups {sorted(groups)}")
        return groups.pop()

    def groups_of(self, seq_ids: Sequence[int]) -> list[list[int]]:
        """`seq_ids` split by KV-cache group, in group order."""
        by_group: dict[int, list[int]] = {}
        for sid in seq_ids:
            by_group.setdefault(self._group_of[sid], []).append(sid)
        return [by_group[g] for g in sorted(by_group)]

    def _emit(self, timing: StepTiming) -> None:
        for hook in self.hooks:
            hook(timing)

    def record(self, kind: str, index: int, start: float, end: float, tokens: int) -> None:
        """Report a step's timing to the hooks (for schedulers outside the engine)."""
        self._emit(StepTiming(kind, index, start, end, tokens))

    def _check_room(self, seq_id: int, extra: int) -> None:
        total = self._lengths.get(seq_id, 0) + extra
        if total > self.max_total_len:
            raise ConfigError(f"sequence {seq_id} would reach {total} tokens, over the KV cache's "
                              f"{self.max_total_len}; shorten the prompt or the number of new tokens")

    def add_sequence(self, seq_id: int, group: int = 0) -> None:
        if not self._groups:
            self.reset()
        if not 0 <= group < self._groups:
            raise ConfigError(f"KV-cache group {group} does not exist (there are {self._groups})")
        if sum(1 for g in self._group_of.values() if g == group) >= self._per_group(self._groups):
            raise ConfigError(f"the KV cache holds at most {self.max_batch} sequences")
        self.caches.add(seq_id, group)
        self._lengths[seq_id], self._group_of[seq_id] = 0, group

    def _appended(self, seq_ids: Sequence[int], n: int = 1) -> None:
        for sid in seq_ids:
            self._lengths[sid] += n

    def prefill(self, seq_id: int, prompt: Sequence[int], all_logits: bool = False):
        """Feed `prompt` in chunks. Returns (next token, logits[vocab]) or, with `all_logits`,
        the logits of every prompt position [len, vocab]."""
        if len(prompt) == 0:
            raise ConfigError("the prompt is empty; give at least one token")
        group = self._group_of[seq_id]
        rows, token, last = [], None, None
        for chunk_no, lo in enumerate(range(0, len(prompt), self.prefill_chunk)):
            chunk = np.asarray(prompt[lo:lo + self.prefill_chunk], dtype=np.int32)[None, :]
            self._check_room(seq_id, chunk.shape[1])
            start = time.perf_counter()
            token, last = self.caches.prefill(group, seq_id, chunk, self._lengths[seq_id], all_logits)
            self._appended([seq_id], chunk.shape[1])
            if all_logits:
                rows.append(self.session.to_numpy(last))
            else:
                token = int(self.session.to_numpy(token)[0])
                self.caches.note_held(group, [seq_id], [token])
            self._emit(StepTiming("prefill", chunk_no, start, time.perf_counter(), chunk.shape[1]))
        if all_logits:
            return np.concatenate(rows, axis=0)
        return token, last

    def begin_decode(self, seq_ids: Sequence[int]) -> None:
        """The host side of the next decode step's KV-cache bookkeeping (positions, page tables),
        done ahead: it needs no token, and may run while the previous step computes on a GPU
        (the KV cache copies it to the device only when the step launches). Follow it with
        `launch(..., begun=True)`. (The static cache has none: its positions advance on the device.)"""
        seq_ids = list(seq_ids)
        for sid in seq_ids:
            self._check_room(sid, 1)
        self.caches.begin(self._group(seq_ids), seq_ids, [1] * len(seq_ids))

    def launch(self, seq_ids: Sequence[int], ids, begun: bool = False):
        """Issue one decode step fed `ids` (host int32 [b, 1], or a device tensor from
        `next_input`); returns (next token ids, logits), both on the device. On a GPU this does
        not wait for the step to finish."""
        seq_ids = list(seq_ids)
        if not begun:
            for sid in seq_ids:
                self._check_room(sid, 1)
        next_ids, logits = self.caches.decode(self._group(seq_ids), seq_ids, ids, begun)
        self._appended(seq_ids)
        return next_ids, logits

    def launch_pair(self, groups: Sequence[Sequence[int]], ids, begun: bool = False):
        """Issue one decode step of two request groups of equal size m in one call of
        `batch_decode_pair` (artifacts built with `microbatch_decode`): group i's sequences are
        micro-batch i, in its own KV cache. `ids`: host int32 [2, m, 1] or a device tensor from
        `next_input`. Returns (next token ids [2, m], logits [2, m, vocab]) on the device."""
        if len(groups) != 2 or len(groups[0]) != len(groups[1]):
            raise ValueError(f"batch_decode_pair takes two request groups of equal size, got {[len(g) for g in groups]}")
        if self.caches.kind != "paged":
            raise ValueError("batch_decode_pair runs on the paged KV cache: build with kv_cache=paged")
        groups = [list(g) for g in groups]
        for sid in (s for g in groups for s in g):
            self._check_room(sid, 1)
        next_ids, logits, *_ = self.caches.forward("batch_decode_pair", ids, [self._group(g) for g in groups],
                                                   groups, [[1] * len(g) for g in groups], begun)
        self._appended([s for g in groups for s in g])
        return next_ids, logits

    def next_input(self, next_ids):
        """The device-resident tokens of a step as the next step's input ([b] -> [b, 1] view,
        [2, m] -> [2, m, 1] for launch_pair; on the static cache the step's tokens as they are:
        it wrote them into the next step's input itself)."""
        return self.caches.next_input(next_ids)

    @property
    def can_launch_ahead(self) -> bool:
        """Whether step t+1 may be launched before step t's tokens are read: on the static cache a
        step's inputs and attention metadata are on the device (TVM's paged cache refreshes one
        metadata buffer per step, which a step still running would read: docs/ARCHITECTURE.md)."""
        return self.caches.can_launch_ahead

    def read(self, next_ids) -> np.ndarray:
        """A launched step's tokens on the host (waits for that step, not for those after it
        where the static cache's mailbox has them)."""
        return self.caches.read(next_ids)

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int], step: int = 0):
        """One decode step for `seq_ids` fed `tokens`; returns (next tokens, device logits)."""
        ids = np.asarray(tokens, dtype=np.int32).reshape(len(seq_ids), 1)
        start = time.perf_counter()
        next_ids, logits = self.launch(seq_ids, ids)
        next_host = self.read(next_ids).astype(np.int64).tolist()
        self.caches.note_held(self._group(seq_ids), seq_ids, next_host)  # what the step left in the device's ids
        self._emit(StepTiming("decode", step, start, time.perf_counter(), len(seq_ids)))
        return next_host, logits

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 scheduler: "DecodeScheduler | None" = None) -> GenerationResult:
        """Greedy generation for a batch of prompts (each prefilled, then decoded together).
        `scheduler` orders the decode steps (default: `SyncDecode`, one step at a time)."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompts) > self.max_batch:
            raise ConfigError(f"{len(prompts)} prompts but the KV cache holds {self.max_batch}; raise max_batch")
        steps: list[StepTiming] = []
        self.hooks.append(steps.append)
        try:
            # A scheduler may ask for the batch split over several KV caches (`kv_groups`).
            groups = max(1, min(scheduler.kv_groups(self) if scheduler else 1, len(prompts)))
            self.reset(groups, len(prompts))
            seq_ids = list(range(len(prompts)))
            first: list[int] = []
            for sid, prompt in zip(seq_ids, prompts):
                self._check_room(sid, len(prompt) + max_new_tokens - 1)
                self.add_sequence(sid, sid * groups // len(prompts))
                first.append(self.prefill(sid, prompt)[0])
            out = [[t] for t in first]
            if max_new_tokens > 1:
                later = (scheduler or SyncDecode()).run(self, seq_ids, first, max_new_tokens - 1)
                for o, tokens in zip(out, later):
                    o.extend(tokens)
        finally:
            self.hooks.remove(steps.append)
        return GenerationResult([list(p) for p in prompts], out, steps)

    def teacher_forced_logits(self, tokens: Sequence[int], prompt_len: int) -> np.ndarray:
        """Logits at every position of `tokens`: the first `prompt_len` in one prefill, the rest
        one decode step each (fed the given token, not the sampled one). [len(tokens), vocab]."""
        self.reset(batch=1)
        self.add_sequence(0)
        rows = [self.prefill(0, tokens[:prompt_len], all_logits=True)]
        for i, tok in enumerate(tokens[prompt_len:]):
            _, logits = self.decode([0], [tok], i)
            rows.append(self.session.to_numpy(logits).reshape(1, -1))
        return np.concatenate(rows, axis=0)
