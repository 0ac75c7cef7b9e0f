"""What a run has done so far, so that a run that does not finish still leaves a true results.json.

`entry.guarded` installs a `RunState` around an entry point's task; `sweep.run_point` adds every
point it measured (and names the one it is measuring). When the task ends other than by
returning — an exception, Ctrl-C (SIGINT), SIGTERM, the profiler's time limit (a SIGINT) — the
guard writes results.json from what the state holds, claiming no more than that: "interrupted",
"partial" (some points were measured) or "error" (none was). SIGTERM is turned into an exception
like KeyboardInterrupt (`Terminated`), so that `finally` blocks still run: the sessions close and
their disco worker processes are stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# The exit status of a run stopped by a signal: 128 + the signal's number, as a shell reports it.
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Python would raise KeyboardInterrupt for SIGINT."""

    signum = signal.SIGTERM


def signal_of(err: KeyboardInterrupt) -> signal.Signals:
    return signal.Signals(getattr(err, "signum", signal.SIGINT))


def exit_status(signum: int) -> int:
    return 128 + int(signum)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread while inside (SIGINT raises
    KeyboardInterrupt as Python makes it; a SIGINT the process ignores stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while inside: a second Ctrl-C must not cut the results.json of
    an interrupted run in half (the write is short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


class RunState:
    """The points a run has finished (harness.report.Point, in order) and the one in progress."""

    def __init__(self) -> None:
        self.points: list = []
        self.current: str | None = None

    def begin(self, label: str) -> None:
        self.current = label

    def add(self, point) -> None:
        if all(p is not point for p in self.points):
            self.points.append(point)
        self.current = None

    @property
    def measured(self) -> list:
        """The points measured without error."""
        return [p for p in self.points if p.ok and p.samples]


_installed: RunState | None = None


def current() -> RunState | None:
    """The state of the run in progress in this process (None outside an entry point)."""
    return _installed


@contextlib.contextmanager
def installed(state: RunState) -> Iterator[RunState]:
    global _installed
    previous, _installed = _installed, state
    try:
        yield state
    finally:
        _installed = previous
