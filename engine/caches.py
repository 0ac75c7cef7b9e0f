"""The KV caches a Generator drives, one class per kind (BuildSpec.kv_cache): TVM's paged cache
(`PagedCaches`) and the project's static one (`StaticCaches`, engine/model/static_kv.py). Both
hold one cache per request group (a scheduler may split a batch into groups, each with its own
per-step state) and run the model's functions on the session; the Generator keeps the sequences'
lengths and the timing hooks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from runtime_patch import functions


class PagedCaches:
    """TVM's paged KV cache: sequences are added to a cache object; each forward pass is bracketed
    by begin/end_forward, which stage the pass's attention metadata (positions, page tables)."""

    kind = "paged"
    # Step t+1 may not be launched before step t is read: TVM's cache refreshes one metadata buffer
    # per step, which a step still running would read (docs/ARCHITECTURE.md).
    can_launch_ahead = False
    sized_by_batch = False  # one cache of max_batch sequences, kept whatever a generation's batch

    def __init__(self, session, prefill_chunk: int, page_size: int):
        self.session, self.prefill_chunk, self.page_size = session, prefill_chunk, page_size
        self.caches: list = []

    def reset(self, groups: int, per_group: int, max_total_len: int, members: dict[int, int]) -> None:
        """Empty caches: the old sequences (`members`: seq id -> group) removed and the caches kept,
        or `groups` new caches (the old ones freed first)."""
        if len(self.caches) == groups:
            for sid, g in members.items():
                self.session.remove_sequence(self.caches[g], sid)
            return
        self.caches = []
        pages = -(-max_total_len // self.page_size)
        self.caches = [self.session.create_kv_cache(per_group, per_group * pages * self.page_size, self.prefill_chunk,
                                                    self.page_size) for _ in range(groups)]

    def add(self, seq_id: int, group: int) -> None:
        self.session.add_sequence(self.caches[group], seq_id)

    def begin(self, group: int, seq_ids: list[int], lengths: list[int]) -> None:
        self.session.begin_forward(self.caches[group], seq_ids, lengths)

    def forward(self, fn: str, ids, groups: list[int], seq_ids: list[list[int]], lengths: list[list[int]],
                begun: bool):
        """Call `fn` on the caches of `groups` (one, or batch_decode_pair's two), each sequence
        appending `lengths` tokens (begin_forward done already if `begun`)."""
        kvs = [self.caches[g] for g in groups]
        if not begun:
            for g, s, n in zip(groups, seq_ids, lengths):
                self.begin(g, s, n)
        out = self.session.call(fn, ids, *kvs)
        for kv in kvs:
            self.session.end_forward(kv)
        return out

    def prefill(self, group: int, seq_id: int, chunk: np.ndarray, start: int, all_logits: bool):
        fn = "prefill_logits" if all_logits else "prefill"
        out = self.forward(fn, chunk, [group], [[seq_id]], [[chunk.shape[1]]], False)
        return (None, out[0]) if all_logits else (out[0], out[1])

    def decode(self, group: int, seq_ids: list[int], ids, begun: bool):
        fn = "decode" if len(seq_ids) == 1 else "batch_decode"
        next_ids, logits, _ = self.forward(fn, ids, [group], [seq_ids], [[1] * len(seq_ids)], begun)
        return next_ids, logits

    def next_input(self, next_ids):
        """A step's device tokens as the next step's input ([b] -> [b, 1], [2, m] -> [2, m, 1])."""
        return self.session.decode_input(next_ids)

    def read(self, next_ids) -> np.ndarray:
        """A launched step's tokens on the host (waits for the step)."""
        return self.session.to_numpy(next_ids)

    def note_held(self, group: int, seq_ids: Sequence[int], tokens: Sequence[int]) -> None:
        """Nothing to note: every step is fed from the host or through next_input."""


class TokenMailbox:
    """Host memory that the GPU writes each decode step's tokens into (runtime_patch.functions.
    KV_MAILBOX: worker 0's, for a DiscoSession): the host reads step k's tokens as soon as that
    step's last kernel has run, while the steps launched after it run (a stream-ordered copy would
    wait for those). `read(call, n)` waits for advance call `call` (counted since the mailbox was
    made) and returns its n tokens."""

    def __init__(self, address: int, check, share_gil: bool = False):
        self.words = np.ctypeslib.as_array((ctypes.c_int32 * functions.MAILBOX_WORDS).from_address(address))
        self.check = check  # raises where the session's workers failed (a spin must not hang on them)
        # Where the step runs Python in a thread of this process (a DiscoSession's worker 0:
        # `python_in_step`), the spin gives the GIL away at every turn: a spin that kept it stalled
        # each such call for the interpreter's switch interval (5 ms; measured on 2 x H200: a pp=2
        # step took 21 ms instead of ~5).
        self.share_gil = share_gil

    @property
    def calls(self) -> int:
        return int(self.words[0])

    def read(self, call: int, n: int, timeout_s: float = 300.0) -> list[int]:
        deadline = last_check = time.monotonic()
        deadline += timeout_s
        while self.words[0] <= call:
            if self.share_gil:
                time.sleep(0)
            now = time.monotonic()
            if now - last_check > 0.5:
                self.check()
                last_check = now
                if now > deadline:
                    raise TimeoutError(f"decode step (advance call {call}) did not finish within {timeout_s:.0f} s")
        if self.words[0] - call > functions.MAILBOX_RING:
            raise RuntimeError(f"advance call {call}'s tokens were overwritten before they were read "
                               f"(read at most {functions.MAILBOX_RING} steps behind)")
        entry = functions.mailbox_entry(call)
        return self.words[entry:entry + n].tolist()


@dataclasses.dataclass
class StepTokens:
    """A static-cache decode step's tokens: on the device (`tensor`, also in the cache's `ids`
    already) and, where the step wrote them to the mailbox, its advance call number."""

    tensor: object
    shape: tuple[int, ...]
    call: int | None


class StaticCaches:
    """The project's static KV cache: per group, one slot per sequence (in the order they were
    added), the cache tensors and each slot's position and next input on the device. A decode step
    advances every slot of its group; its input is already on the device (the previous step, or
    the prefill, wrote it), unless the host feeds other tokens (`set_ids`). Group g's functions run
    on the session's VM instance g: a VM captures a CUDA graph once per function and shape, with the
    addresses of the tensors it was first called with, so two groups' caches need two VMs."""

    kind = "static"
    can_launch_ahead = True  # a step's inputs and positions are on the device, written by the step before
    sized_by_batch = True  # a decode step advances every slot: a generation's batch is the slots

    def __init__(self, session, vocab: int):
        self.session, self.vocab = session, vocab
        self.mailbox: TokenMailbox | None = None
        self._next_call = 0  # the mailbox's call number of the next advance this generator launches
        self.states: list = []
        self.slots: list[list[int]] = []  # per group, the seq ids in slot order
        self._held: list[list[int | None]] = []  # per group and slot: the token the device's ids hold

    def reset(self, groups: int, per_group: int, max_total_len: int, members: dict[int, int]) -> None:
        if not (len(self.states) == groups and self.states[0].slots == per_group
                and self.states[0].max_len == max_total_len):
            self.states = []  # free the old tensors first
            self.states = [self.session.create_static_state(per_group, max_total_len) for _ in range(groups)]
        self.slots = [[] for _ in range(groups)]
        self._held = [[None] * per_group for _ in range(groups)]
        if per_group <= functions.MAILBOX_SLOTS:
            if self.mailbox is None:
                self.mailbox = TokenMailbox(self.session.mailbox(), self.session.check,
                                            share_gil=getattr(self.session, "python_in_step", False))
            self.session.sync()  # no advance in flight: the count is where this generator's calls start
            self._next_call = self.mailbox.calls
        else:
            self.mailbox = None

    def add(self, seq_id: int, group: int) -> None:
        self.slots[group].append(seq_id)

    def begin(self, group: int, seq_ids: list[int], lengths: list[int]) -> None:
        """Nothing to stage: positions live on the device and advance there."""

    def _check_group(self, group: int, seq_ids: Sequence[int]) -> None:
        state = self.states[group]
        if list(seq_ids) != self.slots[group] or len(seq_ids) != state.slots:
            raise ValueError(f"a static-cache decode step advances every slot of its group in order: "
                             f"{self.slots[group]} of {state.slots}, got {list(seq_ids)}")

    def prefill(self, group: int, seq_id: int, chunk: np.ndarray, start: int, all_logits: bool):
        from tvm.runtime import ShapeTuple

        state, slot = self.states[group], self.slots[group].index(seq_id)
        n = chunk.shape[1]
        fn = "prefill_logits_static" if all_logits else "prefill_static"
        outputs = [((n if all_logits else 1,), "int32"), ((n if all_logits else 1, self.vocab), "float32")]
        tokens, logits = self.session.call_static(fn, chunk, *state.tensors(), ShapeTuple([slot]), ShapeTuple([start]),
                                                  outputs=outputs, instance=group)
        self._held[group][slot] = None  # known once the host reads the token (note_held)
        return tokens, logits

    def set_ids(self, group: int, ids: np.ndarray) -> None:
        state = self.states[group]
        self.session.call_static("set_ids", ids, state.ids, outputs=[((state.slots,), "int32")], instance=group)
        self._held[group] = ids.reshape(-1).tolist()

    def note_held(self, group: int, seq_ids: Sequence[int], tokens: Sequence[int]) -> None:
        """The host has read what the device wrote into `ids` for these sequences."""
        for sid, t in zip(seq_ids, tokens):
            self._held[group][self.slots[group].index(sid)] = int(t)

    def decode(self, group: int, seq_ids: list[int], ids, begun: bool):
        """One step of every slot of `group`. `ids`: host int32 [b, 1] (written into the device's
        ids unless they hold these tokens already) or the previous step's tokens (StepTokens: the
        previous step wrote them there itself). Returns (StepTokens, logits)."""
        self._check_group(group, seq_ids)
        state = self.states[group]
        if isinstance(ids, np.ndarray):
            if self._held[group] != ids.reshape(-1).tolist():
                self.set_ids(group, ids)
        fn = "decode_static" if state.slots == 1 else "batch_decode_static"
        tokens, logits = self.session.call_static(fn, *state.tensors(), instance=group,
                                                  outputs=[((state.slots,), "int32"), ((state.slots, self.vocab), "float32")])
        self._held[group] = [None] * state.slots  # known once the host reads them (note_held)
        call = None
        if self.mailbox is not None:
            call, self._next_call = self._next_call, self._next_call + 1
        return StepTokens(tokens, (state.slots,), call), logits

    def next_input(self, tokens: StepTokens) -> StepTokens:
        """The step's tokens as they are: it wrote them into the next step's input itself."""
        return tokens

    def read(self, tokens: StepTokens) -> np.ndarray:
        """A step's tokens on the host: from the mailbox where the step wrote them there, else
        copied from the device."""
        if tokens.call is not None:
            return np.asarray(self.mailbox.read(tokens.call, tokens.shape[0]), dtype=np.int32)
        return self.session.to_numpy(tokens.tensor)
