"""One Chrome trace from CUPTI record files, the experiment's host spans and sampled counters.

Layout (chrome://tracing, https://ui.perfetto.dev):
- the experiment's own trace.json (host spans: compile, load, every run, prefill/decode step),
  unchanged but for a shift onto the common origin;
- per traced process (the experiment, each disco worker) and device: a process "GPU d · label",
  a thread per CUDA stream (a stream's extra lanes, "overlap k", hold records that overlap on it),
  kernels, memcpys and memsets as slices, and device memory allocated (CUPTI) as a counter;
- per traced process: "label · CUDA API", a thread per host thread, the runtime/driver calls,
  with a flow arrow from each launch to the work it launched (same correlation id);
- telemetry counters from the sampler (GPU utilisation, memory, power, clock; or CPU%/RSS).
Every time is placed on the host clock (time.perf_counter) through each file's calibration pairs.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from runtime_patch.cupti_tracer import host_clock, read_records

from harness.trace import Trace, validate

DEVICE_KINDS = ("kernel", "memcpy", "memset")
API_KINDS = ("runtime", "driver")
DEVICE_MEMORY = ("DEVICE", "DEVICE_STATIC", "MANAGED", "ARRAY")
HOST_PID_STRIDE = 100
TELEMETRY_PID = 900
FIRST_CUPTI_PID = 1000
_STEP_INDEX = re.compile(r"\s+\d+$")


# --- inputs ------------------------------------------------------------------------------------

def load_record_files(folder) -> tuple[list[dict], list[dict]]:
    """(record documents, unavailable notes) from a LAB_CUPTI_DIR folder. A process that never
    reached stop() left only its spool (`.partial.jsonl`): it is read and marked incomplete."""
    folder = Path(folder)
    docs, notes = [], []
    if not folder.is_dir():
        return docs, notes
    finals = {p.name[: -len(".json")]: p for p in folder.glob("cupti-*.json")
              if not p.name.endswith(".unavailable.json")}
    for stem, path in sorted(finals.items()):
        try:
            docs.append(read_records(path))
        except (OSError, json.JSONDecodeError) as err:
            notes.append({"file": path.name, "reason": f"unreadable: {err}"})
    for path in sorted(folder.glob("cupti-*.partial.jsonl")):
        if path.name[: -len(".partial.jsonl")] not in finals:
            doc = read_records(path)
            doc["complete"] = False
            docs.append(doc)
    for path in sorted(folder.glob("cupti-*.unavailable.json")):
        try:
            notes.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            notes.append({"file": path.name, "reason": "unreadable note"})
    return docs, notes


def load_host_traces(experiment_dir) -> list[tuple[Path, dict]]:
    """Every trace.json the experiment wrote (one per run folder; a multirun has several)."""
    found = []
    for path in sorted(Path(experiment_dir).rglob("trace.json")):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return found


# --- clocks and lanes ----------------------------------------------------------------------------

def assign_lanes(spans: list[tuple[int, int]]) -> list[int]:
    """A lane per span such that, within a lane, spans nest or follow one another (what a trace
    track must hold). `spans` are (start, end); returns one lane index per span, in input order."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], -spans[i][1]))
    lanes: list[list[int]] = []  # per lane, the ends of the spans still open
    out = [0] * len(spans)
    for i in order:
        start, end = spans[i]
        for lane, open_ends in enumerate(lanes):
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            if not open_ends or end <= open_ends[-1]:
                open_ends.append(end)
                out[i] = lane
                break
        else:
            lanes.append([end])
            out[i] = len(lanes) - 1
    return out


# --- CUPTI records -> trace ----------------------------------------------------------------------

def _device_args(r: dict) -> dict:
    args = {"correlation_id": r.get("correlation_id"), "stream": r.get("stream_id")}
    if r["kind"] == "kernel":
        args.update(grid=r.get("grid"), block=r.get("block"), registers=r.get("registers"),
                    shared_bytes=r.get("shared_bytes"))
        if r.get("graph_id"):
            args["graph_id"] = r["graph_id"]
    else:
        args["bytes"] = r.get("bytes")
        seconds = (r["end_ns"] - r["start_ns"]) / 1e9
        if r.get("bytes") and seconds > 0:
            args["GB/s"] = round(r["bytes"] / seconds / 1e9, 3)
        for key in ("copy_kind", "src_device", "dst_device"):
            if key in r:
                args[key] = r[key]
    return args


def doc_time_range(doc: dict) -> tuple[float, float] | None:
    recs = [r for r in doc.get("records", []) if "start_ns" in r]
    pairs = doc.get("clock", {}).get("pairs", [])
    if not recs or not pairs:
        return None
    to_s = host_clock(pairs)
    return to_s(min(r["start_ns"] for r in recs)), to_s(max(r["end_ns"] for r in recs))


def add_cupti(trace: Trace, docs: list[dict], first_pid: int = FIRST_CUPTI_PID,
              names: dict[str, str] | None = None) -> dict:
    """Add every record document to `trace` (origin: the host clock); returns counts."""
    names = names or {}
    pid = first_pid
    flow_id = 0
    stats = {"kernels": 0, "memcpys": 0, "memsets": 0, "api_calls": 0, "flows": 0,
             "devices": set(), "processes": 0, "overlap_lanes": 0}
    for doc in sorted(docs, key=lambda d: (str(d.get("label")), d.get("pid", 0))):
        pairs = doc.get("clock", {}).get("pairs", [])
        records = doc.get("records", [])
        if not pairs or not records:
            continue
        to_s = host_clock(pairs)
        label = f"{doc.get('label', 'process')} (pid {doc.get('pid', '?')})"
        if doc.get("complete") is False:
            label += " [incomplete: ended without stop()]"
        stats["processes"] += 1
        device = [r for r in records if r["kind"] in DEVICE_KINDS]
        api = [r for r in records if r["kind"] in API_KINDS]
        memory = [r for r in records if r["kind"] == "memory"]
        where_api: dict[int, tuple[int, int, float]] = {}

        if api:
            api_pid, pid = pid, pid + 1
            trace.process(api_pid, f"{label} · CUDA API", sort_index=api_pid)
            tids: dict[tuple[int, int], int] = {}
            by_thread = defaultdict(list)
            for r in api:
                by_thread[r.get("thread_id", 0)].append(r)
            for thread, recs in sorted(by_thread.items()):
                lanes = assign_lanes([(r["start_ns"], r["end_ns"]) for r in recs])
                for r, lane in zip(recs, lanes):
                    key = (thread, lane)
                    if key not in tids:
                        tids[key] = len(tids) + 1
                        suffix = f" (overlap {lane})" if lane else ""
                        trace.thread(api_pid, tids[key], f"host thread {thread}{suffix}", sort_index=tids[key])
                    start = to_s(r["start_ns"])
                    trace.span(api_pid, tids[key], r["name"], start, to_s(r["end_ns"]), cat=f"cuda_{r['kind']}",
                               args={"correlation_id": r["correlation_id"]})
                    where_api[r["correlation_id"]] = (api_pid, tids[key], start)
            stats["api_calls"] += len(api)

        by_device = defaultdict(list)
        for r in device:
            by_device[r.get("device_id", 0)].append(r)
        mem_by_device = defaultdict(list)
        for r in memory:
            if r.get("memory_kind") in DEVICE_MEMORY:
                mem_by_device[r.get("device_id", 0)].append(r)
        for dev in sorted(set(by_device) | set(mem_by_device)):
            dev_pid, pid = pid, pid + 1
            stats["devices"].add(dev)
            trace.process(dev_pid, f"GPU {dev} · {label}", sort_index=dev_pid)
            recs = by_device.get(dev, [])
            by_stream = defaultdict(list)
            for r in recs:
                by_stream[r.get("stream_id", 0)].append(r)
            tid = 0
            for stream, mine in sorted(by_stream.items()):
                lanes = assign_lanes([(r["start_ns"], r["end_ns"]) for r in mine])
                lane_tid = {}
                for lane in sorted(set(lanes)):
                    tid += 1
                    lane_tid[lane] = tid
                    trace.thread(dev_pid, tid, f"stream {stream}" + (f" (overlap {lane})" if lane else ""),
                                 sort_index=tid)
                stats["overlap_lanes"] += len(lane_tid) - 1
                for r, lane in zip(mine, lanes):
                    start = to_s(r["start_ns"])
                    name = names.get(r["name"], r["name"])
                    trace.span(dev_pid, lane_tid[lane], name, start, to_s(r["end_ns"]), cat=r["kind"],
                               args=_device_args(r))
                    stats[{"kernel": "kernels", "memcpy": "memcpys", "memset": "memsets"}[r["kind"]]] += 1
                    launch = where_api.get(r.get("correlation_id"))
                    if launch is not None:
                        flow_id += 1
                        trace.flow(launch[0], launch[1], launch[2], dev_pid, lane_tid[lane], start,
                                   "launch", flow_id, cat="launch")
                        stats["flows"] += 1
            allocated = 0
            for r in sorted(mem_by_device.get(dev, []), key=lambda r: r["start_ns"]):
                allocated += r["bytes"] if r["name"] == "allocation" else -r["bytes"] if r["name"] == "release" else 0
                trace.counter(dev_pid, "device memory allocated (CUPTI)", to_s(r["start_ns"]),
                              {"MiB": allocated / 2**20})
    stats["devices"] = sorted(stats["devices"])
    return stats


def add_telemetry(trace: Trace, kind: str, rows: list[dict], description: str) -> None:
    """Sampled counters on their own process."""
    if not rows:
        return
    trace.process(TELEMETRY_PID, f"telemetry: {description}", sort_index=TELEMETRY_PID)
    for r in rows:
        t = r["perf_counter_s"]
        if kind == "cpu":
            trace.counter(TELEMETRY_PID, "experiment CPU (%)", t, {"cpu": r["cpu_percent"]})
            trace.counter(TELEMETRY_PID, "experiment RSS (MiB)", t, {"rss": r["rss_bytes"] / 2**20})
            continue
        g = r["gpu"]
        if r["utilization_pct"] is not None:
            trace.counter(TELEMETRY_PID, f"GPU {g} utilisation (%)", t,
                          {"sm": r["utilization_pct"], "memory": r["memory_utilization_pct"] or 0})
        if r["memory_used_bytes"] is not None:
            trace.counter(TELEMETRY_PID, f"GPU {g} memory used (GiB)", t, {"used": r["memory_used_bytes"] / 2**30})
        if r["power_w"] is not None:
            trace.counter(TELEMETRY_PID, f"GPU {g} power (W)", t, {"power": r["power_w"]})
        if r["sm_clock_mhz"] is not None:
            trace.counter(TELEMETRY_PID, f"GPU {g} SM clock (MHz)", t, {"clock": r["sm_clock_mhz"]})


def merged_document(host_traces: list[tuple[Path, dict]], extra: Trace, other_data: dict) -> dict:
    """The experiment's trace(s) shifted onto `extra`'s origin, then `extra`'s events."""
    meta, events = [], []
    for k, (path, doc) in enumerate(host_traces):
        origin = float(doc.get("otherData", {}).get("origin_s", extra.origin_s))
        shift_us = (origin - extra.origin_s) * 1e6
        pid_shift = k * HOST_PID_STRIDE
        for e in doc.get("traceEvents", []):
            e = {**e, "pid": e["pid"] + pid_shift if isinstance(e.get("pid"), int) else e.get("pid")}
            if e.get("ph") == "M":
                meta.append(e)
            else:
                if "ts" in e:
                    e["ts"] = e["ts"] + shift_us
                events.append(e)
    own = extra.to_dict()
    own_meta = [e for e in own["traceEvents"] if e["ph"] == "M"]
    own_events = [e for e in own["traceEvents"] if e["ph"] != "M"]
    doc = {"traceEvents": meta + own_meta + events + own_events, "displayTimeUnit": "ms",
           "otherData": {**own["otherData"], **other_data,
                         "host_traces": [str(p) for p, _ in host_traces]}}
    validate(doc)
    return doc


def host_origin_candidates(host_traces) -> list[float]:
    return [float(d["otherData"]["origin_s"]) for _, d in host_traces if "origin_s" in d.get("otherData", {})]


# --- device idle time during decode ---------------------------------------------------------------

def decode_windows(host_traces: list[tuple[Path, dict]]) -> dict[str, list[tuple[float, float]]]:
    """The host's decode-step spans ("decode N"), per host process name, in perf_counter seconds."""
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _, doc in host_traces:
        origin = doc.get("otherData", {}).get("origin_s")
        if origin is None:
            continue
        events = doc.get("traceEvents", [])
        names = {e["pid"]: str(e.get("args", {}).get("name")) for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
        for e in events:
            if e.get("ph") == "X" and _STEP_INDEX.sub("", str(e["name"])) == "decode":
                start = float(origin) + e["ts"] / 1e6
                windows[names.get(e["pid"], str(e["pid"]))].append((start, start + e["dur"] / 1e6))
    return dict(windows)


def run_windows(host_traces: list[tuple[Path, dict]], margin_s: float = 0.002) -> list[tuple[float, float]]:
    """The host's timed repeats ("run N" spans of every sweep point), in perf_counter seconds,
    widened by `margin_s` on each side."""
    windows = []
    for _, doc in host_traces:
        origin = doc.get("otherData", {}).get("origin_s")
        if origin is None:
            continue
        for e in doc.get("traceEvents", []):
            if e.get("ph") == "X" and e.get("cat") == "run":
                start = float(origin) + e["ts"] / 1e6
                windows.append((start - margin_s, start + e["dur"] / 1e6 + margin_s))
    return sorted(windows)


def keep_within(docs: list[dict], windows: list[tuple[float, float]]) -> tuple[list[dict], int]:
    """The record documents with only the records that overlap a window (host clock; `windows`
    sorted, not overlapping but at their margins); how many were left out. A document without
    clock pairs is kept whole."""
    starts = [a for a, _ in windows]
    kept_docs, dropped = [], 0
    for doc in docs:
        pairs = doc.get("clock", {}).get("pairs", [])
        if not pairs:
            kept_docs.append(doc)
            continue
        to_s = host_clock(pairs)
        kept = []
        for r in doc.get("records", []):
            start, end = to_s(r["start_ns"]), to_s(r.get("end_ns", r["start_ns"]))
            i = bisect.bisect_right(starts, end) - 1  # the last window starting before the record ends
            if any(windows[j][1] >= start for j in range(max(0, i - 1), i + 1)):
                kept.append(r)
            else:
                dropped += 1
        kept_docs.append({**doc, "records": kept})
    return kept_docs, dropped


def busy_intervals(docs: list[dict]) -> dict[int, list[tuple[float, float]]]:
    """Per GPU, the union of the intervals in which a kernel, copy or set ran (host clock, sorted)."""
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for doc in docs:
        pairs = doc.get("clock", {}).get("pairs", [])
        if not pairs:
            continue
        to_s = host_clock(pairs)
        for r in doc.get("records", []):
            if r["kind"] in DEVICE_KINDS:
                spans[r.get("device_id", 0)].append((to_s(r["start_ns"]), to_s(r["end_ns"])))
    merged = {}
    for dev, items in spans.items():
        out: list[list[float]] = []
        for a, b in sorted(items):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        merged[dev] = [(a, b) for a, b in out]
    return merged


def busy_within(windows: list[tuple[float, float]], busy: list[tuple[float, float]]) -> float:
    """Seconds of `busy` (sorted, disjoint) that fall inside `windows`."""
    starts = [a for a, _ in busy]
    total = 0.0
    for lo, hi in windows:
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(busy) and busy[i][0] < hi:
            total += max(0.0, min(hi, busy[i][1]) - max(lo, busy[i][0]))
            i += 1
    return total


def device_idle_during_decode(host_traces: list[tuple[Path, dict]], docs: list[dict]) -> list[dict]:
    """Per host process with decode steps and per GPU: the decode steps' wall time, the time the GPU
    ran anything inside them, and the idle fraction (1 - busy / wall)."""
    busy = busy_intervals(docs)
    rows = []
    for track, windows in sorted(decode_windows(host_traces).items()):
        wall = sum(b - a for a, b in windows)
        for dev, intervals in sorted(busy.items()):
            used = busy_within(windows, intervals)
            rows.append({"host_track": track, "device": dev, "decode_steps": len(windows), "decode_s": wall,
                         "busy_s": used, "idle_fraction": 1.0 - used / wall if wall > 0 else None})
    return rows


IDLE_COLUMNS = [("host_track", "host track", None), ("device", "GPU", None), ("decode_steps", "decode steps", None),
                ("decode_s", "decode wall (s)", "{:.4f}"), ("busy_s", "GPU busy (s)", "{:.4f}"),
                ("idle_fraction", "GPU idle", "{:.1%}")]


# --- host step timings (the fallback) -------------------------------------------------------------

def host_step_timings(host_traces: list[tuple[Path, dict]]) -> list[dict]:
    """Per kind of host span (its name less a trailing index: "decode 3" -> "decode"): count and
    time statistics, in ms."""
    by_cat = defaultdict(list)
    for _, doc in host_traces:
        for e in doc.get("traceEvents", []):
            if e.get("ph") == "X":
                by_cat[_STEP_INDEX.sub("", str(e["name"])) or str(e["name"])].append(e["dur"] / 1e3)
    rows = []
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -sum(kv[1])):
        x = np.asarray(ms)
        rows.append({"category": cat, "count": int(x.size), "total_ms": float(x.sum()), "mean_ms": float(x.mean()),
                     "p50_ms": float(np.percentile(x, 50)), "p95_ms": float(np.percentile(x, 95)),
                     "max_ms": float(x.max())})
    return rows


STEP_COLUMNS = [("category", "host span", None), ("count", "count", None), ("total_ms", "total (ms)", "{:.3f}"),
                ("mean_ms", "mean (ms)", "{:.3f}"), ("p50_ms", "p50 (ms)", "{:.3f}"),
                ("p95_ms", "p95 (ms)", "{:.3f}"), ("max_ms", "max (ms)", "{:.3f}")]
