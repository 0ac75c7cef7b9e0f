"""The results folder every experiment writes: results.json, summary.md, plots, trace.json.

An experiment measures one or more `Point`s (a configuration: a tp, a quantization, a mode) and
hands them to `write_report`. A point that failed carries its error and is reported as such;
the others are still written.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from . import markdown, plots
from .measure import RunSample
from .results import RunDir, atomic_write_text
from .trace import Trace


@dataclasses.dataclass
class Point:
    label: str
    params: dict[str, Any]
    samples: list[RunSample] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)  # compile, load, ...
    error: str | None = None

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
                             "allreduce_hidden_ms", "allreduce_hidden_fraction")})
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


def write_report(run_dir: RunDir, title: str, config: dict, points: list[Point], *,
                 columns=BASE_COLUMNS, sections: list[tuple[str, str]] = (), summary_extra: dict | None = None,
                 extra: dict | None = None) -> str:
    """Write every output; returns the status ("ok", "partial" or "error")."""
    good = [p for p in points if p.ok and p.samples]
    status = "ok" if len(good) == len(points) else ("partial" if good else "error")
    summary = {p.label: (p.summary if p.ok else {"error": p.error}) for p in points}
    if len(points) == 1:  # one configuration: its figures at the top level (summary["ttft_s"], ...)
        summary = {"label": points[0].label, **summary[points[0].label]}
    summary.update(summary_extra or {})
    run_dir.write_results(config, [p.to_dict() for p in points], summary, status, extra)
    # Plotting makes many short-lived objects; with a large heap (weights, samples) the cyclic
    # collector's full passes made the first figure take minutes on the GPU box. Exempt what exists.
    gc.collect()
    gc.freeze()

    rows = [point_row(p) for p in points]
    doc_sections = [("Results", markdown.table(rows, list(columns) + [("status", "status", None)]))]
    doc_sections += list(sections)
    if good:
        plots.latency_distribution({p.label: [t for s in p.samples for t in s.itl_s] for p in good
                                    if any(s.itl_s for s in p.samples)} or {p.label: [p.samples[0].ttft_s] for p in good},
                                   f"{title}: inter-token latency", run_dir.path("latency.png"))
        plots.throughput_bars({p.label: p.summary.get("decode_tokens_per_s") or 0.0 for p in good},
                              "decode tokens/s", f"{title}: decode throughput", run_dir.path("throughput.png"))
        origin = min([s.start for p in good for s in p.samples] + [st for p in good for _, st, _ in p.phases])
        trace_of(good, origin).save(run_dir.path("trace.json"))
        doc_sections.append(("Files", "results.json, latency.png, throughput.png, trace.json "
                             "(open in chrome://tracing or https://ui.perfetto.dev)"))
    atomic_write_text(run_dir.path("summary.md"), markdown.summary_document(title, run_dir.env, doc_sections))
    run_dir.update_latest_link()
    return status
