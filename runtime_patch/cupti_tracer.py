"""Kernel-level tracing from inside a process: CUPTI activity records through `cupti-python`.

Every kernel, memcpy and memset on every stream of this process, the CUDA runtime/driver calls
that launched them (launches, copies, synchronisations; other API calls are only counted) and
device memory allocations, each with start/end in CUPTI's nanosecond clock. `stop()` writes them
as one JSON document with clock calibration pairs (CUPTI timestamp, `time.perf_counter()`), so a
reader can place them on the host clock that the experiments' own traces use (perf_counter is
CLOCK_MONOTONIC on Linux: one clock for every process of the machine).

    from runtime_patch import cupti_tracer
    cupti_tracer.maybe_start_from_env()      # traces when $LAB_CUPTI_DIR is set; stops at exit

    cupti_tracer.start("k.json", "controller"); ...; cupti_tracer.stop()

    window = cupti_tracer.Window(); window.start(); ...; doc = window.stop()   # in memory, no file

A `Window` captures one stretch of work (e.g. one extra repeat) in memory: kernels, memcpys and
memsets only, in the same document format and with calibration pairs. CUPTI's activity API has one
set of buffer callbacks per process, so where the file tracer runs, a window taps its records
instead of subscribing again. `register_window_functions()` makes the same available to disco
workers as the tvm-ffi globals `lab.cupti.window_start()` / `lab.cupti.window_stop() -> str`.

Disco workers are killed rather than left to exit, so a worker may never reach its at-exit
handler: records are therefore spooled as they arrive (a background thread asks CUPTI for the
completed buffers every $LAB_CUPTI_FLUSH_S seconds, default 1) to `<name>.partial.jsonl`, which a
reader uses when the final file is missing. Imports nothing from `engine/` or `experiments/`.

Environment: LAB_CUPTI_DIR (output folder; files cupti-<pid>.json), LAB_CUPTI_LABEL (process
label), LAB_CUPTI_API (launch | all | none: which runtime/driver API records to keep),
LAB_CUPTI_FLUSH_S, LAB_CUPTI_MAX_RECORDS (per process, default 5,000,000; later ones are counted).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from runtime_patch import settings

FORMAT = "lab-cupti/1"
DEVICE_KINDS = ("kernel", "memcpy", "memset")
WINDOW_START = "lab.cupti.window_start"
WINDOW_STOP = "lab.cupti.window_stop"
BUFFER_BYTES = 4 << 20
WINDOW_BUFFER_BYTES = 64 << 20
API_KEEP = re.compile(r"Launch|Memcpy|Memset|Synchroniz|StreamWait|EventRecord|Malloc|Free|"
                      r"ProfilerSt", re.IGNORECASE)
_VERSION_SUFFIX = re.compile(r"_v\d+$")


class TracerUnavailable(RuntimeError):
    """CUPTI cannot trace here (module missing, no driver, activity kind refused): says why."""


_tracer: "_Tracer | None" = None
_open_window: "Window | None" = None
_lock = threading.Lock()


def calibrate(get_timestamp, tries: int = 7) -> list:
    """(cupti_ns, perf_counter_s): the CUPTI read bracketed by two host reads, the tightest of
    `tries`, the host time taken as the bracket's midpoint."""
    best = None
    for _ in range(tries):
        t0 = time.perf_counter()
        c = int(get_timestamp())
        t1 = time.perf_counter()
        if best is None or t1 - t0 < best[2]:
            best = (c, (t0 + t1) / 2, t1 - t0)
    return [best[0], best[1]]


def _import_cupti():
    try:
        from cupti import cupti
    except Exception as err:  # noqa: BLE001  (ImportError, or libcupti/cuda-bindings missing)
        raise TracerUnavailable(f"cupti-python is not importable: {type(err).__name__}: {err} "
                                f"(pip install cupti-python; docs/PROFILING.md)") from None
    return cupti


class _Tracer:
    def __init__(self, out_path: Path | None, label: str):
        self.cupti = _import_cupti()
        self.out_path = Path(out_path) if out_path is not None else None
        self.spool_path = (self.out_path.with_name(self.out_path.stem + ".partial.jsonl")
                           if self.out_path is not None else None)
        self.label = label
        self.pid = os.getpid()
        self.api_mode = settings.text("LAB_CUPTI_API")
        self.max_records = settings.integer("LAB_CUPTI_MAX_RECORDS")
        self.flush_s = settings.number("LAB_CUPTI_FLUSH_S")
        self.pending: list[dict] = []
        self.taps: list[list[dict]] = []  # open Windows' record lists (device kinds), under _pending_lock
        self.kept = 0
        self.counts: dict[str, int] = {}
        self.skipped = {"api_filtered": 0, "over_cap": 0, "incomplete": 0, "other_kinds": 0}
        self.warnings: list[str] = []
        self.api_names: dict[tuple[int, int], str] = {}
        self.enabled: list = []
        self.stop_event = threading.Event()
        self.flusher: threading.Thread | None = None
        self._pending_lock = threading.Lock()
        self._spool_lock = threading.Lock()
        self._spool = None
        self._kinds = self._kind_table()

    # --- CUPTI records -> plain dicts ----------------------------------------------------

    def _kind_table(self) -> dict:
        K = self.cupti.ActivityKind
        table = {K.CONCURRENT_KERNEL: "kernel", K.MEMCPY: "memcpy", K.MEMSET: "memset"}
        for name, kind in (("KERNEL", "kernel"), ("MEMCPY2", "memcpy"), ("RUNTIME", "runtime"),
                           ("DRIVER", "driver"), ("MEMORY2", "memory")):
            if hasattr(K, name):
                table[getattr(K, name)] = kind
        return table

    def _api_name(self, kind: str, cbid: int) -> str:
        key = (kind == "driver", cbid)
        name = self.api_names.get(key)
        if name is None:
            domain = (self.cupti.CallbackDomain.DRIVER_API if kind == "driver"
                      else self.cupti.CallbackDomain.RUNTIME_API)
            try:
                name = _VERSION_SUFFIX.sub("", str(self.cupti.get_callback_name(domain, cbid)))
            except Exception:  # noqa: BLE001
                name = f"{kind} cbid {cbid}"
            self.api_names[key] = name
        return name

    def _enum_name(self, enum, value) -> str:
        try:
            return enum(value).name
        except Exception:  # noqa: BLE001
            return str(value)

    def convert(self, a) -> dict | None:
        kind = self._kinds.get(int(a.kind))
        if kind is None:
            self.skipped["other_kinds"] += 1
            return None
        if kind in ("runtime", "driver"):
            name = self._api_name(kind, int(a.cbid))
            if self.api_mode == "none" or (self.api_mode != "all" and not API_KEEP.search(name)):
                self.skipped["api_filtered"] += 1
                return None
            return {"kind": kind, "name": name, "start_ns": int(a.start), "end_ns": int(a.end),
                    "correlation_id": int(a.correlation_id), "thread_id": int(a.thread_id),
                    "process_id": int(a.process_id), "cbid": int(a.cbid)}
        if kind == "memory":
            t = int(a.timestamp)
            return {"kind": kind, "name": self._enum_name(self.cupti.ActivityMemoryOperationType,
                                                          a.memory_operation_type).lower(),
                    "start_ns": t, "end_ns": t, "bytes": int(a.bytes), "address": int(a.address),
                    "memory_kind": self._enum_name(self.cupti.ActivityMemoryKind, a.memory_kind),
                    "device_id": int(a.device_id), "stream_id": int(a.stream_id),
                    "correlation_id": int(a.correlation_id)}
        start, end = int(a.start), int(a.end)
        if start <= 0 or end < start:
            self.skipped["incomplete"] += 1
            return None
        rec = {"kind": kind, "start_ns": start, "end_ns": end, "device_id": int(a.device_id),
               "stream_id": int(a.stream_id), "context_id": int(a.context_id),
               "correlation_id": int(a.correlation_id)}
        if kind == "kernel":
            name = a.name
            rec["name"] = name.decode() if isinstance(name, bytes) else str(name or "?")
            rec["grid"] = [int(a.grid_x), int(a.grid_y), int(a.grid_z)]
            rec["block"] = [int(a.block_x), int(a.block_y), int(a.block_z)]
            rec["shared_bytes"] = int(a.static_shared_memory) + int(a.dynamic_shared_memory)
            rec["registers"] = int(getattr(a, "registers_per_thread", 0))
            rec["graph_id"] = int(getattr(a, "graph_id", 0))
        elif kind == "memcpy":
            copy = self._enum_name(self.cupti.ActivityMemcpyKind, a.copy_kind)
            rec["bytes"] = int(a.bytes)
            rec["copy_kind"] = copy
            if hasattr(a, "src_device_id"):  # peer to peer (MEMCPY2)
                rec["src_device"], rec["dst_device"] = int(a.src_device_id), int(a.dst_device_id)
                copy = "PtoP"
            rec["name"] = f"Memcpy {copy}"
        else:  # memset
            rec["name"] = "Memset"
            rec["bytes"] = int(a.bytes)
            rec["value"] = int(a.value)
        return rec

    # --- CUPTI callbacks and spooling -------------------------------------------------------

    def _buffer_requested(self):
        return BUFFER_BYTES, 0

    def _buffer_completed(self, activities) -> None:
        out, tapped = [], []
        for a in activities:
            try:
                rec = self.convert(a)
            except Exception as err:  # noqa: BLE001  (never raise into CUPTI's thread)
                if len(self.warnings) < 20:
                    self.warnings.append(f"record skipped: {type(err).__name__}: {err}")
                continue
            if rec is None:
                continue
            if self.taps and rec["kind"] in DEVICE_KINDS:
                tapped.append(rec)  # an open window sees it even past this tracer's cap
            if self.kept >= self.max_records:
                self.skipped["over_cap"] += 1
                continue
            self.kept += 1
            self.counts[rec["kind"]] = self.counts.get(rec["kind"], 0) + 1
            out.append(rec)
        if out or tapped:
            with self._pending_lock:
                self.pending.extend(out)
                for tap in self.taps:
                    tap.extend(tapped)

    def _write_line(self, obj) -> None:
        with self._spool_lock:
            if self._spool is None:
                return
            self._spool.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._spool.flush()

    def _drain(self) -> None:
        with self._pending_lock:
            chunk, self.pending = self.pending, []
        if chunk:
            self._write_line({"records": chunk})

    def _flush_loop(self) -> None:
        while not self.stop_event.wait(self.flush_s):
            try:
                self.cupti.activity_flush_all(0)  # completed buffers only; no synchronisation
            except Exception:  # noqa: BLE001
                pass
            self._drain()
            self._write_line({"clock": calibrate(self.cupti.get_timestamp)})

    # --- lifecycle ---------------------------------------------------------------------------

    def _subscribe(self, optional: list[str]) -> None:
        """Register the buffer callbacks and enable kernel records (required) and `optional` kinds."""
        c = self.cupti
        try:
            c.activity_register_callbacks(self._buffer_requested, self._buffer_completed)
            c.activity_enable(c.ActivityKind.CONCURRENT_KERNEL)
            self.enabled.append(c.ActivityKind.CONCURRENT_KERNEL)
        except Exception as err:  # noqa: BLE001  (no driver, no GPU, another subscriber)
            raise TracerUnavailable(f"CUPTI refused kernel tracing: {type(err).__name__}: {err}") from None
        for name in optional:
            kind = getattr(c.ActivityKind, name, None)
            if kind is None:
                continue
            try:
                c.activity_enable(kind)
                self.enabled.append(kind)
            except Exception as err:  # noqa: BLE001
                self.warnings.append(f"activity kind {name} not enabled: {err}")

    def _unsubscribe(self) -> None:
        for kind in self.enabled:
            try:
                self.cupti.activity_disable(kind)
            except Exception:  # noqa: BLE001
                pass

    def start(self) -> None:
        c = self.cupti
        optional = ["MEMCPY", "MEMCPY2", "MEMSET", "MEMORY2"]
        if self.api_mode != "none":
            optional += ["RUNTIME", "DRIVER"]
        self._subscribe(optional)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = open(self.spool_path, "w")
        self._write_line(self.header())
        self._write_line({"clock": calibrate(c.get_timestamp)})
        if self.flush_s > 0:
            self.flusher = threading.Thread(target=self._flush_loop, name="cupti-flush", daemon=True)
            self.flusher.start()

    def header(self) -> dict:
        return {"format": FORMAT, "label": self.label, "pid": self.pid, "hostname": socket.gethostname(),
                "argv": list(sys.argv), "started_unix": time.time(),
                "enabled": [self._enum_name(self.cupti.ActivityKind, k) for k in self.enabled],
                "api_mode": self.api_mode}

    def stop(self) -> Path:
        c = self.cupti
        self.stop_event.set()
        if self.flusher is not None:
            self.flusher.join(timeout=10)
        try:
            c.activity_flush_all(1)  # forced: every buffer, complete or not
        except Exception as err:  # noqa: BLE001
            self.warnings.append(f"final flush failed: {err}")
        end_pair = calibrate(c.get_timestamp)
        self._unsubscribe()
        self._drain()
        self._write_line({"clock": end_pair})
        with self._spool_lock:
            self._spool.close()
            self._spool = None
        doc = read_records(self.spool_path)
        doc.update(complete=True, counts=self.counts, skipped=self.skipped, warnings=self.warnings)
        tmp = self.out_path.with_name(f".{self.out_path.name}.{self.pid}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, self.out_path)
        self.spool_path.unlink(missing_ok=True)
        return self.out_path


def host_clock(pairs: list) -> "callable":
    """ns on CUPTI's clock -> s on the host's perf_counter clock, from a document's calibration
    pairs. Two pairs far enough apart give offset and rate (clocks drift a little); one gives the
    offset. (Here, below harness/ and profiler/, so that both use it.)"""
    if not pairs:
        raise ValueError("no clock calibration pair")
    pairs = sorted(pairs)
    (c0, h0), (c1, h1) = pairs[0], pairs[-1]
    rate = 1e-9
    if c1 - c0 > 0.5e9:
        fitted = (h1 - h0) / (c1 - c0)
        if abs(fitted / 1e-9 - 1) < 1e-3:  # beyond 1000 ppm something is wrong with a pair
            rate = fitted
    return lambda ns: h0 + (ns - c0) * rate


def demangle(names) -> dict[str, str]:
    """{mangled: demangled} for the C++ names among `names` (`_Z...`: NCCL's, cuBLAS's, the
    project's kernels; TVM's are extern "C") through c++filt where it exists, else {}. (Here, below
    harness/ and profiler/, so that both use it.)"""
    import shutil
    import subprocess

    mangled = sorted({n for n in names if n.startswith("_Z")})
    if not mangled or shutil.which("c++filt") is None:
        return {}
    try:
        out = subprocess.run(["c++filt"], input="\n".join(mangled) + "\n", capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = out.stdout.splitlines()
    return dict(zip(mangled, lines)) if out.returncode == 0 and len(lines) == len(mangled) else {}


def read_records(path) -> dict:
    """One record document from a final `cupti-<pid>.json` or a spool `*.partial.jsonl` (a
    spool's last line may be cut short by a killed process: it is ignored)."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    doc = {"records": [], "clock": {"pairs": []}, "complete": False}
    with open(path) as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                break
            if "records" in obj:
                doc["records"].extend(obj["records"])
            elif "clock" in obj:
                doc["clock"]["pairs"].append(obj["clock"])
            else:
                doc.update(obj)
    return doc


# --- public API ------------------------------------------------------------------------------

def is_running() -> bool:
    return _tracer is not None


def start(out_path, process_label: str) -> Path:
    """Start tracing this process into `out_path` (written by `stop()`). Raises
    TracerUnavailable (with the reason) where CUPTI cannot trace; a second call is a no-op."""
    global _tracer
    with _lock:
        if _tracer is not None and _tracer.pid == os.getpid():
            return _tracer.out_path
        if _open_window is not None and _open_window.owns_subscriber:
            raise TracerUnavailable("an in-memory CUPTI Window holds CUPTI's callbacks in this process: "
                                    "stop it before starting the file tracer")
        tracer = _Tracer(Path(out_path), process_label)
        tracer.start()
        _tracer = tracer
        return tracer.out_path


def stop() -> Path | None:
    """Flush every record, stop tracing, write the JSON document; its path, or None if not tracing
    (or in a forked child of the traced process)."""
    global _tracer
    with _lock:
        tracer, _tracer = _tracer, None
        if tracer is None or tracer.pid != os.getpid():
            return None
        return tracer.stop()


def _default_label() -> str:
    argv = sys.argv
    # tvm.exec.disco_worker (and entrypoints built on it): <worker_id> <num_workers> <num_groups> <fds>
    if len(argv) == 6 and all(a.lstrip("-").isdigit() for a in argv[1:]):
        return f"disco worker {argv[1]}"
    return settings.text("LAB_CUPTI_LABEL") or Path(argv[0] if argv else "python").stem or "python"


def _on_sigterm(signum, frame):
    try:
        stop()
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def maybe_start_from_env(process_label: str | None = None) -> bool:
    """Start tracing if $LAB_CUPTI_DIR is set, into $LAB_CUPTI_DIR/cupti-<pid>.json, and stop at
    exit (and on SIGTERM, where nothing else handles it). Where CUPTI cannot trace, writes
    cupti-<pid>.unavailable.json with the reason instead and returns False; never raises."""
    folder = settings.path("LAB_CUPTI_DIR")
    if folder is None:
        return False
    if is_running():
        return True
    out = folder / f"cupti-{os.getpid()}.json"
    label = process_label or _default_label()
    try:
        start(out, label)
    except Exception as err:  # noqa: BLE001  (tracing must never break the traced program)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_name(f"cupti-{os.getpid()}.unavailable.json").write_text(json.dumps(
                {"label": label, "pid": os.getpid(), "reason": str(err)}) + "\n")
        except OSError:
            pass
        return False
    atexit.register(stop)
    try:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass
    return True


# --- in-memory windows -----------------------------------------------------------------------------

class _MemoryTracer(_Tracer):
    """CUPTI for one Window where no file tracer runs: kernels, memcpys and memsets only, kept in
    memory (no spool file, no flusher thread: the window flushes once, at its end). Its buffers are
    large (WINDOW_BUFFER_BYTES: ~300k kernel records) so that CUPTI hands them over at stop() rather
    than while the traced work runs: converting records is Python holding the GIL, host time that
    would otherwise show up as GPU idle in the very steps being measured."""

    def __init__(self, label: str):
        super().__init__(None, label)

    def _buffer_requested(self):
        return WINDOW_BUFFER_BYTES, 0

    def start(self) -> None:
        self._subscribe(["MEMCPY", "MEMCPY2", "MEMSET"])


class Window:
    """Kernel, memcpy and memset records of one stretch of this process's GPU work, in memory.

        window = Window(); window.start(); <run, then synchronise the device>; doc = window.stop()

    `doc` has the record-file format (`read_records`): `records` with start/end on CUPTI's ns clock,
    `clock.pairs` (one pair taken at start, one at stop), `label`, `pid`, plus `window`
    (`source`: "own subscriber" or "file tracer"; `start_cupti_ns`, `stop_cupti_ns`). Only records
    that overlap [start, stop] are kept. stop() forces CUPTI to hand over every buffer, and a kernel
    still running then has no end yet and is dropped: synchronise first (a repeat that read its
    tokens back has).

    Where the file tracer runs in this process (`profile_gpu.sh -m timeline`), the window taps its
    records rather than subscribing again (CUPTI's activity API has one set of buffer callbacks per
    process); the file still gets every record. Otherwise the window subscribes for its duration,
    and the file tracer cannot start until it stops. One window per process at a time.

    start() raises TracerUnavailable with the reason where CUPTI cannot trace (cupti-python missing,
    no driver or GPU, an activity kind refused).
    """

    def __init__(self, label: str | None = None):
        self.label = label or _default_label()
        self.owns_subscriber = False
        self._tracer: _Tracer | None = None
        self._records: list[dict] = []
        self._pairs: list[list] = []

    @property
    def is_open(self) -> bool:
        return self._tracer is not None

    def start(self) -> None:
        global _open_window
        with _lock:
            if self._tracer is not None:
                raise RuntimeError("this CUPTI window is already open: stop() it first")
            if _open_window is not None:
                raise RuntimeError("another CUPTI window is open in this process: stop() it first")
            tracer = _tracer if _tracer is not None and _tracer.pid == os.getpid() else None
            if tracer is None:
                tracer = _MemoryTracer(self.label)  # raises TracerUnavailable
                tracer.start()
                self.owns_subscriber = True
            try:
                self._pairs = [calibrate(tracer.cupti.get_timestamp)]
            except Exception as err:  # noqa: BLE001
                if self.owns_subscriber:
                    tracer._unsubscribe()
                    self.owns_subscriber = False
                raise TracerUnavailable(f"CUPTI timestamp unavailable: {type(err).__name__}: {err}") from None
            self._records = []
            with tracer._pending_lock:
                tracer.taps.append(self._records)
            self._tracer = tracer
            _open_window = self

    def stop(self) -> dict:
        global _open_window
        with _lock:
            tracer = self._tracer
            if tracer is None:
                raise RuntimeError("this CUPTI window is not open: start() it first")
            warnings = []
            try:
                tracer.cupti.activity_flush_all(1)  # forced: every buffer, complete or not
            except Exception as err:  # noqa: BLE001
                warnings.append(f"final flush failed: {err}")
            self._pairs.append(calibrate(tracer.cupti.get_timestamp))
            with tracer._pending_lock:
                tracer.taps.remove(self._records)
            if self.owns_subscriber:
                tracer._unsubscribe()
            elif tracer is not _tracer:
                warnings.append("the file tracer stopped while the window was open: records end there")
            self._tracer, _open_window = None, None
            first, last = self._pairs[0][0], self._pairs[-1][0]
            records = [r for r in self._records if r["end_ns"] >= first and r["start_ns"] <= last]
            counts: dict[str, int] = {}
            for r in records:
                counts[r["kind"]] = counts.get(r["kind"], 0) + 1
            doc = {"format": FORMAT, "label": self.label, "pid": os.getpid(), "hostname": socket.gethostname(),
                   "window": {"source": "own subscriber" if self.owns_subscriber else "file tracer",
                              "start_cupti_ns": first, "stop_cupti_ns": last},
                   "records": records, "clock": {"pairs": list(self._pairs)}, "complete": True,
                   "counts": counts, "warnings": warnings + list(tracer.warnings[:20])}
            if self.owns_subscriber:
                doc["skipped"] = dict(tracer.skipped)
            self.owns_subscriber = False
            self._records = []
            return doc


# --- the same for disco workers, as tvm-ffi global functions ---------------------------------------

_ffi_window: Window | None = None
_ffi_unavailable: str | None = None


def window_start() -> None:
    """`lab.cupti.window_start()`: open this process's window. Never raises (tracing must not break
    the traced program): where CUPTI cannot trace, the reason is kept for window_stop. A start while
    a window is open discards that window and opens a new one."""
    global _ffi_window, _ffi_unavailable
    if _ffi_window is not None and _ffi_window.is_open:
        try:
            _ffi_window.stop()
        except Exception:  # noqa: BLE001
            pass
    _ffi_window, _ffi_unavailable = None, None
    window = Window()
    try:
        window.start()
    except Exception as err:  # noqa: BLE001
        _ffi_unavailable = str(err) if isinstance(err, TracerUnavailable) else f"{type(err).__name__}: {err}"
        return
    _ffi_window = window


def window_stop() -> str:
    """`lab.cupti.window_stop()`: JSON of this process's window document (see Window), or of
    {"unavailable": reason} where CUPTI could not trace or no window was started. Never raises."""
    global _ffi_window, _ffi_unavailable
    window, _ffi_window = _ffi_window, None
    reason, _ffi_unavailable = _ffi_unavailable, None
    if window is None:
        reason = reason or f"{WINDOW_STOP} without {WINDOW_START} in this process (pid {os.getpid()})"
        return json.dumps({"unavailable": reason, "pid": os.getpid()})
    try:
        return json.dumps(window.stop(), separators=(",", ":"))
    except Exception as err:  # noqa: BLE001
        return json.dumps({"unavailable": f"window stop failed: {type(err).__name__}: {err}", "pid": os.getpid()})


def register_window_functions() -> None:
    """Register `lab.cupti.window_start` and `lab.cupti.window_stop` as tvm-ffi global functions in
    this process, so that a disco session can ask each worker (one process per GPU at tp > 1) to
    trace the same stretch of work. Idempotent; needs tvm_ffi (nothing of CUPTI until called)."""
    import tvm_ffi

    tvm_ffi.register_global_func(WINDOW_START, window_start, override=True)
    tvm_ffi.register_global_func(WINDOW_STOP, window_stop, override=True)
