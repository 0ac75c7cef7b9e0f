"""Chrome Trace Event Format (chrome://tracing, Perfetto): a builder and a validator.

Times are given in seconds (any clock, e.g. time.perf_counter()) and written as microseconds
since the trace's origin.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

from .results import atomic_write_text, to_jsonable

TOLERANCE_US = 1e-3
_PROCESS_META = ("process_name", "process_sort_index", "process_labels")
_THREAD_META = ("thread_name", "thread_sort_index")


class Trace:
    def __init__(self, origin_s: float, other_data: dict | None = None):
        self.origin_s = float(origin_s)
        self.other_data = dict(other_data or {})
        self._meta: dict[tuple, dict] = {}  # (name, pid, tid) -> event; re-naming replaces
        self._events: list[dict] = []

    def _us(self, t_s: float) -> float:
        return (t_s - self.origin_s) * 1e6

    def _add_meta(self, name, pid, tid, args):
        event = {"name": name, "ph": "M", "pid": pid, "args": args}
        if tid is not None:
            event["tid"] = tid
        self._meta[(name, pid, tid)] = event

    def process(self, pid: int, name: str, sort_index: int | None = None) -> None:
        self._add_meta("process_name", pid, None, {"name": name})
        if sort_index is not None:
            self._add_meta("process_sort_index", pid, None, {"sort_index": sort_index})

    def thread(self, pid: int, tid: int, name: str, sort_index: int | None = None) -> None:
        self._add_meta("thread_name", pid, tid, {"name": name})
        if sort_index is not None:
            self._add_meta("thread_sort_index", pid, tid, {"sort_index": sort_index})

    def span(self, pid: int, tid: int, name: str, start_s: float, end_s: float,
             cat: str = "", args: dict | None = None) -> dict:
        if end_s < start_s:
            raise ValueError(f"span {name!r} ends before it starts ({start_s} > {end_s})")
        event = {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid,
                 "ts": self._us(start_s), "dur": (end_s - start_s) * 1e6}
        if args:
            event["args"] = args
        self._events.append(event)
        return event

    def counter(self, pid: int, name: str, t_s: float, values: dict) -> dict:
        event = {"name": name, "ph": "C", "pid": pid, "ts": self._us(t_s), "args": dict(values)}
        self._events.append(event)
        return event

    def flow(self, start_pid: int, start_tid: int, start_s: float,
             end_pid: int, end_tid: int, end_s: float, name: str, id, cat: str = "flow"):
        """An arrow from the slice enclosing start_s to the slice enclosing end_s."""
        common = {"name": name, "cat": cat, "id": id, "bp": "e"}
        start = {**common, "ph": "s", "pid": start_pid, "tid": start_tid, "ts": self._us(start_s)}
        end = {**common, "ph": "f", "pid": end_pid, "tid": end_tid, "ts": self._us(end_s)}
        self._events += [start, end]
        return start, end

    def instant(self, pid: int, tid: int, name: str, t_s: float, scope: str = "t",
                cat: str = "", args: dict | None = None) -> dict:
        event = {"name": name, "cat": cat, "ph": "i", "s": scope, "pid": pid, "tid": tid,
                 "ts": self._us(t_s)}
        if args:
            event["args"] = args
        self._events.append(event)
        return event

    def to_dict(self) -> dict:
        return {"traceEvents": list(self._meta.values()) + self._events,
                "displayTimeUnit": "ms",
                "otherData": {"origin_s": self.origin_s, **self.other_data}}

    def save(self, path, check: bool = True):
        """Validate (unless check=False) and write atomically; compact JSON, traces get big."""
        doc = self.to_dict()
        if check:
            validate(doc)
        return atomic_write_text(path, json.dumps(to_jsonable(doc), separators=(",", ":")))


def merge(*traces: Trace) -> Trace:
    """One trace from several (e.g. one per rank), on the earliest origin.

    Keep pids distinct across the inputs (e.g. pid = rank); metadata for the same
    (pid, tid) is taken from the last trace that names it.
    """
    if not traces:
        raise ValueError("merge() needs at least one trace")
    out = Trace(min(t.origin_s for t in traces))
    for t in traces:
        shift_us = (t.origin_s - out.origin_s) * 1e6
        out._meta.update(t._meta)
        out._events += [{**e, "ts": e["ts"] + shift_us} for e in t._events]
        out.other_data.update(t.other_data)
    return out


# --- validation ----------------------------------------------------------------------------

def _fail(i, event, problem):
    raise ValueError(f"traceEvents[{i}] ({event.get('ph')!r} {event.get('name')!r}): {problem}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(trace: dict) -> None:
    """Raise ValueError naming the first problem; return None for a well-formed trace."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError("trace must be a dict with a 'traceEvents' list")
    events = trace["traceEvents"]
    processes, threads = set(), set()
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise ValueError(f"traceEvents[{i}] is not an object: {e!r}")
        for key in ("name", "ph", "pid"):
            if key not in e:
                _fail(i, e, f"missing required key {key!r}")
        if e["ph"] == "M":
            if e["name"] in _THREAD_META and "tid" not in e:
                _fail(i, e, "thread metadata needs a 'tid'")
            if e["name"] == "process_name":
                processes.add(e["pid"])
            elif e["name"] == "thread_name":
                threads.add((e["pid"], e["tid"]))

    tracks = defaultdict(list)
    for i, e in enumerate(events):
        ph = e["ph"]
        if ph == "M":
            continue
        if not _is_number(e.get("ts")):
            _fail(i, e, "missing or non-numeric 'ts'")
        if e["pid"] not in processes:
            _fail(i, e, f"pid {e['pid']} has no process_name metadata")
        on_thread = ph in ("X", "B", "E", "s", "t", "f") or (ph in ("i", "I")
                                                                and e.get("s", "t") == "t")
        if on_thread:
            if "tid" not in e:
                _fail(i, e, "missing required key 'tid'")
            if (e["pid"], e["tid"]) not in threads:
                _fail(i, e, f"pid {e['pid']} tid {e['tid']} has no thread_name metadata")
        if ph == "X":
            if not _is_number(e.get("dur")) or e["dur"] < 0:
                _fail(i, e, f"complete event needs a non-negative 'dur', got {e.get('dur')!r}")
            tracks[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], i))
        elif ph in ("s", "t", "f") and "id" not in e:
            _fail(i, e, "flow event needs an 'id'")
        elif ph == "C" and not isinstance(e.get("args"), dict):
            _fail(i, e, "counter event needs 'args' with its values")

    for (pid, tid), spans in tracks.items():
        _check_nesting(events, pid, tid, spans)


def _check_nesting(events, pid, tid, spans):
    # Sorted by start, longest first: each span must end inside every open span it starts in.
    stack = []
    for start, end, i in sorted(spans, key=lambda s: (s[0], -s[1])):
        while stack and stack[-1][1] <= start + TOLERANCE_US:
            stack.pop()
        if stack and end > stack[-1][1] + TOLERANCE_US:
            j = stack[-1][2]
            raise ValueError(
                f"pid {pid} tid {tid}: {events[i]['name']!r} [{start:.3f}, {end:.3f}] us "
                f"partially overlaps {events[j]['name']!r} "
                f"[{stack[-1][0]:.3f}, {stack[-1][1]:.3f}] us (spans on a track must nest)")
        stack.append((start, end, i))
