"""Where a step's time goes on the GPU: kernel records of one traced repeat, by category.

One repeat of a sweep point runs under CUPTI (runtime_patch.cupti_tracer.Window: kernels, memcpys,
memsets, each with start/end). Every record gets a category from its kernel name (`RULES`, first
match wins) or, for copies and sets, from its record kind. Each step's window (the host's
perf_counter span of the step, engine.generate.StepTiming) is then swept on one device: its
elementary intervals (between consecutive record starts/ends and the window's edges) go to ONE
category each, by `PRIORITY`, or to "GPU idle" where no record runs (the host, launch and VM time
the device waited through). So the categories and the idle time add up to the window exactly (integer
nanoseconds), whatever overlaps.

    records = records_from_documents([window.stop(), *worker_documents])
    point = point_breakdown(records, decode_windows, prefill_windows, devices=[0, 1])
    # or, where CUPTI could not trace:  point = not_measured(str(err))
    markdown_table([{"label": "tp=2 q0f16", "breakdown": point, "floor_us": 1234.5}])

Records use the host clock in integer ns: {"kind", "name", "start_ns", "end_ns", "device", "stream"}.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from collections import defaultdict

from runtime_patch.cupti_tracer import DEVICE_KINDS, TracerUnavailable, demangle, host_clock

WEIGHTS = "weights (GEMV/GEMM)"
ATTENTION = "attention"
COLLECTIVES = "collectives"
NORMS = "norms & elementwise"
EMBEDDING = "embedding & sampling"
COPIES = "copies"
UNCLASSIFIED = "unclassified"
CATEGORIES = (WEIGHTS, ATTENTION, COLLECTIVES, NORMS, EMBEDDING, COPIES, UNCLASSIFIED)
IDLE = "GPU idle"

# Which category an interval goes to when records of several categories overlap in it (concurrent
# streams: a collective on a communication stream beside compute, a copy beside a kernel): compute
# first, so that "collectives" is the collective time the step was exposed to and the rest is
# reported as "collectives overlapped"; unclassified before copies and collectives, so that unknown
# work is never hidden behind them.
PRIORITY = (WEIGHTS, ATTENTION, NORMS, EMBEDDING, UNCLASSIFIED, COPIES, COLLECTIVES)


@dataclasses.dataclass(frozen=True)
class Rule:
    category: str
    pattern: re.Pattern
    note: str


def _rx(text: str) -> re.Pattern:
    return re.compile(text, re.IGNORECASE)


# Kernel name -> category, first match wins. Patterns are substrings that survive C++ mangling
# (CUPTI reports `_Z...` names; the profiler demangles them) and TVM's naming of a fused kernel after
# the functions it fuses (`fused_split1_silu1_multiply1_kernel`, `linear8_kernel`). The TVM names
# they were checked against are in tests/fixtures/kernel_names_llama3-8b_cuda.json.
RULES: tuple[Rule, ...] = (
    Rule(COLLECTIVES, _rx(r"nccl|all_?reduce|all_?gather|reduce_?scatter|one_?shot"),
         "NCCL (ncclDevKernel_AllReduce_Sum_f16_RING_LL, ..._Broadcast_RING_LL, ..._AllGather_RING, "
         "ncclKernel_...), and any all-reduce of ours (the one-shot allreduce); before the other rules, "
         "so that an allreduce fused into anything is still a collective"),
    Rule(ATTENTION, _rx(r"attention|attn|paged_kv|ragged_kv|kv_cache|kv_copy|single_page|DecodePartial|"
                        r"DecodeMerge|CausalSoftmax|StaticDecode|AppendRows|merge_state|fmha|flash|rotary|"
                        r"(?<![a-z])rope(?![a-z])"),
         "everything between the q/k/v projection and the o projection: RoPE (fused_rope, tir_split_rotary), "
         "the KV caches' appends and page copies (tir_kv_cache_transpose_append, copy_single_page, "
         "compact_kv_copy, AppendRows, RopeAppendRows: the static prefill's RoPE and append), TVM's attention kernels (batch_decode_paged_kv, batch_prefill_ragged_kv, "
         "tree_attn, tir_attention_merge_state) and ours (DecodePartial, DecodeMerge, CausalSoftmax, StaticDecode, "
         "StaticDecodeCluster, StaticDecodeMma)"),
    Rule(WEIGHTS, _rx(r"linear|matmul|dense|dequantize|gemm|gemv|nvjet|cutlass|xmma|splitK_?reduce"),
         "TVM's linears named after their function (linear8, fused_linear6_add: the residual add is fused "
         "into the GEMV), the prefill's weight dequantization for cuBLAS (TVM's dequantize*, our Dequantize), our GemvQuant, "
         "our GemmQuant and GemmQuantReduce (the prefill's quantized GEMM and its split-K sums), "
         "cuBLAS/cuBLASLt (nvjet_sm90_*, sm90_xmma_gemm_*, cutlass, gemmk1, gemv2N, gemmSN, splitKreduce); "
         "cuBLAS GEMMs of the prefill attention are moved to attention (see step_breakdown)"),
    Rule(EMBEDDING, _rx(r"embedding|take|argmax|argsort|top_?[kp]|sampl|multinomial|softmax|cumsum|gather|"
                        r"Advance|SettlePrefill"),
         "the token embedding gather, take_last_row (the last position's rows a prefill's last layer "
         "finishes on), "
         "argmax and sampling kernels (TVM's argmax_kernel, our ArgmaxRows; a softmax that is not the attention's), "
         "and the hand-over of the chosen token to the next step (the static KV cache's Advance, SettlePrefill)"),
    Rule(NORMS, _rx(r"norm|silu|gelu|swiglu|relu|multiply|(?<![a-z])add(?![a-z])|subtract|divide|"
                    r"reshape|transpose|split|concat|squeeze|expand_dims|broadcast_to|cast|elementwise|arange"),
         "RMSNorm (TVM's rms_norm*, our RmsNormRows), SwiGLU (fused_split_silu_multiply), residual adds (add1), "
         "reshapes and transposes, "
         "arange (positions) and other elementwise kernels"),
)
COPY_NOTE = "memcpy and memset records, by record kind (whatever their name)"

# cuBLAS kernels of the prefill attention (runtime_patch/native/cuda_attention.cu, per chunk of
# query rows: `group` strided-batched GEMMs S = Q K^T, CausalSoftmax, `group` GEMMs O = P V) carry the
# names of GEMMs of the weights; their position around CausalSoftmax tells them apart.
_LIBRARY_GEMM = _rx(r"gemm|gemv|nvjet|cutlass|xmma|splitK_?reduce")
_GEMM_TAIL = _rx(r"splitK_?reduce")  # the second kernel of a split-K GEMM
_PREFILL_SOFTMAX = re.compile(r"CausalSoftmax")


def classify(name: str, kind: str = "kernel") -> str:
    """The category of one record: copies by kind, kernels by the first rule matching the name
    (mangled or demangled), else "unclassified"."""
    if kind in ("memcpy", "memset"):
        return COPIES
    for rule in RULES:
        if rule.pattern.search(name):
            return rule.category
    return UNCLASSIFIED


def kernel_map(names) -> dict[str, str]:
    """{name: category} for kernel names, each classified on its demangled form where c++filt is
    present (the rules also match the mangled form)."""
    names = list(dict.fromkeys(names))
    readable = demangle(names)
    return {n: classify(readable.get(n, n)) for n in names}


# --- records on the host clock ---------------------------------------------------------------------

def host_records(doc: dict | str) -> list[dict]:
    """The device records of one tracer document (a Window's, a record file's, a spool's; or its
    JSON, as lab.cupti.window_stop returns it) on the host's perf_counter clock in integer ns,
    through the document's calibration pairs (cupti_tracer.host_clock). A document saying
    {"unavailable": reason} raises TracerUnavailable(reason)."""
    if isinstance(doc, str):
        doc = json.loads(doc)
    if "unavailable" in doc:
        raise TracerUnavailable(f"pid {doc.get('pid', '?')}: {doc['unavailable']}")
    pairs = doc.get("clock", {}).get("pairs", [])
    device = [r for r in doc.get("records", []) if r.get("kind") in DEVICE_KINDS]
    if not device:
        return []
    if not pairs:
        raise ValueError("the tracer document has no clock calibration pair: record it with "
                         "runtime_patch.cupti_tracer (Window or the file tracer)")
    to_s = host_clock(pairs)
    return [{"kind": r["kind"], "name": r.get("name", "?"), "start_ns": round(to_s(r["start_ns"]) * 1e9),
             "end_ns": round(to_s(r["end_ns"]) * 1e9), "device": r.get("device_id", 0),
             "stream": r.get("stream_id", 0)} for r in device]


def records_from_documents(docs) -> list[dict]:
    """host_records of several documents (one per traced process: the controller, each worker)."""
    return [r for doc in docs for r in host_records(doc)]


# --- the sweep ----------------------------------------------------------------------------------------

def _categorise(records: list[dict], names: dict[str, str]) -> list[str]:
    """A category per record: by rule, then the prefill attention's cuBLAS GEMMs moved to attention.

    On each stream, the library GEMMs right before a CausalSoftmax (back to the first kernel of
    another kind, or to GEMMs already given to attention) are its S = Q K^T, and as many GEMMs right
    after it are its O = P V. GEMMs are counted, not kernels: a split-K reduction kernel belongs to
    the GEMM before it, so Q K^T and P V may differ in kernels per GEMM. What follows O = P V (the o
    projection, also a cuBLAS GEMM) stays with the weights."""
    cats = [classify(names.get(r["name"], r["name"]), r["kind"]) for r in records]
    streams = defaultdict(list)
    for i, r in enumerate(records):
        if r["kind"] == "kernel":
            streams[(r["device"], r["stream"])].append(i)
    for seq in streams.values():
        seq.sort(key=lambda i: records[i]["start_ns"])
        text = [names.get(records[i]["name"], records[i]["name"]) for i in seq]
        gemm = [bool(_LIBRARY_GEMM.search(t)) for t in text]
        tail = [bool(_GEMM_TAIL.search(t)) for t in text]
        for pos in range(len(seq)):
            if not _PREFILL_SOFTMAX.search(text[pos]):
                continue
            before = pos
            while before > 0 and gemm[before - 1] and cats[seq[before - 1]] != ATTENTION:
                before -= 1
            count = sum(not tail[j] for j in range(before, pos))  # GEMMs of S = Q K^T
            after = pos + 1
            while after < len(seq) and gemm[after] and (count > 0 or tail[after]):
                count -= 0 if tail[after] else 1
                after += 1
            if before < pos:
                for j in [*range(before, pos), *range(pos + 1, after)]:
                    cats[seq[j]] = ATTENTION
    return cats


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


# The name an idle interval gets where no record starts after it in its window.
END_OF_STEP = "(end of the step)"


def _sweep(lo: int, hi: int, pieces: list[tuple[int, int, str, str]]):
    """One window [lo, hi) and the (start, end, category, name) pieces of records clipped to it ->
    (ns per category, idle ns, collective ns hidden under another category, idle ns by the name of
    the record that ends the idle interval (END_OF_STEP where none does)). Every elementary interval
    goes to the first category of PRIORITY with a record running in it, or to idle."""
    events = sorted([(a, 1, c, n) for a, _, c, n in pieces] + [(b, -1, c, n) for _, b, c, n in pieces],
                    key=lambda e: (e[0], e[1]))
    total = dict.fromkeys(CATEGORIES, 0)
    running = dict.fromkeys(CATEGORIES, 0)
    idle = overlapped = 0
    idle_before: dict[str, int] = defaultdict(int)
    t, k = lo, 0
    while t < hi:
        while k < len(events) and events[k][0] <= t:
            running[events[k][2]] += events[k][1]
            k += 1
        length = (events[k][0] if k < len(events) else hi) - t
        winner = next((c for c in PRIORITY if running[c] > 0), None)
        if winner is None:
            idle += length
            # with nothing running, the next event is a record's start (or the window's end)
            idle_before[events[k][3] if k < len(events) else END_OF_STEP] += length
        else:
            total[winner] += length
            if winner != COLLECTIVES and running[COLLECTIVES] > 0:
                overlapped += length
        t += length
    return total, idle, overlapped, idle_before


def step_breakdown(records: list[dict], windows, device: int, top: int = 10) -> dict:
    """Per-step means over `windows` ((start_s, end_s) on the host's perf_counter clock) of where
    `device`'s time went. Records are clipped to each window; overlapping records give an interval
    to one category by PRIORITY; "collectives_overlapped_us" is the time a collective ran while the
    interval went to another category (hidden under compute or copies). Returns {"steps",
    "step_us", "categories": {category: µs per step}, "idle_us", "shares" (of step_us, idle under
    "GPU idle"), "collectives_overlapped_us", "records_in_windows", "kernels" (the `top` kernels by
    busy time per step, overlaps not removed), "idle_before" (the idle time per step by the record
    the device waited to start, END_OF_STEP for idle after the step's last record: where the host
    or another device kept it waiting; the `top` largest), "check"}: categories + idle equal
    step_us by construction (integer ns), "check" shows it."""
    spans = sorted((_ns(a), _ns(b)) for a, b in windows)
    if not spans:
        raise ValueError("step_breakdown needs at least one step window (start_s, end_s)")
    if any(b < a for a, b in spans):
        raise ValueError("a step window ends before it starts: pass (start_s, end_s) pairs")
    mine = sorted((r for r in records if r["device"] == device and r["end_ns"] > r["start_ns"]),
                  key=lambda r: r["start_ns"])
    readable = demangle({r["name"] for r in mine if r["kind"] == "kernel"})
    cats = _categorise(mine, readable)
    starts = [r["start_ns"] for r in mine]
    longest = max((r["end_ns"] - r["start_ns"] for r in mine), default=0)

    total = dict.fromkeys(CATEGORIES, 0)
    idle = overlapped = in_windows = 0
    busy: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (name, category) -> [ns, calls]
    waits: dict[str, int] = defaultdict(int)  # readable name (or END_OF_STEP) -> idle ns before it
    category_of = {END_OF_STEP: IDLE}
    for lo, hi in spans:
        pieces = []
        for i in range(bisect.bisect_left(starts, lo - longest), bisect.bisect_left(starts, hi)):
            a, b = max(mine[i]["start_ns"], lo), min(mine[i]["end_ns"], hi)
            if b > a:
                name = readable.get(mine[i]["name"], mine[i]["name"])
                pieces.append((a, b, cats[i], name))
                category_of[name] = cats[i]
                entry = busy[(name, cats[i])]
                entry[0] += b - a
                entry[1] += 1
        in_windows += len(pieces)
        window_total, window_idle, window_overlapped, window_waits = _sweep(lo, hi, pieces)
        for c, ns in window_total.items():
            total[c] += ns
        idle += window_idle
        overlapped += window_overlapped
        for name, ns in window_waits.items():
            waits[name] += ns

    steps = len(spans)
    window_ns = sum(b - a for a, b in spans)
    attributed = sum(total.values()) + idle
    us = lambda ns: ns / steps / 1e3  # noqa: E731  (total ns -> µs per step)
    step_us = us(window_ns)
    per_step = {c: us(ns) for c, ns in total.items()}
    shares = {c: (v / step_us if step_us else 0.0) for c, v in per_step.items()}
    shares[IDLE] = us(idle) / step_us if step_us else 0.0
    kernels = sorted(({"name": name, "category": cat, "us_per_step": us(ns), "calls_per_step": calls / steps}
                      for (name, cat), (ns, calls) in busy.items()), key=lambda k: -k["us_per_step"])
    idle_before = sorted(({"name": name, "category": category_of[name], "us_per_step": us(ns)}
                          for name, ns in waits.items()), key=lambda w: -w["us_per_step"])
    return {"device": device, "steps": steps, "step_us": step_us, "categories": per_step, "idle_us": us(idle),
            "shares": shares, "collectives_overlapped_us": us(overlapped), "records_in_windows": in_windows,
            "kernels": kernels[:top], "idle_before": idle_before[:top],
            "check": {"sum_us": us(attributed), "step_us": step_us, "difference_us": us(attributed - window_ns),
                      "exact": attributed == window_ns}}


def point_breakdown(records: list[dict], decode_windows, prefill_windows, devices, top: int = 10) -> dict:
    """Per device, the decode and the prefill breakdowns (None for a phase without windows):
    {"measured": True, "devices": [{"device", "decode", "prefill"}]}. A prefill "step" is one
    prefill chunk (one StepTiming), as a decode step is one token."""
    return {"measured": True, "devices": [
        {"device": d,
         "decode": step_breakdown(records, decode_windows, d, top) if decode_windows else None,
         "prefill": step_breakdown(records, prefill_windows, d, top) if prefill_windows else None}
        for d in devices]}


def not_measured(reason: str) -> dict:
    """The record of a point whose breakdown could not be measured (no CUPTI, the CPU, ...)."""
    return {"measured": False, "reason": str(reason)}


def bandwidth_floor_us(bytes_per_step: float, bytes_per_s: float) -> float:
    """The time one step needs to read `bytes_per_step` (a rank's weights) at `bytes_per_s`."""
    if bytes_per_s <= 0 or bytes_per_step < 0:
        raise ValueError(f"bandwidth_floor_us needs bytes >= 0 and a bandwidth > 0 "
                         f"(got {bytes_per_step}, {bytes_per_s})")
    return bytes_per_step / bytes_per_s * 1e6


# --- reporting ------------------------------------------------------------------------------------------

COLORS = {WEIGHTS: "#1f77b4", ATTENTION: "#ff7f0e", COLLECTIVES: "#d62728", NORMS: "#2ca02c",
          EMBEDDING: "#9467bd", COPIES: "#8c564b", UNCLASSIFIED: "#e377c2", IDLE: "#c7c7c7"}


def _measured_rows(points: list[dict], phase: str):
    """(point, device entry, phase breakdown) for every measured point, device and phase present."""
    for p in points:
        b = p["breakdown"]
        if b.get("measured"):
            for entry in b["devices"]:
                if entry.get(phase):
                    yield p, entry, entry[phase]


def plot(points: list[dict], path, title: str):
    """A horizontal bar per measured point and device: the decode step's categories and GPU idle
    stacked in µs per step, the bandwidth floor (`floor_us`, where given) as a black marker.
    points: [{"label", "breakdown" (point_breakdown or not_measured), "floor_us" (or None)}]."""
    from . import plots

    plt = plots.plt
    rows = list(_measured_rows(points, "decode"))
    plots._require(bool(rows), "breakdown.plot needs at least one measured decode breakdown "
                   "(where none was, report the reasons with markdown_table only)")
    labels = [f"{p['label']} · GPU {entry['device']}" for p, entry, _ in rows]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.55 * len(rows)))
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for cat in (*CATEGORIES, IDLE):
        widths = [b["idle_us"] if cat == IDLE else b["categories"][cat] for _, _, b in rows]
        if any(widths):
            ax.barh(y, widths, left=left, color=COLORS[cat], label=cat, edgecolor="white", linewidth=0.5)
            left = [a + w for a, w in zip(left, widths)]
    floors = [(i, p.get("floor_us")) for i, (p, _, _) in enumerate(rows) if p.get("floor_us")]
    if floors:
        ax.scatter([f for _, f in floors], [i for i, _ in floors], marker="D", color="black", zorder=3,
                   label="bandwidth floor (weights / bandwidth)")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set(xlabel="µs per decode step", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return plots._save(fig, path)


def _cell(us: float, share: float) -> str:
    return f"{us:.1f} ({share:.0%})"


def _short(name: str) -> str:
    """A kernel's name without its return type, anonymous namespaces and argument list (demangled
    names are long); END_OF_STEP as it is."""
    if name == END_OF_STEP:
        return name
    bare = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    return bare.split("(")[0] or name


def idle_lines(points: list[dict], shown: int = 4) -> list[str]:
    """A line per measured point and device whose decode step idles at least 1 µs: the idle time
    before the kernels it waited for, the largest `shown` of them."""
    lines = []
    for p, entry, b in _measured_rows(points, "decode"):
        waits = [w for w in b.get("idle_before", []) if w["us_per_step"] >= 0.05]
        if b["idle_us"] < 1 or not waits:
            continue
        parts = ", ".join(f"{w['us_per_step']:.1f} before {_short(w['name'])}" for w in waits[:shown])
        lines.append(f"- {p['label']} GPU {entry['device']}: {b['idle_us']:.1f} idle: {parts}")
    return lines


def markdown_table(points: list[dict]) -> str:
    """One row per measured point, device and phase (decode, prefill): step µs, each category and
    GPU idle as "µs (share)", the collective time hidden under other work, and the bandwidth floor
    (decode rows); then where the decode steps idled (idle_lines), and a line per point that was
    not measured, with its reason."""
    from . import markdown

    rows = []
    for phase in ("decode", "prefill"):
        for p, entry, b in _measured_rows(points, phase):
            row = {"label": p["label"], "device": entry["device"], "phase": phase, "steps": b["steps"],
                   "step_us": b["step_us"], IDLE: _cell(b["idle_us"], b["shares"][IDLE]),
                   "overlapped": b["collectives_overlapped_us"],
                   "floor_us": p.get("floor_us") if phase == "decode" else None}
            row.update({c: _cell(b["categories"][c], b["shares"][c]) for c in CATEGORIES})
            rows.append(row)
    columns = [("label", "config", None), ("device", "GPU", None), ("phase", "phase", None), ("steps", "steps", None),
               ("step_us", "step (µs)", "{:.1f}")] + [(c, f"{c} µs (share)", None) for c in CATEGORIES] + \
              [(IDLE, "GPU idle µs (share)", None), ("overlapped", "collectives overlapped (µs)", "{:.1f}"),
               ("floor_us", "bandwidth floor (µs)", "{:.1f}")]
    parts = [markdown.table(rows, columns)] if rows else []
    waits = idle_lines(points)
    if waits:
        parts.append("GPU idle by what the device waited to start (µs per decode step; the end of the step: "
                     "after its last kernel):\n\n" + "\n".join(waits) + "\n")
    missing = [f"- {p['label']}: breakdown not measured: {p['breakdown'].get('reason', 'no reason given')}"
               for p in points if not p["breakdown"].get("measured")]
    if missing:
        parts.append("\n".join(missing) + "\n")
    return "\n".join(parts) if parts else "No sweep point to report.\n"
