"""The results folder every experiment writes: results.json, summary.md, plots, trace.json.

An experiment measures one or more `Point`s (a configuration: a tp, a quantization, a mode) and
hands them to `write_report`. A point that failed carries its error and is reported as such;
the others are still written. results.json is written last, its status covering everything
before it (a plot or summary.md that could not be written makes the run "partial").
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any, Callable

from . import markdown, plots, tracing
from .measure import RunSample
from .results import RunDir, atomic_write_text
from .trace import Trace

log = logging.getLogger("experiments")

@dataclasses.dataclass
class Point:
    label: str
    params: dict[str, Any]
    samples: list[RunSample] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)  # compile, load, ...
    error: str | None = None
    config_error: bool = False  # the error is the user's to fix (a ConfigError): see entry.exit_status

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"label": self.label, "params": self.params, "error": self.error,
                "phases": [{"name": n, "seconds": e - s} for n, s, e in self.phases],
                "samples": [s.to_dict() for s in self.samples]}


def _ms(summary: dict | None, key: str) -> float | None:
    return None if not summary else summary[key] * 1e3


def point_row(p: Point) -> dict:
    s = p.summary
    row = {"label": p.label, **p.params, "status": "ok" if p.ok else f"error: {p.error}"}
    if p.ok and s:
        row.update(ttft_ms=_ms(s["ttft_s"], "p50"), itl_ms=_ms(s.get("itl_s"), "p50"),
                   itl_p95_ms=_ms(s.get("itl_s"), "p95"), decode_tps=s.get("decode_tokens_per_s"),
                   prefill_tps=s.get("prefill_tokens_per_s"), roofline=s.get("roofline_fraction"),
                   weight_gib=s["weight_bytes"] / 2**30)
        row.update({k: v for k, v in s.items()
                    if k in ("speedup", "efficiency", "allreduce_share", "hidden_ms", "same_tokens", "note",
                             "allreduce_hidden_ms", "allreduce_hidden_fraction", "gpu_idle_share",
                             "collectives_share_traced", "transfer_share", "devices")})
        predicted = s.get("memory_predicted_bytes")
        if predicted:
            row["device_memory_gib"] = predicted["total"] / 2**30
    return row


BASE_COLUMNS = [
    ("label", "config", None), ("ttft_ms", "TTFT p50 (ms)", "{:.2f}"), ("itl_ms", "ITL p50 (ms)", "{:.3f}"),
    ("itl_p95_ms", "ITL p95 (ms)", "{:.3f}"), ("decode_tps", "decode tok/s", "{:.1f}"),
    ("prefill_tps", "prefill tok/s", "{:.0f}"), ("roofline", "roofline", "{:.0%}"),
    ("weight_gib", "weights/rank (GiB)", "{:.3f}"),
]


def trace_of(points: list[Point], origin: float) -> Trace:
    """One process per configuration; the host thread holds compile/load and every step."""
    trace = Trace(origin, {"note": "host-side spans; kernel-level timelines: ./profile_gpu.sh -m timeline"})
    for pid, p in enumerate(points, start=1):
        trace.process(pid, f"{p.label} (controller)", sort_index=pid)
        trace.thread(pid, 1, "host: generate loop (steps until tokens are on the host)", sort_index=1)
        if any(step.kind == "launch" for sample in p.samples for step in sample.steps):
            trace.thread(pid, 2, "host: step launches", sort_index=2)
        for name, start, end in p.phases:
            trace.span(pid, 1, name, start, end, cat="setup")
        for sample in p.samples:
            trace.span(pid, 1, f"run {sample.repeat}", sample.start, sample.end, cat="run",
                       args={"batch": sample.batch, "prompt_len": sample.prompt_len})
            for step in sample.steps:
                tid = 2 if step.kind == "launch" else 1  # launches run ahead of the steps (pipeline)
                trace.span(pid, tid, f"{step.kind} {step.index}", step.start, step.end, cat=step.kind,
                           args={"tokens": step.tokens})
    return trace


def measured(points: list[Point]) -> list[Point]:
    """The points measured without error."""
    return [p for p in points if p.ok and p.samples]


def status_of(points: list[Point]) -> str:
    """"ok": every point measured; "partial": some; "error": none."""
    good = measured(points)
    return "ok" if points and len(good) == len(points) else ("partial" if good else "error")


def summary_of(points: list[Point], summary_extra: dict | None = None) -> dict:
    """results.json's `summary`: each point's figures (or its error) by label; a single point's
    at the top level (summary["ttft_s"], ...)."""
    summary = {p.label: (p.summary if p.ok else {"error": p.error}) for p in points}
    if len(points) == 1:
        summary = {"label": points[0].label, **summary[points[0].label]}
    summary.update(summary_extra or {})
    return summary


Figure = tuple[str, Callable]  # (file name, function(path) that writes it)


def notes_of(points: list[Point]) -> str | None:
    """The summary's Notes: each point's `note` and `roofline_note` (one line where every point has
    the same), None where there are none."""
    notes = {p.label: "; ".join(n for n in (p.summary.get("note"), p.summary.get("roofline_note")) if n)
             for p in points if p.summary.get("note") or p.summary.get("roofline_note")}
    if not notes:
        return None
    if len(set(notes.values())) == 1 and len(notes) == len(points):
        return next(iter(notes.values()))
    return "\n".join(f"- {label}: {note}" for label, note in notes.items())


def write_report(run_dir: RunDir, title: str, config: dict, points: list[Point], *,
                 columns=BASE_COLUMNS, sections: list[tuple[str, str]] = (), summary_extra: dict | None = None,
                 extra: dict | None = None, figures: list[Figure] = ()) -> str:
    """Write every output of the run, results.json last, and return its status: "ok" (every
    point measured, every file written), "partial" (a point failed, or a file could not be
    written: its error is in results.json's `report_errors`), "error" (no point measured).
    `figures`: the experiment's own figures, written (or their failure recorded) like the others.
    An error writing results.json itself is raised (entry.guarded then writes a smaller one)."""
    good = measured(points)
    status = status_of(points)
    problems: list[str] = []
    written: list[str] = []

    def attempt(name: str, make: Callable) -> None:
        try:
            make(run_dir.path(name))
            written.append(name)
        except Exception as err:  # noqa: BLE001  (a full disk, a plot's bad input: recorded, the rest goes on)
            problems.append(f"{name}: {type(err).__name__}: {err}")
            log.error("could not write %s: %s: %s", run_dir.path(name), type(err).__name__, err)

    # Plotting makes many short-lived objects; with a large heap (weights, samples) the cyclic
    # collector's full passes made the first figure take minutes on the GPU box. Exempt what exists.
    gc.collect()
    gc.freeze()
    if good:
        itl = {p.label: [t for s in p.samples for t in s.itl_s] for p in good if any(s.itl_s for s in p.samples)}
        ttft = {p.label: [s.ttft_s for s in p.samples] for p in good}
        attempt("latency.png", lambda path: plots.latency_distribution(
            itl or ttft, f"{title}: " + ("inter-token latency" if itl else "time to first token (no decode step)"),
            path))
        decode = {p.label: p.summary["decode_tokens_per_s"] for p in good if p.summary.get("decode_tokens_per_s")}
        if decode:
            attempt("throughput.png", lambda path: plots.throughput_bars(decode, "decode tokens/s",
                                                                         f"{title}: decode throughput", path))
        origin = min([s.start for p in good for s in p.samples] + [st for p in good for _, st, _ in p.phases])
        attempt("trace.json", lambda path: trace_of(good, origin).save(path))
    for name, make in figures:
        attempt(name, make)
    where = tracing.report_section(good, f"{title}: where the time goes")
    if where is not None and where[1] is not None:
        attempt("breakdown.png", where[1])

    rows = [point_row(p) for p in points]
    doc_sections = [("Results", markdown.table(rows, list(columns) + [("status", "status", None)]))]
    doc_sections += list(sections)
    if where is not None:
        doc_sections.append(("Where the time goes", where[0]))
    notes = notes_of(good)
    if notes:
        doc_sections.append(("Notes", notes))
    if written:
        doc_sections.append(("Files", "results.json, " + ", ".join(written)
                             + (" (open trace.json in chrome://tracing or https://ui.perfetto.dev)"
                                if "trace.json" in written else "")))
    if problems:
        doc_sections.append(("Not written", "\n".join(f"- {p}" for p in problems)))
    attempt("summary.md", lambda path: atomic_write_text(
        path, markdown.summary_document(title, run_dir.env, doc_sections)))
    if problems and status == "ok":
        status = "partial"
    extra = dict(extra or {})
    if problems:
        extra["report_errors"] = problems
    run_dir.write_results(config, [p.to_dict() for p in points], summary_of(points, summary_extra), status, extra)
    try:
        run_dir.update_latest_link()
    except OSError as err:
        log.warning("could not point %s at this run: %s", run_dir.root.parent / "latest", err)
    return status
